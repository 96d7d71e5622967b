"""The benchmark's occluder maker (it makes occlusions to measure with; :mod:`avface.stages.confidence`
is what detects them), after the occlusion protocol of AVFace section 3.4: seeded spans of
speech, occluders pasted over the mouth and lower face, and black frames for audio-only spans.

Per clip, from a seed and the clip's id (so that adding a clip changes no other clip's
spans):

* **occluder spans**: 0.5 to 1.5 s each, one per about 6 s of clip (1 to 3), placed where
  the speech activity is high, at least ``EDGE_MARGIN_S`` from the clip's ends (so that
  every span has visible neighbours) and ``SPAN_GAP_S`` apart. Two variants share them:
  ``hand``, a hand silhouette (palm, four fingers, thumb, forearm) filled with the clip's
  own skin: its shading template is given the colour distribution of the cheeks of the
  span's first frame by sliced optimal transport; and ``object``, a plain object, either a
  bar or a hand-held microphone (chosen per clip). Occluders follow the face (mouth
  position, face size, roll) and move and rotate a little from frame to frame.
* **audio-only spans** (variant ``audio_only``): 1 to 2 s of speech with black frames, one
  per about 10 s of clip (1 or 2).

Occluder shapes are unions of capsules and ellipses rendered as height fields in pixels: the
coverage mask is anti-aliased and the shading is that of rounded surfaces (cylinders and
ellipsoids), with a soft contact shadow on the face. Masks depend only on the plan (the
clean tracking's geometry and the seeded parameters), never on pixel values, so which lip
landmarks an occluder covers is known without rendering a frame.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import subprocess
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter1d

from avface import media
from avface.core.timeseries import fill_missing
from avface.core.topology import LIPS
from avface.errors import MediaError
from avface.stages.tracking import Tracking

log = logging.getLogger(__name__)

PLAN_VERSION = 1
"""Bumped whenever the same seed would give different occlusions."""

OCCLUDER_SPAN_S = (0.5, 1.5)
AUDIO_ONLY_SPAN_S = (1.0, 2.0)
SECONDS_PER_OCCLUDER_SPAN = 6.0
MAX_OCCLUDER_SPANS = 3
SECONDS_PER_AUDIO_SPAN = 10.0
MAX_AUDIO_SPANS = 2
EDGE_MARGIN_S = 0.3
"""Spans keep this far from the clip's first and last frame."""
SPAN_GAP_S = 0.5
"""Minimum gap between two spans of one variant."""
SPEECH_KEEP_FRACTION = 0.8
"""A span start is drawn among the candidates whose mean speech activity is at least this
fraction of the best candidate's."""
COVERED_AT = 0.5
"""A landmark is covered where the occluder's coverage is at least this; a frame counts as
occluded when at least this fraction of its lip landmarks is covered."""

WOBBLE_OFFSET_FW = 0.03
"""Frame-to-frame drift of an occluder (standard deviation, face widths)."""
WOBBLE_ANGLE_DEG = 4.0
"""Frame-to-frame rotation of an occluder (standard deviation, degrees)."""
WOBBLE_CUTOFF_S = 0.35
"""Time scale of the drift (Gaussian smoothing of white noise, seconds)."""
MAX_TILT_DEG = 15.0
"""Each span's occluder is tilted by up to this much against the face's roll."""

SKIN_OT_ITERATIONS = 24
SKIN_OT_QUANTILES = 64
CHEEK_LANDMARKS = (50, 280, 205, 425)
"""Cheek points whose surroundings give the skin colour (both sides, two rings)."""
CHEEK_RADIUS_FW = 0.05
HAND_TEMPLATE_RGB = (218.0, 170.0, 145.0)
"""The hand's template colour before its distribution is moved onto the cheeks'."""
OBJECT_COLOURS_RGB = ((28, 28, 30), (72, 74, 78), (172, 174, 178), (30, 42, 92), (150, 32, 30), (118, 84, 52))
SHADOW_STRENGTH = 0.35

VARIANTS = ("hand", "object", "audio_only")
OCCLUDER_VARIANTS = ("hand", "object")

ENCODER_CRF = 10
"""Variants are encoded near-losslessly, so that they differ from a re-encode of the clean
clip in the pasted pixels only (the report shows the remaining floor)."""
ENCODER_PRESET = "ultrafast"
"""x264 preset for variants: ultrafast is about six times faster than medium at 1080p on
two cores; the files are larger, which does not matter for a benchmark cache."""


