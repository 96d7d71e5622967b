"""Expression, jaw, head pose and gaze curves: visemes from espeak's phoneme timing,
blended like co-articulation, blinks, brow movement and smooth head motion."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.ndimage
from scipy.spatial.transform import Rotation

from avface.synth.common import MM, smooth_noise

JAW_MAX_RAD = 0.30

COARTICULATION_S = 0.03
"""Standard deviation of the Gaussian that blends viseme targets over time."""
ANTICIPATION_S = 0.03
"""The lips move this much ahead of the sound."""
CURVE_RATE_HZ = 200
"""Rate at which the expression curves are built before sampling at frame times."""

# viseme -> (jaw opening rad, lip rounding, lip spreading, lip closing), each in [0, ~1].
# Jaw openings are those of clear speech (an open "ah" about 11 degrees, 20-25 mm between the
# lips with the canonical model's jaw pivot at ear level):
# MediaPipe under-reads wide openings (it recovers ~80 % of the lip gap), so a yawn-sized
# jaw mostly measures its prior: with targets 1.35x these (up to 0.3 rad) its mean lip error
# on 512 px clips was 2.5-2.8 px, with these 2.1-2.4 px.
VISEME_TARGETS: dict[str, tuple[float, float, float, float]] = {
    "sil": (0.00, 0.00, 0.00, 1.00),
    "PP": (0.00, 0.15, 0.00, 1.10),
    "FF": (0.03, 0.00, 0.25, 0.55),
    "TH": (0.055, 0.00, 0.15, 0.00),
    "DD": (0.06, 0.00, 0.15, 0.00),
    "kk": (0.075, 0.00, 0.05, 0.00),
    "CH": (0.055, 0.55, 0.00, 0.00),
    "SS": (0.03, 0.00, 0.40, 0.20),
    "nn": (0.055, 0.00, 0.15, 0.00),
    "RR": (0.06, 0.50, 0.00, 0.00),
    "aa": (0.20, 0.00, 0.10, 0.00),
    "E": (0.12, 0.00, 0.40, 0.00),
    "ih": (0.07, 0.00, 0.70, 0.00),
    "oh": (0.15, 0.75, 0.00, 0.00),
    "ou": (0.06, 1.00, 0.00, 0.00),
}


@dataclass
class Animation:
    expression: np.ndarray  # (T, E)
    jaw_pose: np.ndarray  # (T, 3)
    global_orient: np.ndarray  # (T, 3)
    transl: np.ndarray  # (T, 3)
    gaze: np.ndarray  # (T, 2) yaw, pitch offsets of the gaze from the camera, radians


def _viseme_curves(phonemes, duration_s: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(jaw, round, spread, close) at CURVE_RATE_HZ: each phoneme's viseme target (scaled by
    a random emphasis) held over its span, silence elsewhere, blended by a Gaussian."""
    from avface.synth.tts import phoneme_to_viseme

    n = int(math.ceil(duration_s * CURVE_RATE_HZ)) + 1
    t = np.arange(n) / CURVE_RATE_HZ
    target = np.tile(np.asarray(VISEME_TARGETS["sil"], np.float64), (n, 1))
    for name, start, end in phonemes:
        v = np.asarray(VISEME_TARGETS[phoneme_to_viseme(name)], np.float64).copy()
        v[:3] *= rng.uniform(0.85, 1.15)
        a = int(round((start - ANTICIPATION_S) * CURVE_RATE_HZ))
        b = max(int(round((end - ANTICIPATION_S) * CURVE_RATE_HZ)), a + 1)
        target[max(a, 0):max(min(b, n), 0)] = v
    smooth = scipy.ndimage.gaussian_filter1d(target, COARTICULATION_S * CURVE_RATE_HZ, axis=0, mode="nearest")
    return t, smooth


def _blink_curve(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Eyelid closure in [0, 1]: blinks every 2-4.5 s, 80 ms closing, 40 ms closed, 160 ms opening."""
    out = np.zeros_like(t)
    start = rng.uniform(0.6, 1.8)
    while start < t[-1]:
        close_s, hold_s, open_s = 0.08, 0.04, 0.16
        x = t - start
        c = np.where(x < 0, 0.0,
            np.where(x < close_s, 0.5 - 0.5 * np.cos(np.pi * x / close_s),
            np.where(x < close_s + hold_s, 1.0,
            np.where(x < close_s + hold_s + open_s, 0.5 + 0.5 * np.cos(np.pi * (x - close_s - hold_s) / open_s), 0.0))))
        out = np.maximum(out, c)
        start += rng.uniform(2.0, 4.5)
    return out


def animate(phonemes, n_frames: int, fps: float, rng: np.random.Generator) -> Animation:
    duration_s = n_frames / fps
    tc, curves = _viseme_curves(phonemes, duration_s + 0.2, rng)
    tf = np.arange(n_frames) / fps
    sample = lambda c: np.interp(tf, tc, c)  # noqa: E731
    jaw = np.clip(sample(curves[:, 0]), 0.0, JAW_MAX_RAD)
    rounding = np.clip(sample(curves[:, 1]), 0.0, 1.0)
    spread = np.clip(sample(curves[:, 2]), 0.0, 1.0)
    close = np.clip(sample(curves[:, 3]), 0.0, 1.1)
    blink = _blink_curve(tf, rng)
    # brows: slow drift plus a lift on the louder (open) vowels
    brow = np.clip(0.25 + 0.25 * smooth_noise(rng, n_frames, fps, 0.4)
                   + 0.8 * scipy.ndimage.gaussian_filter1d(jaw / JAW_MAX_RAD, 0.15 * fps) ** 2, 0.0, 1.0)
    expression = np.stack([rounding, spread, close, blink, blink, brow], 1).astype(np.float32)
    jaw_pose = np.zeros((n_frames, 3), np.float32)
    jaw_pose[:, 0] = jaw

    deg = np.deg2rad
    noise = lambda cut: smooth_noise(rng, n_frames, fps, cut)  # noqa: E731
    yaw = deg(4.0) * noise(0.35)
    pitch = deg(2.5) * noise(0.45) + 0.2 * scipy.ndimage.gaussian_filter1d(jaw, 0.1 * fps)  # nods with speech
    roll = deg(1.8) * noise(0.3)
    rot = Rotation.from_euler("YXZ", np.stack([yaw, pitch, roll], 1))
    global_orient = rot.as_rotvec().astype(np.float32)
    transl = np.stack([4 * MM * noise(0.3), 3 * MM * noise(0.3), 8 * MM * noise(0.2)], 1).astype(np.float32)
    # gaze: fixations on the camera with small saccades every ~0.6-1.5 s
    gaze = np.zeros((n_frames, 2), np.float32)
    t_next = 0.0
    target = np.zeros(2)
    for k in range(n_frames):
        if tf[k] >= t_next:
            target = rng.normal(0.0, deg(2.5), 2)
            t_next = tf[k] + rng.uniform(0.6, 1.5)
        gaze[k] = target if k == 0 else 0.5 * gaze[k - 1] + 0.5 * target
    return Animation(expression, jaw_pose, global_orient, transl, gaze)
