"""Worker processes of the service: one reconstruction job each, and the start-up probe.

The socket loop (server.py) never imports torch. It starts ``python -m
avface.service.worker --job-dir DIR --msg-fd W --life-fd R`` as a new process in a new
session (its own process group, so that cancelling also stops the ffmpeg processes the
pipeline starts) and talks to it over two pipes:

- ``msg-fd``: the worker writes JSON lines: ``{"t": "progress", "stage", "fraction",
  "message"}`` as the job goes on, then one final ``{"t": "done", "meta"}`` or
  ``{"t": "error", "code", "message", "detail", "retry"}``. A worker that exits without a
  final line has died (killed, out of memory, crashed).
- ``life-fd``: the worker only reads it. It reaches end-of-file when the server dies, and
  the worker then kills its own process group, so that a killed server leaves no orphan
  writing into a job folder that the restarted server runs again.

Test hook: when the environment variable ``AVFACE_PIPELINE`` names a module, the worker and
the probe use that module's ``reconstruct``, ``ReconstructOptions``, ``available_models``
and (if present) ``validate`` instead of ``avface.pipeline`` and ``avface.result``. Only the
tests set it, to run slow or misbehaving jobs on purpose.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from avface.core.jsonutil import json_safe
from avface.service import protocol as P
from avface.service import store as S

log = logging.getLogger(__name__)

PIPELINE_ENV = "AVFACE_PIPELINE"
#: Seconds between two progress lines of the same stage (stage starts and ends always go).
PROGRESS_INTERVAL_S = 0.1
#: Seconds between SIGTERM and SIGKILL when a worker is cancelled.
TERM_GRACE_S = 1.0


# ---------------------------------------------------------------------------------------
# Server side: a handle on one worker process
# ---------------------------------------------------------------------------------------
class WorkerProcess:
    """A running worker, seen from the socket loop. Never blocks.

    ``WorkerProcess(job_id, job_dir, ...)`` starts a worker on that job. ``WorkerProcess.spare(log_path)``
    starts a *spare*: a worker that imports the pipeline (torch, MediaPipe: seconds of a job's
    start) and then waits, on a third pipe, for the job that :meth:`assign` gives it, so that a
    job submitted to an idle server starts on its first frame at once."""

    def __init__(self, job_id: str | None, job_dir: Path | None, *, max_duration_s: float | None = None,
                 device: str | None = None, flame_dir: str | None = None, threads: int = 0,
                 spare_log: Path | None = None):
        self.job_id = job_id
        msg_r, msg_w = os.pipe()
        life_r, life_w = os.pipe()
        cmd = [sys.executable, "-m", "avface.service.worker", "--msg-fd", str(msg_w), "--life-fd", str(life_r)]
        child_fds = [msg_w, life_r]
        self._job_w = None
        if spare_log is not None:
            job_r, self._job_w = os.pipe()
            cmd += ["--spare", "--job-fd", str(job_r)]
            child_fds.append(job_r)
            log_path, banner = spare_log, "spare worker started"
        else:
            cmd += ["--job-dir", str(job_dir), *_job_args(max_duration_s, device, flame_dir, threads)]
            log_path, banner = job_dir / S.LOG_FILE, "worker started"
        try:
            with open(log_path, "ab") as logf:
                logf.write(f"--- {banner} {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
                logf.flush()
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                             pass_fds=tuple(child_fds), start_new_session=True)
        except BaseException:
            for fd in (msg_r, life_w, self._job_w, *child_fds):
                if fd is not None:
                    os.close(fd)
            raise
        for fd in child_fds:
            os.close(fd)
        os.set_blocking(msg_r, False)
        self.fd = msg_r
        self._life_w = life_w
        self._buf = b""
        #: The worker closed its end (it exited); the socket loop stops polling ``fd``.
        self.eof = False
        self.final: dict | None = None
        self.kill_deadline: float | None = None
        self.cancelled_at: float | None = None
        #: When the worker last wrote a line (progress included): the hang watchdog's clock.
        self.last_activity = time.monotonic()
        #: The server stopped this worker because it hung (no line for the hang timeout).
        self.hung = False

    @classmethod
    def spare(cls, log_path: Path) -> "WorkerProcess":
        """A spare worker (see the class), its output in ``log_path`` until it has a job."""
        return cls(None, None, spare_log=log_path)

    def assign(self, job_id: str, job_dir: Path, *, max_duration_s: float | None, device: str | None,
               flame_dir: str | None, threads: int = 0) -> bool:
        """Give a spare its job; False when it cannot take it (it has exited)."""
        if self._job_w is None or self.proc.poll() is not None:
            return False
        line = json.dumps({"job_dir": str(job_dir), "args": _job_args(max_duration_s, device, flame_dir, threads)})
        try:
            os.write(self._job_w, line.encode() + b"\n")  # one short line: never blocks on an empty pipe
        except OSError:
            return False
        finally:
            os.close(self._job_w)
            self._job_w = None
        self.job_id = job_id
        self.last_activity = time.monotonic()
        return True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read(self) -> list[dict]:
        """Every complete line the worker has written so far."""
        out = []
        while self.fd is not None:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                self.eof = True
                break
            self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        if lines:
            self.last_activity = time.monotonic()
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                log.warning("worker %s wrote a line that is not JSON: %r", self.job_id, line[:200])
                continue
            if msg.get("t") in ("done", "error"):
                self.final = msg
            out.append(msg)
        return out

    def poll(self) -> int | None:
        return self.proc.poll()

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def terminate(self) -> None:
        """SIGTERM to the worker's process group now, SIGKILL at ``kill_deadline``."""
        if self.cancelled_at is None:
            self.cancelled_at = time.monotonic()
            self.kill_deadline = self.cancelled_at + TERM_GRACE_S
            self._signal_group(signal.SIGTERM)

    def kill(self) -> None:
        self._signal_group(signal.SIGKILL)

    def close(self) -> None:
        """After the worker exited: stop what it left behind (ffmpeg) and free the pipes."""
        self.kill()
        for fd in (self.fd, self._life_w, self._job_w):
            if fd is not None:
                os.close(fd)
        self.fd = self._life_w = self._job_w = None

    def rss_bytes(self) -> int:
        return proc_rss_bytes(self.proc.pid)


