"""Error measures shared by the demo, the tests and the benchmark."""
from __future__ import annotations

import numpy as np

from avface.core.geometry import similarity


def aligned_vertex_error(pred: np.ndarray, gt: np.ndarray, frames: np.ndarray | None = None) -> np.ndarray:
    """Per-frame mean vertex distance after a similarity alignment of pred onto gt.

    pred, gt: (T, V, 3) in the same units; frames: (T,) bool of the frames to measure.
    Returns (n,) errors in the units of gt, one per measured frame.
    """
    pred = np.asarray(pred, np.float64)
    gt = np.asarray(gt, np.float64)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"expected two (T, V, 3) arrays of one shape, got {pred.shape} and {gt.shape}")
    idx = np.arange(len(pred)) if frames is None else np.nonzero(np.asarray(frames, bool))[0]
    out = np.empty(len(idx))
    for j, t in enumerate(idx):
        s, r, tr = similarity(pred[t], gt[t])
        out[j] = np.linalg.norm(s * pred[t] @ r.T + tr - gt[t], axis=-1).mean()
    return out


def nme(pred2d: np.ndarray, gt2d: np.ndarray, iod: np.ndarray) -> np.ndarray:
    """Per-frame normalised mean error in percent: mean landmark distance / inter-ocular
    distance. pred2d, gt2d: (T, M, 2); iod: (T,). Returns (T,)."""
    err = np.linalg.norm(np.asarray(pred2d, np.float64) - np.asarray(gt2d, np.float64), axis=-1).mean(-1)
    return 100.0 * err / np.maximum(np.asarray(iod, np.float64), 1e-9)
