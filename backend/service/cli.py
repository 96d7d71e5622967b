"""Command-line front of the service: serve, submit, jobs, fetch, cancel, keys, bench-service.

``avface.cli`` calls :func:`register`; ``python -m avface.service CMD ...`` is ``avface CMD ...``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from avface.service import protocol as P

log = logging.getLogger(__name__)

SERVER_ENV = "AVFACE_SERVER"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "avface" / "service"


def _exit_status(code: str) -> int:
    """Exit status for an error code: the domain errors' own statuses, 1 otherwise."""
    from avface import errors

    for cls in (errors.AVFaceError, *errors.AVFaceError.__subclasses__()):
        if cls.code == code:
            return cls.exit_status
    return 1


def _fail(prog: str, code: str, message: str) -> int:
    print(f"avface {prog}: {code}: {message}", file=sys.stderr)
    return _exit_status(code)


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=os.environ.get(SERVER_ENV, P.DEFAULT_ADDRESS),
                   help=f"service address (default ${SERVER_ENV} or {P.DEFAULT_ADDRESS})")
    p.add_argument("--server-key", help="the server's public key (server.key from `avface keys`), for a CurveZMQ server")
    p.add_argument("--client-key", help="this client's client.key_secret, when the server only admits known clients")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer before retrying (default 10)")
    p.add_argument("--retries", type=int, default=3, help="reconnects before giving up (default 3)")


def _client(args):
    from avface.service.client import Client

    return Client(args.server, timeout_s=args.timeout, retries=args.retries, server_key=args.server_key,
                  client_key=args.client_key)


def register(subparsers) -> None:
    """Add the service's subcommands to ``avface``'s argparse subparsers."""
    _register_serve(subparsers)
    _register_clients(subparsers)


def _register_serve(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the reconstruction service (ZeroMQ)",
                              description="Run the reconstruction service. Loopback only unless CurveZMQ keys are given.")
    p.add_argument("--bind", default=P.DEFAULT_ADDRESS, help=f"ZeroMQ endpoint (default {P.DEFAULT_ADDRESS}; "
                   "tcp://127.0.0.1:* picks a free port)")
    p.add_argument("--workers", type=int, default=1, help="jobs run at once, each in its own process (default 1)")
    p.add_argument("--data-dir", type=Path, default=None, help=f"job folders (default {default_data_dir()})")
    p.add_argument("--root", type=Path, action="append", default=[],
                   help="accept client paths under this folder (repeatable; default for a loopback bind: home and temp dir)")
    p.add_argument("--curve-secret", type=Path, help="the server's server.key_secret (from `avface keys`)")
    p.add_argument("--curve-clients", type=Path, help="folder of client public keys allowed to connect")
    p.add_argument("--device", default="auto", help="torch device of the jobs: auto, cpu, cuda (default auto)")
    p.add_argument("--flame-dir", help="folder with the FLAME files on this machine")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads each job's stages run with (default 0: this machine's cores shared evenly "
                   "between the --workers, at least 1). OpenMP's threads sleep while they wait "
                   "(OMP_WAIT_POLICY=PASSIVE unless the environment sets it), so a busy machine slows a job "
                   "in proportion; the threads used are in each result's meta.threads")
    p.add_argument("--max-frame-bytes", type=int, default=P.DEFAULT_MAX_FRAME_BYTES)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--max-upload-bytes", type=int, default=4 << 30)
    p.add_argument("--max-chunks", type=int, default=16_384)
    p.add_argument("--max-duration-s", type=float, default=900.0,
                   help="longest video accepted, in seconds; longer ones are refused at submit (too_long)")
    p.add_argument("--hang-timeout-s", type=float, default=1800.0,
                   help="stop a job whose worker reports no progress for this long (job_timeout; default 1800)")
    p.add_argument("--ready-file", type=Path, help="write the bound endpoint here (JSON) once listening")
    p.add_argument("--no-spare-worker", dest="spare_worker", action="store_false",
                   help="start each job's worker when the job starts; by default one worker waits ahead with the "
                   "pipeline imported, so that a job starts at once (it costs an idle process's memory)")
    p.add_argument("--idle-exit-s", type=float, default=0.0,
                   help="exit after this many seconds with no job and no request (default 0: never); what a "
                   "backend started by a desktop application uses, so that it ends even if the application crashed")
    p.set_defaults(func=cmd_serve)


