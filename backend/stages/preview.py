"""preview.mp4: the fitted mesh drawn over the frames, with the original audio, so a person
can check a reconstruction at a glance. Drawn with OpenCV: front-facing triangle edges in
a thin wire, the lips in a brighter colour (green where the speech carried the mouth), and a
banner on occluded or filled frames."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from avface import media
from avface.core.geometry import project
from avface.errors import CancelledError
from avface.stages.fit import CoarseFit

log = logging.getLogger(__name__)

WIRE_RGB = (90, 220, 255)
LIPS_RGB = (255, 80, 120)
BANNER_RGB = (255, 170, 0)
#: The lips' colour on frames whose mouth the speech carried, so it shows without reading.
AUDIO_LIPS_RGB = (80, 255, 120)


def _lip_edges(faces: np.ndarray, lips: np.ndarray) -> np.ndarray:
    lipset = set(int(i) for i in lips)
    edges = {tuple(sorted((int(a), int(b)))) for f in faces for a, b in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0]))}
    return np.array([e for e in edges if e[0] in lipset and e[1] in lipset], np.int64).reshape(-1, 2)


def draw_mesh(frame: np.ndarray, pts: np.ndarray, faces: np.ndarray, lip_edges: np.ndarray,
              banner: str | None = None, lips_rgb: tuple = LIPS_RGB) -> np.ndarray:
    """Draw projected vertices pts (V, 2) over an RGB frame (H, W, 3); returns a new frame."""
    import cv2

    out = frame.copy()
    overlay = frame.copy()
    tri = pts[faces]  # (F, 3, 2)
    # image y points down, so a front-facing counter-clockwise triangle has negative area here
    area = (tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1]) - (tri[:, 2, 0] - tri[:, 0, 0]) * (tri[:, 1, 1] - tri[:, 0, 1])
    front = tri[area < 0]
    scale = 4  # sub-pixel precision for cv2's fixed-point drawing
    polys = [np.round(t * scale).astype(np.int32) for t in front]
    cv2.polylines(overlay, polys, True, WIRE_RGB, 1, cv2.LINE_AA, shift=2)
    out = cv2.addWeighted(overlay, 0.55, out, 0.45, 0)
    for a, b in lip_edges:
        pa = tuple(np.round(pts[a] * scale).astype(int))
        pb = tuple(np.round(pts[b] * scale).astype(int))
        cv2.line(out, pa, pb, lips_rgb, 2 if frame.shape[0] >= 400 else 1, cv2.LINE_AA, shift=2)
    if banner:
        h = max(14, frame.shape[0] // 20)
        cv2.rectangle(out, (0, 0), (frame.shape[1], h + 6), (0, 0, 0), -1)
        cv2.putText(out, banner, (4, h), cv2.FONT_HERSHEY_SIMPLEX, h / 30.0, BANNER_RGB, 1, cv2.LINE_AA)
    return out


@dataclass(frozen=True, eq=False)
class PreviewAudio:
    """The preview's soundtrack, and the frames whose mouth the speech carried."""

    path: str | None = None
    """The audio file to play (the video itself or ``--audio``), or None for a silent preview."""
    offset_s: float = 0.0
    """Where in ``path`` the clip's first frame is, seconds."""
    frames: np.ndarray | None = None
    """(T,) bool: the frames whose mouth the speech carried (the networks stage's
    ``NetworkRun.audio_frames``): their banner says so. None: none."""


@dataclass(frozen=True)
class PreviewHooks:
    """How the preview reports its progress and learns that the job was cancelled."""

    progress: Callable[[float], None] | None = None
    """``progress(fraction)``, called now and then."""
    should_cancel: Callable[[], bool] | None = None
    """Polled; True stops the preview with CancelledError."""


def write_preview(info: "media.VideoInfo", start: int, fit: CoarseFit, occluded: np.ndarray, path: Path, *,
                  audio: PreviewAudio = PreviewAudio(), detail_panel: Callable[[int], np.ndarray] | None = None,
                  hooks: PreviewHooks = PreviewHooks()) -> Path:
    """Stream the frames again, draw the fit over each, and encode with the audio
    (:class:`PreviewAudio`: its file and offset, and the frames whose mouth the speech
    carried, whose banner says so). ``detail_panel(i)`` gives frame i's second panel, drawn
    to the right: the surface shaded with the fine stage's detail
    (``avface.stages.detail.run.detail_panels``)."""
    audio_frames, progress, should_cancel = audio.frames, hooks.progress, hooks.should_cancel
    verts = fit.camera_vertices()
    pts_all = project(verts, fit.intrinsics)
    faces = fit.model.faces
    lip_edges = _lip_edges(faces, fit.model.lip_vertex_ids)
    n = len(verts)

    def frames():
        for i, frame in enumerate(media.iter_frames(info, start, start + n)):
            if should_cancel is not None and should_cancel():
                raise CancelledError("cancelled while writing the preview")
            banner = None
            if fit.filled[i]:
                banner = f"{start + i}: no face - filled"
            elif occluded[i]:
                banner = f"{start + i}: occluded"
            lips_rgb = LIPS_RGB
            if audio_frames is not None and audio_frames[i]:
                banner = (banner or f"{start + i}") + " - mouth from the audio"
                lips_rgb = AUDIO_LIPS_RGB
            drawn = draw_mesh(frame, pts_all[i], faces, lip_edges, banner, lips_rgb)
            yield drawn if detail_panel is None else np.concatenate([drawn, detail_panel(i)], axis=1)
            if progress and i % 10 == 0:
                progress((i + 1) / n)

    audio_path = None
    if audio.path is not None:
        # cut the audio to the frame range so it stays in sync with the preview
        wave = media.read_audio(audio.path, start_s=audio.offset_s, duration_s=n / info.fps)
        audio_path = path.with_suffix(".wav")
        media.write_wav(audio_path, wave, media.SAMPLE_RATE_HZ)
    try:
        media.write_video(frames(), path, info.fps, audio=audio_path)
    finally:
        if audio_path is not None:
            audio_path.unlink(missing_ok=True)
    return path