def _job_args(max_duration_s: float | None, device: str | None, flame_dir: str | None, threads: int) -> list[str]:
    """The worker's command-line options of one job."""
    args = []
    if max_duration_s:
        args += ["--max-duration-s", str(max_duration_s)]
    if device:
        args += ["--device", device]
    if flame_dir:
        args += ["--flame-dir", flame_dir]
    if threads:
        args += ["--threads", str(threads)]
    return args


def proc_rss_bytes(pid: int | str = "self", field: str = "VmRSS") -> int:
    """Resident (``VmRSS``) or peak resident (``VmHWM``) memory of a process, 0 when unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode}"


def start_probe(flame_dir: str | None, device: str | None, log_path: Path) -> subprocess.Popen:
    """``python -m avface.service.worker --probe``: prints one JSON line on stdout."""
    cmd = [sys.executable, "-m", "avface.service.worker", "--probe"]
    if flame_dir:
        cmd += ["--flame-dir", flame_dir]
    if device:
        cmd += ["--device", device]
    with open(log_path, "ab") as logf:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=logf,
                                start_new_session=True)


# ---------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------
def _pipeline_modules():
    """(pipeline module, validate function) honouring the ``AVFACE_PIPELINE`` test hook."""
    name = os.environ.get(PIPELINE_ENV)
    if name:
        mod = importlib.import_module(name)
        validate = getattr(mod, "validate", None)
        if validate is None:
            validate = importlib.import_module("avface.result").validate
        return mod, validate
    pipeline = importlib.import_module("avface.pipeline")
    return pipeline, importlib.import_module("avface.result").validate


def _resolve_device(device: str | None) -> str:
    if device and device != "auto":
        return device
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def probe(flame_dir: str | None, device: str | None) -> dict:
    """What hello reports: the pipeline's models, the device, versions."""
    info: dict = {"pipeline": os.environ.get(PIPELINE_ENV) or "avface.pipeline"}
    try:
        mod, _ = _pipeline_modules()
        info["models"] = mod.available_models(flame_dir)
    except Exception as e:  # a missing or broken pipeline still lets the server answer
        info["models"] = {}
        info["pipeline_error"] = f"{type(e).__name__}: {e}"
    torch = sys.modules.get("torch")
    info["torch"] = getattr(torch, "__version__", None)
    info["device"] = _resolve_device(device)
    if info["device"] == "cuda" and torch is not None:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class _Messenger:
    def __init__(self, fd: int):
        os.set_inheritable(fd, False)  # not for ffmpeg and other children of the pipeline
        self._f = os.fdopen(fd, "wb", buffering=0)
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}

    def send(self, msg: dict) -> None:
        data = json.dumps(msg, allow_nan=False, default=str).encode() + b"\n"
        with self._lock:
            self._f.write(data)

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        fraction = min(1.0, max(0.0, float(fraction))) if fraction == fraction else 0.0
        last = self._last.get(stage)
        if last is not None and fraction < 1.0 and now - last < PROGRESS_INTERVAL_S:
            return
        self._last[stage] = now
        self.send({"t": "progress", "stage": str(stage), "fraction": fraction, "message": str(message)})


