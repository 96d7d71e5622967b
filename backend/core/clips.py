"""Finding talking-face clips in a folder: the videos, and the separate audio or transcript
that belongs to each. A ``manifest.json`` (as in ../shared/data) pairs videos with audio files
where the container has none; without one, every video file is a clip and a ``.wav`` of the
same stem beside it is its audio."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from avface.errors import InputError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".m4v")


@dataclass(frozen=True)
class Clip:
    id: str
    video: Path
    audio: Path | None = None
    """A separate audio file, when the container has no audio track of its own."""


def discover_clips(folder: Path) -> list[Clip]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of clips")
    manifest = folder / "manifest.json"
    clips: list[Clip] = []
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
            for c in data.get("clips", []):
                video = folder / c["video"]
                audio = folder / c["audio"] if c.get("audio") else None
                if not video.is_file():
                    log.warning("manifest lists %s, which is missing; skipped", video)
                    continue
                clips.append(Clip(str(c.get("id") or video.stem), video, audio if audio and audio.is_file() else None))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{manifest} is not a valid clip manifest: {e}") from e
        return clips
    for video in sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES):
        wav = video.with_suffix(".wav")
        clips.append(Clip(video.stem, video, wav if wav.is_file() else None))
    return clips
