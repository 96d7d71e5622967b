"""Client library of the AVFace service: submit, watch progress, cancel, fetch.

Pure Python (standard library, pyzmq, numpy); no bpy, no torch, no other avface module, so
the Blender add-on vendors this file and ``protocol.py`` beside it.

Two layers:

- :class:`Client` sends requests and matches replies by ``parent_id``, following the ZeroMQ
  guide's Lazy Pirate pattern: each request has a timeout; when one passes, the socket is
  closed with LINGER 0, a new one connects, and every request still waiting is sent again
  (the same message, so the server can tell a retry from a new submit), at most
  ``retries`` times before the request fails with ``no_answer``. ``Client.poll(timeout_s)``
  never waits longer than asked, so a UI timer can drive it with ``timeout_s=0``.
- :class:`JobRun` is a state machine over one job (hash, submit, upload, watch, fetch) that
  advances a little on every ``step()``: the add-on's modal operator calls it from a timer,
  the CLI from a loop. A run that loses the server keeps its ``job_id``; the result stays
  on the server and ``JobRun(client, job_id=...)`` fetches it later.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Callable

import zmq

try:  # inside the avface package or the add-on's vendored copy
    from . import protocol as P
except ImportError:  # both files copied side by side outside a package
    import protocol as P  # type: ignore[no-redef]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_RETRIES = 3
#: A watch that hears nothing for this long asks the server again (heartbeat and catch-up).
HEARTBEAT_S = 2.0
#: Replies may carry the server's largest chunk; this is what the client accepts.
CLIENT_MAX_FRAME_BYTES = 256 << 20
CLIENT_MAX_JSON_BYTES = 64 << 20
#: Upload chunks in flight (each up to chunk_bytes).
WINDOW = 4
#: Download chunks in flight, across result files.
FETCH_WINDOW = 8
#: Bytes hashed per step() before an upload, so a timer tick stays short.
HASH_STEP_BYTES = 8 << 20


class ServiceError(Exception):
    """An error reply, or ``no_answer``. ``code`` is one of protocol.ERROR_CODES."""

    def __init__(self, code: str, message: str, *, detail: str | None = None, content: dict | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.detail = detail
        self.content = content or {}


class NoAnswer(ServiceError):
    def __init__(self, message: str):
        super().__init__("no_answer", message)


def load_key(value: str | os.PathLike | bytes | None, *, secret: bool = False) -> bytes | None:
    """A Z85 CurveZMQ key from a key file written by ``avface keys`` (or by zmq.auth) or from
    the 40-character key itself. ``secret``: the secret key of a ``.key_secret`` file."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    text = os.fspath(value)
    if len(text) == 40 and not os.path.exists(text):
        return text.encode()
    import zmq.auth

    public, sec = zmq.auth.load_certificate(text)
    key = sec if secret else public
    if not key:
        raise ValueError(f"{text} holds no {'secret' if secret else 'public'} key")
    return key


def _size_note(msg: P.Message) -> str:
    """Why a request may have gone unanswered: a frame that big is dropped by the server's
    ZeroMQ socket before the server sees it, so no error reply can come back."""
    biggest = max((len(b) for b in msg.buffers), default=0)
    if biggest <= P.DEFAULT_MAX_FRAME_BYTES:
        return ""
    return (f" (the request carried a {biggest:,}-byte frame; servers refuse frames over their max_frame_bytes, "
            f"{P.DEFAULT_MAX_FRAME_BYTES:,} bytes by default, and drop those over {P.HARD_FRAME_CAP_BYTES:,} bytes "
            "without a reply: send smaller chunks)")


class Pending:
    """One request in flight. ``done`` once answered or failed; ``result()`` gives the
    reply's content or raises :class:`ServiceError`."""

    def __init__(self, msg: P.Message, timeout_s: float, retries: int, callback: Callable | None):
        self.msg = msg
        self.frames = P.encode(msg)
        self.timeout_s = timeout_s
        self.tries_left = retries
        self.callback = callback
        self.deadline = 0.0
        self.sent = False
        self.done = False
        self.reply: P.Message | None = None
        self.error: ServiceError | None = None

    @property
    def msg_id(self) -> str:
        return self.msg.msg_id

    def result(self) -> dict:
        if not self.done:
            raise RuntimeError("request still pending")
        if self.error is not None:
            raise self.error
        return self.reply.content


