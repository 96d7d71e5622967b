"""The hand that slides over the mouth: when, where and how it is drawn."""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from avface.synth.common import smooth_noise, srgb_to_linear
from avface.synth.face import SKIN_TONES

OCCLUDER_SPAN_S = 1.2
"""How long the hand is in the frame: slides in, holds over the mouth, slides out."""
OCCLUDER_RAMP_FRACTION = 0.22
"""Fraction of the span spent sliding in (and again sliding out)."""
OCCLUDED_MIN_FRACTION = 0.3
"""A frame is occluded when the hand covers at least this fraction of the lips' area."""


@dataclass
class Hand:
    """A hand drawn over the lower face: palm ellipse, four finger capsules and a thumb,
    defined in units of the face's projected width."""

    colour: np.ndarray  # (3,) linear
    span: tuple[float, float]
    hold: np.ndarray  # (T, 2) offset of the palm centre from the mouth, face widths
    angle: np.ndarray  # (T,) degrees
    side: float  # +1: enters from the subject's left (image right)


def make_hand(rng: np.random.Generator, span: tuple[float, float], n_frames: int, fps: float, face_skin) -> Hand:
    tones = [np.asarray(t) for t in SKIN_TONES]
    far = sorted(tones, key=lambda t: -float(np.abs(t - face_skin).sum()))[:3]
    colour = far[rng.integers(len(far))] * np.array([1.0, 0.96, 0.95])
    hold = np.stack([0.04 * smooth_noise(rng, n_frames, fps, 1.5), 0.03 * smooth_noise(rng, n_frames, fps, 1.5)], 1)
    angle = 4.0 * smooth_noise(rng, n_frames, fps, 1.2) + rng.uniform(-12, 12)
    side = float(rng.choice([-1.0, 1.0]))
    return Hand(srgb_to_linear(colour), span, hold, angle, side)


def draw_hand(img: np.ndarray, hand: Hand, k: int, t: float, mouth_px: np.ndarray,
               face_w_px: float) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Paint the hand into the linear image (in place); returns the region it was drawn in
    and its coverage there (float32 in [0, 1]), or None when it is outside its span."""
    t0, t1 = hand.span
    if not t0 <= t < t1:
        return None
    s = (t - t0) / (t1 - t0)
    ramp = OCCLUDER_RAMP_FRACTION
    if s < ramp:
        a = 0.5 - 0.5 * math.cos(math.pi * s / ramp)
    elif s > 1 - ramp:
        a = 0.5 + 0.5 * math.cos(math.pi * (s - 1 + ramp) / ramp)
    else:
        a = 1.0
    h, w = img.shape[:2]
    fw = face_w_px
    cover = mouth_px + np.array([hand.side * 0.06, 0.10]) * fw + hand.hold[k] * fw
    start = np.array([cover[0] + hand.side * 0.5 * fw, h + 0.9 * fw])
    centre = start + a * (cover - start)
    ang = math.radians(hand.angle[k] + hand.side * (1 - a) * 25.0)
    # fingers point across the face, away from the side the hand comes from; thumb up
    direction = np.array([-hand.side * math.cos(ang), -math.sin(ang) * 0.3 - 0.25])
    direction /= np.linalg.norm(direction)
    perp = np.array([-direction[1], direction[0]]) * hand.side  # towards the top of the frame
    shapes = []  # (base, tip, radius) capsules
    for off, length in ((-0.16, 0.36), (-0.055, 0.42), (0.055, 0.40), (0.16, 0.32)):
        base = centre + direction * 0.22 * fw + perp * off * fw
        shapes.append((base, base + direction * length * fw + perp * off * 0.25 * fw, 0.052 * fw))
    thumb_base = centre + perp * 0.16 * fw
    shapes.append((thumb_base, thumb_base + (0.45 * direction + 0.9 * perp) * 0.26 * fw, 0.06 * fw))

    # draw in the hand's bounding box only
    reach = 0.95 * fw
    x0, y0 = int(max(0, centre[0] - reach)), int(max(0, centre[1] - reach))
    x1, y1 = int(min(w, centre[0] + reach + 1)), int(min(h, centre[1] + reach + 1))
    if x1 <= x0 or y1 <= y0:
        return (slice(0, 0), slice(0, 0)), np.zeros((0, 0), np.float32)
    origin = np.array([x0, y0], np.float64)
    to_fixed = lambda p: tuple(int(round((c - o - 0.5) * 16)) for c, o in zip(p, origin))  # noqa: E731
    roi = (slice(y0, y1), slice(x0, x1))
    mask = np.zeros((y1 - y0, x1 - x0), np.float32)
    palm_deg = math.degrees(math.atan2(direction[1], direction[0]))
    cv2.ellipse(mask, to_fixed(centre), (int(0.30 * fw * 16), int(0.24 * fw * 16)), palm_deg, 0, 360, 1.0, -1,
                cv2.LINE_AA, 4)
    for base, tip, r in shapes:
        cv2.line(mask, to_fixed(base), to_fixed(tip), 1.0, max(1, int(round(2 * r))), cv2.LINE_AA, 4)
    # creases: a darker outline along each finger that lies between two others
    crease = np.zeros_like(mask)
    for base, tip, r in shapes[1:4]:
        ring = np.zeros_like(mask)
        cv2.line(ring, to_fixed(base), to_fixed(tip), 1.0, max(1, int(round(2 * r))), cv2.LINE_AA, 4)
        cv2.line(ring, to_fixed(base), to_fixed(tip), 0.0, max(1, int(round(1.6 * r))), cv2.LINE_AA, 4)
        crease = np.maximum(crease, ring)
    mask = np.clip(mask, 0, 1)
    # rounded look: brighter inside, darker at the rim, a little darker lower down
    dist = cv2.distanceTransform((mask > 0.5).astype(np.uint8), cv2.DIST_L2, 3)
    rim = np.clip(dist / (0.12 * fw), 0, 1)
    yy = (np.arange(y0, y1, dtype=np.float32)[:, None] - centre[1]) / fw
    gain = (0.55 + 0.45 * rim) * (1.0 - 0.15 * np.clip(yy, -1, 1)) * (1.0 - 0.5 * crease)
    sub = img[roi]
    sub *= 1 - mask[..., None]
    sub += (hand.colour[None, None, :] * gain[..., None]) * mask[..., None]
    return roi, mask


def occluder_span(rng: np.random.Generator, phonemes, duration_s: float) -> tuple[float, float]:
    """A seeded span of OCCLUDER_SPAN_S while someone speaks (or mid clip)."""
    span = min(OCCLUDER_SPAN_S, 0.6 * duration_s)
    if phonemes:
        lo, hi = phonemes[0][1] + 0.2, phonemes[-1][2] - span
    else:
        lo, hi = 0.5 * (duration_s - span), 0.5 * (duration_s - span)
    lo = max(lo, 0.0)
    hi = min(max(hi, lo), duration_s - span)
    start = float(rng.uniform(lo, hi)) if hi > lo else max(0.0, min(lo, duration_s - span))
    return (round(start, 4), round(start + span, 4))
