"""The 52 ARKit blendshape curves, spelled as ARKit spells them, from MediaPipe's scores.

MediaPipe's blendshape head was trained on ARKit-style targets and outputs 51 of the 52
ARKit names plus "_neutral"; it has no tongueOut, which is written as zeros.
"""
from __future__ import annotations

import numpy as np

from avface.core.timeseries import fill_missing, lowpass
from avface.result.arkit_names import ARKIT_NAMES

#: Low-pass cut-off of the curves: keeps blinks (about 100 ms) and syllable-rate mouth
#: motion (up to about 8 Hz) while removing the tracker's frame-to-frame flicker.
CUTOFF_HZ = 8.0


def arkit_curves(blendshapes: np.ndarray, names, valid: np.ndarray, fps: float,
                 cutoff_hz: float = CUTOFF_HZ) -> np.ndarray:
    """(T, 52) ARKit curves in [0, 1] from MediaPipe scores (T, C) named by `names`.

    Frames where `valid` is False (no face, or the tracker's scores are not to be trusted)
    are interpolated from their neighbours before filtering.
    """
    blendshapes = np.asarray(blendshapes, np.float64)
    if blendshapes.ndim != 2 or blendshapes.shape[1] != len(names):
        raise ValueError(f"expected (T, {len(names)}) blendshape scores, got {blendshapes.shape}")
    index = {n: i for i, n in enumerate(names)}
    out = np.zeros((len(blendshapes), len(ARKIT_NAMES)))
    for k, name in enumerate(ARKIT_NAMES):
        if name in index:
            out[:, k] = blendshapes[:, index[name]]
    out = fill_missing(out, valid)
    out = lowpass(out, fps, cutoff_hz)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def arkit_from_weights(weights: np.ndarray, shape_names) -> np.ndarray:
    """(T, 52) ARKit curves that *are* a model's fitted expression weights (T, E) whose shapes
    are ARKit's (``shape_names`` in Apple's spelling, ``arkit_names.apple_spelling``): each
    curve its shape's weight, a split pair's mean, zeros for a shape the model lacks."""
    from avface.result.arkit_names import arkit_sources

    weights = np.asarray(weights, np.float64)
    out = np.zeros((len(weights), len(ARKIT_NAMES)))
    for k, src in enumerate(arkit_sources(list(shape_names))):
        if src:
            out[:, k] = weights[:, list(src)].mean(1)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