class Watch:
    """Events of one job, in sequence order, without duplicates or gaps."""

    def __init__(self, job_id: str, since: int = 0):
        self.job_id = job_id
        self.last_seq = since
        self.events: deque[dict] = deque()
        self.job: dict | None = None  # the job summary from the last watch reply
        self.final = False
        self.error: ServiceError | None = None
        self.pending: Pending | None = None
        self.last_heard = time.monotonic()

    def drain(self) -> list[dict]:
        out = list(self.events)
        self.events.clear()
        return out


class Client:
    """One DEALER connection to a server, used from one thread."""

    def __init__(self, address: str = P.DEFAULT_ADDRESS, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES, server_key=None, client_key=None,
                 context: zmq.Context | None = None):
        """``server_key``: the server's public key (file or Z85 text) when it uses CurveZMQ;
        ``client_key``: this client's ``.key_secret`` file (a fresh key pair when omitted)."""
        self.address = address
        self.timeout_s = timeout_s
        self.retries = retries
        self.server_key = load_key(server_key)
        if self.server_key is not None:
            if client_key is not None:
                self.client_public, self.client_secret = load_key(client_key), load_key(client_key, secret=True)
            else:
                self.client_public, self.client_secret = zmq.curve_keypair()
        self.ctx = context or zmq.Context.instance()
        self.pending: dict[str, Pending] = {}
        self.watches: dict[str, Watch] = {}
        self.reconnects = 0
        self.socket: zmq.Socket | None = None
        self._connect()

    # -- connection -----------------------------------------------------------------------
    def _connect(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.server_key is not None:
            sock.curve_serverkey = self.server_key
            sock.curve_publickey = self.client_public
            sock.curve_secretkey = self.client_secret
        sock.connect(self.address)
        self.socket = sock

    def _reconnect(self) -> None:
        self.socket.close(0)
        self.reconnects += 1
        log.info("no answer from %s; reconnecting (%d)", self.address, self.reconnects)
        self._connect()
        for p in self.pending.values():
            p.sent = False
        for w in self.watches.values():
            if not w.final and w.error is None and (w.pending is None or w.pending.done):
                self._send_watch(w)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------------
    def send(self, msg_type: str, content: dict | None = None, *, job_id: str | None = None, buffers=(),
             callback: Callable[[Pending], None] | None = None, timeout_s: float | None = None,
             retries: int | None = None) -> Pending:
        """Queue a request; it goes out now and is retried by :meth:`poll`."""
        msg = P.build(msg_type, content, job_id=job_id, buffers=buffers)
        p = Pending(msg, self.timeout_s if timeout_s is None else timeout_s,
                    self.retries if retries is None else retries, callback)
        self.pending[p.msg_id] = p
        self._flush()
        return p

    def _flush(self) -> None:
        now = time.monotonic()
        for p in self.pending.values():
            if p.sent:
                continue
            try:
                self.socket.send_multipart(p.frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break  # the connection's queue is full; poll() tries again
            p.sent = True
            p.deadline = now + p.timeout_s

    def _resolve(self, p: Pending, reply: P.Message | None, error: ServiceError | None) -> None:
        self.pending.pop(p.msg_id, None)
        p.reply, p.error, p.done = reply, error, True
        if p.callback is not None:
            p.callback(p)

    def poll(self, timeout_s: float = 0.0) -> list[P.Message]:
        """Receive what has arrived (waiting at most ``timeout_s``), resolve requests, retry
        or fail those past their deadline, refresh quiet watches. Returns the events."""
        self._flush()
        self._heartbeat()
        now = time.monotonic()
        wait = timeout_s
        deadlines = [p.deadline for p in self.pending.values() if p.sent]
        if deadlines:
            wait = max(0.0, min(wait, min(deadlines) - now))
        events: list[P.Message] = []
        if self.socket.poll(int(wait * 1000), zmq.POLLIN):
            for _ in range(1000):
                try:
                    frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                msg = self._dispatch(frames)
                if msg is not None:
                    events.append(msg)
        self._check_deadlines()
        return events

    def _dispatch(self, frames: list) -> P.Message | None:
        try:
            msg = P.decode(frames, max_frame_bytes=CLIENT_MAX_FRAME_BYTES, max_json_bytes=CLIENT_MAX_JSON_BYTES)
        except P.ProtocolError as e:
            log.warning("ignoring a malformed message from the server: %s", e)
            return None
        p = self.pending.get(msg.parent_id) if msg.parent_id else None
        if p is not None and msg.msg_type in P.REPLY_TYPES:
            if msg.msg_type == "error":
                c = msg.content
                self._resolve(p, msg, ServiceError(str(c.get("code")), str(c.get("message")), detail=c.get("detail"), content=c))
            else:
                self._resolve(p, msg, None)
            return None
        if msg.msg_type in P.EVENT_TYPES:
            w = self.watches.get(msg.job_id)
            if w is not None:
                self._deliver(w, [msg.content])
            return msg
        return None  # a late answer to a request already retried or given up

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        expired = [p for p in self.pending.values() if p.sent and now >= p.deadline]
        if not expired:
            return
        retry = False
        for p in expired:
            if p.tries_left > 0:
                p.tries_left -= 1
                retry = True
            else:
                self._resolve(p, None, NoAnswer(f"no answer from {self.address} to {p.msg.msg_type} after "
                                                f"{self.retries + 1} tries of {p.timeout_s:g} s" + _size_note(p.msg)))
        if retry:
            self._reconnect()
            self._flush()

    def _heartbeat(self) -> None:
        """A watch that has heard nothing for HEARTBEAT_S asks again from its last seq: the
        answer proves the server alive (no answer: Lazy Pirate reconnects) and brings any
        event the server had to drop, the final one included."""
        now = time.monotonic()
        for w in self.watches.values():
            if (not w.final and w.error is None and now - w.last_heard > HEARTBEAT_S
                    and (w.pending is None or w.pending.done)):
                self._send_watch(w)

    def wait(self, p: Pending, timeout_s: float | None = None) -> dict:
        """Block until ``p`` is answered (the retries bound this) and return its content."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while not p.done:
            if end is not None and time.monotonic() >= end:
                raise NoAnswer(f"{p.msg.msg_type} not answered within {timeout_s:g} s")
            self.poll(0.05)
        return p.result()

    def call(self, msg_type: str, content: dict | None = None, **kw) -> dict:
        """Send and wait: the reply's content, or ServiceError."""
        return self.wait(self.send(msg_type, content, **kw))

    # -- watching -------------------------------------------------------------------------
    def watch(self, job_id: str, since: int = 0) -> Watch:
        """Stream a job's events into the returned Watch (read them with ``drain()``)."""
        w = self.watches.get(job_id)
        if w is None:
            w = self.watches[job_id] = Watch(job_id, since)
        w.error = None
        self._send_watch(w)
        return w

    def unwatch(self, job_id: str) -> None:
        if self.watches.pop(job_id, None) is not None:
            self.send("unwatch", {"job_id": job_id}, job_id=job_id, retries=0)

    def _send_watch(self, w: Watch) -> None:
        def done(p: Pending) -> None:
            if p.error is not None:
                w.error = p.error
                return
            w.last_heard = time.monotonic()
            w.job = p.reply.content.get("job")
            self._deliver(w, p.reply.content.get("events", []))
            if w.job and w.job.get("state") in P.FINAL_STATES:
                w.final = True

        w.last_heard = time.monotonic()
        w.pending = self.send("watch", {"job_id": w.job_id, "since": w.last_seq}, job_id=w.job_id, callback=done)

    def _deliver(self, w: Watch, events: list[dict]) -> None:
        for ev in events:
            seq = ev.get("seq", 0)
            if seq <= w.last_seq:
                continue
            if seq > w.last_seq + 1:
                # An event was dropped (the server found our queue full): the backlog of a new
                # watch request fills the gap, in order.
                if w.pending is None or w.pending.done:
                    self._send_watch(w)
                return
            w.last_seq = seq
            w.last_heard = time.monotonic()
            w.events.append(ev)
            if ev.get("kind") == "state" and ev.get("state") in P.FINAL_STATES:
                w.final = True

    # -- blocking conveniences ------------------------------------------------------------
    def hello(self) -> dict:
        return self.call("hello", {"client": "avface.service.client", "protocol_version": P.PROTOCOL_VERSION})

    def ping(self) -> dict:
        return self.call("ping")

    def status(self, job_id: str) -> dict:
        return self.call("status", {"job_id": job_id}, job_id=job_id)["job"]

    def jobs(self) -> list[dict]:
        return self.call("list_jobs")["jobs"]

    def cancel(self, job_id: str) -> dict:
        return self.call("cancel", {"job_id": job_id}, job_id=job_id)

    def delete(self, job_id: str) -> dict:
        return self.call("delete", {"job_id": job_id}, job_id=job_id)

    def stats(self) -> dict:
        return self.call("stats")

    def run(self, run: "JobRun", *, on_step: Callable[["JobRun", list[dict]], None] | None = None,
            step_s: float = 0.1) -> "JobRun":
        """Drive ``run`` to its end (blocking; the request retries bound the time)."""
        while not run.finished:
            events = run.step(step_s)
            if on_step is not None:
                on_step(run, events)
        return run

    def submit(self, video, *, audio=None, transcript: str | None = None, options: dict | None = None,
               upload: bool | str = "auto") -> str:
        """Submit (and upload, if needed) and return the job id without waiting for the job."""
        run = self.run(JobRun(self, video=video, audio=audio, transcript=transcript, options=options,
                              upload=upload, detach=True))
        if run.error is not None:
            raise run.error
        return run.job_id

    def fetch(self, job_id: str, out_dir, *, wait: bool = False, head: bool = False) -> Path:
        """Download a finished job's result into ``out_dir``; returns the path of result.npz.
        ``head``: the head as soon as it is ready (see :class:`JobRun`)."""
        run = self.run(JobRun(self, job_id=job_id, out_dir=out_dir, wait=wait, head=head))
        if run.error is not None:
            raise run.error
        return run.result_path


def _is_path_mode(address: str, upload: bool | str) -> bool:
    if upload == "auto":
        return P.is_loopback(address)
    return not upload


class JobRun:
    """One job, from a file (or an existing ``job_id``) to a result folder; advanced by
    :meth:`step`, which never blocks longer than its ``timeout_s`` plus one file chunk.

    ``phase`` goes hashing → submitting → uploading → running → fetching → done, or ends in
    ``failed`` or ``cancelled``. ``error`` then holds a :class:`ServiceError`.
    """

    def __init__(self, client: Client, *, video=None, audio=None, transcript: str | None = None,
                 options: dict | None = None, out_dir=None, upload: bool | str = "auto", job_id: str | None = None,
                 detach: bool = False, wait: bool = True, fetch: bool = True, head: bool = False):
        """``detach``: stop once the job is queued (uploads complete). ``wait``: when attaching
        to ``job_id``, wait for it to finish (else a job that is not done fails with
        ``not_ready``). ``fetch``: download the result into ``out_dir`` when done. ``head``:
        download it as soon as the head is ready (the result but for its detail maps, which
        the job goes on making), or the head a job kept when it ended without its detail;
        ``result_meta["detail"]["state"]`` then says ``pending`` (or why the maps never came)."""
        if job_id is None and video is None:
            raise ValueError("JobRun needs a video to submit or the job_id of a submitted job")
        self.client = client
        self.video = None if video is None else Path(video).resolve()
        self.audio = None if audio is None else Path(audio).resolve()
        self.transcript = transcript
        self.options = dict(options or {})
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.path_mode = _is_path_mode(client.address, upload)
        self.auto_upload = upload == "auto"
        self.detach, self.wait_for_job, self.do_fetch = detach, wait, fetch and out_dir is not None
        self.head = head
        self.job_id = job_id
        self.phase = "running" if job_id else ("submitting" if self.path_mode else "hashing")
        self.state: str | None = None
        self.stage: str | None = None
        self.fraction = 0.0
        self.message = ""
        self.error: ServiceError | None = None
        self.job: dict | None = None
        self.result_path: Path | None = None
        self.result_meta: dict | None = None
        self.upload_bytes = self.upload_total = 0
        self.fetch_bytes = self.fetch_total = 0
        self._req: Pending | None = None
        self._watch: Watch | None = None
        self._hashes: dict[str, str] = {}
        self._hash_state = None  # (part, hashlib object, open file) while hashing
        self._uploads: list[tuple[str, Path]] = []
        self._uploaded_before = 0
        self._chunk = P.DEFAULT_CHUNK_BYTES
        self._cancel_wanted = False
        self._window: list[Pending] = []
        self._offset = 0
        self._files: list[dict] | None = None
        self._open: dict[str, dict] = {}  # result files being downloaded
        self._next = (0, 0)
        self._cancel: Pending | None = None

    @property
    def finished(self) -> bool:
        return self.phase in ("done", "failed", "cancelled")

    def cancel(self) -> None:
        """Ask the server to cancel (the run ends when it confirms); before the job exists,
        just stop."""
        if self.finished:
            return
        if self.phase == "fetching" or (self.job_id is None and self._req is None):
            self._end("cancelled", ServiceError("cancelled", "cancelled"))
        elif self.job_id is None:
            self._cancel_wanted = True  # once the submit in flight has its job id
        elif self._cancel is None:
            self._cancel = self.client.send("cancel", {"job_id": self.job_id}, job_id=self.job_id)

    def step(self, timeout_s: float = 0.0) -> list[dict]:
        """Advance: handle what has arrived, send what is due, then wait for answers up to
        ``timeout_s`` and handle those too. Returns this job's new events (progress and
        state dicts)."""
        events: list[dict] = []
        for wait in (0.0, timeout_s):
            if self.finished:
                break
            # hashing is local work: waiting for the network would only slow it down
            self.client.poll(0.0 if self.phase == "hashing" else wait)
            events += self._advance()
        return events

    def _advance(self) -> list[dict]:
        events: list[dict] = []
        for _ in range(8):  # follow phase changes (submitting -> running ...) within one step
            phase = self.phase
            try:
                getattr(self, "_step_" + phase)()
            except ServiceError as e:
                self._end("failed", e)
            except OSError as e:
                self._end("failed", ServiceError("output" if phase == "fetching" else "bad_input", str(e)))
            new = self._watch.drain() if self._watch is not None else []
            for ev in new:
                self._apply(ev)
            events += new
            if self._cancel is not None and self._cancel.done and not self.finished:
                if self._cancel.error is not None:
                    self._end("failed", self._cancel.error)
                elif self._cancel.reply.content.get("state") == P.CANCELLED:  # it was queued or uploading
                    self._end("cancelled", ServiceError("cancelled", "cancelled"))
            if self.finished or self.phase == phase:
                break
        return events

    # -- phases ---------------------------------------------------------------------------
    def _end(self, phase: str, error: ServiceError | None) -> None:
        self.phase, self.error = phase, error
        if self._hash_state is not None:
            self._hash_state[2].close()
            self._hash_state = None
        for p in [*self._window, self._req]:
            if p is not None:
                self.client.pending.pop(p.msg_id, None)
        self._window, self._req = [], None
        for f in self._open.values():
            os.close(f["fd"])
        self._open = {}
        if self._watch is not None:
            self.client.watches.pop(self._watch.job_id, None)

    def _step_hashing(self) -> None:
        parts = [("video", self.video)] + ([("audio", self.audio)] if self.audio else [])
        if self._hash_state is None:
            todo = [(n, p) for n, p in parts if n not in self._hashes]
            if not todo:
                self.phase = "submitting"
                return
            name, path = todo[0]
            self._hash_state = (name, hashlib.sha256(), open(path, "rb"))
        name, h, f = self._hash_state
        chunk = f.read(HASH_STEP_BYTES)
        if chunk:
            h.update(chunk)
            return
        f.close()
        self._hashes[name] = h.hexdigest()
        self._hash_state = None

    def _input_spec(self, name: str, path: Path) -> dict:
        if self.path_mode:
            return {"path": str(path)}
        return {"upload": {"size": path.stat().st_size, "name": path.name, "sha256": self._hashes.get(name)}}

    def _step_submitting(self) -> None:
        if self._req is None:
            content = {"video": self._input_spec("video", self.video), "options": self.options,
                       "audio": None if self.audio is None else self._input_spec("audio", self.audio),
                       "transcript": self.transcript}
            self._req = self.client.send("submit", content)
            return
        if not self._req.done:
            return
        req, self._req = self._req, None
        if req.error is not None:
            if self.path_mode and self.auto_upload and req.error.code == "path_not_allowed":
                log.info("the server takes no paths from here; uploading instead")
                self.path_mode = False
                self.phase = "hashing"
                return
            raise req.error
        reply = req.reply.content
        self.job_id = reply["job_id"]
        self.job = reply["job"]
        self.state = self.job["state"]
        self._chunk = int(reply.get("chunk_bytes") or P.DEFAULT_CHUNK_BYTES)
        if self._cancel_wanted:
            self.cancel()
        if self.state == P.UPLOADING:
            self._uploads = [(n, p) for n, p in (("video", self.video), ("audio", self.audio)) if p is not None]
            self.upload_total = sum(p.stat().st_size for _, p in self._uploads)
            self.phase = "uploading"
        else:
            self._start_watch()

    def _step_uploading(self) -> None:
        part, path = self._uploads[0]
        size = path.stat().st_size
        for p in [p for p in self._window if p.done]:
            self._window.remove(p)
            if p.error is not None:
                if p.error.code == "upload_mismatch" and isinstance(p.error.content.get("received"), int):
                    self._offset = min(self._offset, p.error.content["received"])  # resend from there
                    continue
                raise p.error
            reply = p.reply.content
            self.upload_bytes = max(self.upload_bytes, self._uploaded_before + reply["received"])
            if reply.get("state") == P.QUEUED:  # every part is complete
                self.upload_bytes = self.upload_total
                self._start_watch()
                return
            if reply["received"] >= size and not self._window:
                self._uploads.pop(0)
                self._uploaded_before += size
                self._offset = 0
                return
        with open(path, "rb") as f:
            while len(self._window) < WINDOW and self._offset < size:
                f.seek(self._offset)
                data = f.read(self._chunk)
                self._window.append(self.client.send("upload", {"job_id": self.job_id, "part": part, "offset": self._offset},
                                                     job_id=self.job_id, buffers=[data]))
                self._offset += len(data)

    def _start_watch(self) -> None:
        self.phase = "running"
        if self.detach:
            self._end("done", None)
            return
        self._watch = self.client.watch(self.job_id, 0)

    def _step_running(self) -> None:
        if self._watch is None and self.job is None:
            # Attaching to a submitted job: ask where it stands before replaying its events.
            if self._req is None:
                self._req = self.client.send("status", {"job_id": self.job_id}, job_id=self.job_id)
            if not self._req.done:
                return
            self.job = self._req.result()["job"]
            self._req = None
            self.state = self.job["state"]
            error = self.job.get("error") or {}
            if self.state == P.DONE or (self.head and self.job.get("head_ready")):
                self._on_done()
            elif self.state in P.FINAL_STATES:
                self._end(self.state, ServiceError(error.get("code") or self.state, error.get("message") or self.state,
                                                   detail=error.get("detail"), content=error))
            elif not self.wait_for_job:
                self._end("failed", ServiceError("not_ready", f"job {self.job_id} is {self.state}"))
            return
        if self._watch is None:
            self._watch = self.client.watch(self.job_id, 0)
        if self._watch.error is not None:
            raise self._watch.error

    def _apply(self, ev: dict) -> None:
        if self.phase == "fetching":  # the head (or the result) is being fetched: a later end of the job
            return                    # (a failure in the fine stage, a cancel) does not undo that
        if ev.get("kind") == "progress":
            self.stage, self.fraction, self.message = ev.get("stage"), float(ev.get("fraction", 0.0)), ev.get("message", "")
        elif ev.get("kind") == "state":
            self.state = ev.get("state")
            self.message = ev.get("message") or ""
            if ev.get("head") and self.head:  # the head is ready: fetch it, leave the job running
                self._on_done()
                return
            if self.state == P.QUEUED:
                self.stage, self.fraction = None, 0.0
            err = ev.get("error")
            if self.state == P.FAILED:
                err = err or {}
                self._end("failed", ServiceError(err.get("code") or "internal", err.get("message") or "job failed",
                                                 detail=err.get("detail"), content=err))
            elif self.state == P.CANCELLED:
                self._end("cancelled", ServiceError("cancelled", self.message or "cancelled"))
            elif self.state == P.DONE:
                self._on_done()

    def _on_done(self) -> None:
        if self._watch is not None:
            self.client.watches.pop(self._watch.job_id, None)
        if not self.do_fetch:
            self._end("done", None)
            return
        self.phase = "fetching"
        self._req = None

    def _step_fetching(self) -> None:
        if self._req is None and self._files is None:
            self._req = self.client.send("fetch", {"job_id": self.job_id}, job_id=self.job_id)
        if self._req is not None:
            if not self._req.done:
                return
            content = self._req.result()
            self._req = None
            self.result_meta = content.get("meta")
            self._chunk = int(content.get("chunk_bytes") or P.DEFAULT_CHUNK_BYTES)
            self._files = list(content["manifest"]["files"])
            self.fetch_total = sum(int(f["size"]) for f in self._files)
            for entry in self._files:
                rel = Path(entry["path"])
                if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                    raise ServiceError("bad_result", f"the server named a result file outside the folder: {entry['path']!r}")
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._next = (0, 0)  # (file index, offset) of the next chunk to ask for
        # Chunks of several files in flight at once: a result has many small detail maps.
        for p in [p for p in self._window if p.done]:
            self._window.remove(p)
            c = p.result()
            f = self._open[c["path"]]
            data = p.reply.data(0)
            if len(data) != min(self._chunk, f["size"] - c["offset"]):
                raise ServiceError("bad_result", f"{c['path']}: chunk at {c['offset']} has {len(data)} bytes")
            os.pwrite(f["fd"], data, c["offset"])
            f["got"] += len(data)
            self.fetch_bytes += len(data)
            if f["got"] == f["size"]:
                self._close_file(c["path"])
        while len(self._window) < FETCH_WINDOW and self._next[0] < len(self._files):
            index, offset = self._next
            entry = self._files[index]
            size = int(entry["size"])
            if offset == 0:
                target = self.out_dir / entry["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                part = target.with_name(target.name + ".part")
                self._open[entry["path"]] = {"fd": os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
                                             "part": part, "target": target, "size": size, "got": 0,
                                             "sha256": entry.get("sha256")}
                if size == 0:
                    self._close_file(entry["path"])
            if offset < size:
                self._window.append(self.client.send("fetch", {"job_id": self.job_id, "path": entry["path"],
                                                               "offset": offset, "length": self._chunk},
                                                     job_id=self.job_id))
            offset += self._chunk
            self._next = (index + 1, 0) if offset >= size else (index, offset)
        if self._next[0] >= len(self._files) and not self._window and not self._open:
            self.result_path = self.out_dir / "result.npz"
            self._end("done", None)

    def _close_file(self, rel: str) -> None:
        f = self._open.pop(rel)
        os.close(f["fd"])
        if f["sha256"] and P.file_sha256(f["part"]) != f["sha256"]:
            raise ServiceError("bad_result", f"{rel} arrived damaged (sha256 mismatch)")
        os.replace(f["part"], f["target"])
