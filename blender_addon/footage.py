"""The user's footage as the add-on must speak of it: which source frames a movie strip shows,
and the user's own file wherever the backend names its uploaded copy. No ``bpy`` here: tested
with plain pytest.

A movie strip's frames: Blender shows a movie one picture per scene frame unless the strip
plays at the movie's own rate (the Sequencer's "Adjust Playback Rate" when a movie is added
in the UI; ``strips.new_movie`` in a script does not), and which it does is not readable
from Python. Its content spans ``frame_final_duration + frame_offset_start + frame_offset_end``
scene frames in every version, so the clip's own picture count against that span tells the
two apart (:func:`source_range`). ``frame_duration`` cannot: Blender 4.2 gives the picture
count, 5.0 the span.

Uploaded footage: a backend that cannot read the user's path gets the file uploaded and keeps
it as ``<data>/jobs/<job id>/input/video.<ext>`` (``audio.<ext>`` for a sound file); its
messages and the result's ``meta.source.path`` then name that copy. :func:`user_paths` puts
the user's own file back into a message, and :func:`is_uploaded_copy` recognises a path that
must never reach the scene.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePath

#: Parts of the backend's job store an uploaded input lives in (backend/service/store.py).
INPUT_DIR = "input"
JOBS_DIR = "jobs"
UPLOAD_PARTS = ("video", "audio")


@dataclass(frozen=True)
class SourceRange:
    start: int
    """First source frame the strip shows."""
    end: int
    """One past the last source frame it shows (at most ``pictures``)."""
    pictures: int
    """The clip's own frame count."""
    ratio: float
    """Source frames per scene frame along the strip: 1 for one picture per scene frame,
    fps / scene fps when the strip plays at the movie's own rate."""


def source_range(*, offset_start: float, offset_end: float, final_duration: int, fps: float, scene_fps: float,
                 pictures: int | None) -> SourceRange:
    """The source frames a movie strip shows. The offsets and the final duration are the
    strip's, in scene frames; ``fps`` is the movie's rate, ``pictures`` its frame count (None
    when unknown: then one picture per scene frame is assumed)."""
    span = final_duration + offset_start + offset_end  # scene frames the whole content spans
    if pictures is None or pictures < 1:
        pictures = max(int(round(span)), 1)
    rate = fps / scene_fps if fps > 0 and scene_fps > 0 else 1.0
    if span <= 0:
        ratio = 1.0
    else:
        candidates = [(abs(span - pictures), 1.0), (abs(span - pictures / rate), rate)]
        miss, ratio = min(candidates, key=lambda c: c[0])
        if miss > 1.0:  # neither: a retimed strip; spread its pictures evenly over its span
            ratio = pictures / span
    start = min(max(int(round(offset_start * ratio)), 0), pictures - 1)
    end = min(max(int(round((offset_start + final_duration) * ratio)), start + 1), pictures)
    return SourceRange(start, end, int(pictures), ratio)


def is_uploaded_copy(path) -> bool:
    """``path`` is the backend's copy of an upload (``.../jobs/<id>/input/video.mp4``)."""
    parts = re.split(r"[/\\]", str(path))  # the backend's machine may be Windows or not
    return (len(parts) >= 4 and parts[-2] == INPUT_DIR and parts[-4] == JOBS_DIR
            and PurePath(parts[-1]).stem in UPLOAD_PARTS)


def user_paths(text: str, files: dict[str, Path | str | None], *, bare_names: bool = True) -> str:
    """``text`` with every mention of the backend's uploaded copy of ``files`` (part -> the
    user's path: "video", "audio") replaced by the user's own file: a full path by the user's
    full path, and with ``bare_names`` (the files were uploaded), a bare name (``video.mp4``)
    by the file's name."""
    if not text:
        return text
    for part, user in files.items():
        if user is None:
            continue
        user = Path(user)
        # the backend names the copy by the part and the name's suffix, cleaned (checks.input_ref)
        suffix = re.escape("".join(ch for ch in user.suffix.lower() if ch.isalnum() or ch == ".")[:10])
        full = re.compile(rf"[^\s'\"()\[\]]*[/\\]{JOBS_DIR}[/\\][^/\\\s'\"]+[/\\]{INPUT_DIR}[/\\]{part}{suffix}(?![\w.])")
        text = full.sub(lambda _m, u=str(user): u, text)
        if not bare_names:
            continue
        bare = re.compile(rf"(?<![\w./\\-]){part}{suffix}(?![\w.])")
        text = bare.sub(lambda _m, n=user.name: n, text)
    return text
