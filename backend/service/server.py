"""The reconstruction service: a ROUTER socket in an event loop that never runs torch.

One thread polls the socket, the workers' message pipes and the clock. Requests are
answered at once from memory or from the job folders; reconstruction runs in worker
processes (worker.py), at most ``workers`` at a time, so hello and ping stay fast whatever
the jobs do. Jobs persist in the data dir (store.py): a restarted server resumes queued
jobs, runs interrupted ones again (once), and serves finished results.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq

import avface
from avface.config import NAMED_CHECKPOINTS, PATH_OPTIONS, ReconstructOptions
from avface.errors import InputError
from avface.service import protocol as P
from avface.service import store as S
from avface.service.worker import WorkerProcess, describe_exit, probe_duration_s, proc_rss_bytes, start_probe

log = logging.getLogger(__name__)

#: Longest wait of the event loop; it also bounds how late a worker's exit is noticed.
TICK_S = 0.1
MEMORY_SAMPLE_S = 0.25
#: An upload with no chunk for this long fails (its client is gone).
UPLOAD_IDLE_S = 3600.0
#: A frame this large makes libzmq drop the connection before the loop sees it.
HARD_FRAME_CAP_BYTES = P.HARD_FRAME_CAP_BYTES
MAX_TRANSCRIPT_CHARS = 256_000
LIST_JOBS_MAX = 500



@dataclass(frozen=True)
class ServerConfig:
    """``avface serve``'s settings; each limit is answered with its error code."""

    data_dir: Path
    """Job folders live in DATA_DIR/jobs; one server per data dir."""
    bind: str = P.DEFAULT_ADDRESS
    """ZeroMQ endpoint; ``tcp://127.0.0.1:*`` picks a free port (see ``ready_file``)."""
    workers: int = 1
    """Jobs that run at the same time, each in its own process."""
    roots: tuple[Path, ...] = ()
    """Client paths (video, audio, flame_dir) are accepted only under these folders."""
    curve_secret_file: Path | None = None
    """The server's CurveZMQ key (``avface keys`` writes ``server.key_secret``)."""
    curve_clients_dir: Path | None = None
    """Folder of client public keys allowed to connect; any client with the server key when unset."""
    device: str = "auto"
    """Default torch device of the jobs."""
    flame_dir: str | None = None
    """Where the FLAME files are, on this machine."""
    max_frame_bytes: int = P.DEFAULT_MAX_FRAME_BYTES
    """Largest binary frame (upload chunk) accepted: ``too_large``."""
    max_queue: int = 64
    """Most jobs waiting (queued or uploading): ``queue_full``."""
    max_upload_bytes: int = 4 << 30
    """Largest declared upload: ``too_large``."""
    max_chunks: int = 16_384
    """Most chunks per uploaded file: ``too_many_chunks``."""
    max_duration_s: float = 900.0
    """Longest input video, in seconds: ``too_long``, refused at submit (a path) or when the
    upload completes, before any worker starts on it."""
    hang_timeout_s: float = 1800.0
    """A worker that reports nothing (no progress) for this long is stopped: ``job_timeout``."""
    ready_file: Path | None = None
    """Written (JSON: endpoint, pid, public_key) once the socket is bound."""


class RequestError(Exception):
    def __init__(self, code: str, message: str, **extra):
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra


def check_config(config: ServerConfig) -> None:
    """Refuse settings that would be unsafe; raises InputError with what to do."""
    if not P.is_loopback(config.bind) and config.curve_secret_file is None:
        raise InputError(
            f"refusing to bind {config.bind} without CurveZMQ keys: anyone on the network could submit jobs "
            "and read results. Run `avface keys -o DIR` and start with --curve-secret DIR/server.key_secret, "
            "or bind a loopback address such as tcp://127.0.0.1:5555"
        )
    if config.workers < 1:
        raise InputError(f"--workers must be at least 1, got {config.workers}")


def default_roots(bind: str) -> tuple[Path, ...]:
    """Without --root, a loopback server takes paths under the user's home and the temp dir
    (the local add-on sends the paths of the strips it reconstructs); a network server
    takes uploads only."""
    if not P.is_loopback(bind):
        return ()
    import tempfile

    return (Path.home(), Path(tempfile.gettempdir()))


@dataclass
class _Stats:
    started: float = field(default_factory=time.time)
    requests: int = 0
    errors: dict = field(default_factory=dict)
    peak_total_rss: int = 0
    peak_worker_rss: int = 0
    peak_workers: int = 0


