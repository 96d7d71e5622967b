"""The benchmark's error measures, as pure functions of arrays.

Every function takes vertices in one unit (the harness passes metres) and returns errors in
that same unit, so that each can be checked against a hand-computed case; the harness turns
metres into millimetres. Landmark arrays follow the tracker's layout: vertex i is MediaPipe
landmark i (468 of them), pixels for 2D.

Definitions (also written into report.md):

* **NME** of a frame: the mean 2D distance between predicted and reference landmarks,
  divided by the inter-ocular distance (outer eye corners 33 and 263), in percent.
* **AUC@10 %**: the area under the cumulative error distribution of per-frame NME from 0 to
  10 %, divided by 10 % (1 is perfect). For frames with errors e_i this is exactly
  ``mean_i max(0, 1 - e_i / 10)``.
* **Lip-vertex error** of a frame: each frame of the prediction is rigidly aligned (rotation
  and translation, no scale) onto the reference on the skull-rigid vertices (``RIGID``), then
  the mean distance over the 40 ``LIPS`` vertices is taken. Head-pose differences do not
  count; only where the lips are relative to the skull does.
* **Jitter**: rigid head motion is removed by aligning every frame onto the first measured
  frame on ``RIGID``; the jitter is the mean over frames t (t-1, t, t+1 all "still") and over
  all vertices of |x[t+1] - 2 x[t] + x[t-1]|, in units per frame squared.
* **Still frames**: the head turns by less than ``max_rot_deg_s`` and its rigid points move
  by less than ``max_trans_s`` (per second), measured over a centred window, in runs of at
  least ``min_run`` frames.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from avface.bench.evaluate import aligned_vertex_error, nme
from avface.core.geometry import rigid, similarity
from avface.core.topology import LIPS, RIGID, inter_ocular

AUC_MAX_NME_PERCENT = 10.0
"""Upper limit of the NME axis of the cumulative error curve (the paper's AUC@10 %)."""

STILL_MAX_ROT_DEG_S = 12.0
"""A head turning slower than this (degrees per second) counts as still."""
STILL_MAX_TRANS_M_S = 0.03
"""... and whose skull points move slower than this (metres per second)."""
STILL_WINDOW_FRAMES = 2
"""Head speed at frame t is measured from frame t - w to t + w, which averages out the
tracker's frame-to-frame noise that would otherwise look like motion."""
STILL_MIN_RUN_S = 0.3
"""Only runs of still frames at least this long count (a jitter measure needs spans)."""


def _check_vertices(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"expected {name} as (T, V, 3) vertices, got shape {tuple(x.shape)}")
    return x


def _frame_index(frames, n: int) -> np.ndarray:
    if frames is None:
        return np.arange(n)
    frames = np.asarray(frames)
    if frames.dtype == bool:
        if frames.shape != (n,):
            raise ValueError(f"expected a ({n},) bool frame mask, got shape {frames.shape}")
        return np.nonzero(frames)[0]
    return frames.astype(np.int64)


def nme_frames(pred2d: np.ndarray, ref2d: np.ndarray, iod: np.ndarray, ids=None) -> np.ndarray:
    """(T,) per-frame NME in percent of ``iod`` over landmarks ``ids`` (default all)."""
    pred2d = np.asarray(pred2d, np.float64)
    ref2d = np.asarray(ref2d, np.float64)
    if ids is not None:
        ids = list(ids)
        pred2d, ref2d = pred2d[:, ids], ref2d[:, ids]
    return nme(pred2d[..., :2], ref2d[..., :2], iod)


def auc(nme_percent: np.ndarray, max_percent: float = AUC_MAX_NME_PERCENT) -> float:
    """Area under the cumulative error distribution of per-frame NME up to ``max_percent``,
    normalised to [0, 1]; NaN when there are no frames."""
    e = np.asarray(nme_percent, np.float64).ravel()
    e = e[np.isfinite(e)]
    if e.size == 0:
        return float("nan")
    # integral_0^L 1[e <= x] dx / L = max(0, 1 - e / L), averaged over frames
    return float(np.mean(np.clip(1.0 - e / max_percent, 0.0, 1.0)))


def ced_curve(nme_percent: np.ndarray, max_percent: float = AUC_MAX_NME_PERCENT, n: int = 201):
    """(x, fraction of frames with NME <= x) for plotting the cumulative error curve."""
    e = np.sort(np.asarray(nme_percent, np.float64).ravel())
    x = np.linspace(0.0, max_percent, n)
    frac = np.searchsorted(e, x, side="right") / max(len(e), 1)
    return x, frac


def align_rigid(src: np.ndarray, dst: np.ndarray, ids=RIGID) -> np.ndarray:
    """(V, 3) ``src`` moved by the rotation and translation that best map its ``ids``
    vertices onto ``dst``'s (least squares, no scale)."""
    ids = list(ids)
    r, t = rigid(src[ids], dst[ids], np.ones(len(ids)))
    return src @ r.T + t


def lip_vertex_error(pred: np.ndarray, ref: np.ndarray, frames=None, *, lips=LIPS, rigid_ids=RIGID) -> np.ndarray:
    """Per-frame lip-vertex error: mean distance over ``lips`` after rigidly aligning each
    frame of ``pred`` onto ``ref`` on ``rigid_ids``. pred, ref: (T, V, 3); returns (n,) in
    their unit for the selected frames."""
    pred = _check_vertices(pred, "pred")
    ref = _check_vertices(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred {pred.shape} and ref {ref.shape} differ in shape")
    idx = _frame_index(frames, len(pred))
    lips = list(lips)
    out = np.empty(len(idx))
    for j, t in enumerate(idx):
        moved = align_rigid(pred[t], ref[t], rigid_ids)
        out[j] = np.linalg.norm(moved[lips] - ref[t, lips], axis=-1).mean()
    return out


def lips_nme_between(pred2d: np.ndarray, ref2d: np.ndarray, frames=None, *, lips=LIPS) -> np.ndarray:
    """Per-frame lips NME (percent) of one projected reconstruction against another, normalised
    by the reference's inter-ocular distance. (T, >=468, 2) each; returns (n,)."""
    pred2d = np.asarray(pred2d, np.float64)
    ref2d = np.asarray(ref2d, np.float64)
    idx = _frame_index(frames, len(pred2d))
    return nme_frames(pred2d[idx], ref2d[idx], inter_ocular(ref2d[idx]), lips)


def remove_rigid_motion(vertices: np.ndarray, rigid_ids=RIGID, reference: np.ndarray | None = None) -> np.ndarray:
    """(T, V, 3) every frame rigidly aligned on ``rigid_ids`` onto ``reference`` (default the
    first frame): what is left is the motion of the face relative to the skull."""
    v = _check_vertices(vertices, "vertices")
    ref = v[0] if reference is None else np.asarray(reference, np.float64)
    return np.stack([align_rigid(v[t], ref, rigid_ids) for t in range(len(v))]) if len(v) else v.copy()


def head_speed(points: np.ndarray, fps: float, valid=None, *, rigid_ids=RIGID,
               window: int = STILL_WINDOW_FRAMES) -> tuple[np.ndarray, np.ndarray]:
    """Rigid head speed per frame from (T, V, 3) metric points: (rotation in degrees per
    second, translation of the ``rigid_ids`` centroid per second). Measured between frames
    t - window and t + window (clamped to the clip); NaN where either end is not valid."""
    p = _check_vertices(points, "points")
    n = len(p)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    ids = list(rigid_ids)
    rot = np.full(n, np.nan)
    trans = np.full(n, np.nan)
    for t in range(n):
        a, b = max(0, t - window), min(n - 1, t + window)
        if b <= a or not (valid[a] and valid[b]) or not (np.isfinite(p[a, ids]).all() and np.isfinite(p[b, ids]).all()):
            continue
        r, _ = rigid(p[a, ids], p[b, ids], np.ones(len(ids)))
        angle = math.degrees(math.acos(float(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))
        rot[t] = angle * fps / (b - a)
        trans[t] = np.linalg.norm(p[b, ids].mean(0) - p[a, ids].mean(0)) * fps / (b - a)
    return rot, trans


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open [start, end) runs of True in a (T,) bool array."""
    m = np.concatenate([[False], np.asarray(mask, bool), [False]])
    d = np.diff(m.astype(np.int8))
    return list(zip(np.nonzero(d == 1)[0].tolist(), np.nonzero(d == -1)[0].tolist()))


def still_frames(points: np.ndarray, fps: float, valid=None, *, max_rot_deg_s: float = STILL_MAX_ROT_DEG_S,
                 max_trans_s: float = STILL_MAX_TRANS_M_S, min_run_s: float = STILL_MIN_RUN_S,
                 rigid_ids=RIGID) -> np.ndarray:
    """(T,) bool: frames where the head is still (see the module docstring). ``max_trans_s``
    is in the unit of ``points`` per second (metres by default)."""
    rot, trans = head_speed(points, fps, valid, rigid_ids=rigid_ids)
    still = (rot < max_rot_deg_s) & (trans < max_trans_s)  # NaN compares False
    min_run = max(3, int(math.ceil(min_run_s * fps)))
    out = np.zeros(len(still), bool)
    for a, b in runs(still):
        if b - a >= min_run:
            out[a:b] = True
    return out


def jitter(vertices: np.ndarray, still: np.ndarray, rigid_ids=RIGID) -> float:
    """Mean vertex acceleration |x[t+1] - 2 x[t] + x[t-1]| (unit per frame squared) after
    removing rigid head motion, over frames t whose neighbours t-1, t+1 are also still;
    NaN when there are none."""
    v = _check_vertices(vertices, "vertices")
    still = np.asarray(still, bool)
    if still.shape != (len(v),):
        raise ValueError(f"expected a ({len(v)},) still mask, got {still.shape}")
    centre = np.zeros(len(v), bool)
    centre[1:-1] = still[:-2] & still[1:-1] & still[2:]
    if not centre.any():
        return float("nan")
    need = np.zeros(len(v), bool)
    for t in np.nonzero(centre)[0]:
        need[t - 1:t + 2] = True
    idx = np.nonzero(need)[0]
    aligned = np.full_like(v, np.nan)
    aligned[idx] = remove_rigid_motion(v[idx], rigid_ids, reference=v[idx[0]])
    t = np.nonzero(centre)[0]
    acc = aligned[t + 1] - 2.0 * aligned[t] + aligned[t - 1]  # (n, V, 3)
    return float(np.linalg.norm(acc, axis=-1).mean())


def vertex_error_similarity(pred: np.ndarray, gt: np.ndarray, frames=None) -> np.ndarray:
    """Per-frame mean distance over all vertices after a similarity alignment (scale,
    rotation, translation) of each predicted frame onto the ground truth; the scale absorbs
    the depth-focal ambiguity of a single view. Returns (n,) in gt's unit."""
    pred = _check_vertices(pred, "pred")
    gt = _check_vertices(gt, "gt")
    idx = _frame_index(frames, len(pred))
    mask = np.zeros(len(pred), bool)
    mask[idx] = True
    return aligned_vertex_error(pred, gt, mask)


def lip_error_similarity(pred: np.ndarray, gt: np.ndarray, frames=None, *, lips=LIPS, rigid_ids=RIGID) -> np.ndarray:
    """Per-frame lip-vertex error against ground truth: similarity alignment on the
    skull-rigid vertices (scale included, as for vertex_error_similarity), then the mean
    distance over ``lips``. Returns (n,) in gt's unit."""
    pred = _check_vertices(pred, "pred")
    gt = _check_vertices(gt, "gt")
    idx = _frame_index(frames, len(pred))
    ids, lips = list(rigid_ids), list(lips)
    out = np.empty(len(idx))
    for j, t in enumerate(idx):
        s, r, tr = similarity(pred[t, ids], gt[t, ids])
        moved = s * pred[t, lips] @ r.T + tr
        out[j] = np.linalg.norm(moved - gt[t, lips], axis=-1).mean()
    return out


def lip_opening(vertices: np.ndarray) -> np.ndarray:
    """(T,) distance between the inner-lip midpoints (landmarks 13 and 14)."""
    v = np.asarray(vertices, np.float64)
    return np.linalg.norm(v[:, 13] - v[:, 14], axis=-1)


def safe_mean(x) -> float:
    """Mean of the finite values; NaN when there are none."""
    a = np.asarray(x, np.float64).ravel()
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def ratio(value: float, reference: float) -> float:
    """value / reference, NaN when either is missing or the reference is not positive."""
    if not (math.isfinite(value) and math.isfinite(reference)) or reference <= 0:
        return float("nan")
    return value / reference


def geometric_mean(x) -> float:
    """Geometric mean of the finite positive values (the average of ratios); NaN if none."""
    a = np.asarray(x, np.float64).ravel()
    a = a[np.isfinite(a) & (a > 0)]
    return float(np.exp(np.log(a).mean())) if a.size else float("nan")


# --------------------------------------------------------------------------- the fine stage


@dataclass(eq=False)
class DetailFigures:
    """What a method with a fine stage hands the benchmark of one clip variant."""

    displacement: np.ndarray  #: (T, S, S) float32 metres, the maps as written
    mouth: np.ndarray  #: (S, S) bool, the mouth's texels (detail_occluder_ratio's region)
    photo_residual_coarse: float  #: held-out frames, 8-bit levels, coarse normals
    photo_residual_detail: float  #: the same with the detailed normals
    held_out_frames: int
    normal_maps: tuple | None = None
    """(frame, coarse, detailed): one held-out frame's UV normal maps, (S, S, 3) uint8 each,
    for the report's before/after picture."""


def detail_gain(coarse: float, detail: float) -> float:
    """1 - detail / coarse: the share of the coarse shading's photometric residual that the
    detail explains on frames it did not train on (NaN without a coarse residual)."""
    return 1.0 - detail / coarse if coarse and math.isfinite(coarse) and math.isfinite(detail) else math.nan