# --------------------------------------------------------------------------- seeding


def clip_rng(seed: int, clip_id: str, purpose: str) -> np.random.Generator:
    """A generator that depends only on (seed, clip id, purpose): stable across runs,
    Python versions and the other clips in the folder."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(clip_id.encode()), zlib.crc32(purpose.encode())])


def smooth_noise(rng: np.random.Generator, n: int, sigma_frames: float) -> np.ndarray:
    """(n,) Gaussian-smoothed white noise with unit standard deviation in expectation (the
    scale is the filter's, not the sample's: a short series is not blown up)."""
    if n <= 0:
        return np.zeros(0)
    sigma = max(float(sigma_frames), 1e-3)
    pad = int(3 * sigma) + 1
    x = gaussian_filter1d(rng.normal(size=n + 2 * pad), sigma)[pad:pad + n]
    # white noise of unit variance through a Gaussian of width sigma has variance
    # sum(kernel^2) ~= 1 / (2 sqrt(pi) sigma)
    return x * math.sqrt(2.0 * math.sqrt(math.pi) * sigma) if sigma >= 1.0 else x


# --------------------------------------------------------------------------- spans


def choose_spans(n_frames: int, fps: float, activity: np.ndarray | None, rng: np.random.Generator, *,
                 count: int, min_s: float, max_s: float, margin_s: float = EDGE_MARGIN_S,
                 gap_s: float = SPAN_GAP_S) -> list[tuple[int, int]]:
    """Up to ``count`` disjoint half-open frame spans [start, end) of ``min_s`` to ``max_s``
    seconds where the speech ``activity`` (T,) is high, kept ``margin_s`` from the clip's
    ends and ``gap_s`` apart. Shorter clips get shorter spans (down to half of ``min_s``) or
    none."""
    act = np.ones(n_frames) if activity is None else np.nan_to_num(np.asarray(activity, np.float64))
    if act.shape != (n_frames,):
        raise ValueError(f"expected ({n_frames},) speech activity, got {act.shape}")
    margin = int(math.ceil(margin_s * fps))
    gap = int(math.ceil(gap_s * fps))
    room = n_frames - 2 * margin
    spans: list[tuple[int, int]] = []
    csum = np.concatenate([[0.0], np.cumsum(act)])
    for _ in range(count):
        length = int(round(rng.uniform(min_s, max_s) * fps))
        length = min(length, room)
        if length < max(2, int(round(0.5 * min_s * fps))):
            break
        starts = np.arange(margin, n_frames - margin - length + 1)
        ok = np.ones(len(starts), bool)
        for a, b in spans:
            ok &= (starts + length + gap <= a) | (starts >= b + gap)
        if not ok.any():
            break
        starts = starts[ok]
        score = (csum[starts + length] - csum[starts]) / length
        keep = starts[score >= SPEECH_KEEP_FRACTION * score.max() - 1e-12]
        s = int(keep[rng.integers(len(keep))])
        spans.append((s, s + length))
    return sorted(spans)


# --------------------------------------------------------------------------- face geometry


@dataclass(frozen=True, eq=False)
class FaceGeometry:
    """Where the occluders go, per frame, from the clean clip's tracking (pixels). Frames
    without a detection are interpolated from their neighbours."""

    mouth: np.ndarray  #: (T, 2) centroid of the lip landmarks
    face_w: np.ndarray  #: (T,) face size: max(cheek to cheek, 0.8 * forehead to chin)
    roll_deg: np.ndarray  #: (T,) angle of the line from eye corner 33 to 263, image axes
    cheeks: np.ndarray  #: (T, 4, 2) the CHEEK_LANDMARKS
    lips: np.ndarray  #: (T, 40, 2) lip landmarks; NaN where the clean clip has no detection
    detected: np.ndarray  #: (T,) bool
    width: int
    height: int

    @property
    def n_frames(self) -> int:
        return len(self.mouth)


def face_geometry(tracking: Tracking) -> FaceGeometry:
    det = np.asarray(tracking.detected, bool)
    if not det.any():
        raise ValueError("the clean clip has no detected face to place occluders on")
    lm = np.asarray(tracking.landmarks, np.float64)[:, :, :2]
    lips = lm[:, list(LIPS)]
    mouth = np.nanmean(np.where(det[:, None, None], lips, 0.0), axis=1)
    width = np.linalg.norm(lm[:, 234] - lm[:, 454], axis=-1)
    height = np.linalg.norm(lm[:, 10] - lm[:, 152], axis=-1)
    face_w = np.maximum(width, 0.8 * height)
    eye = lm[:, 263] - lm[:, 33]
    roll = np.full(len(det), np.nan)
    roll[det] = np.degrees(np.unwrap(np.arctan2(eye[det, 1], eye[det, 0])))
    cheeks = lm[:, list(CHEEK_LANDMARKS)]
    fill = lambda x: fill_missing(x, det)  # noqa: E731
    return FaceGeometry(fill(mouth), fill(face_w), fill(roll), fill(cheeks),
                        np.where(det[:, None, None], lips, np.nan), det, int(tracking.width), int(tracking.height))


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True, eq=False)
class SpanOccluder:
    """One occluder over one span: its kind and seeded parameters."""

    kind: str  #: hand | bar | mic
    span: tuple[int, int]
    side: float  #: +1: enters from the image's right, -1: from the left
    tilt_deg: float
    scale: float
    wobble: np.ndarray  #: (L, 3) per span frame: dx, dy (face widths), dangle (degrees)
    colour: tuple[float, float, float]  #: sRGB 0..255 (objects; the hand's is the skin's)
    seed: int  #: seeds the skin transfer


@dataclass(frozen=True, eq=False)
class OcclusionPlan:
    clip_id: str
    seed: int
    fps: float
    occluder_spans: tuple[tuple[int, int], ...]
    audio_spans: tuple[tuple[int, int], ...]
    hand: tuple[SpanOccluder, ...]
    object: tuple[SpanOccluder, ...]
    object_kind: str  #: bar | mic
    geometry: FaceGeometry

    @property
    def n_frames(self) -> int:
        return self.geometry.n_frames

    def spans(self, variant: str) -> tuple[tuple[int, int], ...]:
        if variant in OCCLUDER_VARIANTS:
            return self.occluder_spans
        if variant == "audio_only":
            return self.audio_spans
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")

    def occluder_at(self, variant: str, t: int) -> SpanOccluder | None:
        occ = self.hand if variant == "hand" else self.object if variant == "object" else ()
        for o in occ:
            if o.span[0] <= t < o.span[1]:
                return o
        return None

    def span_mask(self, variant: str) -> np.ndarray:
        m = np.zeros(self.n_frames, bool)
        for a, b in self.spans(variant):
            m[a:b] = True
        return m

    def describe(self) -> dict:
        """JSON-able summary (what metrics.json and the variant cache key record)."""
        return {
            "plan_version": PLAN_VERSION,
            "seed": self.seed,
            "occluder_spans": [list(s) for s in self.occluder_spans],
            "occluder_spans_s": [[round(a / self.fps, 3), round(b / self.fps, 3)] for a, b in self.occluder_spans],
            "audio_only_spans": [list(s) for s in self.audio_spans],
            "audio_only_spans_s": [[round(a / self.fps, 3), round(b / self.fps, 3)] for a, b in self.audio_spans],
            "object_kind": self.object_kind,
            "hand_sides": [o.side for o in self.hand],
        }

    def digest(self) -> str:
        """Hash of everything that decides the variants' pixels."""
        h = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        g = self.geometry
        for a in (g.mouth, g.face_w, g.roll_deg, g.cheeks):
            h.update(np.ascontiguousarray(np.round(a, 4)).tobytes())
        for o in self.hand + self.object:
            h.update(json.dumps([o.kind, o.span, o.side, o.tilt_deg, o.scale, o.colour, o.seed]).encode())
            h.update(np.ascontiguousarray(np.round(o.wobble, 6)).tobytes())
        return h.hexdigest()


