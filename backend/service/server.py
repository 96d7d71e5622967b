"""The reconstruction service: a ROUTER socket in an event loop that never runs torch.

One thread polls the socket, the workers' message pipes and the clock. Requests are
answered at once from memory or from the job folders; reconstruction runs in worker
processes (worker.py), at most ``workers`` at a time, so hello and ping stay fast whatever
the jobs do. Jobs persist in the data dir (store.py): a restarted server resumes queued
jobs, runs interrupted ones again (once), and serves finished results.

This module holds the socket loop and the handler of each request type; the checks of what
clients send are in checks.py, the worker processes and the job queue in pool.py.
"""
from __future__ import annotations

import logging
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

import avface
from avface.errors import InputError
from avface.service import checks as C
from avface.service import protocol as P
from avface.service import store as S
from avface.service.checks import RequestError
from avface.service.pool import WorkerPool
from avface.service.worker import proc_rss_bytes

log = logging.getLogger(__name__)

#: Longest wait of the event loop; it also bounds how late a worker's exit is noticed.
TICK_S = 0.1
MEMORY_SAMPLE_S = 0.25
#: An upload with no chunk for this long fails (its client is gone).
UPLOAD_IDLE_S = 3600.0
#: A frame this large makes libzmq drop the connection before the loop sees it.
HARD_FRAME_CAP_BYTES = P.HARD_FRAME_CAP_BYTES
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
    threads: int = 0
    """torch threads of each job's stages (a job's own ``threads`` option wins); 0: the
    cores shared evenly between the ``workers`` (``avface.core.threads``)."""
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
    spare_worker: bool = True
    """Keep one worker started ahead, with the pipeline imported (torch, MediaPipe), waiting
    for the next job: a job then starts on its first frame at once instead of a few seconds
    later. It costs an idle process's memory (about 0.4 GB) while no job runs."""
    idle_exit_s: float = 0.0
    """Exit after this many seconds with no job queued, uploading or running and no request
    (0: never). A backend started for a desktop application then ends on its own when the
    application that started it is gone, crashed or not."""


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
    if config.idle_exit_s < 0 or config.threads < 0:
        raise InputError("--idle-exit-s and --threads must be 0 or more")


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
        self.subs: dict[str, dict[bytes, tuple[list, str]]] = {}  # job_id -> identity -> (routing, watch msg_id)
        self.submits: dict[str, str] = {}  # submit msg_id -> job_id (a retried submit is the same job)
        self.deleted: set[str] = set()
        self.upload_seen: dict[str, float] = {}
        self.stats = _Stats()
        self._stop = False
        self._last_sample = 0.0
        self._last_busy = time.monotonic()
        self._auth = None
        self.ctx = zmq.Context()
        self.socket = self._make_socket()
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.poller = zmq.Poller()
        self.pool = WorkerPool(config, self.store, self.poller, self.stats, self._broadcast)
        self._recover()
        self.pool.start_probe()
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
        again unless this was their last attempt (the pool decides), uploads go on."""
        for job in sorted(self.store.load_all(), key=lambda j: (j.queued_at or j.created)):
            if job.submit_msg_id:
                self.submits[job.submit_msg_id] = job.job_id
            self.pool.recover(job)
            if job.state == P.UPLOADING:
                self.upload_seen[job.job_id] = time.monotonic()
        if self.pool.queue:
            log.info("resuming %d queued jobs", len(self.pool.queue))

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
        if events.get(self.socket):
            self._last_busy = time.monotonic()
        self.pool.read(events)
        self._tick()

    def _tick(self) -> None:
        now = time.monotonic()
        self.pool.reap(now)
        self.pool.schedule()
        self.pool.poll_probe()
        if now - self._last_sample >= MEMORY_SAMPLE_S:
            self._last_sample = now
            self.pool.sample_memory()
            self._expire_uploads(now)
        self._exit_when_idle(now)

    def _exit_when_idle(self, now: float) -> None:
        """``--idle-exit-s``: stop once nothing has been asked or run for that long."""
        busy = self.pool.workers or self.pool.queue or self.upload_seen
        if busy:
            self._last_busy = now
        elif self.config.idle_exit_s and now - self._last_busy > self.config.idle_exit_s:
            log.info("no job and no request for %.0f s (--idle-exit-s): stopping", self.config.idle_exit_s)
            self._stop = True

    def _expire_uploads(self, now: float) -> None:
        for job_id, seen in list(self.upload_seen.items()):
            job = self.store.jobs.get(job_id)
            if job is None or job.state != P.UPLOADING:
                self.upload_seen.pop(job_id, None)
            elif now - seen > UPLOAD_IDLE_S:
                self.upload_seen.pop(job_id, None)
                self.pool.finish(job, P.FAILED, {"code": "upload_mismatch", "detail": None,
                                                 "message": f"upload incomplete: no chunk for {UPLOAD_IDLE_S:.0f} s"})

    def shutdown(self) -> None:
        """Stop the workers (their jobs go back to the queue without using up an attempt),
        then the socket."""
        self.pool.shutdown()
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
        info = self.pool.probe_info
        return {
            "server": "avface",
            "server_version": avface.__version__,
            "protocol_version": P.PROTOCOL_VERSION,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "zmq": zmq.zmq_version(),
            "pyzmq": zmq.__version__,
            "probe": self.pool.probe_state,
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
            "queue": len(self.pool.queue),
            "running": len(self.pool.workers),
            "workers": self.config.workers,
            "spare_worker_pid": self.pool.spare.pid if self.pool.spare is not None else None,
            "peak_workers": st.peak_workers,
            "server_rss_bytes": proc_rss_bytes(),
            "server_peak_rss_bytes": proc_rss_bytes(field="VmHWM"),
            "peak_total_rss_bytes": st.peak_total_rss,
            "peak_worker_rss_bytes": st.peak_worker_rss,
        }

    # submit ------------------------------------------------------------------------------
    def _do_submit(self, msg: P.Message) -> dict:
        c = msg.content
        if msg.msg_id in self.submits and self.submits[msg.msg_id] in self.store.jobs:
            job = self.store.jobs[self.submits[msg.msg_id]]  # a retried submit: the same job
            return {"job_id": job.job_id, "job": job.summary(), "chunk_bytes": self._chunk_bytes()}
        options = C.check_options(c.get("options"), self.roots, self.pool.probe_info.get("models") or {})
        video = C.input_ref(c.get("video"), "video", self.roots, self.config.max_upload_bytes)
        audio = None if c.get("audio") is None else C.input_ref(c["audio"], "audio", self.roots,
                                                                self.config.max_upload_bytes)
        transcript = c.get("transcript")
        C.check_transcript(transcript)
        waiting = sum(j.state in (P.QUEUED, P.UPLOADING) for j in self.store.jobs.values())
        if waiting >= self.config.max_queue:
            raise RequestError("queue_full", f"{waiting} jobs are waiting; this server queues at most {self.config.max_queue}")
        uploads = [r for r in (video, audio) if r is not None and r.mode == "upload"]
        if video.mode == "path":
            C.check_duration(Path(video.path), options, self.config.max_duration_s)
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
            self.pool.set_state(job, P.UPLOADING, message="waiting for the upload")
        else:
            self.pool.enqueue(job)
        return {"job_id": job.job_id, "job": job.summary(), "chunk_bytes": self._chunk_bytes()}

    def _chunk_bytes(self) -> int:
        return min(P.DEFAULT_CHUNK_BYTES, self.config.max_frame_bytes)

    def _do_upload(self, msg: P.Message) -> dict:
        job = self._job_of(msg)
        part, ref, offset = C.upload_target(job, msg)
        path = self.store.input_path(job, ref)
        received = path.stat().st_size
        data = msg.buffers[0]
        n = len(data)
        C.check_chunk(offset, n, received, ref.size)
        ref.chunks += 1
        if ref.chunks > self.config.max_chunks:
            self.pool.finish(job, P.FAILED, {"code": "too_many_chunks", "detail": None,
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
                    C.check_duration(self.store.input_path(job, job.video), job.options, self.config.max_duration_s)
                except RequestError as e:
                    self.pool.finish(job, P.FAILED, {"code": e.code, "message": e.message, "detail": None})
                    raise
            self.pool.enqueue(job)
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
        C.check_since(since)
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
        worker_pid = self.pool.cancel(job)
        if worker_pid is not None:
            return {"job_id": job.job_id, "state": job.state, "accepted": True, "worker_pid": worker_pid}
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
        if job.state != P.DONE and job.head_meta is None:
            why = f": {job.error['code']}: {job.error['message']}" if job.error else ""
            raise RequestError("not_ready", f"job {job.job_id} is {job.state}{why}", state=job.state)
        c = msg.content
        if c.get("path") is None:  # done: the whole result; before (or without) its detail: the head
            done = job.state == P.DONE
            return {"job_id": job.job_id, "manifest": self.store.manifest(job),
                    "meta": job.result_meta if done else job.head_meta, "complete": done,
                    "chunk_bytes": self._chunk_bytes()}
        path, size = self.store.result_file(job, c["path"])
        offset = c.get("offset", 0)
        length = c.get("length", self._chunk_bytes())
        C.check_fetch_range(offset, length)
        length = min(length, self._chunk_bytes())
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        return ({"job_id": job.job_id, "path": c["path"], "offset": offset, "size": size,
                 "eof": offset + len(data) >= size}, [data])


def serve(config: ServerConfig) -> int:
    """Run until SIGINT or SIGTERM."""
    server = Server(config)
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    server.run()
    return 0
