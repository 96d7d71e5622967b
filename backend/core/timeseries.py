"""Per-frame signals over time: filling frames without evidence and smoothing.

Every function takes (T, ...) arrays with time first.
"""
from __future__ import annotations

import numpy as np
from scipy.signal import butter, sosfiltfilt


def fill_missing(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Linear interpolation over time of rows where `valid` is False; edges hold the nearest
    valid row. x: (T, ...) -> same shape. All-invalid input gives zeros."""
    x = np.array(x, dtype=np.float64, copy=True)
    valid = np.asarray(valid, bool) & np.all(np.isfinite(x.reshape(len(x), -1)), axis=1)
    if not valid.any():
        return np.zeros_like(x)
    t = np.arange(len(x))
    flat = x.reshape(len(x), -1)
    for j in range(flat.shape[1]):
        flat[:, j] = np.interp(t, t[valid], flat[valid, j])
    return flat.reshape(x.shape)


def hold_nearest(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(T, ...) rows where ``valid`` is False replaced by the nearest valid row (earlier on a tie)."""
    valid = np.asarray(valid, bool)
    if not valid.any():
        raise ValueError("no valid frame to hold")
    idx = np.nonzero(valid)[0]
    t = np.arange(len(valid))
    pos = np.clip(np.searchsorted(idx, t), 1, len(idx) - 1) if len(idx) > 1 else np.zeros(len(t), int)
    if len(idx) > 1:
        left, right = idx[pos - 1], idx[pos]
        nearest = np.where(t - left <= right - t, left, right)
    else:
        nearest = np.full(len(t), idx[0])
    return np.asarray(x)[nearest]


def lowpass(x: np.ndarray, fps: float, cutoff_hz: float) -> np.ndarray:
    """Zero-phase second-order Butterworth low-pass along time. x: (T, ...)."""
    nyquist = fps / 2.0
    if len(x) < 10 or cutoff_hz >= 0.9 * nyquist:
        return np.asarray(x, np.float64)
    sos = butter(2, cutoff_hz / nyquist, output="sos")
    return sosfiltfilt(sos, x, axis=0)
