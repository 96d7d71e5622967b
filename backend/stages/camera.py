"""The ``camera`` stage: the clip's vertical field of view, chosen as the one under which a
quick fit of the default model reprojects the tracker's landmarks best
(docs/architecture.md, "The camera"). ``--fov`` skips the estimate."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from avface.config import FitConfig
from avface.models.canonical_mesh import N_VERTICES
from avface.stages.confidence import mouth_visible
from avface.stages.fit import fit_default
from avface.stages.tracking import Tracking

log = logging.getLogger(__name__)


#: Fields of view (degrees, vertical) the camera estimate tries: telephoto interviews to webcams.
FOV_CANDIDATES = (15.0, 20.0, 26.0, 33.0, 42.0, 53.0, 65.0)
#: Frames the camera estimate fits (spread evenly over the trusted ones), and its L-BFGS steps.
#: On the benchmark's 11 clips, 24 frames and 15 steps choose within 3 degrees of 40 and 20
#: (0.6 s a clip against 1.1 s); 16 and 12 drift by up to 9 degrees.
FOV_FRAMES = 24
FOV_ITERATIONS = 15
#: Fewer trusted frames than this: no estimate, FitConfig.fov_deg.
FOV_MIN_FRAMES = 5


@dataclass(frozen=True)
class CameraEstimate:
    """The clip's vertical field of view, and how it was chosen."""

    fov_deg: float
    estimated: bool  #: False: FitConfig.fov_deg (too few trusted frames) or the user's
    candidates_deg: tuple[float, ...] = ()
    residual_px: tuple[float, ...] = ()  #: the subset fit's mean reprojection error at each candidate
    frames: int = 0

    def to_meta(self) -> dict:
        return {"fov_deg": round(self.fov_deg, 2), "estimated": self.estimated, "frames": self.frames,
                "candidates_deg": list(self.candidates_deg), "residual_px": [round(r, 4) for r in self.residual_px]}


def _frame_subset(tracking: Tracking, idx: np.ndarray) -> Tracking:
    """The tracking of frames ``idx`` only (every per-frame array indexed)."""
    n = tracking.n_frames
    per_frame = {}
    for f in dataclasses.fields(tracking):
        a = getattr(tracking, f.name)
        if isinstance(a, np.ndarray) and a.ndim >= 1 and len(a) == n:
            per_frame[f.name] = a[idx]
    return dataclasses.replace(tracking, **per_frame)


def estimate_fov(tracking: Tracking, mouth_conf: np.ndarray | None = None, config: FitConfig = FitConfig(), *,
                 candidates=FOV_CANDIDATES, n_frames: int = FOV_FRAMES) -> CameraEstimate:
    """The vertical field of view under which the default model reprojects the tracker's
    landmarks best. A wrong one is not free: the perspective it assumes bends the face's
    depth, and the model can follow only part of that bend, so the reprojection error grows
    (and the lips, which stand furthest forward of the skull, move). Each candidate gets a
    quick fit (no smoothness, ``FOV_ITERATIONS`` steps) of up to ``n_frames`` frames spread
    evenly over those whose mouth the tracker is trusted on; a parabola through the best
    candidate and its neighbours, in log focal length, refines the minimum (clamped to the
    candidates' range). Costs about 0.6 s on a CPU, whatever the clip's length."""
    det = np.asarray(tracking.detected, bool)
    trusted = det.copy()
    if mouth_conf is not None:
        trusted &= mouth_visible(np.asarray(mouth_conf))
    if trusted.sum() < FOV_MIN_FRAMES:
        trusted = det
    frames = np.flatnonzero(trusted)
    if len(frames) < FOV_MIN_FRAMES:
        return CameraEstimate(float(config.fov_deg), False, frames=len(frames))
    idx = frames[np.unique(np.linspace(0, len(frames) - 1, min(n_frames, len(frames))).round().astype(int))]
    sub = _frame_subset(tracking, idx)
    quick = dataclasses.replace(config, iterations=FOV_ITERATIONS, w_smooth_pose=0.0, w_smooth_expression=0.0)
    cands = np.asarray(candidates, np.float64)
    res = np.empty(len(cands))
    ref = sub.landmarks[:, :N_VERTICES, :2].astype(np.float64)
    for i, fov in enumerate(cands):
        f = fit_default(sub, dataclasses.replace(quick, fov_deg=float(fov)))
        res[i] = np.linalg.norm(f.projected_landmarks()[:, :N_VERTICES] - ref, axis=-1).mean()
    # log focal length: the candidates are about evenly spaced in it
    x = -np.log(np.tan(np.radians(cands) / 2.0))
    j = int(np.argmin(res))
    best = x[j]
    if 0 < j < len(cands) - 1:
        a, b, c = np.polyfit(x[j - 1:j + 2], res[j - 1:j + 2], 2)
        if a > 0:
            best = float(np.clip(-b / (2 * a), min(x[j - 1], x[j + 1]), max(x[j - 1], x[j + 1])))
    fov = float(np.degrees(2.0 * np.arctan(np.exp(-best))))
    log.info("camera: vertical field of view %.1f degrees (estimated on %d frames)", fov, len(idx))
    return CameraEstimate(fov, True, tuple(float(c) for c in cands), tuple(float(r) for r in res), len(idx))


def clip_camera(tracking: Tracking, mouth_conf: np.ndarray | None, config: FitConfig = FitConfig(),
                fov_deg: float | None = None) -> CameraEstimate:
    """The caller's field of view when ``fov_deg`` is given, else :func:`estimate_fov`'s
    (what reconstruct and the benchmark both do)."""
    if fov_deg is not None:
        return CameraEstimate(float(fov_deg), False)
    return estimate_fov(tracking, mouth_conf, config)
