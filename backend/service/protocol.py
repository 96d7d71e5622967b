"""The AVFace service wire protocol: one envelope for every message (docs/protocol.md).

A message is a ZeroMQ multipart message::

    [routing ids...] DELIMITER header content [buffer ...]

- ``DELIMITER`` is ``b"<AVFACE|MSG>"``; the frames before it are routing identities (the
  ROUTER socket adds them, a DEALER client sends none).
- ``header`` is a UTF-8 JSON object: ``msg_id``, ``msg_type``, ``version`` (the protocol
  version, ``"MAJOR.MINOR"``), ``job_id`` (or null), ``time`` (ISO 8601, UTC),
  ``parent_id`` (the ``msg_id`` this message answers, null in a request) and ``buffers``,
  one descriptor ``{"dtype": ..., "shape": [...]}`` per binary frame that follows.
- ``content`` is a UTF-8 JSON object, encoded with ``allow_nan=False``.
- each buffer is the raw bytes of a C-contiguous array; bytes payloads (file chunks) are
  ``uint8`` arrays of shape ``(n,)``.

This module is vendored into the Blender add-on next to ``client.py``: it imports only the
standard library, pyzmq and numpy, never ``avface`` itself.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

import numpy as np

#: "MAJOR.MINOR": a message whose MAJOR differs from ours is refused with ``version_mismatch``.
PROTOCOL_VERSION = "1.0"
DELIMITER = b"<AVFACE|MSG>"

#: Default endpoint of a local backend.
DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"

#: JSON frames (header, content) larger than this are refused with ``too_large``.
MAX_JSON_BYTES = 1 << 20
#: Default bound on one binary frame; a server may configure its own (hello reports it).
DEFAULT_MAX_FRAME_BYTES = 4 << 20
#: A server's ZeroMQ socket drops frames over max(this, 4 x its max frame) before the server
#: can read them, so no error reply is possible for those.
HARD_FRAME_CAP_BYTES = 64 << 20
#: Default size of one upload or download chunk.
DEFAULT_CHUNK_BYTES = 1 << 20
#: At most this many routing frames and buffers in one message.
MAX_ROUTING_FRAMES = 4
MAX_BUFFERS = 4

_MSG_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
#: Job ids are made by the server: 32 lowercase hex digits, so they can never name a path
#: outside the data dir.
JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")

# ---------------------------------------------------------------------------------------
# Message types. Every request is answered by "<type>_reply" or by "error"; "progress" and
# "state" are events pushed to clients that watch a job.
# ---------------------------------------------------------------------------------------
REQUEST_TYPES: dict[str, str] = {
    "hello": "versions, device, limits and which face models are available (and why not)",
    "ping": "liveness; answered by the socket loop whatever the workers are doing",
    "submit": "create a job from local paths under the server's roots, or announce uploads",
    "upload": "one chunk of an uploaded input (one buffer)",
    "status": "one job's state",
    "list_jobs": "every job's state, newest first",
    "watch": "stream a job's events from sequence number `since`; the reply carries the backlog",
    "unwatch": "stop streaming a job's events to this client",
    "cancel": "cancel a queued or running job; a running worker is terminated",
    "fetch": "without `path`: the result's manifest (once the job is done, or earlier once its head is ready: "
             "`complete` says which); with `path`: one chunk of that file",
    "delete": "remove a finished job and its folder",
    "stats": "server counters: memory, jobs by state, errors by code",
}
EVENT_TYPES: dict[str, str] = {
    "progress": "stage progress of a running job",
    "state": "a job changed state (the final one carries the error, if any)",
}
REPLY_TYPES: dict[str, str] = {f"{t}_reply": f"answer to {t}" for t in REQUEST_TYPES}
REPLY_TYPES["error"] = "a request failed; content has code, message and detail"
MESSAGE_TYPES: dict[str, str] = {**REQUEST_TYPES, **EVENT_TYPES, **REPLY_TYPES}

# Job states.
UPLOADING, QUEUED, RUNNING, DONE, FAILED, CANCELLED = "uploading", "queued", "running", "done", "failed", "cancelled"
JOB_STATES = (UPLOADING, QUEUED, RUNNING, DONE, FAILED, CANCELLED)
FINAL_STATES = frozenset({DONE, FAILED, CANCELLED})

# ---------------------------------------------------------------------------------------
# Error codes. The domain codes repeat avface.errors (a test keeps them equal) because this
# module must not import avface.
# ---------------------------------------------------------------------------------------
ERROR_CODES: dict[str, str] = {
    # envelope and protocol
    "bad_envelope": "the frames are not a valid envelope (delimiter, JSON, header fields, buffer descriptors)",
    "version_mismatch": "the header's protocol major version differs from the server's",
    "unknown_type": "the msg_type is not a request type",
    "bad_request": "the content lacks a field or a field has the wrong type",
    "too_large": "a frame, a JSON part or a declared upload is larger than the server's limit",
    "too_many_chunks": "an upload used more chunks than the server's limit",
    "queue_full": "the queue already holds the server's maximum number of waiting jobs",
    "too_long": "the input video is longer than the server's maximum duration",
    "path_not_allowed": "a path sent by the client is not under one of the server's roots",
    "not_found": "a path sent by the client does not name a readable file",
    "bad_job_id": "a job id is not 32 lowercase hex digits",
    "unknown_job": "no job with this id",
    "bad_state": "the job is not in a state that allows this request",
    "job_active": "the job is queued or running; cancel it first",
    "not_ready": "the job has no result yet",
    "upload_mismatch": "an upload chunk's offset, or the uploaded file's size or sha256, does not match",
    "worker_died": "the worker process died (killed, out of memory, crashed) on every allowed attempt",
    "job_timeout": "the job's worker reported no progress for the server's hang timeout and was stopped",
    "internal": "an unexpected error in the server or the worker; the message and the job log say more",
    "no_answer": "(client side) the server did not answer within the timeout after the allowed retries",
    # domain errors raised by the reconstruction (avface.errors)
    "avface_error": "a reconstruction error without a more specific code",
    "bad_input": "bad arguments or options",
    "bad_media": "the video or audio is unreadable, truncated or has no usable stream",
    "no_face": "no face was detected in any frame",
    "model_file": "a required model file is missing or malformed",
    "output": "the job's output folder cannot be written",
    "bad_result": "the result does not follow the result contract",
    "cancelled": "the job was cancelled",
}


class ProtocolError(Exception):
    """A message that cannot be accepted. ``msg_id``/``msg_type`` are filled in as far as the
    header could be read, so that the error reply can still name its parent."""

    def __init__(self, code: str, message: str, *, msg_id: str | None = None, msg_type: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.msg_id = msg_id
        self.msg_type = msg_type


def new_msg_id() -> str:
    return uuid.uuid4().hex


def utc_now() -> str:
    """ISO 8601 time in UTC with millisecond precision, as in every header."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dumps(obj: Any) -> bytes:
    """Canonical JSON: no NaN or infinity (the receiver may not be Python), UTF-8."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(data: bytes) -> Any:
    return json.loads(bytes(data).decode("utf-8"), parse_constant=_reject_constant)


def file_sha256(path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (uploads and results are checked with it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe(array: np.ndarray) -> dict:
    """Buffer descriptor of a C-contiguous array."""
    return {"dtype": array.dtype.str, "shape": list(array.shape)}


@dataclass
class Message:
    """One decoded (or to-be-encoded) message. ``buffers`` hold bytes-like objects."""

    header: dict
    content: dict = field(default_factory=dict)
    buffers: list = field(default_factory=list)
    #: Routing frames in front of the delimiter (server side only).
    routing: list = field(default_factory=list)

    @property
    def msg_id(self) -> str:
        return self.header["msg_id"]

    @property
    def msg_type(self) -> str:
        return self.header["msg_type"]

    @property
    def job_id(self) -> str | None:
        return self.header.get("job_id")

    @property
    def parent_id(self) -> str | None:
        return self.header.get("parent_id")

    def array(self, index: int) -> np.ndarray:
        """Buffer ``index`` as a read-only numpy array of its described dtype and shape."""
        desc = self.header["buffers"][index]
        return np.frombuffer(self.buffers[index], dtype=np.dtype(desc["dtype"])).reshape(desc["shape"])

    def data(self, index: int = 0) -> bytes:
        """Buffer ``index`` as bytes."""
        return _frame_bytes(self.buffers[index])


def build(
    msg_type: str,
    content: dict | None = None,
    *,
    job_id: str | None = None,
    parent: Message | str | None = None,
    buffers: Sequence[Any] = (),
) -> Message:
    """A new message. ``buffers`` may be numpy arrays (described by dtype and shape) or
    bytes-like objects (described as uint8 of shape (n,))."""
    if msg_type not in MESSAGE_TYPES:
        raise ValueError(f"unknown msg_type {msg_type!r}")
    descs, raw = [], []
    for buf in buffers:
        if isinstance(buf, np.ndarray):
            arr = np.ascontiguousarray(buf)
            descs.append(describe(arr))
            raw.append(memoryview(arr).cast("B") if arr.size else b"")
        else:
            view = memoryview(buf)
            descs.append({"dtype": "|u1", "shape": [view.nbytes]})
            raw.append(view)
    parent_id = parent.msg_id if isinstance(parent, Message) else parent
    header = {
        "msg_id": new_msg_id(),
        "msg_type": msg_type,
        "version": PROTOCOL_VERSION,
        "job_id": job_id,
        "time": utc_now(),
        "parent_id": parent_id,
        "buffers": descs,
    }
    return Message(header=header, content=dict(content or {}), buffers=raw)


def encode(msg: Message) -> list:
    """Frames to send (routing frames first, if any)."""
    return [*msg.routing, DELIMITER, dumps(msg.header), dumps(msg.content), *msg.buffers]


def _frame_bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def _frame_len(frame: Any) -> int:
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


def split_routing(frames: Sequence[Any]) -> tuple[list, list]:
    """(routing frames, the rest starting after the delimiter). Raises ProtocolError when
    there is no delimiter within the allowed routing prefix."""
    for i, frame in enumerate(frames[: MAX_ROUTING_FRAMES + 1]):
        if _frame_len(frame) == len(DELIMITER) and _frame_bytes(frame) == DELIMITER:
            return [_frame_bytes(f) for f in frames[:i]], list(frames[i + 1 :])
    raise ProtocolError("bad_envelope", "no <AVFACE|MSG> delimiter in the first frames")


def decode(
    frames: Sequence[Any],
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    max_json_bytes: int = MAX_JSON_BYTES,
) -> Message:
    """Parse and check one message; the frames in front of the delimiter (a ROUTER's
    identities) land in ``routing``. Raises :class:`ProtocolError`."""
    routing, rest = split_routing(frames)
    if len(rest) < 2:
        raise ProtocolError("bad_envelope", f"expected header and content after the delimiter, got {len(rest)} frames")
    if _frame_len(rest[0]) > max_json_bytes:
        raise ProtocolError("too_large", f"header is {_frame_len(rest[0])} bytes; the limit is {max_json_bytes}")
    try:
        header = loads(_frame_bytes(rest[0]))
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError("bad_envelope", f"header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise ProtocolError("bad_envelope", "header is not a JSON object")
    msg_id = header.get("msg_id")
    msg_id = msg_id if isinstance(msg_id, str) and _MSG_ID_RE.match(msg_id) else None
    msg_type = header.get("msg_type") if isinstance(header.get("msg_type"), str) else None
    if msg_id is None:
        raise ProtocolError("bad_envelope", "header.msg_id must be 1-64 characters of [A-Za-z0-9_.:-]")
    version = header.get("version")
    if not isinstance(version, str) or not re.match(r"^\d+\.\d+$", version):
        raise ProtocolError("bad_envelope", "header.version must be 'MAJOR.MINOR'", msg_id=msg_id, msg_type=msg_type)
    if version.split(".")[0] != PROTOCOL_VERSION.split(".")[0]:
        raise ProtocolError(
            "version_mismatch",
            f"protocol version {version} is not compatible with this end's {PROTOCOL_VERSION}",
            msg_id=msg_id,
            msg_type=msg_type,
        )
    if msg_type is None:
        raise ProtocolError("bad_envelope", "header.msg_type must be a string", msg_id=msg_id)
    for key in ("job_id", "parent_id"):
        if header.get(key) is not None and not isinstance(header[key], str):
            raise ProtocolError("bad_envelope", f"header.{key} must be a string or null", msg_id=msg_id, msg_type=msg_type)
    descs = header.get("buffers", [])
    buffers = rest[2:]
    if not isinstance(descs, list) or len(descs) != len(buffers):
        raise ProtocolError(
            "bad_envelope", f"header.buffers describes {len(descs) if isinstance(descs, list) else '?'} buffers, "
            f"{len(buffers)} follow", msg_id=msg_id, msg_type=msg_type,
        )
    if len(buffers) > MAX_BUFFERS:
        raise ProtocolError("too_large", f"{len(buffers)} buffers; at most {MAX_BUFFERS}", msg_id=msg_id, msg_type=msg_type)
    for i, (desc, buf) in enumerate(zip(descs, buffers)):
        size = _frame_len(buf)
        if size > max_frame_bytes:
            raise ProtocolError(
                "too_large", f"buffer {i} is {size} bytes; the limit is {max_frame_bytes}", msg_id=msg_id, msg_type=msg_type
            )
        try:
            dtype = np.dtype(desc["dtype"])
            shape = [int(s) for s in desc["shape"]]
            if dtype.hasobject or any(s < 0 for s in shape) or not isinstance(desc["shape"], list):
                raise ValueError("object dtype or negative shape")
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError("bad_envelope", f"buffer {i} descriptor {desc!r} is invalid: {e}", msg_id=msg_id, msg_type=msg_type) from e
        if math.prod(shape) * dtype.itemsize != size:
            raise ProtocolError(
                "bad_envelope", f"buffer {i} is {size} bytes, its descriptor {desc!r} says "
                f"{math.prod(shape) * dtype.itemsize}", msg_id=msg_id, msg_type=msg_type,
            )
    if _frame_len(rest[1]) > max_json_bytes:
        raise ProtocolError("too_large", f"content is {_frame_len(rest[1])} bytes; the limit is {max_json_bytes}",
                            msg_id=msg_id, msg_type=msg_type)
    try:
        content = loads(_frame_bytes(rest[1]))
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError("bad_envelope", f"content is not JSON: {e}", msg_id=msg_id, msg_type=msg_type) from e
    if not isinstance(content, dict):
        raise ProtocolError("bad_envelope", "content is not a JSON object", msg_id=msg_id, msg_type=msg_type)
    if msg_type not in MESSAGE_TYPES:
        raise ProtocolError("unknown_type", f"unknown msg_type {msg_type!r}", msg_id=msg_id, msg_type=msg_type)
    return Message(header=header, content=content, buffers=list(buffers), routing=routing)


def reply(request: Message, content: dict | None = None, *, buffers: Iterable[Any] = (), job_id: str | None = None) -> Message:
    """The ``<type>_reply`` to ``request``, routed back to its sender."""
    msg = build(f"{request.msg_type}_reply", {"status": "ok", **(content or {})}, job_id=job_id or request.job_id,
                parent=request, buffers=list(buffers))
    msg.routing = list(request.routing)
    return msg


def error_reply(
    routing: list, code: str, message: str, *, parent_id: str | None = None, job_id: str | None = None,
    request_type: str | None = None, detail: str | None = None, extra: dict | None = None,
) -> Message:
    """An ``error`` message answering ``parent_id`` (null when the request's header could
    not be read)."""
    if code not in ERROR_CODES:
        raise ValueError(f"undocumented error code {code!r}")
    content = {"status": "error", "code": code, "message": message, "request_type": request_type, "detail": detail}
    content.update(extra or {})
    msg = build("error", content, job_id=job_id, parent=parent_id)
    msg.routing = list(routing)
    return msg


_LOOPBACK_HOSTS = {"localhost", "::1", "[::1]", "ip6-localhost"}


def is_loopback(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// endpoints on a loopback interface. Wildcards
    (``*``, ``0.0.0.0``) and named interfaces count as non-loopback."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    # tcp://[source;]host:port, host may be [v6]
    host = rest.split(";")[-1].rsplit(":", 1)[0]
    if host in _LOOPBACK_HOSTS:
        return True
    parts = host.split(".")
    return len(parts) == 4 and parts[0] == "127" and all(p.isdigit() for p in parts)