def _register_clients(subparsers) -> None:
    p = subparsers.add_parser("submit", help="submit a video to a service, show progress, write the result")
    p.add_argument("video", type=Path)
    p.add_argument("--audio", type=Path, help="a separate audio file (default: the video's own sound)")
    p.add_argument("--transcript", type=Path, help="a text file with what is said")
    p.add_argument("-o", "--out", type=Path, help="result folder (required unless --detach)")
    p.add_argument("--detach", action="store_true", help="print the job id once submitted and return")
    p.add_argument("--upload", choices=["auto", "yes", "no"], default="auto",
                   help="send the files' bytes (yes) or their paths (no); auto sends paths to a loopback server "
                   "and falls back to bytes when it refuses them")
    p.add_argument("--model", help="face model: default or flame")
    p.add_argument("--device", help="torch device for this job")
    p.add_argument("--frame-start", type=int)
    p.add_argument("--frame-end", type=int)
    p.add_argument("--preview", action="store_true", help="also render preview.mp4")
    p.add_argument("--no-vertices", action="store_true", help="leave the per-frame vertices out of result.npz")
    _add_client_args(p)
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("jobs", help="list a service's jobs")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    _add_client_args(p)
    p.set_defaults(func=cmd_jobs)

    p = subparsers.add_parser("fetch", help="download a finished job's result")
    p.add_argument("job_id")
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--wait", action="store_true", help="wait for the job to finish, showing progress")
    p.add_argument("--head", action="store_true", help="the head as soon as it is ready, before its detail maps "
                   "(or the head a job kept when its detail was cancelled or failed)")
    _add_client_args(p)
    p.set_defaults(func=cmd_fetch)

    p = subparsers.add_parser("cancel", help="cancel a queued or running job")
    p.add_argument("job_id")
    _add_client_args(p)
    p.set_defaults(func=cmd_cancel)

    p = subparsers.add_parser("keys", help="make CurveZMQ key pairs for a networked service")
    p.add_argument("-o", "--out", type=Path, default=Path("avface-keys"), help="folder for the keys (default ./avface-keys)")
    p.add_argument("--force", action="store_true", help="overwrite existing keys")
    p.set_defaults(func=cmd_keys)

    from avface.service import loadtest

    loadtest.register(subparsers)


# -- handlers -------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from avface.errors import AVFaceError
    from avface.service.server import ServerConfig, serve

    # A service logs what it does (jobs, workers, restarts) at INFO whatever the CLI's level.
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("avface.service").setLevel(logging.DEBUG if getattr(args, "verbose", 0) >= 2 else logging.INFO)
    config = ServerConfig(
        data_dir=args.data_dir or default_data_dir(), bind=args.bind, workers=args.workers,
        roots=tuple(args.root), curve_secret_file=args.curve_secret, curve_clients_dir=args.curve_clients,
        device=args.device, flame_dir=args.flame_dir, threads=args.threads, max_frame_bytes=args.max_frame_bytes,
        max_queue=args.max_queue, max_upload_bytes=args.max_upload_bytes, max_chunks=args.max_chunks,
        max_duration_s=args.max_duration_s, hang_timeout_s=args.hang_timeout_s, ready_file=args.ready_file,
        idle_exit_s=args.idle_exit_s, spare_worker=args.spare_worker,
    )
    try:
        return serve(config)
    except AVFaceError as e:
        return _fail("serve", e.code, e.message)


def _options(args) -> dict:
    opts = {"model": args.model, "device": args.device, "frame_start": args.frame_start, "frame_end": args.frame_end}
    if args.preview:
        opts["preview"] = True
    if args.no_vertices:
        opts["write_vertices"] = False
    return {k: v for k, v in opts.items() if v is not None}


class _Bars:
    """tqdm bars on stderr: one for the upload, one per stage, one for the download."""

    def __init__(self):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = None
        self.key = None
        self.finished: set[str] = set()

    def _bar(self, key, desc: str, total: float, unit: str = "%", scale: bool = False):
        if self.key != key:
            self.close()
            self.key = key
            self.bar = self._tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, file=sys.stderr, leave=True,
                                  bar_format=None if scale else "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}]{postfix}")
        return self.bar

    def update(self, run, events) -> None:
        # A fast step can start and finish a transfer, so byte bars follow the byte counts,
        # not the phase.
        if run.upload_total and "upload" not in self.finished:
            self._bytes("upload", "upload", run.upload_bytes, run.upload_total)
        for ev in events:
            if ev.get("kind") == "progress":
                bar = self._bar(("stage", ev.get("attempt"), ev["stage"]), ev["stage"], 100)
                bar.n = round(100 * ev["fraction"], 1)
                bar.set_postfix_str(str(ev.get("message", ""))[:40], refresh=False)
                bar.refresh()
            elif ev.get("kind") == "state" and ev.get("state") == P.QUEUED and ev.get("message", "").startswith("retrying"):
                self.close()
                print(f"avface: {ev['message']}", file=sys.stderr)
        if run.fetch_total and "fetch" not in self.finished:
            self._bytes("fetch", "download", run.fetch_bytes, run.fetch_total)

    def _bytes(self, key: str, desc: str, n: int, total: int) -> None:
        bar = self._bar(key, desc, total, "B", True)
        bar.n = n
        bar.refresh()
        if n >= total:
            self.finished.add(key)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = self.key = None


