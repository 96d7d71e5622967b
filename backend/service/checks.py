"""The checks of what a client sends: a submit's inputs and options, client paths against
the server's roots, and the fields of upload, watch and fetch requests.

Each check raises :class:`RequestError` with the error code the client gets (docs/protocol.md);
none of them changes a job or the store.
"""
from __future__ import annotations

import os
from pathlib import Path

from avface.config import NAMED_CHECKPOINTS, PATH_OPTIONS, ReconstructOptions
from avface.errors import InputError
from avface.service import protocol as P
from avface.service import store as S
from avface.service.worker import probe_duration_s

MAX_TRANSCRIPT_CHARS = 256_000


class RequestError(Exception):
    def __init__(self, code: str, message: str, **extra):
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra


# -- submit -----------------------------------------------------------------------------------
def check_path(value: object, what: str, roots: tuple[Path, ...], *, want_dir: bool = False) -> Path:
    if not isinstance(value, str) or not value or "\x00" in value:
        raise RequestError("bad_request", f"{what} must be a non-empty path string")
    if not os.path.isabs(value):
        raise RequestError("path_not_allowed", f"{what} must be an absolute path, got {value!r}")
    real = Path(os.path.realpath(value))
    if not any(real == root or root in real.parents for root in roots):
        raise RequestError("path_not_allowed", f"{what} {value!r} is not under the server's roots"
                           + ("" if roots else " (this server takes uploads only)"))
    if not (real.is_dir() if want_dir else real.is_file()):
        raise RequestError("not_found", f"{what} {value!r} is not a readable {'folder' if want_dir else 'file'}")
    return real


def input_ref(spec: object, part: str, roots: tuple[Path, ...], max_upload_bytes: int) -> S.InputRef:
    if not isinstance(spec, dict) or ("path" in spec) == ("upload" in spec):
        raise RequestError("bad_request", f"submit.{part} must be {{'path': ...}} or {{'upload': {{'size', 'name'}}}}")
    if "path" in spec:
        real = check_path(spec["path"], part, roots)
        return S.InputRef(mode="path", path=str(real), name=real.name, size=real.stat().st_size)
    up = spec["upload"]
    if not isinstance(up, dict) or type(up.get("size")) is not int or up["size"] < 1:
        raise RequestError("bad_request", f"submit.{part}.upload.size must be a positive integer")
    if up["size"] > max_upload_bytes:
        raise RequestError("too_large", f"{part} is {up['size']} bytes; this server takes at most "
                           f"{max_upload_bytes}")
    sha = up.get("sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
        raise RequestError("bad_request", f"submit.{part}.upload.sha256 must be 64 hex digits")
    name = os.path.basename(str(up.get("name") or part))[:200] or part
    suffix = "".join(ch for ch in Path(name).suffix.lower() if ch.isalnum() or ch == ".")[:10]
    return S.InputRef(mode="upload", path=f"{S.INPUT_DIR}/{part}{suffix}", name=name, size=up["size"], sha256=sha)


def check_options(options: object, roots: tuple[Path, ...], models: dict) -> dict:
    """A submit's options, checked; ``models`` is what the model probe found (empty until
    it reports)."""
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
            out[key] = str(check_path(out[key], key, roots, want_dir=kind == "dir"))
    model = out.get("model")
    if model is not None and models and out.get("flame_dir") is None:
        if model not in models:
            raise RequestError("bad_input", f"unknown model {model!r}; this server has {', '.join(sorted(models))}")
        if not models[model].get("available", True):
            raise RequestError("model_file", f"model {model!r} is not available here: {models[model].get('reason')}")
    return out


def check_transcript(transcript: object) -> None:
    if transcript is not None and (not isinstance(transcript, str) or len(transcript) > MAX_TRANSCRIPT_CHARS):
        raise RequestError("bad_request", f"transcript must be text of at most {MAX_TRANSCRIPT_CHARS} characters")


def check_duration(path: Path, options: dict, max_duration_s: float) -> None:
    """``too_long`` now, before a worker starts, for a video over the duration limit. A
    file that cannot be probed passes: the worker reports the media error with context."""
    if not max_duration_s:
        return
    try:
        duration = probe_duration_s(path, options.get("frame_start"), options.get("frame_end"))
    except InputError:
        return  # a frame range outside the clip: the job reports it with the clip's length
    if duration is not None and duration > max_duration_s:
        raise RequestError("too_long", f"the video is {duration:.1f} s long; this server takes at most "
                                       f"{max_duration_s:g} s (--max-duration-s)")


# -- upload, watch, fetch ---------------------------------------------------------------------
def upload_target(job: S.Job, msg: P.Message) -> tuple[str, S.InputRef, int]:
    """The part, its input and the offset an upload chunk is for."""
    c = msg.content
    if job.state != P.UPLOADING:
        raise RequestError("bad_state", f"job {job.job_id} is {job.state}, not uploading")
    part, offset = c.get("part"), c.get("offset")
    ref = {"video": job.video, "audio": job.audio}.get(part) if isinstance(part, str) else None
    if ref is None or ref.mode != "upload":
        raise RequestError("bad_request", f"upload.part must name an uploaded input of this job, got {part!r}")
    if type(offset) is not int or offset < 0 or len(msg.buffers) != 1:
        raise RequestError("bad_request", "upload needs an integer offset >= 0 and exactly one buffer")
    return part, ref, offset


def check_chunk(offset: int, n: int, received: int, size: int) -> None:
    """A chunk must continue (or repeat) what was received, within the declared size."""
    if offset > received or offset + n > size:
        raise RequestError("upload_mismatch", f"chunk [{offset}, {offset + n}) does not continue the "
                           f"{received} of {size} bytes received", received=received)


def check_since(since: object) -> None:
    if type(since) is not int:
        raise RequestError("bad_request", "watch.since must be an integer")


def check_fetch_range(offset: object, length: object) -> None:
    if type(offset) is not int or type(length) is not int or offset < 0 or length < 1:
        raise RequestError("bad_request", "fetch.offset must be an integer >= 0 and fetch.length >= 1")
