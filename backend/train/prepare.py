"""Training clips from videos: track, hear, and keep what training needs (avface.train.data),
for every clip of a folder as :func:`avface.core.clips.discover_clips` finds them (a
``manifest.json`` as the benchmark reads it, or videos with a ``.wav`` of the same stem).

The tracking is cached per clip content as the pipeline caches it, so preparing a folder
twice, or preparing the benchmark's clips, does not run MediaPipe again.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np

from avface.core.clips import Clip, discover_clips
from avface.errors import AVFaceError, InputError
from avface.stages.confidence import visual_confidence
from avface.train.data import prepare_clip, save_clip

log = logging.getLogger(__name__)


def prepare_video(video: str | Path, audio: str | Path | None = None, *, cache_dir: Path | None = None,
                  fov_deg: float = 63.0) -> dict[str, np.ndarray]:
    """One training clip from a video (its own audio track, or ``audio``)."""
    from avface import media
    from avface.stages import audio as audio_mod
    from avface.stages.tracking import track

    info = media.probe(video)
    tracking = track(info, cache_dir=cache_dir)
    features = None
    source = audio if audio is not None else (video if info.has_audio else None)
    if source is not None:
        wave = media.read_audio(source)
        features = audio_mod.extract_features(wave, media.SAMPLE_RATE_HZ, tracking.n_frames, info.fps)
    else:
        log.warning("%s has no audio: its windows train the video side only", video)
    conf, _ = visual_confidence(tracking)
    return prepare_clip(tracking, features, mouth_conf=conf, fov_deg=fov_deg)


def prepare_folder(folder: str | Path, out_dir: str | Path, *, cache_dir: Path | None = None,
                   progress: Callable[[int, int, str], None] | None = None) -> list[Path]:
    """Prepare every clip of ``folder`` into ``out_dir/ID.npz`` (already prepared ones are
    kept). A clip that cannot be read is skipped with a warning naming it. Returns the files."""
    clips: list[Clip] = discover_clips(Path(folder))
    if not clips:
        raise InputError(f"{folder} holds no video clips")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, clip in enumerate(clips):
        path = out_dir / f"{clip.id}.npz"
        if progress:
            progress(i, len(clips), clip.id)
        if not path.is_file():
            try:
                save_clip(path, prepare_video(clip.video, clip.audio, cache_dir=cache_dir))
            except AVFaceError as e:
                log.warning("skipping %s: %s", clip.video, e)
                continue
        written.append(path)
    if not written:
        raise InputError(f"no clip of {folder} could be prepared for training")
    return written
