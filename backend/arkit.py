"""The 52 ARKit blendshape curves, spelled as ARKit spells them, from MediaPipe's scores.

MediaPipe's blendshape head was trained on ARKit-style targets and outputs 51 of the 52
ARKit names plus "_neutral"; it has no tongueOut, which is written as zeros.
"""
from __future__ import annotations

import numpy as np
from scipy.signal import butter, sosfiltfilt

#: ARKit's ARFaceAnchor.BlendShapeLocation names, in Apple's documented order.
ARKIT_NAMES = (
    "eyeBlinkLeft", "eyeLookDownLeft", "eyeLookInLeft", "eyeLookOutLeft", "eyeLookUpLeft", "eyeSquintLeft",
    "eyeWideLeft", "eyeBlinkRight", "eyeLookDownRight", "eyeLookInRight", "eyeLookOutRight", "eyeLookUpRight",
    "eyeSquintRight", "eyeWideRight", "jawForward", "jawLeft", "jawRight", "jawOpen", "mouthClose",
    "mouthFunnel", "mouthPucker", "mouthLeft", "mouthRight", "mouthSmileLeft", "mouthSmileRight",
    "mouthFrownLeft", "mouthFrownRight", "mouthDimpleLeft", "mouthDimpleRight", "mouthStretchLeft",
    "mouthStretchRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
    "mouthPressLeft", "mouthPressRight", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthUpperUpLeft",
    "mouthUpperUpRight", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight", "noseSneerLeft", "noseSneerRight", "tongueOut",
)
assert len(ARKIT_NAMES) == 52
#: Low-pass cut-off of the curves: keeps blinks (about 100 ms) and syllable-rate mouth
#: motion (up to about 8 Hz) while removing the tracker's frame-to-frame flicker.
CUTOFF_HZ = 8.0


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


def lowpass(x: np.ndarray, fps: float, cutoff_hz: float = CUTOFF_HZ) -> np.ndarray:
    """Zero-phase second-order Butterworth low-pass along time. x: (T, ...)."""
    nyquist = fps / 2.0
    if len(x) < 10 or cutoff_hz >= 0.9 * nyquist:
        return np.asarray(x, np.float64)
    sos = butter(2, cutoff_hz / nyquist, output="sos")
    return sosfiltfilt(sos, x, axis=0)


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