def _span_occluder(rng: np.random.Generator, kind: str, span: tuple[int, int], fps: float) -> SpanOccluder:
    n = span[1] - span[0]
    sigma = WOBBLE_CUTOFF_S * fps
    wobble = np.stack([WOBBLE_OFFSET_FW * smooth_noise(rng, n, sigma), WOBBLE_OFFSET_FW * smooth_noise(rng, n, sigma),
                       WOBBLE_ANGLE_DEG * smooth_noise(rng, n, sigma)], axis=1)
    colour = tuple(float(c) for c in OBJECT_COLOURS_RGB[rng.integers(len(OBJECT_COLOURS_RGB))])
    return SpanOccluder(kind, span, float(rng.choice([-1.0, 1.0])), float(rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG)),
                        float(rng.uniform(0.95, 1.1)), wobble, colour, int(rng.integers(2**31)))


def make_plan(clip_id: str, seed: int, tracking: Tracking, activity: np.ndarray | None) -> OcclusionPlan:
    """The clip's occlusion plan: deterministic in (seed, clip id, clean tracking, activity)."""
    n, fps = tracking.n_frames, float(tracking.fps)
    geometry = face_geometry(tracking)
    duration = n / fps
    n_occ = int(np.clip(round(duration / SECONDS_PER_OCCLUDER_SPAN), 1, MAX_OCCLUDER_SPANS))
    n_aud = int(np.clip(round(duration / SECONDS_PER_AUDIO_SPAN), 1, MAX_AUDIO_SPANS))
    occ_spans = choose_spans(n, fps, activity, clip_rng(seed, clip_id, "occluder-spans"), count=n_occ,
                             min_s=OCCLUDER_SPAN_S[0], max_s=OCCLUDER_SPAN_S[1])
    aud_spans = choose_spans(n, fps, activity, clip_rng(seed, clip_id, "audio-spans"), count=n_aud,
                             min_s=AUDIO_ONLY_SPAN_S[0], max_s=AUDIO_ONLY_SPAN_S[1])
    rng = clip_rng(seed, clip_id, "occluders")
    object_kind = "bar" if rng.random() < 0.5 else "mic"
    hand = tuple(_span_occluder(rng, "hand", s, fps) for s in occ_spans)
    obj = tuple(_span_occluder(rng, object_kind, s, fps) for s in occ_spans)
    return OcclusionPlan(clip_id, int(seed), fps, tuple(occ_spans), tuple(aud_spans), hand, obj, object_kind, geometry)


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Capsule:
    a: tuple[float, float]
    b: tuple[float, float]
    r: float