def _drive(client, run, prog: str) -> int:
    bars = _Bars()
    try:
        client.run(run, on_step=bars.update)
    except KeyboardInterrupt:
        bars.close()
        print(f"avface {prog}: interrupted; the job {run.job_id or ''} goes on on the server "
              f"(avface cancel {run.job_id} to stop it)".replace("  ", " "), file=sys.stderr)
        return 130
    finally:
        bars.close()
    if run.error is not None:
        if run.error.code == "no_answer" and run.job_id:
            return _fail(prog, run.error.code, f"{run.error.message}; job {run.job_id} is kept on the server, "
                         f"fetch it later with `avface fetch {run.job_id}`")
        return _fail(prog, run.error.code, run.error.message)
    return 0


def cmd_submit(args) -> int:
    from avface.service.client import JobRun, ServiceError

    if not args.detach and args.out is None:
        return _fail("submit", "bad_input", "give -o DIR for the result, or --detach")
    for what, path in (("video", args.video), ("audio", args.audio), ("transcript", args.transcript)):
        if path is not None and not path.is_file():
            return _fail("submit", "bad_input", f"{what} {path} is not a file")
    transcript = args.transcript.read_text(encoding="utf-8") if args.transcript else None
    upload = {"auto": "auto", "yes": True, "no": False}[args.upload]
    try:
        with _client(args) as client:
            run = JobRun(client, video=args.video, audio=args.audio, transcript=transcript, options=_options(args),
                         out_dir=args.out, upload=upload, detach=args.detach)
            status = _drive(client, run, "submit")
    except ServiceError as e:
        return _fail("submit", e.code, e.message)
    if status == 0:
        print(run.job_id if args.detach else run.result_path)
    return status


def cmd_fetch(args) -> int:
    from avface.service.client import JobRun, ServiceError

    try:
        with _client(args) as client:
            run = JobRun(client, job_id=args.job_id, out_dir=args.out, wait=args.wait or args.head, head=args.head)
            status = _drive(client, run, "fetch")
    except ServiceError as e:
        return _fail("fetch", e.code, e.message)
    if status == 0:
        print(run.result_path)
    return status


def cmd_jobs(args) -> int:
    from avface.service.client import ServiceError

    try:
        with _client(args) as client:
            jobs = client.jobs()
    except ServiceError as e:
        return _fail("jobs", e.code, e.message)
    if args.json:
        print(json.dumps(jobs, indent=1))
        return 0
    print(f"{'JOB':32}  {'STATE':9}  {'PROGRESS':22}  {'CREATED':19}  VIDEO")
    for j in jobs:
        prog = f"{j['stage']} {100 * j['fraction']:.0f}%" if j["state"] == P.RUNNING and j["stage"] else ""
        if j.get("error"):
            prog = j["error"]["code"]
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["created"]))
        print(f"{j['job_id']:32}  {j['state']:9}  {prog[:22]:22}  {created}  {j['video']['name']}")
    return 0


def cmd_cancel(args) -> int:
    from avface.service.client import ServiceError

    try:
        with _client(args) as client:
            reply = client.cancel(args.job_id)
    except ServiceError as e:
        return _fail("cancel", e.code, e.message)
    if not reply.get("accepted"):
        print(f"job {args.job_id} had already ended ({reply['state']})")
    else:
        print(f"job {args.job_id}: cancelled" if reply["state"] == P.CANCELLED else f"job {args.job_id}: cancelling")
    return 0


def make_keys(out: Path, *, force: bool = False) -> dict[str, Path]:
    """server.key/.key_secret and client.key/.key_secret in ``out`` (secret files mode 0600)."""
    import zmq.auth

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("server", "client"):
        if (out / f"{name}.key_secret").exists() and not force:
            raise FileExistsError(f"{out / (name + '.key_secret')} exists; pass --force to replace it")
        public, secret = zmq.auth.create_certificates(str(out), name)
        os.chmod(secret, 0o600)
        paths[name] = Path(public)
        paths[name + "_secret"] = Path(secret)
    return paths


def cmd_keys(args) -> int:
    try:
        paths = make_keys(args.out, force=args.force)
    except (OSError, FileExistsError) as e:
        return _fail("keys", "output", str(e))
    print(f"server: avface serve --bind tcp://0.0.0.0:5555 --curve-secret {paths['server_secret']}"
          f" [--curve-clients DIR-with-{paths['client'].name}]")
    print(f"client: avface submit ... --server tcp://HOST:5555 --server-key {paths['server']}"
          f" --client-key {paths['client_secret']}")
    return 0
