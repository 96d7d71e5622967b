"""Small pieces the synthetic clip's modules share: units, sRGB conversion, smooth noise."""
from __future__ import annotations

import numpy as np
import scipy.ndimage

MM = 1e-3


def srgb_to_linear(c) -> np.ndarray:
    return np.power(np.clip(np.asarray(c, np.float32), 0, 1), 2.2)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    return np.power(np.clip(c, 0, 1), 1 / 2.2)


def smooth_noise(rng: np.random.Generator, n: int, rate_hz: float, cutoff_hz: float) -> np.ndarray:
    """(n,) zero-mean unit-std noise, low-passed at ``cutoff_hz``."""
    x = rng.standard_normal(n + int(4 * rate_hz / cutoff_hz))
    y = scipy.ndimage.gaussian_filter1d(x, sigma=rate_hz / (2 * np.pi * cutoff_hz), mode="wrap")[:n]
    return ((y - y.mean()) / max(float(y.std()), 1e-9)).astype(np.float64)