def _watch_parent(fd: int) -> None:
    """Block on the life pipe; end-of-file means the server is gone."""
    def run() -> None:
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            pass
        os.killpg(os.getpgid(0), signal.SIGKILL)

    os.set_inheritable(fd, False)
    threading.Thread(target=run, name="life-pipe", daemon=True).start()


def probe_duration_s(path: Path, frame_start: int | None = None, frame_end: int | None = None) -> float | None:
    """Seconds of video the job will read; None when the file cannot be probed (the
    pipeline then reports the media error itself, with its own context)."""
    from avface import media
    from avface.errors import MediaError

    try:
        info = media.probe(path)
    except MediaError:
        return None
    start, end = info.frame_range(frame_start, frame_end)  # InputError for a range outside the clip
    return (end - start) / info.fps


def write_manifest(result_dir: Path, *, include_detail: bool = True) -> dict:
    """manifest.json: every file under result/ (relative POSIX path, size, sha256);
    ``include_detail=False`` leaves out the detail maps (a head whose maps never came)."""
    files = []
    for p in sorted(result_dir.rglob("*")):
        if not include_detail and p.relative_to(result_dir).parts[0] == "detail":
            continue
        if p.is_file() and p.name != S.MANIFEST_FILE and not p.name.endswith(".tmp") and ".partial." not in p.name:
            files.append({"path": p.relative_to(result_dir).as_posix(), "size": p.stat().st_size, "sha256": P.file_sha256(p)})
    manifest = {"files": files}
    tmp = result_dir / (S.MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, result_dir / S.MANIFEST_FILE)
    return manifest


class _JobFailure(Exception):
    def __init__(self, code: str, message: str, detail: str | None = None):
        super().__init__(message)
        self.code, self.message, self.detail = code, message, detail


def run_job(job_dir: Path, messenger: _Messenger, *, max_duration_s: float | None, device: str | None,
            flame_dir: str | None, threads: int = 0) -> dict:
    """Run one job; returns the result's meta. Raises on failure."""
    job = S.Job.from_json(json.loads((job_dir / S.JOB_FILE).read_text()))
    inputs = {}
    for part, ref in (("video", job.video), ("audio", job.audio)):
        if ref is None:
            continue
        path = Path(ref.path) if ref.mode == "path" else job_dir / ref.path
        if ref.mode == "upload":
            size = path.stat().st_size if path.exists() else -1
            if size != ref.size:
                raise _JobFailure("upload_mismatch", f"uploaded {part} has {size} bytes, {ref.size} were announced")
            if ref.sha256 and P.file_sha256(path) != ref.sha256:
                raise _JobFailure("upload_mismatch", f"uploaded {part} does not match its sha256 {ref.sha256}")
        inputs[part] = path
    opts = dict(job.options)
    if max_duration_s:
        duration = probe_duration_s(inputs["video"], opts.get("frame_start"), opts.get("frame_end"))
        if duration is not None and duration > max_duration_s:
            raise _JobFailure("too_long", f"the video is {duration:.1f} s long; this server takes at most {max_duration_s:g} s")

    mod, validate = _pipeline_modules()
    if opts.get("flame_dir") is None:
        opts["flame_dir"] = flame_dir
    if opts.get("device") in (None, "auto"):
        opts["device"] = _resolve_device(device)
    if not opts.get("threads"):
        opts["threads"] = threads
    if "audio" in inputs:
        opts["audio"] = str(inputs["audio"])
    if job.transcript:
        opts["transcript"] = str(job_dir / job.transcript)
    # every option reaches the pipeline; an option it does not know is an error, never dropped
    options = mod.ReconstructOptions.from_dict({k: v for k, v in opts.items() if v is not None})
    result_dir = job_dir / S.RESULT_DIR
    result_dir.mkdir(exist_ok=True)
    log.info("job %s: reconstruct %s with %s", job.job_id, inputs["video"], options)

    def head_ready(path: Path) -> None:  # the head can be fetched while the detail is made
        meta = validate(Path(path))
        write_manifest(result_dir)
        messenger.send({"t": "head", "meta": json_safe(meta if isinstance(meta, dict) else {})})

    result = mod.reconstruct(inputs["video"], result_dir, options, progress=messenger.progress, on_head=head_ready)
    meta = validate(Path(result))
    write_manifest(result_dir)
    return meta if isinstance(meta, dict) else {}


