"""The face's skin texture, painted in UV space from the canonical mesh's landmark rings."""
from __future__ import annotations

import math

import cv2
import numpy as np
import scipy.ndimage

from avface.core.topology import (LEFT_EYE, LEFT_EYEBROW, LIPS_LOWER_INNER, LIPS_LOWER_OUTER, LIPS_UPPER_INNER,
    LIPS_UPPER_OUTER, RIGHT_EYE, RIGHT_EYEBROW)
from avface.synth.common import srgb_to_linear

TEXTURE_SIZE = 1024
"""Side of the UV-space skin texture in texels."""


def paint_texture(rng: np.random.Generator, uv: np.ndarray, skin: np.ndarray, hair: np.ndarray) -> np.ndarray:
    """The face's albedo in UV space, (S, S, 3) linear: skin with soft variation, lips,
    brows, lash lines and nostrils drawn from the landmark rings' UVs."""
    s = TEXTURE_SIZE
    px = np.stack([uv[:, 0] * s, (1.0 - uv[:, 1]) * s], 1)  # texel coordinates, v up -> row down

    def pts(ids):
        return np.round((px[list(ids)] - 0.5) * 16).astype(np.int32)

    tex = np.empty((s, s, 3), np.float32)
    tex[:] = skin
    # low-frequency blotches and a warmer lower face / nose / cheeks
    for scale_px, amount, tint in ((s // 8, 0.035, (1.0, 1.0, 1.0)), (s // 64, 0.012, (0.3, 1.0, 0.9))):
        noise = scipy.ndimage.gaussian_filter(rng.standard_normal((s // scale_px * 4, s // scale_px * 4)), 2.0, mode="wrap")
        noise = cv2.resize((noise / max(noise.std(), 1e-9)).astype(np.float32), (s, s), interpolation=cv2.INTER_CUBIC)
        tex *= 1.0 + amount * noise[..., None] * np.asarray(tint, np.float32)
    redness = np.zeros((s, s), np.float32)
    for vid, r, a in ((4, 0.035, 0.9), (1, 0.03, 0.6), (205, 0.07, 0.7), (425, 0.07, 0.7), (152, 0.05, 0.3)):
        cv2.circle(redness, tuple(int(c) for c in px[vid]), int(r * s), a, -1)
    redness = cv2.GaussianBlur(redness, (0, 0), 0.03 * s)
    tex *= 1.0 - 0.10 * redness[..., None] * np.array([0.0, 1.0, 0.8], np.float32)

    # lips: the outer contour, a little darker towards the inner line
    lips = np.zeros((s, s), np.float32)
    outer = LIPS_UPPER_OUTER + LIPS_LOWER_OUTER[::-1]
    cv2.fillPoly(lips, [pts(outer)], 1.0, cv2.LINE_AA, shift=4)
    lips = cv2.GaussianBlur(lips, (0, 0), 0.0025 * s)
    lip_colour = skin * np.array([0.86, 0.55, 0.56], np.float32)
    tex = tex * (1 - lips[..., None]) + lip_colour * lips[..., None]
    inner_line = np.zeros((s, s), np.float32)
    inner = LIPS_UPPER_INNER + LIPS_LOWER_INNER[::-1]
    cv2.polylines(inner_line, [pts(inner)], True, 1.0, max(2, int(0.004 * s)), cv2.LINE_AA, shift=4)
    inner_line = cv2.GaussianBlur(inner_line, (0, 0), 0.002 * s)
    tex *= 1.0 - 0.65 * inner_line[..., None]

    # brows: filled between their lower and upper landmark rows, soft edges
    brows = np.zeros((s, s), np.float32)
    for brow in (RIGHT_EYEBROW, LEFT_EYEBROW):
        poly = brow[:5] + brow[5:][::-1]
        cv2.fillPoly(brows, [pts(poly)], 1.0, cv2.LINE_AA, shift=4)
    brows = cv2.GaussianBlur(brows, (0, 0), 0.004 * s) * 0.85
    tex = tex * (1 - brows[..., None]) + hair * brows[..., None]

    # lash lines on the upper lids, a fainter line on the lower lids, a soft lid crease shadow
    lash = np.zeros((s, s), np.float32)
    for eye in (RIGHT_EYE, LEFT_EYE):
        upper_line = (eye[0],) + eye[9:16] + (eye[8],)
        lower_line = eye[0:9]
        cv2.polylines(lash, [pts(upper_line)], False, 1.0, max(2, int(0.006 * s)), cv2.LINE_AA, shift=4)
        cv2.polylines(lash, [pts(lower_line)], False, 0.35, max(1, int(0.003 * s)), cv2.LINE_AA, shift=4)
    lash = cv2.GaussianBlur(lash, (0, 0), 0.0015 * s)
    tex *= 1.0 - 0.85 * np.clip(lash, 0, 1)[..., None]
    crease = np.zeros((s, s), np.float32)
    for eye in (RIGHT_EYE, LEFT_EYE):
        c = px[list(eye)].mean(0)
        w = np.ptp(px[list(eye), 0])
        cv2.ellipse(crease, (int(c[0]), int(c[1] - 0.12 * w)), (int(0.62 * w), int(0.35 * w)), 0, 0, 360, 1.0, -1)
    crease = cv2.GaussianBlur(crease, (0, 0), 0.012 * s)
    tex *= 1.0 - 0.18 * crease[..., None]

    # nostrils: dark ellipses under the nose tip, between the tip and the alar creases
    nost = np.zeros((s, s), np.float32)
    for wing in (98, 327):
        c = 0.45 * px[wing] + 0.55 * px[2]
        c[1] = 0.5 * (px[wing, 1] + px[2, 1])
        axis = (int(0.018 * s), int(0.008 * s))
        angle = math.degrees(math.atan2(px[2, 1] - px[wing, 1], px[2, 0] - px[wing, 0]))
        cv2.ellipse(nost, (int(c[0]), int(c[1])), axis, angle, 0, 360, 1.0, -1, cv2.LINE_AA)
    nost = cv2.GaussianBlur(nost, (0, 0), 0.004 * s)
    tex *= 1.0 - 0.7 * nost[..., None]
    return srgb_to_linear(tex)