@dataclass(frozen=True)
class Ellipse:
    c: tuple[float, float]
    rx: float
    ry: float
    angle_deg: float


def _shape_primitives(kind: str, side: float) -> tuple[list, list]:
    """Primitives in face-width units, origin at the mouth centre, x along the eye line,
    y down the face; returns (primitives, grille) where grille lists the primitives whose
    surface gets a microphone grille."""
    s = side
    if kind == "hand":
        # palm over the mouth and chin, a little towards the side the arm comes from;
        # fingers reach across the face, the thumb up towards the nose, the forearm out
        # of the frame below and to the side
        palm = Ellipse((0.10 * s, 0.10), 0.31, 0.25, -8.0 * s)
        fingers = []
        for off, length in ((-0.16, 0.30), (-0.055, 0.38), (0.055, 0.36), (0.16, 0.28)):
            base = (0.10 * s - 0.18 * s, 0.10 + off)
            tip = (base[0] - length * s, base[1] + 0.03 * off)
            fingers.append(Capsule(base, tip, 0.058))
        thumb = Capsule((0.24 * s, -0.02), (0.16 * s, -0.21), 0.062)
        forearm = Capsule((0.18 * s, 0.22), (0.18 * s + 0.9 * s, 0.22 + 1.8), 0.20)
        return [forearm, palm, *fingers, thumb], []
    if kind == "bar":
        return [Capsule((-0.62, 0.08), (0.62, 0.08), 0.21)], []
    if kind == "mic":
        head = Ellipse((0.0, 0.04), 0.27, 0.27, 0.0)
        handle = Capsule((0.0, 0.04), (0.45 * s, 1.9), 0.085)
        return [handle, head], [1]
    raise ValueError(f"unknown occluder kind {kind!r}")