def _wait_for_job(fd: int) -> dict | None:
    """A spare worker: import what a job needs, then block until the server hands over a job
    (None when it closes the pipe instead). The worker's output then goes to the job's log."""
    t0 = time.perf_counter()
    mod, _ = _pipeline_modules()
    warm_up = getattr(mod, "warm_up", None)
    if warm_up is not None:
        warm_up()
    log.info("spare worker ready in %.1f s", time.perf_counter() - t0)
    os.set_inheritable(fd, False)
    data = b""
    with os.fdopen(fd, "rb", buffering=0) as f:
        while not data.endswith(b"\n"):
            chunk = f.read(4096)
            if not chunk:
                return None
            data += chunk
    job = json.loads(data)
    logf = os.open(Path(job["job_dir"]) / S.LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(logf, 1)
    os.dup2(logf, 2)
    os.close(logf)
    banner = f"--- worker started {time.strftime('%Y-%m-%d %H:%M:%S')} (process {os.getpid()}, a spare, ready before the job came) ---"
    os.write(2, banner.encode() + b"\n")
    return job


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m avface.service.worker", description=__doc__.split("\n")[0])
    ap.add_argument("--job-dir", type=Path)
    ap.add_argument("--msg-fd", type=int)
    ap.add_argument("--life-fd", type=int)
    ap.add_argument("--max-duration-s", type=float)
    ap.add_argument("--device")
    ap.add_argument("--flame-dir")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the job's stages (0: one per core)")
    ap.add_argument("--probe", action="store_true", help="print hello's model and device report as one JSON line")
    ap.add_argument("--spare", action="store_true",
                    help="import the pipeline, then wait for a job on --job-fd (one JSON line: job_dir, args)")
    ap.add_argument("--job-fd", type=int)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.probe:
        sys.stdout.write(json.dumps(probe(args.flame_dir, args.device), default=str) + "\n")
        sys.stdout.flush()
        return 0
    one_job = args.job_dir is not None and not args.spare
    spare = args.spare and args.job_fd is not None and args.job_dir is None
    if args.msg_fd is None or args.life_fd is None or not (one_job or spare):
        ap.error("--msg-fd, --life-fd and either --job-dir or --spare with --job-fd are required")
    _watch_parent(args.life_fd)
    if spare:
        job = _wait_for_job(args.job_fd)
        if job is None:  # the server no longer needs a spare
            return 0
        args = ap.parse_args(["--msg-fd", str(args.msg_fd), "--life-fd", str(args.life_fd), "--job-dir", job["job_dir"],
                              *job["args"]])
    messenger = _Messenger(args.msg_fd)
    from avface.errors import AVFaceError

    try:
        meta = run_job(args.job_dir, messenger, max_duration_s=args.max_duration_s, device=args.device,
                       flame_dir=args.flame_dir, threads=args.threads)
    except _JobFailure as e:
        messenger.send({"t": "error", "code": e.code, "message": e.message, "detail": e.detail, "retry": False})
        return 1
    except AVFaceError as e:
        log.error("job failed: %s (%s)", e, e.code)
        messenger.send({"t": "error", "code": e.code, "message": e.message, "detail": e.detail, "retry": False})
        return 1
    except Exception as e:  # an unexpected error may be transient (memory, a device): retried once
        log.exception("job failed with an unexpected error")
        messenger.send({"t": "error", "code": "internal", "message": f"{type(e).__name__}: {e}",
                        "detail": traceback.format_exc()[-4000:], "retry": True})
        return 1
    messenger.send({"t": "done", "meta": json_safe(meta)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