class Server:
    def __init__(self, config: ServerConfig):
        check_config(config)
        self.config = config
        self.roots = tuple(Path(os.path.realpath(r)) for r in (config.roots or default_roots(config.bind)))
        self.store = S.JobStore(config.data_dir)
        try:
            self.store.lock()
        except S.StoreError as e:
            raise InputError(e.message) from e
        self.queue: deque[str] = deque()
        self.workers: dict[str, WorkerProcess] = {}
        self.subs: dict[str, dict[bytes, tuple[list, str]]] = {}  # job_id -> identity -> (routing, watch msg_id)
        self.submits: dict[str, str] = {}  # submit msg_id -> job_id (a retried submit is the same job)
        self.deleted: set[str] = set()
        self.upload_seen: dict[str, float] = {}
        self.stats = _Stats()
        self.probe_info: dict = {}
        self.probe_state = "pending"
        self._stop = False
        self._last_sample = 0.0
        self._auth = None
        self.ctx = zmq.Context()
        self.socket = self._make_socket()
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._recover()
        self.probe = start_probe(config.flame_dir, config.device, self.store.root / "probe.log")
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        if config.ready_file:
            tmp = Path(str(config.ready_file) + ".tmp")
            tmp.write_bytes(P.dumps({"endpoint": self.endpoint, "pid": os.getpid(), "public_key": self.public_key}))
            os.replace(tmp, config.ready_file)
        log.info("avface service %s listening on %s (%d workers, data dir %s, auth %s)", avface.__version__,
                 self.endpoint, config.workers, self.store.root, "curve" if self.public_key else "none")

    # -- set-up ---------------------------------------------------------------------------
    def _make_socket(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone client raises instead of silently eating events
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max(HARD_FRAME_CAP_BYTES, 4 * self.config.max_frame_bytes))
        self.public_key = None
        if self.config.curve_secret_file:
            from zmq.auth import load_certificate

            public, secret = load_certificate(str(self.config.curve_secret_file))
            if not secret:
                raise InputError(f"{self.config.curve_secret_file} holds no secret key; pass the .key_secret file")
            if self.config.curve_clients_dir:
                from zmq.auth.thread import ThreadAuthenticator

                self._auth = ThreadAuthenticator(self.ctx)
                self._auth.start()
                self._auth.configure_curve(domain="*", location=str(self.config.curve_clients_dir))
            sock.curve_secretkey = secret
            sock.curve_publickey = public
            sock.curve_server = True
            self.public_key = public.decode()
        try:
            sock.bind(self.config.bind)
        except zmq.ZMQError as e:
            sock.close()
            raise InputError(f"cannot bind {self.config.bind}: {e}") from e
        return sock

    def _recover(self) -> None:
        """Resume what the last server left: queued jobs wait again, interrupted ones run
        again unless this was their last attempt."""
        for job in sorted(self.store.load_all(), key=lambda j: (j.queued_at or j.created)):
            if job.submit_msg_id:
                self.submits[job.submit_msg_id] = job.job_id
            if job.state == P.RUNNING:
                _kill_stray_worker(job)
                job.worker_pid = None
                job.history.append({"attempt": job.attempts, "outcome": "interrupted",
                                    "reason": "the server stopped while the job ran"})
                if job.cancel_requested:
                    self._finish(job, P.CANCELLED, {"code": "cancelled", "message": "cancelled", "detail": None})
                    continue
                if job.attempts >= S.MAX_ATTEMPTS:
                    self._finish(job, P.FAILED, self._failure("worker_died", job))
                    continue
                self._set_state(job, P.QUEUED, message="requeued after a server restart")
            if job.state == P.QUEUED:
                self.queue.append(job.job_id)
            elif job.state == P.UPLOADING:
                self.upload_seen[job.job_id] = time.monotonic()
        if self.queue:
            log.info("resuming %d queued jobs", len(self.queue))

    # -- the loop -------------------------------------------------------------------------
    def stop(self, *_args) -> None:
        self._stop = True

    def run(self) -> None:
        try:
            while not self._stop:
                self.step(TICK_S)
        finally:
            self.shutdown()

    def step(self, timeout_s: float) -> None:
        events = dict(self.poller.poll(int(timeout_s * 1000)))
        if events.get(self.socket):
            # Drain what is there, bounded so that workers and timers get their turn.
            for _ in range(256):
                try:
                    frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._on_frames(frames)
        for job_id, worker in list(self.workers.items()):
            if not worker.eof and events.get(worker.fd):
                self._on_worker_lines(job_id, worker.read())
                if worker.eof:
                    self.poller.unregister(worker.fd)
        self._tick()

    def _tick(self) -> None:
        now = time.monotonic()
        for job_id, worker in list(self.workers.items()):
            if (not worker.hung and worker.cancelled_at is None
                    and now - worker.last_activity > self.config.hang_timeout_s):
                # alive but silent: a deadlock or a stuck device; stop it instead of waiting forever
                worker.hung = True
                log.warning("job %s: no progress for %.0f s; stopping worker %d", job_id,
                            now - worker.last_activity, worker.pid)
                worker.terminate()
            if worker.kill_deadline is not None and now >= worker.kill_deadline:
                worker.kill()
                worker.kill_deadline = None
            rc = worker.poll()
            if rc is not None:
                self._on_worker_exit(job_id, worker, rc)
        self._schedule()
        if self.probe is not None and self.probe.poll() is not None:
            self._on_probe()
        if now - self._last_sample >= MEMORY_SAMPLE_S:
            self._last_sample = now
            rss = [w.rss_bytes() for w in self.workers.values()]
            st = self.stats
            st.peak_total_rss = max(st.peak_total_rss, proc_rss_bytes() + sum(rss))
            st.peak_worker_rss = max([st.peak_worker_rss, *rss])
            for job_id, seen in list(self.upload_seen.items()):
                job = self.store.jobs.get(job_id)
                if job is None or job.state != P.UPLOADING:
                    self.upload_seen.pop(job_id, None)
                elif now - seen > UPLOAD_IDLE_S:
                    self.upload_seen.pop(job_id, None)
                    self._finish(job, P.FAILED, {"code": "upload_mismatch", "detail": None,
                                                 "message": f"upload incomplete: no chunk for {UPLOAD_IDLE_S:.0f} s"})

    def shutdown(self) -> None:
        """Stop the workers; their jobs go back to the queue without using up an attempt."""
        for job_id, worker in list(self.workers.items()):
            worker.terminate()
        deadline = time.monotonic() + 2.0
        for job_id, worker in list(self.workers.items()):
            try:
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.proc.wait()
            worker.close()
            job = self.store.jobs.get(job_id)
            if job is not None and job.state == P.RUNNING:
                job.attempts = max(0, job.attempts - 1)
                job.worker_pid = None
                job.state = P.QUEUED
                job.queued_at = job.queued_at or time.time()
                self.store.save(job)
        self.workers.clear()
        if self.probe is not None and self.probe.poll() is None:
            self.probe.kill()
            self.probe.wait()
        if self._auth is not None:
            self._auth.stop()
        self.socket.close(0)
        self.ctx.term()
        self.store.unlock()
        log.info("avface service stopped")

    # -- sending --------------------------------------------------------------------------
    def _send(self, msg: P.Message) -> int:
        """Non-blocking send: 0, or the errno why the message was dropped (EHOSTUNREACH: the
        client is gone; EAGAIN: its queue is full, it is not reading)."""
        try:
            self.socket.send_multipart(P.encode(msg), flags=zmq.NOBLOCK, copy=False)
            return 0
        except zmq.ZMQError as e:
            log.debug("dropping %s to a client: %s", msg.msg_type, e)
            return e.errno

    def _send_error(self, routing: list, code: str, message: str, *, parent_id=None, job_id=None,
                    request_type=None, **extra) -> None:
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
        self._send(P.error_reply(routing, code, message, parent_id=parent_id, job_id=job_id,
                                 request_type=request_type, extra=extra or None))

    def _broadcast(self, job: S.Job, event: dict) -> None:
        kind = event["kind"]
        for identity, (routing, watch_id) in list(self.subs.get(job.job_id, {}).items()):
            msg = P.build(kind, event, job_id=job.job_id, parent=watch_id)
            msg.routing = routing
            # A client that is slow keeps its subscription: it sees the gap in seq and asks
            # for the backlog. One that is gone loses it.
            if self._send(msg) == zmq.EHOSTUNREACH:
                self.subs[job.job_id].pop(identity, None)
        if job.state in P.FINAL_STATES:
            self.subs.pop(job.job_id, None)

    # -- requests -------------------------------------------------------------------------
    def _on_frames(self, frames: list) -> None:
        self.stats.requests += 1
        identity = frames[0].bytes
        try:
            msg = P.decode(frames[1:], max_frame_bytes=self.config.max_frame_bytes)
        except P.ProtocolError as e:
            try:
                extra_routing, _ = P.split_routing(frames[1:])
            except P.ProtocolError:
                extra_routing = []
            self._send_error([identity, *extra_routing], e.code, e.message, parent_id=e.msg_id, request_type=e.msg_type)
            return
        msg.routing = [identity, *msg.routing]
        handler = getattr(self, "_do_" + msg.msg_type, None) if msg.msg_type in P.REQUEST_TYPES else None
        if handler is None:
            self._send_error(msg.routing, "unknown_type", f"{msg.msg_type!r} is not a request type",
                             parent_id=msg.msg_id, request_type=msg.msg_type)
            return
        try:
            result = handler(msg)
        except (RequestError, S.StoreError) as e:
            self._send_error(msg.routing, e.code, e.message, parent_id=msg.msg_id, job_id=msg.job_id,
                             request_type=msg.msg_type, **getattr(e, "extra", {}))
            return
        except Exception as e:  # a bug must not take the service down
            log.exception("handling %s failed", msg.msg_type)
            self._send_error(msg.routing, "internal", f"{type(e).__name__}: {e}", parent_id=msg.msg_id,
                             request_type=msg.msg_type)
            return
        content, buffers = result if isinstance(result, tuple) else (result, ())
        self._send(P.reply(msg, content, buffers=buffers, job_id=content.get("job_id") or msg.job_id))

    def _job_of(self, msg: P.Message) -> S.Job:
        job_id = msg.content.get("job_id", msg.job_id)
        return self.store.get(job_id)

    def _do_ping(self, msg: P.Message) -> dict:
        return {"time": time.time(), "uptime_s": time.time() - self.stats.started}

    def _do_hello(self, msg: P.Message) -> dict:
        info = self.probe_info
        return {
            "server": "avface",
            "server_version": avface.__version__,
            "protocol_version": P.PROTOCOL_VERSION,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "zmq": zmq.zmq_version(),
            "pyzmq": zmq.__version__,
            "probe": self.probe_state,
            "device": info.get("device"),
            "gpu": info.get("gpu"),
            "torch": info.get("torch"),
            "models": info.get("models"),
            "pipeline": info.get("pipeline"),
            "pipeline_error": info.get("pipeline_error"),
            "workers": self.config.workers,
            "auth": "curve" if self.public_key else "none",
            "accepts_paths": bool(self.roots),
            "limits": {
                "max_frame_bytes": self.config.max_frame_bytes,
                "chunk_bytes": min(P.DEFAULT_CHUNK_BYTES, self.config.max_frame_bytes),
                "max_queue": self.config.max_queue,
                "max_upload_bytes": self.config.max_upload_bytes,
                "max_chunks": self.config.max_chunks,
                "max_duration_s": self.config.max_duration_s,
                "hang_timeout_s": self.config.hang_timeout_s,
            },
        }

    def _do_stats(self, msg: P.Message) -> dict:
        st = self.stats
        by_state: dict[str, int] = {}
        for job in self.store.jobs.values():
            by_state[job.state] = by_state.get(job.state, 0) + 1
        return {
            "uptime_s": time.time() - st.started,
            "requests": st.requests,
            "errors": dict(st.errors),
            "jobs": by_state,
            "queue": len(self.queue),
            "running": len(self.workers),
            "workers": self.config.workers,
            "peak_workers": st.peak_workers,
            "server_rss_bytes": proc_rss_bytes(),
            "server_peak_rss_bytes": proc_rss_bytes(field="VmHWM"),
            "peak_total_rss_bytes": st.peak_total_rss,
            "peak_worker_rss_bytes": st.peak_worker_rss,
        }

    # submit ------------------------------------------------------------------------------
    def _check_path(self, value: object, what: str, *, want_dir: bool = False) -> Path:
        if not isinstance(value, str) or not value or "\x00" in value:
            raise RequestError("bad_request", f"{what} must be a non-empty path string")
        if not os.path.isabs(value):
            raise RequestError("path_not_allowed", f"{what} must be an absolute path, got {value!r}")
        real = Path(os.path.realpath(value))
        if not any(real == root or root in real.parents for root in self.roots):
            raise RequestError("path_not_allowed", f"{what} {value!r} is not under the server's roots"
                               + ("" if self.roots else " (this server takes uploads only)"))
        if not (real.is_dir() if want_dir else real.is_file()):
            raise RequestError("not_found", f"{what} {value!r} is not a readable {'folder' if want_dir else 'file'}")
        return real

    def _input_ref(self, spec: object, part: str) -> S.InputRef:
        if not isinstance(spec, dict) or ("path" in spec) == ("upload" in spec):
            raise RequestError("bad_request", f"submit.{part} must be {{'path': ...}} or {{'upload': {{'size', 'name'}}}}")
        if "path" in spec:
            real = self._check_path(spec["path"], part)
            return S.InputRef(mode="path", path=str(real), name=real.name, size=real.stat().st_size)
        up = spec["upload"]
        if not isinstance(up, dict) or type(up.get("size")) is not int or up["size"] < 1:
            raise RequestError("bad_request", f"submit.{part}.upload.size must be a positive integer")
        if up["size"] > self.config.max_upload_bytes:
            raise RequestError("too_large", f"{part} is {up['size']} bytes; this server takes at most "
                               f"{self.config.max_upload_bytes}")
        sha = up.get("sha256")
        if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
            raise RequestError("bad_request", f"submit.{part}.upload.sha256 must be 64 hex digits")
        name = os.path.basename(str(up.get("name") or part))[:200] or part
        suffix = "".join(ch for ch in Path(name).suffix.lower() if ch.isalnum() or ch == ".")[:10]
        return S.InputRef(mode="upload", path=f"{S.INPUT_DIR}/{part}{suffix}", name=name, size=up["size"], sha256=sha)

    def _check_options(self, options: object) -> dict:
        if options is None:
            return {}
        if not isinstance(options, dict):
            raise RequestError("bad_request", "submit.options must be an object")
        # every option of ReconstructOptions, checked by the pipeline's own dataclasses; None
        # means the server's default
        out = {k: v for k, v in options.items() if v is not None}
        try:  # "auto" is the one device name the worker resolves itself
            ReconstructOptions.from_dict({k: v for k, v in out.items() if (k, v) != ("device", "auto")})
        except InputError as e:
            raise RequestError("bad_input", str(e)) from e
        if (out.get("frame_start") or 0) < 0:
            raise RequestError("bad_input", "frame_start must be >= 0")
        if out.get("frame_end") is not None and out["frame_end"] <= (out.get("frame_start") or 0):
            raise RequestError("bad_input", "frame_end must be greater than frame_start")
        for key, kind in PATH_OPTIONS.items():  # paths on this machine: under the roots only
            if key in out and not (key == "networks_checkpoint" and out[key] in NAMED_CHECKPOINTS):
                out[key] = str(self._check_path(out[key], key, want_dir=kind == "dir"))
        models = self.probe_info.get("models") or {}
        model = out.get("model")
        if model is not None and models and out.get("flame_dir") is None:
            if model not in models:
                raise RequestError("bad_input", f"unknown model {model!r}; this server has {', '.join(sorted(models))}")
            if not models[model].get("available", True):
                raise RequestError("model_file", f"model {model!r} is not available here: {models[model].get('reason')}")
        return out

    def _check_duration(self, path: Path, options: dict) -> None:
        """``too_long`` now, before a worker starts, for a video over the duration limit. A
        file that cannot be probed passes: the worker reports the media error with context."""
        if not self.config.max_duration_s:
            return
        try:
            duration = probe_duration_s(path, options.get("frame_start"), options.get("frame_end"))
        except InputError:
            return  # a frame range outside the clip: the job reports it with the clip's length
        if duration is not None and duration > self.config.max_duration_s:
            raise RequestError("too_long", f"the video is {duration:.1f} s long; this server takes at most "
                                           f"{self.config.max_duration_s:g} s (--max-duration-s)")

    def _do_submit(self, msg: P.Message) -> dict:
        c = msg.content
        if msg.msg_id in self.submits and self.submits[msg.msg_id] in self.store.jobs:
            job = self.store.jobs[self.submits[msg.msg_id]]  # a retried submit: the same job
            return {"job_id": job.job_id, "job": job.summary(), "chunk_bytes": self._chunk_bytes()}
        options = self._check_options(c.get("options"))
        video = self._input_ref(c.get("video"), "video")
        audio = None if c.get("audio") is None else self._input_ref(c["audio"], "audio")
        transcript = c.get("transcript")
        if transcript is not None and (not isinstance(transcript, str) or len(transcript) > MAX_TRANSCRIPT_CHARS):
            raise RequestError("bad_request", f"transcript must be text of at most {MAX_TRANSCRIPT_CHARS} characters")
        waiting = sum(j.state in (P.QUEUED, P.UPLOADING) for j in self.store.jobs.values())
        if waiting >= self.config.max_queue:
            raise RequestError("queue_full", f"{waiting} jobs are waiting; this server queues at most {self.config.max_queue}")
        uploads = [r for r in (video, audio) if r is not None and r.mode == "upload"]
        if video.mode == "path":
            self._check_duration(Path(video.path), options)
        job = self.store.create(options=options, video=video, audio=audio,
                                state=P.UPLOADING if uploads else P.QUEUED, submit_msg_id=msg.msg_id)
        jdir = self.store.job_dir(job.job_id)
        for ref in uploads:
            (jdir / ref.path).touch()
        if transcript is not None:
            job.transcript = f"{S.INPUT_DIR}/transcript.txt"
            (jdir / job.transcript).write_text(transcript, encoding="utf-8")
        self.submits[msg.msg_id] = job.job_id
        log.info("job %s submitted: %s (%s)", job.job_id, video.name, video.mode)
        if uploads:
            self.upload_seen[job.job_id] = time.monotonic()
            self._set_state(job, P.UPLOADING, message="waiting for the upload")
        else:
            self._enqueue(job)
        return {"job_id": job.job_id, "job": job.summary(), "chunk_bytes": self._chunk_bytes()}

    def _chunk_bytes(self) -> int:
        return min(P.DEFAULT_CHUNK_BYTES, self.config.max_frame_bytes)

    def _do_upload(self, msg: P.Message) -> dict:
        c = msg.content
        job = self._job_of(msg)
        if job.state != P.UPLOADING:
            raise RequestError("bad_state", f"job {job.job_id} is {job.state}, not uploading")
        part, offset = c.get("part"), c.get("offset")
        ref = {"video": job.video, "audio": job.audio}.get(part) if isinstance(part, str) else None
        if ref is None or ref.mode != "upload":
            raise RequestError("bad_request", f"upload.part must name an uploaded input of this job, got {part!r}")
        if type(offset) is not int or offset < 0 or len(msg.buffers) != 1:
            raise RequestError("bad_request", "upload needs an integer offset >= 0 and exactly one buffer")
        path = self.store.input_path(job, ref)
        received = path.stat().st_size
        data = msg.buffers[0]
        n = len(data)
        if offset > received or offset + n > ref.size:
            raise RequestError("upload_mismatch", f"chunk [{offset}, {offset + n}) does not continue the "
                               f"{received} of {ref.size} bytes received", received=received)
        ref.chunks += 1
        if ref.chunks > self.config.max_chunks:
            self._finish(job, P.FAILED, {"code": "too_many_chunks", "detail": None,
                                         "message": f"more than {self.config.max_chunks} chunks for the {part}"})
            raise RequestError("too_many_chunks", f"more than {self.config.max_chunks} chunks for the {part}; "
                               "send bigger chunks (up to max_frame_bytes)")
        if offset + n > received:  # a repeated chunk (a retried request) is already there
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, data.buffer if hasattr(data, "buffer") else data, offset)
            finally:
                os.close(fd)
            received = offset + n
        self.upload_seen[job.job_id] = time.monotonic()
        uploads = [r for r in (job.video, job.audio) if r is not None and r.mode == "upload"]
        if all(self.store.input_path(job, r).stat().st_size == r.size for r in uploads):
            if job.video.mode == "upload":
                try:
                    self._check_duration(self.store.input_path(job, job.video), job.options)
                except RequestError as e:
                    self._finish(job, P.FAILED, {"code": e.code, "message": e.message, "detail": None})
                    raise
            self._enqueue(job)
        else:
            self.store.save(job)
        return {"job_id": job.job_id, "part": part, "received": received, "size": ref.size, "state": job.state}

    # job control -------------------------------------------------------------------------
    def _do_status(self, msg: P.Message) -> dict:
        job = self._job_of(msg)
        return {"job_id": job.job_id, "job": job.summary()}

    def _do_list_jobs(self, msg: P.Message) -> dict:
        jobs = sorted(self.store.jobs.values(), key=lambda j: j.created, reverse=True)
        slim = []
        for job in jobs[:LIST_JOBS_MAX]:
            s = job.summary()
            for key in ("history", "options", "result_meta"):
                s.pop(key)
            slim.append(s)
        return {"jobs": slim, "total": len(jobs)}

    def _do_watch(self, msg: P.Message) -> dict:
        job = self._job_of(msg)
        since = msg.content.get("since", 0)
        if type(since) is not int:
            raise RequestError("bad_request", "watch.since must be an integer")
        if job.state not in P.FINAL_STATES:
            self.subs.setdefault(job.job_id, {})[msg.routing[0]] = (list(msg.routing), msg.msg_id)
        # A watching client repeats this as its heartbeat; it usually has every event already.
        events = self.store.events(job, since) if since < job.last_seq else []
        return {"job_id": job.job_id, "job": job.summary(), "events": events}

    def _do_unwatch(self, msg: P.Message) -> dict:
        job = self._job_of(msg)
        self.subs.get(job.job_id, {}).pop(msg.routing[0], None)
        return {"job_id": job.job_id}

    def _do_cancel(self, msg: P.Message) -> dict:
        job = self._job_of(msg)
        if job.state in P.FINAL_STATES:
            return {"job_id": job.job_id, "state": job.state, "accepted": False}
        if job.state == P.RUNNING:
            worker = self.workers.get(job.job_id)
            job.cancel_requested = True
            self.store.save(job)
            if worker is not None:
                worker.terminate()
                log.info("job %s: cancelling, terminating worker %d", job.job_id, worker.pid)
                return {"job_id": job.job_id, "state": job.state, "accepted": True, "worker_pid": worker.pid}
        if job.job_id in self.queue:
            self.queue.remove(job.job_id)
        self._finish(job, P.CANCELLED, {"code": "cancelled", "message": "cancelled by the client", "detail": None})
        return {"job_id": job.job_id, "state": job.state, "accepted": True}

    def _do_delete(self, msg: P.Message) -> dict:
        job_id = S.check_job_id(msg.content.get("job_id", msg.job_id))
        if job_id in self.deleted and job_id not in self.store.jobs:
            return {"job_id": job_id, "deleted": True}  # a retried delete
        job = self.store.get(job_id)
        if job.state in (P.QUEUED, P.RUNNING):
            raise RequestError("job_active", f"job {job_id} is {job.state}; cancel it first")
        self.subs.pop(job_id, None)
        self.upload_seen.pop(job_id, None)
        self.store.delete(job_id)
        self.deleted.add(job_id)
        return {"job_id": job_id, "deleted": True}

    def _do_fetch(self, msg: P.Message):
        job = self._job_of(msg)
        if job.state != P.DONE:
            why = f": {job.error['code']}: {job.error['message']}" if job.error else ""
            raise RequestError("not_ready", f"job {job.job_id} is {job.state}{why}", state=job.state)
        c = msg.content
        if c.get("path") is None:
            return {"job_id": job.job_id, "manifest": self.store.manifest(job), "meta": job.result_meta,
                    "chunk_bytes": self._chunk_bytes()}
        path, size = self.store.result_file(job, c["path"])
        offset = c.get("offset", 0)
        length = c.get("length", self._chunk_bytes())
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 1:
            raise RequestError("bad_request", "fetch.offset must be an integer >= 0 and fetch.length >= 1")
        length = min(length, self._chunk_bytes())
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        return ({"job_id": job.job_id, "path": c["path"], "offset": offset, "size": size,
                 "eof": offset + len(data) >= size}, [data])

    # -- job life -------------------------------------------------------------------------
    def _set_state(self, job: S.Job, state: str, *, message: str = "") -> None:
        job.state = state
        job.message = message
        event = self.store.append_event(job, {"kind": "state", "state": state, "attempt": job.attempts,
                                              "message": message, "error": job.error})
        self.store.save(job)
        self._broadcast(job, event)

    def _enqueue(self, job: S.Job) -> None:
        job.queued_at = time.time()
        self.queue.append(job.job_id)
        self._set_state(job, P.QUEUED, message="waiting for a worker")

    def _finish(self, job: S.Job, state: str, error: dict | None) -> None:
        job.error = error
        job.finished = time.time()
        job.worker_pid = None
        job.fraction = 1.0 if state == P.DONE else job.fraction
        self._set_state(job, state, message=(error or {}).get("message", "") if state != P.DONE else "done")
        log.info("job %s %s%s", job.job_id, state, f": {error['code']}: {error['message']}" if error else "")

    @staticmethod
    def _failure(code: str, job: S.Job) -> dict:
        reasons = "; ".join(f"attempt {h['attempt']}: {h['reason']}" for h in job.history)
        return {"code": code, "message": f"the job failed {len(job.history)} times ({reasons})", "detail": None}

    def _schedule(self) -> None:
        while self.queue and len(self.workers) < self.config.workers:
            job = self.store.jobs.get(self.queue.popleft())
            if job is None or job.state != P.QUEUED:
                continue
            job.attempts += 1
            job.started = time.time()
            job.stage, job.fraction, job.cancel_requested = None, 0.0, False
            jdir = self.store.job_dir(job.job_id)
            try:
                worker = WorkerProcess(job.job_id, jdir, max_duration_s=self.config.max_duration_s,
                                       device=self.config.device, flame_dir=self.config.flame_dir)
            except OSError as e:
                job.history.append({"attempt": job.attempts, "outcome": "error", "reason": f"cannot start a worker: {e}"})
                self._finish(job, P.FAILED, {"code": "internal", "message": f"cannot start a worker: {e}", "detail": None})
                continue
            self.workers[job.job_id] = worker
            self.poller.register(worker.fd, zmq.POLLIN)
            job.worker_pid = worker.pid
            self.stats.peak_workers = max(self.stats.peak_workers, len(self.workers))
            self._set_state(job, P.RUNNING, message=f"attempt {job.attempts} of {S.MAX_ATTEMPTS}")
            log.info("job %s running in worker %d (attempt %d)", job.job_id, worker.pid, job.attempts)

    def _on_worker_lines(self, job_id: str, lines: list[dict]) -> None:
        job = self.store.jobs.get(job_id)
        if job is None:
            return
        for line in lines:
            if line.get("t") != "progress" or job.cancel_requested:
                continue
            stage, fraction, message = str(line.get("stage")), float(line.get("fraction", 0.0)), str(line.get("message", ""))
            new_stage = stage != job.stage
            job.stage, job.fraction, job.message = stage, fraction, message
            event = self.store.append_event(job, {"kind": "progress", "stage": stage, "fraction": fraction,
                                                  "message": message, "attempt": job.attempts})
            if new_stage:
                self.store.save(job)
            self._broadcast(job, event)

    def _on_worker_exit(self, job_id: str, worker: WorkerProcess, rc: int) -> None:
        if not worker.eof:
            self._on_worker_lines(job_id, worker.read())
            self.poller.unregister(worker.fd)
        worker.close()
        del self.workers[job_id]
        job = self.store.jobs.get(job_id)
        if job is None:
            return
        final = worker.final
        if final is not None and final.get("t") == "done" and rc == 0:  # even if a cancel came too late
            job.result_meta = final.get("meta")
            job.history.append({"attempt": job.attempts, "outcome": "done", "reason": ""})
            self._finish(job, P.DONE, None)
        elif worker.hung and not job.cancel_requested:
            # not retried: a job that hung once will most likely hang again
            stage = f" in stage {job.stage}" if job.stage else ""
            reason = f"no progress for {self.config.hang_timeout_s:g} s{stage}"
            job.history.append({"attempt": job.attempts, "outcome": "timeout", "reason": reason})
            self._finish(job, P.FAILED, {"code": "job_timeout", "detail": None,
                                         "message": f"the job made no progress for {self.config.hang_timeout_s:g} s{stage} "
                                                    "and was stopped (the server's --hang-timeout-s)"})
        elif job.cancel_requested:
            gone = time.monotonic() - (worker.cancelled_at or time.monotonic())
            job.history.append({"attempt": job.attempts, "outcome": "cancelled", "reason": f"worker stopped {gone:.2f} s after cancel"})
            self._finish(job, P.CANCELLED, {"code": "cancelled", "message": "cancelled by the client", "detail": None})
        elif final is not None and final.get("t") == "error" and not final.get("retry"):
            job.history.append({"attempt": job.attempts, "outcome": "error", "reason": f"{final.get('code')}: {final.get('message')}"})
            self._finish(job, P.FAILED, {"code": final.get("code") or "internal", "message": final.get("message") or "",
                                         "detail": final.get("detail")})
        else:
            if final is not None:  # an unexpected exception in the worker
                reason, code = f"{final.get('message')}", "internal"
            else:
                reason, code = f"worker process {describe_exit(rc)}" + (f" during stage {job.stage}" if job.stage else ""), "worker_died"
            job.history.append({"attempt": job.attempts, "outcome": "died" if final is None else "error", "reason": reason})
            log.warning("job %s: attempt %d ended: %s", job_id, job.attempts, reason)
            if job.attempts >= S.MAX_ATTEMPTS:
                error = self._failure(code, job)
                if final is not None:
                    error["detail"] = final.get("detail")
                self._finish(job, P.FAILED, error)
            else:
                job.worker_pid = None
                job.queued_at = time.time()
                self.queue.appendleft(job.job_id)  # the retry goes first: it was already waiting
                self._set_state(job, P.QUEUED, message=f"retrying: {reason}")

    def _on_probe(self) -> None:
        out = self.probe.stdout.read() if self.probe.stdout else b""
        rc = self.probe.returncode
        self.probe.stdout and self.probe.stdout.close()
        self.probe = None
        try:
            self.probe_info = json.loads(out.decode().strip().splitlines()[-1])
            self.probe_state = "done"
        except (ValueError, IndexError):
            self.probe_state = f"failed ({describe_exit(rc)}; see {self.store.root / 'probe.log'})"
            log.warning("model probe %s", self.probe_state)


def _kill_stray_worker(job: S.Job) -> None:
    """A worker of a killed server normally kills itself (its life pipe closes); this makes
    sure, checking the command line so that a reused pid is left alone."""
    if not job.worker_pid:
        return
    try:
        cmdline = Path(f"/proc/{job.worker_pid}/cmdline").read_bytes()
    except OSError:
        return
    if job.job_id.encode() in cmdline and b"avface.service.worker" in cmdline:
        try:
            os.killpg(job.worker_pid, signal.SIGKILL)
        except OSError:
            pass


def serve(config: ServerConfig) -> int:
    """Run until SIGINT or SIGTERM."""
    server = Server(config)
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    server.run()
    return 0