@dataclass(frozen=True, eq=False)
class Layer:
    """An occluder rendered into the box [y0, y0 + h) x [x0, x0 + w) of a frame."""

    x0: int
    y0: int
    coverage: np.ndarray  #: (h, w) float32 in [0, 1], anti-aliased
    height: np.ndarray  #: (h, w) float32 in [0, 1]: surface height (1 on a ridge, 0 at the rim)
    grille: np.ndarray | None  #: (h, w) bool where the surface is a microphone grille
    shadow_offset: tuple[float, float]  #: pixels

    def full_mask(self, shape: tuple[int, int]) -> np.ndarray:
        """(H, W) float32 coverage over the whole frame."""
        m = np.zeros(shape, np.float32)
        h, w = self.coverage.shape
        m[self.y0:self.y0 + h, self.x0:self.x0 + w] = self.coverage
        return m

    def covers(self, points: np.ndarray) -> np.ndarray:
        """(N,) bool: coverage >= COVERED_AT at each (x, y) pixel point (NaN: False)."""
        p = np.asarray(points, np.float64)
        out = np.zeros(len(p), bool)
        ok = np.isfinite(p).all(axis=1)
        if not ok.any():
            return out
        x = np.floor(p[ok, 0]).astype(int) - self.x0
        y = np.floor(p[ok, 1]).astype(int) - self.y0
        h, w = self.coverage.shape
        inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        vals = np.zeros(len(x), np.float32)
        vals[inside] = self.coverage[y[inside], x[inside]]
        out[np.nonzero(ok)[0]] = vals >= COVERED_AT
        return out


def _pose(plan: OcclusionPlan, occ: SpanOccluder, t: int) -> tuple[np.ndarray, float, float]:
    """(origin px, face width px, angle degrees) of an occluder at frame t."""
    g = plan.geometry
    k = t - occ.span[0]
    fw = float(g.face_w[t]) * occ.scale
    angle = float(g.roll_deg[t]) + occ.tilt_deg + float(occ.wobble[k, 2])
    th = math.radians(angle)
    u = np.array([math.cos(th), math.sin(th)])
    v = np.array([-math.sin(th), math.cos(th)])
    origin = g.mouth[t] + (occ.wobble[k, 0] * u + occ.wobble[k, 1] * v) * fw
    return origin, fw, angle


def render_layer(plan: OcclusionPlan, occ: SpanOccluder, t: int) -> Layer | None:
    """The occluder of frame t as a coverage mask and height field (no colour); None when
    it lies outside the frame."""
    g = plan.geometry
    origin, fw, angle = _pose(plan, occ, t)
    th = math.radians(angle)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])  # local -> image
    prims, grille_ids = _shape_primitives(occ.kind, occ.side)

    def to_px(p):
        return origin + rot @ (np.asarray(p, np.float64) * fw)

    # bounding box of all primitives, clipped to the frame
    lo, hi = np.full(2, np.inf), np.full(2, -np.inf)
    for pr in prims:
        if isinstance(pr, Capsule):
            for p in (pr.a, pr.b):
                q = to_px(p)
                lo, hi = np.minimum(lo, q - pr.r * fw), np.maximum(hi, q + pr.r * fw)
        else:
            q = to_px(pr.c)
            rr = max(pr.rx, pr.ry) * fw
            lo, hi = np.minimum(lo, q - rr), np.maximum(hi, q + rr)
    x0, y0 = max(0, int(math.floor(lo[0])) - 2), max(0, int(math.floor(lo[1])) - 2)
    x1, y1 = min(g.width, int(math.ceil(hi[0])) + 3), min(g.height, int(math.ceil(hi[1])) + 3)
    if x1 <= x0 or y1 <= y0:
        return None
    # pixel centres of the box, in local face-width units
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    px = np.stack([xs + 0.5 - origin[0], ys + 0.5 - origin[1]], axis=-1)
    local = (px @ rot.astype(np.float32)) / fw  # rot^T applied to row vectors
    cov = np.zeros(xs.shape, np.float32)
    height = np.zeros(xs.shape, np.float32)
    grille = np.zeros(xs.shape, bool) if grille_ids else None
    px_per_unit = fw
    for i, pr in enumerate(prims):
        if isinstance(pr, Capsule):
            a, b = np.asarray(pr.a, np.float32), np.asarray(pr.b, np.float32)
            ab = b - a
            s = np.clip(((local - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
            d = np.linalg.norm(local - (a + s[..., None] * ab), axis=-1)  # units
            rr = pr.r
        else:
            th2 = math.radians(pr.angle_deg)
            c2, s2 = math.cos(th2), math.sin(th2)
            q = local - np.asarray(pr.c, np.float32)
            qx, qy = q[..., 0] * c2 + q[..., 1] * s2, -q[..., 0] * s2 + q[..., 1] * c2
            nr = np.sqrt((qx / pr.rx) ** 2 + (qy / pr.ry) ** 2)  # 1 on the rim
            rr = min(pr.rx, pr.ry)
            d = nr * rr
        c = np.clip((rr - d) * px_per_unit + 0.5, 0.0, 1.0)  # anti-aliased edge, one pixel wide
        hgt = np.sqrt(np.clip(1.0 - (d / rr) ** 2, 0.0, 1.0))
        if grille is not None and i in grille_ids:
            grille |= c > 0.5
        cov = np.maximum(cov, c)
        height = np.maximum(height, hgt * (c > 0))
    if not (cov > 0).any():
        return None
    shadow = (0.04 * fw * math.cos(th) - 0.02 * fw * math.sin(th), 0.04 * fw * math.sin(th) + 0.05 * fw * math.cos(th))
    return Layer(x0, y0, cov, height, grille, shadow)


def layer_at(plan: OcclusionPlan, variant: str, t: int) -> Layer | None:
    """The occluder layer of ``variant`` at frame t (None outside its spans)."""
    occ = plan.occluder_at(variant, t)
    return None if occ is None else render_layer(plan, occ, t)


def lip_coverage(plan: OcclusionPlan, variant: str) -> np.ndarray:
    """(T,) fraction of the clean clip's lip landmarks that the occluder covers (NaN where the
    clean clip has no detection); 1 inside audio-only spans, 0 elsewhere."""
    n = plan.n_frames
    if variant == "audio_only":
        return plan.span_mask(variant).astype(np.float64)
    out = np.zeros(n)
    for a, b in plan.spans(variant):
        for t in range(a, b):
            lips = plan.geometry.lips[t]
            if not np.isfinite(lips).all():
                out[t] = np.nan
                continue
            layer = layer_at(plan, variant, t)
            out[t] = 0.0 if layer is None else float(layer.covers(lips).mean())
    return out


def occluded_frames(plan: OcclusionPlan, variant: str) -> np.ndarray:
    """(T,) bool: frames the metrics count as occluded for ``variant``: at least half of the
    clean lip landmarks covered (every frame of an audio-only span)."""
    return np.nan_to_num(lip_coverage(plan, variant), nan=0.0) >= COVERED_AT


# --------------------------------------------------------------------------- skin colour


class SlicedOT:
    """Sliced optimal transport of colour distributions (iterative distribution transfer,
    Pitié et al. 2005; Rabin et al. 2011): in each step the colours are projected on a random
    orthonormal basis and each projection is mapped monotonically onto the target's
    quantiles. The fitted map applies to any colours."""

    def __init__(self, steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
        self.steps = steps

    @classmethod
    def fit(cls, source: np.ndarray, target: np.ndarray, rng: np.random.Generator, *,
            iterations: int = SKIN_OT_ITERATIONS, quantiles: int = SKIN_OT_QUANTILES) -> "SlicedOT":
        x = np.asarray(source, np.float64).copy()
        y = np.asarray(target, np.float64)
        if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or len(x) == 0 or len(y) == 0:
            raise ValueError(f"expected (N, D) source and (M, D) target colours, got {x.shape} and {y.shape}")
        d = x.shape[1]
        qs = np.linspace(0.0, 1.0, quantiles)
        ramp = np.linspace(0.0, 1e-6, quantiles)  # strictly increasing knots for np.interp
        steps = []
        for _ in range(iterations):
            basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
            px, py = x @ basis, y @ basis
            src_q = np.quantile(px, qs, axis=0).T + ramp  # (D, K)
            dst_q = np.quantile(py, qs, axis=0).T
            for j in range(d):
                px[:, j] = np.interp(px[:, j], src_q[j], dst_q[j])
            x = px @ basis.T
            steps.append((basis, src_q, dst_q))
        return cls(steps)

    def apply(self, colours: np.ndarray) -> np.ndarray:
        x = np.asarray(colours, np.float64).copy()
        for basis, src_q, dst_q in self.steps:
            px = x @ basis
            for j in range(px.shape[1]):
                px[:, j] = np.interp(px[:, j], src_q[j], dst_q[j])
            x = px @ basis.T
        return x


def _shade(height: np.ndarray) -> np.ndarray:
    """Diffuse-looking shading of a height field: dark at the rim, bright on the ridges."""
    return (0.45 + 0.55 * np.sqrt(np.clip(height, 0.0, 1.0))).astype(np.float32)


def cheek_pixels(frame: np.ndarray, geometry: FaceGeometry, t: int) -> np.ndarray:
    """(N, 3) RGB samples of the skin around the cheek landmarks of frame t.

    In a turned head the far cheek's landmarks lie at the silhouette, where discs would
    catch background or hair: only the cheek facing the camera is sampled then (the one
    farther from the mouth centre in the image). Colours far from the samples' median (hair,
    shadows, highlights) are dropped.
    """
    h, w = frame.shape[:2]
    r = max(2.0, CHEEK_RADIUS_FW * float(geometry.face_w[t]))
    cheeks = geometry.cheeks[t]  # (4, 2): right 50, left 280, right 205, left 425
    mid_x = float(geometry.mouth[t, 0])  # the mouth centre lies on the face's midline
    reach = np.array([abs(cheeks[0, 0] - mid_x) + abs(cheeks[2, 0] - mid_x),
                      abs(cheeks[1, 0] - mid_x) + abs(cheeks[3, 0] - mid_x)])
    sides = [0, 1] if reach.min() >= 0.6 * reach.max() else [int(np.argmax(reach))]
    out = []
    for i, c in enumerate(cheeks):
        if i % 2 not in sides:
            continue
        x0, x1 = int(max(0, c[0] - r)), int(min(w, c[0] + r + 1))
        y0, y1 = int(max(0, c[1] - r)), int(min(h, c[1] + r + 1))
        if x1 <= x0 or y1 <= y0:
            continue
        ys, xs = np.mgrid[y0:y1, x0:x1]
        inside = (xs + 0.5 - c[0]) ** 2 + (ys + 0.5 - c[1]) ** 2 <= r * r
        out.append(frame[y0:y1, x0:x1][inside])
    px = np.concatenate(out).astype(np.float64) if out else np.zeros((0, 3))
    if len(px) >= 20:
        med = np.median(px, axis=0)
        d = np.linalg.norm(px - med, axis=1)
        px = px[d <= max(2.5 * np.median(d), 6.0)]
    return px


LUT_LEVELS = 256


def skin_lut(frame: np.ndarray, plan: OcclusionPlan, occ: SpanOccluder, t: int) -> np.ndarray:
    """(LUT_LEVELS, 3) sRGB colour per shade level: the hand template's colours moved onto
    the distribution of frame t's cheek colours by sliced optimal transport."""
    levels = np.linspace(0.0, 1.0, LUT_LEVELS)
    template = np.asarray(HAND_TEMPLATE_RGB)[None, :] * levels[:, None]
    target = cheek_pixels(frame, plan.geometry, t)
    layer = render_layer(plan, occ, t)
    if len(target) < 20 or layer is None:
        log.debug("%s: too few cheek pixels at frame %d; the hand keeps its template colour", plan.clip_id, t)
        return np.clip(template, 0, 255)
    shade = _shade(layer.height)[layer.coverage >= COVERED_AT]
    source = np.asarray(HAND_TEMPLATE_RGB)[None, :] * shade[:, None]
    rng = np.random.default_rng(occ.seed)
    if len(source) > 20000:
        source = source[rng.choice(len(source), 20000, replace=False)]
    if len(target) > 20000:
        target = target[rng.choice(len(target), 20000, replace=False)]
    ot = SlicedOT.fit(source, target, rng)
    return np.clip(ot.apply(template), 0.0, 255.0)


# --------------------------------------------------------------------------- compositing


def composite(frame: np.ndarray, layer: Layer, colour: np.ndarray) -> np.ndarray:
    """Paste a coloured layer over an RGB uint8 frame (a new frame), with a soft contact
    shadow. ``colour`` is (h, w, 3) sRGB float over the layer's box."""
    import cv2

    out = frame.copy()
    h, w = layer.coverage.shape
    box = out[layer.y0:layer.y0 + h, layer.x0:layer.x0 + w].astype(np.float32)
    cov = layer.coverage
    # the shadow: the coverage, shifted and blurred, darkens what the occluder does not cover
    dx, dy = layer.shadow_offset
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    shadow = cv2.warpAffine(cov, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0.0)
    k = max(3, int(2 * round(0.5 * math.hypot(dx, dy)) + 1))
    shadow = cv2.GaussianBlur(shadow, (k, k), 0)
    box *= (1.0 - SHADOW_STRENGTH * shadow * (1.0 - cov))[..., None]
    box = box * (1.0 - cov[..., None]) + colour * cov[..., None]
    out[layer.y0:layer.y0 + h, layer.x0:layer.x0 + w] = np.clip(np.round(box), 0, 255).astype(np.uint8)
    return out


def object_colour(layer: Layer, base_rgb) -> np.ndarray:
    """(h, w, 3) shading of a plain object: diffuse plus a highlight, a darker grille."""
    hgt = layer.height
    diffuse = 0.35 + 0.75 * np.sqrt(np.clip(hgt, 0, 1))
    col = np.asarray(base_rgb, np.float32)[None, None, :] * diffuse[..., None] + (70.0 * hgt ** 12)[..., None]
    if layer.grille is not None:
        ys, xs = np.mgrid[0:hgt.shape[0], 0:hgt.shape[1]]
        pitch = max(3, int(round(0.012 * max(hgt.shape))))
        mesh = ((xs + ys) // pitch % 2 == 0) ^ ((xs - ys) // pitch % 2 == 0)
        col = np.where((layer.grille & mesh)[..., None], col * 0.55, col)
    return col


class VariantRenderer:
    """Turns clean frames into a variant's frames, in frame order. The hand's skin colour is
    fitted on the first frame of each span that it sees (variants are always rendered from
    a span's start, so the colour depends only on the plan and the clean frames)."""

    def __init__(self, plan: OcclusionPlan):
        self.plan = plan
        self._luts: dict[tuple[int, int], np.ndarray] = {}

    def render(self, variant: str, t: int, frame: np.ndarray) -> np.ndarray:
        plan = self.plan
        if variant == "audio_only":
            return np.zeros_like(frame) if plan.span_mask("audio_only")[t] else frame
        occ = plan.occluder_at(variant, t)
        if occ is None:
            return frame
        layer = render_layer(plan, occ, t)
        if layer is None:
            return frame
        if occ.kind == "hand":
            lut = self._luts.get(occ.span)
            if lut is None:
                lut = self._luts[occ.span] = skin_lut(frame, plan, occ, t)
            idx = np.clip(np.round(_shade(layer.height) * (LUT_LEVELS - 1)).astype(int), 0, LUT_LEVELS - 1)
            colour = lut[idx].astype(np.float32)
        else:
            colour = object_colour(layer, occ.colour)
        return composite(frame, layer, colour)


# --------------------------------------------------------------------------- writing variants


class _Encoder:
    """Near-lossless H.264 writer fed raw RGB frames through a pipe (a benchmark cache: fast
    and faithful matter here, small files do not)."""

    def __init__(self, path: Path, width: int, height: int, fps: float):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.partial.mp4")
        rate = Fraction(fps).limit_denominator(1_000_000)
        pix = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        cmd = [media.ffmpeg_exe(), "-hide_banner", "-nostdin", "-y", "-v", "error",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate",
               f"{rate.numerator}/{rate.denominator}", "-i", "pipe:", "-c:v", "libx264", "-preset", ENCODER_PRESET,
               "-crf", str(ENCODER_CRF), "-pix_fmt", pix, "-threads", "2", "-an", str(self.tmp)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def write(self, frame: np.ndarray) -> None:
        self.proc.stdin.write(np.ascontiguousarray(frame).data)

    def close(self, ok: bool) -> None:
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        err = self.proc.stderr.read().decode("utf-8", "replace")
        self.proc.stderr.close()
        rc = self.proc.wait()
        if ok and rc == 0:
            self.tmp.replace(self.path)
            return
        self.tmp.unlink(missing_ok=True)
        if ok:
            raise MediaError(f"encoding the benchmark variant {self.path.name} failed", detail=err)


def write_variants(info: "media.VideoInfo", plan: OcclusionPlan, paths: dict[str, Path],
                   renderer: VariantRenderer | None = None) -> dict[str, Path]:
    """Decode the clean clip once and write every variant in ``paths`` (variant -> mp4)."""
    renderer = renderer or VariantRenderer(plan)
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    encoders = {v: _Encoder(p, info.width, info.height, info.fps) for v, p in paths.items()}
    ok = False
    try:
        for t, frame in enumerate(media.iter_frames(info)):
            if t >= plan.n_frames:
                break
            for v, enc in encoders.items():
                enc.write(renderer.render(v, t, frame))
        ok = True
    except BrokenPipeError as e:
        raise MediaError(f"the encoder for a benchmark variant of {info.path.name} stopped: {e}") from e
    finally:
        errors = []
        for enc in encoders.values():
            try:
                enc.close(ok)
            except MediaError as e:
                errors.append(e)
        if ok and errors:
            raise errors[0]
    return paths
