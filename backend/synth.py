"""The synthetic talking-face demo clip, with 3D ground truth.

:func:`make_demo_clip` speaks a text with espeak-ng (:mod:`avface.tts`), animates the
MediaPipe canonical face (:class:`avface.models.canonical.CanonicalModel`) from espeak's
phoneme timing, renders it with a small software rasteriser, slides a hand over the mouth
for about a second, and writes ``demo.mp4`` (H.264 + AAC speech), ``demo.wav`` and
``demo_gt.npz``. The demo then needs no download, and tests can measure 3D error in
millimetres against the exact vertices that were drawn.

Conventions
-----------
* Ground-truth vertices are in the OpenCV camera frame: metres, x right, y down, z forward
  from the camera centre. The model frame (y up, z towards the viewer) maps to it by
  ``p_cam = R p_model + t`` with ``R = diag(1, -1, -1)`` (``model_to_camera``).
* Pixel coordinates are continuous, as MediaPipe's normalised landmarks times the frame
  size (avface.tracking): pixel (i, j) covers [i, i + 1) x [j, j + 1), so a vertex projects
  to ``u = fx x / z + cx`` with ``cx = width / 2``.
* Frame ``t`` shows time ``t / fps``; audio sample 0 is time 0.

The face
--------
Identity: the canonical mesh, scaled by a few per cent per axis and bent by a smooth, mostly
symmetric random field of a few millimetres. Expression: the jaw joint (``jaw_pose`` about
x, about 0.2 rad on open vowels, never above JAW_MAX_RAD) plus a per-clip linear basis of smooth, localised displacement fields
(lip rounding, spreading, closing; a blink per eye; brow raise), each solved as a harmonic
field over the mesh from displacements prescribed on landmark rings. The curves come from
espeak's phonemes through visemes, blended over time like co-articulation. Head motion is
a few degrees of smooth yaw, pitch and roll and a few millimetres of translation.

The canonical mesh from the task bundle closes the eye and mouth openings with triangles;
those triangles are not drawn, so eyeballs (sclera, iris, pupil) and a mouth interior
(cavity, teeth, tongue) show through, and blinks and closed lips come from the mesh itself.

The renderer
------------
Painter's algorithm into a triangle-id buffer (``cv2.fillConvexPoly`` per triangle, back to
front within each layer, layers back to front: neck, skull and hair, ears, eyes, mouth, face),
then one vectorised pass over covered pixels: barycentric interpolation of normals and UVs,
a UV-space skin texture (lips, brows, lash lines, nostrils), wrapped Lambert + Blinn-Phong
lighting in linear light, 2x supersampling. About 40-60 ms per 512 x 512 frame on 2 CPU cores.

How real it looks to MediaPipe (6 s clips at 512 px, seeds 0-3, frames decoded from the
mp4): the face is detected on every frame, the hand's included, and its 468 landmarks lie
2.2-2.9 px (mean) from the projected ground truth on unoccluded frames, 2.1-2.4 px on the
lips; 1 px is about 0.72 mm at the face. Most of what is left is MediaPipe's own prior
(forehead top, nose ridge, the upper-lid ring, wide mouth openings), which no shading
change tried here moved.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import scipy.ndimage
import scipy.signal
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.spatial.transform import Rotation

from .errors import InputError, OutputError
from avface.models.canonical import mesh_laplacian

log = logging.getLogger(__name__)

GT_FORMAT = "avface-synth-gt/1"

VIDEO_NAME = "demo.mp4"
WAV_NAME = "demo.wav"
GT_NAME = "demo_gt.npz"

AUDIO_RATE_HZ = 16_000
"""demo.wav is written at the method's audio rate."""
AUDIO_PEAK = 0.7
"""The speech is normalised to this peak (full scale 1)."""
LEAD_SILENCE_S = 0.5
"""Silence before the speech starts."""
MIN_TAIL_SILENCE_S = 0.3
"""At least this much silence after the speech."""

FOV_Y_DEG = 40.0
"""Vertical field of view of the camera."""
CAMERA_DISTANCE_M = 0.55
"""Distance from the camera centre to the model origin (the face is ~5 cm nearer)."""
FACE_CENTRE_V = 0.47
"""Where the face's centre sits, as a fraction of the frame height from the top."""

JAW_MAX_RAD = 0.30
SUPERSAMPLE = 2
"""Each output pixel averages SUPERSAMPLE x SUPERSAMPLE rendered pixels."""
TEXTURE_SIZE = 1024
"""Side of the UV-space skin texture in texels."""
SLIVER_HEIGHT_PX = 1.0
"""Triangles less high than this (rendered pixels) are shaded flat (see _Renderer.render)."""

OCCLUDER_SPAN_S = 1.2
"""How long the hand is in the frame: slides in, holds over the mouth, slides out."""
OCCLUDER_RAMP_FRACTION = 0.22
"""Fraction of the span spent sliding in (and again sliding out)."""
OCCLUDED_MIN_FRACTION = 0.3
"""A frame is occluded when the hand covers at least this fraction of the lips' area."""

COARTICULATION_S = 0.03
"""Standard deviation of the Gaussian that blends viseme targets over time."""
ANTICIPATION_S = 0.03
"""The lips move this much ahead of the sound."""
CURVE_RATE_HZ = 200
"""Rate at which the expression curves are built before sampling at frame times."""

MM = 1e-3

_EYE_RADIUS_M = 0.012
_EYE_FRONT_M = 0.0015
"""The cornea's apex lies this far in front of the centroid of the eye ring."""
_IRIS_RADIUS_M = 0.0058
_PUPIL_RADIUS_M = 0.0021
# The skull: its centre this far below the face mesh's top edge, this tall (half), with the
# hairline at this height on the unit sphere. A skull that reaches well above the forehead,
# and a jaw line that the skull does not widen, cut MediaPipe's landmark error on the
# forehead and chin by half (measured: 3.2 -> 2.6 px mean at 512 px).
_SKULL_BELOW_FACE_TOP_M = 0.053
_SKULL_HALF_HEIGHT_M = 0.12
_HAIRLINE_NY = 0.8

DEFAULT_SENTENCES = (
    "Hello there!",
    "My name is Ava, and I am reading a short story.",
    "We went to the beach, and the blue water was cool and calm.",
    "Please pass me that big orange box.",
    "Few people who wait will see the moon rise.",
    "Thank you, and have a wonderful day.",
    "Yes.",
)
"""The default text is the longest run of these sentences, in order, that fits the clip."""

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

EXPRESSION_NAMES = ("lips_round", "lips_spread", "lips_close", "blink_right", "blink_left", "brow_raise")

# Skin albedos (sRGB, 0-1): a spread of skin tones; the hand takes another one.
_SKIN_TONES = (
    (0.90, 0.72, 0.62), (0.86, 0.66, 0.54), (0.80, 0.60, 0.47), (0.72, 0.52, 0.40),
    (0.62, 0.43, 0.32), (0.52, 0.35, 0.26),
)
_HAIR_COLOURS = ((0.10, 0.07, 0.05), (0.22, 0.14, 0.08), (0.35, 0.24, 0.14), (0.06, 0.06, 0.06), (0.45, 0.33, 0.20))
_IRIS_COLOURS = ((0.30, 0.18, 0.08), (0.22, 0.32, 0.45), (0.30, 0.35, 0.20), (0.18, 0.11, 0.06))

# materials of the shading pass
_M_GOURAUD, _M_FACE, _M_EYE, _M_FLAT = 0, 1, 2, 3


# --------------------------------------------------------------------------- result


@dataclass(frozen=True, eq=False)
class SynthClip:
    """A rendered demo clip and its ground truth (see the module docstring for conventions)."""

    video_path: Path
    wav_path: Path
    gt_path: Path
    fps: float
    n_frames: int
    width: int
    height: int
    gt_vertices: np.ndarray
    """(T, 468, 3) float32 metres, OpenCV camera frame; vertex i is MediaPipe landmark i."""
    K: np.ndarray
    """(3, 3) float64 intrinsics in continuous pixel coordinates."""
    occluded: np.ndarray
    """(T,) bool: the hand covers at least OCCLUDED_MIN_FRACTION of the lips."""
    occlusion_fraction: np.ndarray
    """(T,) float32: fraction of the lips' projected area under the hand."""
    occluder_span_s: tuple[float, float] | None
    """When the hand is in the frame, seconds; None without an occluder."""
    phonemes: list[tuple[str, float, float]]
    """(espeak phoneme, start_s, end_s) on the clip's time line."""
    words: list[tuple[str, float, float]]
    text: str
    seed: int
    neutral_vertices: np.ndarray
    """(468, 3) float32: the clip's identity in the model frame (y up), before pose."""
    expression_names: tuple[str, ...]
    expression_basis: np.ndarray
    """(E, 468, 3) float32 displacement fields in the model frame."""
    expression: np.ndarray
    """(T, E) float32 coefficients."""
    jaw_pose: np.ndarray
    """(T, 3) float32 axis-angle of the jaw joint."""
    global_orient: np.ndarray
    """(T, 3) float32 axis-angle of the head about the model's root joint (model frame)."""
    transl: np.ndarray
    """(T, 3) float32 metres, model frame."""
    model_to_camera: np.ndarray
    """(4, 4) float64: camera-frame point = model_to_camera @ posed model point."""

    @property
    def duration_s(self) -> float:
        return self.n_frames / self.fps

    def project(self, vertices: np.ndarray | None = None) -> np.ndarray:
        """(T, 468, 2) pixel positions of ``vertices`` (default: the ground truth) through K."""
        v = self.gt_vertices if vertices is None else np.asarray(vertices)
        uvw = v @ self.K.T
        return (uvw[..., :2] / uvw[..., 2:3]).astype(np.float32)


# --------------------------------------------------------------------------- mesh helpers


def _opening_faces(faces: np.ndarray) -> np.ndarray:
    """(F,) bool: the triangles that close the eyes and the mouth in the canonical mesh."""
    from avface.models.canonical import LEFT_EYE, LIPS_LOWER_INNER, LIPS_UPPER_INNER, RIGHT_EYE

    out = np.zeros(len(faces), bool)
    for ring in (set(LIPS_UPPER_INNER + LIPS_LOWER_INNER), set(RIGHT_EYE), set(LEFT_EYE)):
        out |= np.isin(faces, list(ring)).all(axis=1)
    return out


def _harmonic_field(lap: sp.csr_matrix, fixed: dict[int, np.ndarray], zero: np.ndarray) -> np.ndarray:
    """(V, 3) displacement, equal to ``fixed[i]`` on its keys, 0 on ``zero`` (bool mask) and
    harmonic (as smooth as the mesh graph allows) elsewhere."""
    n = lap.shape[0]
    value = np.zeros((n, 3))
    is_fixed = zero.copy()
    for i, d in fixed.items():
        value[i] = d
        is_fixed[i] = True
    free = ~is_fixed
    a = lap[free][:, free].tocsc()
    rhs = -(lap[free][:, is_fixed] @ value[is_fixed])
    solve = spla.factorized(a)
    for k in range(3):
        value[free, k] = solve(np.ascontiguousarray(rhs[:, k]))
    return value


class _NormalAccumulator:
    """Vertex normals of a fixed topology as one sparse product (faster than np.add.at)."""

    def __init__(self, faces: np.ndarray, n_vertices: int):
        f = len(faces)
        rows = faces.T.ravel()
        cols = np.tile(np.arange(f), 3)
        self.faces = faces
        self.m = sp.csr_matrix((np.ones(3 * f, np.float32), (rows, cols)), shape=(n_vertices, f))

    def __call__(self, v: np.ndarray) -> np.ndarray:
        f = self.faces
        fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
        n = self.m @ fn
        return (n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _uv_sphere(n_lat: int, n_lon: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit sphere (N, 3) and its triangles, counter-clockwise seen from outside."""
    theta = np.linspace(0, np.pi, n_lat + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.cos(p), np.cos(t), np.sin(t) * np.sin(p)], -1).reshape(-1, 3)
    verts = np.concatenate([[[0, 1, 0]], ring, [[0, -1, 0]]]).astype(np.float32)
    faces = []
    idx = lambda i, j: 1 + i * n_lon + (j % n_lon)  # noqa: E731
    for j in range(n_lon):
        faces.append((0, idx(0, j), idx(0, j + 1)))
        faces.append((len(verts) - 1, idx(n_lat - 2, j + 1), idx(n_lat - 2, j)))
    for i in range(n_lat - 2):
        for j in range(n_lon):
            faces.append((idx(i, j), idx(i + 1, j), idx(i + 1, j + 1)))
            faces.append((idx(i, j), idx(i + 1, j + 1), idx(i, j + 1)))
    return verts, _orient_outwards(verts, np.asarray(faces, np.int64))


def _orient_outwards(verts: np.ndarray, faces: np.ndarray, centre=None) -> np.ndarray:
    """Flip triangles whose normal points towards ``centre`` (default: the origin)."""
    c = np.zeros(3) if centre is None else np.asarray(centre)
    a, b, d = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    n = np.cross(b - a, d - a)
    inward = np.einsum("fk,fk->f", n, (a + b + d) / 3 - c) < 0
    faces = faces.copy()
    faces[inward] = faces[inward][:, ::-1]
    return faces


def _grid(nx: int, ny: int) -> tuple[np.ndarray, np.ndarray]:
    """(nx*ny, 2) parameters in [0, 1]^2 and triangles of the grid (counter-clockwise in (s, t))."""
    s, t = np.meshgrid(np.linspace(0, 1, nx), np.linspace(0, 1, ny), indexing="xy")
    st = np.stack([s.ravel(), t.ravel()], 1)
    faces = []
    for j in range(ny - 1):
        for i in range(nx - 1):
            a = j * nx + i
            faces.append((a, a + 1, a + nx + 1))
            faces.append((a, a + nx + 1, a + nx))
    return st.astype(np.float32), np.asarray(faces, np.int64)


def _srgb_to_linear(c) -> np.ndarray:
    return np.power(np.clip(np.asarray(c, np.float32), 0, 1), 2.2)


def _linear_to_srgb(c: np.ndarray) -> np.ndarray:
    return np.power(np.clip(c, 0, 1), 1 / 2.2)


def _smooth_noise(rng: np.random.Generator, n: int, rate_hz: float, cutoff_hz: float) -> np.ndarray:
    """(n,) zero-mean unit-std noise, low-passed at ``cutoff_hz``."""
    x = rng.standard_normal(n + int(4 * rate_hz / cutoff_hz))
    y = scipy.ndimage.gaussian_filter1d(x, sigma=rate_hz / (2 * np.pi * cutoff_hz), mode="wrap")[:n]
    return ((y - y.mean()) / max(float(y.std()), 1e-9)).astype(np.float64)


# --------------------------------------------------------------------------- the face


@dataclass
class _Face:
    """Per-clip face: identity, expression basis, landmark rings and appearance."""

    neutral: np.ndarray  # (468, 3) model frame
    basis: np.ndarray  # (E, 468, 3)
    faces: np.ndarray  # (F', 3) drawn triangles (openings removed)
    uv: np.ndarray  # (468, 2)
    texture: np.ndarray  # (S, S, 3) float32 linear albedo
    eye_centres: np.ndarray  # (2, 3) eyeball centres, model frame (right, left)
    skin: np.ndarray  # (3,) sRGB
    hair: np.ndarray  # (3,) sRGB
    iris: np.ndarray  # (3,) sRGB


def _mirror_index(v: np.ndarray) -> np.ndarray:
    from scipy.spatial import cKDTree

    _, idx = cKDTree(v).query(v * np.array([-1.0, 1.0, 1.0]))
    return idx


def _identity(rng: np.random.Generator, v0: np.ndarray) -> np.ndarray:
    """A per-seed identity: per-axis scale within +-5 % and a smooth, mostly symmetric
    displacement of a few millimetres."""
    scale = 1.0 + np.clip(rng.normal(0.0, [0.025, 0.025, 0.02]), -0.05, 0.05)
    n_bumps = 8
    centres = v0[rng.choice(len(v0), n_bumps, replace=False)]
    amps = rng.normal(0.0, 1.5 * MM, (n_bumps, 3))
    radii = rng.uniform(0.03, 0.06, n_bumps)
    d2 = ((v0[:, None, :] - centres[None]) ** 2).sum(-1)  # (V, n_bumps)
    disp = np.einsum("vk,kc->vc", np.exp(-d2 / (2 * radii ** 2)), amps)
    mirrored = disp[_mirror_index(v0)] * np.array([-1.0, 1.0, 1.0])
    disp = 0.8 * 0.5 * (disp + mirrored) + 0.2 * disp
    return (v0 * scale + disp).astype(np.float32)


def _expression_basis(v: np.ndarray, faces_drawn: np.ndarray) -> np.ndarray:
    """(E, V, 3) displacement fields on the identity ``v`` in the order of EXPRESSION_NAMES."""
    from avface.models.canonical import (LEFT_EYE, LEFT_EYEBROW, LIPS, LIPS_LOWER_INNER, LIPS_LOWER_OUTER,
                                         LIPS_UPPER_INNER, LIPS_UPPER_OUTER, RIGHT_EYE, RIGHT_EYEBROW)

    n = len(v)
    lap = mesh_laplacian(faces_drawn, n)
    lips = np.asarray(LIPS)
    mouth = v[lips].mean(0)
    half_width = 0.5 * abs(v[291, 0] - v[61, 0])
    rel = v - mouth
    dist = np.sqrt(rel[:, 0] ** 2 + (1.3 * rel[:, 1]) ** 2 + (0.7 * rel[:, 2]) ** 2)
    above_nose_line = rel[:, 1] > 0.022
    upper = set(LIPS_UPPER_OUTER + LIPS_UPPER_INNER) - {61, 291, 78, 308}
    lower = set(LIPS_LOWER_OUTER + LIPS_LOWER_INNER)

    def mouth_field(fn, radius):
        fixed = {int(i): fn(int(i)) for i in lips}
        zero = (dist > radius) | above_nose_line
        return _harmonic_field(lap, fixed, zero)

    def rounding(i):
        x = rel[i, 0] / half_width
        dy = 1.2 * MM if i in upper else (-1.2 * MM if i in lower else 0.0)
        return np.array([-0.32 * rel[i, 0], dy, 5.0 * MM * (1.0 - 0.5 * x * x)])

    def spreading(i):
        x = rel[i, 0] / half_width
        return np.array([0.15 * rel[i, 0], 2.5 * MM * x * x, -2.0 * MM * x * x])

    round_f = mouth_field(rounding, 0.048)
    spread_f = mouth_field(spreading, 0.052)

    # closing: the inner lips meet half way at every column of the mouth
    up_in, lo_in = LIPS_UPPER_INNER[1:-1], LIPS_LOWER_INNER
    fixed = {}
    for a, b in zip(up_in, lo_in):
        gap = v[b] - v[a]
        fixed[a] = 0.5 * gap
        fixed[b] = -0.5 * gap
    for c in (78, 308):
        fixed[c] = np.zeros(3)
    close_f = _harmonic_field(lap, fixed, (dist > 0.03) | above_nose_line)

    def blink(ring):
        lower_ids, upper_ids = ring[1:8], ring[9:16]
        corners = (ring[0], ring[8])
        centre = v[list(ring)].mean(0)
        fixed = {}
        for u, lo in zip(upper_ids, lower_ids):
            fixed[u] = 0.97 * (v[lo] - v[u])
        for i in tuple(lower_ids) + corners:
            fixed[i] = np.zeros(3)
        zero = np.linalg.norm(v - centre, axis=1) > 0.024
        return _harmonic_field(lap, fixed, zero)

    # RIGHT_EYE is (corner, 7 lower, corner, 7 upper) in the order MediaPipe lists them
    blink_r = blink(RIGHT_EYE)
    blink_l = blink(LEFT_EYE)

    brow_ids = RIGHT_EYEBROW + LEFT_EYEBROW
    fixed = {i: np.array([0.0, 4.0 * MM, 0.5 * MM]) for i in brow_ids}
    for i in RIGHT_EYE + LEFT_EYE:
        fixed[i] = np.zeros(3)
    eye_y = v[list(RIGHT_EYE + LEFT_EYE), 1].mean()
    brow_f = _harmonic_field(lap, fixed, v[:, 1] < eye_y)

    return np.stack([round_f, spread_f, close_f, blink_r, blink_l, brow_f]).astype(np.float32)


def _paint_texture(rng: np.random.Generator, uv: np.ndarray, skin: np.ndarray, hair: np.ndarray) -> np.ndarray:
    """The face's albedo in UV space, (S, S, 3) linear: skin with soft variation, lips,
    brows, lash lines and nostrils drawn from the landmark rings' UVs."""
    from avface.models.canonical import (LEFT_EYE, LEFT_EYEBROW, LIPS_LOWER_INNER, LIPS_LOWER_OUTER,
                                         LIPS_UPPER_INNER, LIPS_UPPER_OUTER, RIGHT_EYE, RIGHT_EYEBROW)

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
    return _srgb_to_linear(tex)


def _build_face(rng: np.random.Generator) -> _Face:
    from avface.models.canonical import LEFT_EYE, RIGHT_EYE, load_canonical_mesh

    mesh = load_canonical_mesh()
    faces_drawn = mesh.faces[~_opening_faces(mesh.faces)]
    neutral = _identity(rng, mesh.vertices.astype(np.float64))
    basis = _expression_basis(neutral.astype(np.float64), faces_drawn)
    skin = np.asarray(_SKIN_TONES[rng.integers(len(_SKIN_TONES))], np.float32) * rng.uniform(0.97, 1.03, 3).astype(np.float32)
    hair = np.asarray(_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))], np.float32)
    iris = np.asarray(_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))], np.float32)
    texture = _paint_texture(rng, mesh.uv, np.clip(skin, 0, 1), hair)
    centres = []
    for ring in (RIGHT_EYE, LEFT_EYE):
        c = neutral[list(ring)].mean(0)
        centres.append(c + np.array([0.0, 0.0, _EYE_FRONT_M - _EYE_RADIUS_M], np.float32))
    return _Face(neutral, basis, faces_drawn, mesh.uv, texture, np.asarray(centres, np.float32), skin, hair, iris)




# --------------------------------------------------------------------------- animation


@dataclass
class _Animation:
    expression: np.ndarray  # (T, E)
    jaw_pose: np.ndarray  # (T, 3)
    global_orient: np.ndarray  # (T, 3)
    transl: np.ndarray  # (T, 3)
    gaze: np.ndarray  # (T, 2) yaw, pitch offsets of the gaze from the camera, radians


def _viseme_curves(phonemes, duration_s: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(jaw, round, spread, close) at CURVE_RATE_HZ: each phoneme's viseme target (scaled by
    a random emphasis) held over its span, silence elsewhere, blended by a Gaussian."""
    from avface.tts import phoneme_to_viseme

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


def _animate(phonemes, n_frames: int, fps: float, rng: np.random.Generator) -> _Animation:
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
    brow = np.clip(0.25 + 0.25 * _smooth_noise(rng, n_frames, fps, 0.4)
                   + 0.8 * scipy.ndimage.gaussian_filter1d(jaw / JAW_MAX_RAD, 0.15 * fps) ** 2, 0.0, 1.0)
    expression = np.stack([rounding, spread, close, blink, blink, brow], 1).astype(np.float32)
    jaw_pose = np.zeros((n_frames, 3), np.float32)
    jaw_pose[:, 0] = jaw

    deg = np.deg2rad
    noise = lambda cut: _smooth_noise(rng, n_frames, fps, cut)  # noqa: E731
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
    return _Animation(expression, jaw_pose, global_orient, transl, gaze)


# --------------------------------------------------------------------------- camera


def intrinsics(width: int, height: int, fov_y_deg: float = FOV_Y_DEG) -> np.ndarray:
    """(3, 3) pinhole intrinsics in continuous pixel coordinates (principal point at the centre)."""
    f = 0.5 * height / math.tan(math.radians(fov_y_deg) / 2)
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def _model_to_camera(neutral: np.ndarray, K: np.ndarray, height: int) -> np.ndarray:
    """(4, 4): flip y and z, and place the face's centre at (image centre x, FACE_CENTRE_V of
    the height) at CAMERA_DISTANCE_M."""
    m = np.diag([1.0, -1.0, -1.0, 1.0])
    centre = neutral.mean(0) * np.array([1.0, -1.0, -1.0])
    z = CAMERA_DISTANCE_M + centre[2]
    want_y = (FACE_CENTRE_V * height - K[1, 2]) / K[1, 1] * z
    m[:3, 3] = [-centre[0], want_y - centre[1], CAMERA_DISTANCE_M]
    return m


# --------------------------------------------------------------------------- renderer


@dataclass
class _Layer:
    verts: np.ndarray  # (N, 3) camera frame
    faces: np.ndarray  # (F, 3) CCW seen from outside / front
    attrs: np.ndarray  # (N, 5): lit colour or normal (3), u, v
    material: int
    cull: bool = True


@dataclass
class _Light:
    key_dir: np.ndarray
    key: float
    fill_dir: np.ndarray
    fill: float
    ambient: float
    sky: float


def _dot(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(P,) n @ d for (P, 3) float32 n; spelt out because numpy's matmul takes a slow path
    for an inner size of 3 (about 9x slower here)."""
    d = d.astype(np.float32)
    return n[:, 0] * d[0] + n[:, 1] * d[1] + n[:, 2] * d[2]


def _shade(albedo: np.ndarray, n: np.ndarray, light: _Light, spec: float, shininess: float,
           wrap: float = 0.25) -> np.ndarray:
    """Linear colour (P, 3) float32: sky-tinted ambient, wrapped Lambert (a soft, skin-like
    terminator) and Blinn-Phong with a distant viewer (the view direction varies by less
    than the field of view, which moves highlights by a fraction of their size)."""
    n = np.asarray(n, np.float32)
    lum = np.float32(light.ambient) + np.float32(0.5 * light.sky) * np.clip(-n[:, 1], -1.0, 1.0)
    highlight = np.zeros(len(n), np.float32)
    view = np.array([0.0, 0.0, -1.0])
    for d, k in ((light.key_dir, light.key), (light.fill_dir, light.fill)):
        lum += np.float32(k / (1 + wrap)) * np.maximum(_dot(n, d) + np.float32(wrap), 0.0)
        if spec > 0:
            h = (view + d) / np.linalg.norm(view + d)
            highlight += np.float32(k) * np.maximum(_dot(n, h), 0.0) ** np.float32(shininess)
    return np.asarray(albedo, np.float32) * lum[:, None] + (np.float32(spec) * highlight)[:, None]


class _Renderer:
    def __init__(self, width: int, height: int, K: np.ndarray, supersample: int):
        self.s = supersample
        self.w, self.h = width * supersample, height * supersample
        self.K = K.copy()
        self.K[:2] *= supersample  # continuous coordinates scale exactly
        self.K_inv = np.linalg.inv(self.K)

    def project(self, p: np.ndarray) -> np.ndarray:
        uvw = p @ self.K.T
        return uvw[:, :2] / uvw[:, 2:3]

    def render(self, layers: list[_Layer], background: np.ndarray, texture: np.ndarray, eye: dict,
               light: _Light) -> np.ndarray:
        """Linear RGB (H*s, W*s, 3) float32."""
        ids = np.full((self.h, self.w), -1, np.int32)
        all_xy, all_attr, all_faces, all_mat = [], [], [], []
        offset_v = offset_f = 0
        for layer in layers:
            xy = self.project(layer.verts)
            f = layer.faces
            a, b, c = xy[f[:, 0]], xy[f[:, 1]], xy[f[:, 2]]
            area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
            # counter-clockwise seen from the front (y up) is clockwise in the image (y down)
            keep = area < -1e-6 if layer.cull else np.abs(area) > 1e-6
            depth = layer.verts[f, 2].mean(1)
            order = np.nonzero(keep)[0]
            order = order[np.argsort(-depth[order], kind="stable")]
            fixed = np.round((xy - 0.5) * 16).astype(np.int32)  # cv2: integer = pixel centre, 4 fraction bits
            tri = fixed[f]
            for k in order:
                cv2.fillConvexPoly(ids, tri[k], int(offset_f + k), cv2.LINE_8, 4)
            all_xy.append(xy)
            all_attr.append(layer.attrs)
            all_faces.append(f + offset_v)
            all_mat.append(np.full(len(f), layer.material, np.int8))
            offset_v += len(xy)
            offset_f += len(f)
        xy = np.concatenate(all_xy).astype(np.float64)
        attrs = np.concatenate(all_attr).astype(np.float64)
        faces = np.concatenate(all_faces)
        mats = np.concatenate(all_mat)

        img = background.copy()
        flat = np.flatnonzero(ids >= 0)
        if flat.size == 0:
            return img
        # Each attribute is affine over a triangle's screen area: attr = A + x Gx + y Gy.
        # Per-triangle tables (F, K) turn the per-pixel work into row gathers and two FMAs.
        p0, p1, p2 = xy[faces[:, 0]], xy[faces[:, 1]], xy[faces[:, 2]]
        a0, a1, a2 = attrs[faces[:, 0]], attrs[faces[:, 1]], attrs[faces[:, 2]]
        d = (p1[:, 0] - p0[:, 0]) * (p2[:, 1] - p0[:, 1]) - (p2[:, 0] - p0[:, 0]) * (p1[:, 1] - p0[:, 1])
        d = np.where(np.abs(d) < 1e-12, 1e-12, d)[:, None]
        # b1 = c2 dx + c3 dy, b2 = c4 dx + c5 dy with (dx, dy) = (x - x0, y - y0)
        c2, c3 = (p2[:, 1:2] - p0[:, 1:2]) / d, -(p2[:, 0:1] - p0[:, 0:1]) / d
        c4, c5 = -(p1[:, 1:2] - p0[:, 1:2]) / d, (p1[:, 0:1] - p0[:, 0:1]) / d
        gx = (a1 - a0) * c2 + (a2 - a0) * c4
        gy = (a1 - a0) * c3 + (a2 - a0) * c5
        base = a0 - p0[:, 0:1] * gx - p0[:, 1:2] * gy
        # Pixels a triangle's fill covers can lie a little outside it; on a sliver (seen edge
        # on, at a silhouette) extrapolating its planes there gives wild values, so slivers
        # less than a pixel high are drawn with their mean attributes instead.
        longest = np.max(np.stack([np.linalg.norm(p1 - p0, axis=1), np.linalg.norm(p2 - p1, axis=1),
                                   np.linalg.norm(p0 - p2, axis=1)]), axis=0)
        sliver = np.abs(d[:, 0]) < SLIVER_HEIGHT_PX * np.maximum(longest, 1e-9)
        base[sliver] = (a0[sliver] + a1[sliver] + a2[sliver]) / 3.0
        gx[sliver] = 0.0
        gy[sliver] = 0.0
        base, gx, gy = base.astype(np.float32), gx.astype(np.float32), gy.astype(np.float32)

        tri = ids.ravel()[flat]
        py = (flat // self.w).astype(np.float32) + 0.5
        px = (flat % self.w).astype(np.float32) + 0.5
        mat = mats[tri]
        out = np.empty((flat.size, 3), np.float32)

        def interpolate(sel, channels):
            t, x, y = tri[sel], px[sel, None], py[sel, None]
            att = gx[t, :channels]
            att *= x
            att += base[t, :channels]
            att += y * gy[t, :channels]
            return att

        # Gouraud and flat layers carry their (lit) colour
        sel = np.flatnonzero((mat == _M_GOURAUD) | (mat == _M_FLAT))
        out[sel] = interpolate(sel, 3)
        for m in (_M_FACE, _M_EYE):
            sel = np.flatnonzero(mat == m)
            if sel.size == 0:
                continue
            a = interpolate(sel, 5)
            n = a[:, :3]
            n /= np.maximum(np.sqrt(n[:, 0] * n[:, 0] + n[:, 1] * n[:, 1] + n[:, 2] * n[:, 2]), 1e-9)[:, None]
            if m == _M_FACE:
                albedo = _sample(texture, a[:, 3] * texture.shape[1] - 0.5, (1.0 - a[:, 4]) * texture.shape[0] - 0.5)
                out[sel] = _shade(albedo, n, light, spec=0.06, shininess=18.0)
            else:
                out[sel] = _shade(_eye_albedo(a[:, 3], eye), n, light, spec=0.9, shininess=120.0, wrap=0.1)
        img.reshape(-1, 3)[flat] = out
        return img


def _sample(texture: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear lookups (P, 3) at texel coordinates (cv2 convention: integer = texel centre).
    cv2.remap wants maps shorter than 32767 on each side, so the points go in rows."""
    n = len(x)
    cols = 4096
    rows = -(-n // cols)
    mx = np.zeros(rows * cols, np.float32)
    my = np.zeros(rows * cols, np.float32)
    mx[:n], my[:n] = x, y
    out = cv2.remap(texture, mx.reshape(rows, cols), my.reshape(rows, cols), cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(-1, 3)[:n]


def _eye_albedo(cos_gaze: np.ndarray, eye: dict) -> np.ndarray:
    """Sclera, iris (with a darker limbal ring and radial falloff) and pupil by the angle
    between the surface normal and the gaze."""
    ang = np.arccos(np.clip(cos_gaze, -1, 1))
    iris_a, pupil_a = eye["iris_angle"], eye["pupil_angle"]
    r = np.clip(ang / iris_a, 0, 2)
    out = np.empty((len(ang), 3), np.float32)
    out[:] = eye["sclera"]
    iris = eye["iris"] * (0.75 + 0.45 * np.clip(r, 0, 1))[:, None]
    limbus = np.clip((r - 0.82) / 0.18, 0, 1)[:, None]
    iris = iris * (1 - 0.6 * limbus)
    inside = r < 1.0
    edge = np.clip((1.0 - r) * 12, 0, 1)[:, None]  # anti-aliased iris edge
    out = np.where(inside[:, None], edge * iris + (1 - edge) * out, out)
    pupil = np.clip((pupil_a - ang) / (0.08 * iris_a), 0, 1)[:, None]
    out = out * (1 - pupil) + eye["pupil"] * pupil
    return out


# --------------------------------------------------------------------------- the scene


class _Scene:
    """Everything per clip that the frames share: geometry templates, colours, lights."""

    def __init__(self, rng: np.random.Generator, face: _Face, K: np.ndarray, m2c: np.ndarray,
                 width: int, height: int, supersample: int):
        from avface.models.canonical import CanonicalModel

        self.face = face
        self.model = CanonicalModel(face.neutral, face.basis)
        self.joints = self.model.joints_rest.astype(np.float64)  # (2, 3): root, jaw
        self.K, self.m2c = K, m2c
        self.renderer = _Renderer(width, height, K, supersample)
        self.normals_face = _NormalAccumulator(face.faces, len(face.neutral))
        skin_lin = _srgb_to_linear(face.skin)
        hair_lin = _srgb_to_linear(face.hair)
        key = np.array([-0.45 + rng.uniform(-0.2, 0.2), -0.55 + rng.uniform(-0.15, 0.15), -1.0])
        self.light = _Light(key / np.linalg.norm(key), 0.80, np.array([0.77, -0.1, -0.63]), 0.28, 0.20, 0.10)
        self.eye = dict(iris_angle=math.asin(_IRIS_RADIUS_M / _EYE_RADIUS_M),
                        pupil_angle=math.asin(_PUPIL_RADIUS_M / _EYE_RADIUS_M),
                        sclera=_srgb_to_linear([0.86, 0.83, 0.80]), iris=_srgb_to_linear(face.iris),
                        pupil=_srgb_to_linear([0.03, 0.03, 0.03]))
        v = face.neutral

        # skull + hair: an ellipsoid behind the face mesh; hair on top and at the back
        sph, sph_f = _uv_sphere(18, 28)
        self.skull_centre = np.array([0.0, v[:, 1].max() - _SKULL_BELOW_FACE_TOP_M, v[:, 2].min() + 0.005])
        self.skull_axes = np.array([abs(v[:, 0]).max() + 0.004, _SKULL_HALF_HEIGHT_M, 0.105])
        self.skull_unit, self.skull_faces = sph, sph_f
        # the hairline runs a little above the face mesh's top edge, so the forehead continues
        hairline = (sph[:, 1] > _HAIRLINE_NY - 0.25 * np.abs(sph[:, 0]) - 0.3 * np.clip(-sph[:, 2], 0, 1)) | (sph[:, 2] < -0.45)
        self.skull_albedo = np.where(hairline[:, None], hair_lin, skin_lin * 0.95).astype(np.float32)
        # ears
        self.ear_unit, self.ear_faces = _uv_sphere(8, 12)
        ear_y = v[[234, 454], 1].mean() - 0.012
        self.ear_centres = np.array([[v[234, 0] - 0.002, ear_y, v[234, 2] - 0.012],
                                     [v[454, 0] + 0.002, ear_y, v[454, 2] - 0.012]])
        self.ear_axes = np.array([0.010, 0.030, 0.017])
        # neck: an open cylinder below the jaw that does not turn with the head
        nv, nf = _grid(24, 6)
        ang = (nv[:, 0] - 0.5) * 2.0 * np.pi
        neck_r, neck_z = 0.058, -0.035
        self.neck_unit = np.stack([neck_r * np.sin(ang), -0.04 - 0.30 * nv[:, 1], neck_z + neck_r * np.cos(ang)], 1)
        self.neck_faces = _orient_outwards(self.neck_unit * np.array([1, 0, 1]), nf, centre=(0.0, 0.0, neck_z))
        self.neck_normals = np.stack([np.sin(ang), np.zeros_like(ang), np.cos(ang)], 1)
        # the jaw shades the top of the neck
        self.neck_albedo = (skin_lin * (0.55 + 0.35 * np.clip(nv[:, 1:2] / 0.4, 0, 1))).astype(np.float32)

        # mouth: a dark cavity, teeth on each jaw, a tongue on the lower jaw
        mouth = v[[13, 14, 78, 308]]
        mx, my, mz = 0.0, mouth[:2, 1].mean(), mouth[:2, 2].mean()
        half = 0.5 * abs(v[308, 0] - v[78, 0])
        gv, gf = _grid(3, 3)
        self.cavity = (np.stack([mx + (gv[:, 0] - 0.5) * 2.0 * half * 1.25, my + 0.008 - gv[:, 1] * 0.030,
                                 np.full(len(gv), mz - 0.026)], 1), gf)
        self.cavity_jaw = gv[:, 1:2].astype(np.float64)  # 0: moves with the skull, 1: with the jaw
        tv_, tf_ = _grid(13, 3)

        def teeth(y_top, height_m, z0, depth_curv):
            """A strip along the dental arch: (x, y from y_top down by height_m, z bent back)."""
            x = (tv_[:, 0] - 0.5) * 2.0 * half * 0.95
            y = y_top - tv_[:, 1] * height_m
            z = z0 - depth_curv * x ** 2
            return np.stack([x, y, z], 1)

        upper_edge = v[13, 1] - 0.0035  # 3.5 mm of upper teeth below the upper lip's inner edge
        self.teeth_upper = teeth(upper_edge + 0.009, 0.009, v[13, 2] - 0.0065, 32.0)
        self.teeth_lower = teeth(v[14, 1] - 0.001, 0.0085, v[14, 2] - 0.0085, 32.0)
        self.teeth_faces = tf_
        stripes = 0.82 + 0.18 * np.abs(np.cos(tv_[:, 0] * np.pi * 6))  # gaps between teeth
        self.teeth_albedo = (_srgb_to_linear([0.92, 0.89, 0.80])[None] * stripes[:, None]).astype(np.float32)
        self.tongue_unit, self.tongue_faces = _uv_sphere(8, 12)
        self.tongue_centre = np.array([0.0, v[14, 1] - 0.012, mz - 0.016])
        self.tongue_axes = np.array([0.6 * half * 2 * 0.5 * 1.6, 0.006, 0.018])
        self.cavity_colour = _srgb_to_linear([0.22, 0.07, 0.07])
        self.tongue_albedo = _srgb_to_linear([0.70, 0.33, 0.33])

        self.eye_unit, self.eye_faces = _uv_sphere(14, 20)

        # background: a vertical gradient between two muted colours and a soft vignette
        h, w = self.renderer.h, self.renderer.w
        top = _srgb_to_linear(rng.uniform([0.35, 0.40, 0.45], [0.65, 0.70, 0.75]))
        bottom = _srgb_to_linear(rng.uniform([0.20, 0.20, 0.20], [0.45, 0.42, 0.40]))
        yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :, None]
        bg = top * (1 - yy) + bottom * yy
        self.background = (bg * (1.0 - 0.25 * xx ** 2)).astype(np.float32) * np.ones((1, w, 1), np.float32)

    # -- poses

    def _rigid(self, R: np.ndarray, transl: np.ndarray):
        """Model-frame rest point -> camera frame, moving with the head (rotation R about
        the root joint, then transl)."""
        j0 = self.joints[0]
        Rc, tc = self.m2c[:3, :3], self.m2c[:3, 3]

        def f(p):
            q = (p - j0) @ R.T + j0 + transl
            return q @ Rc.T + tc
        return f

    def layers(self, k: int, anim: _Animation, verts_cam: np.ndarray) -> list[_Layer]:
        R = Rotation.from_rotvec(anim.global_orient[k].astype(np.float64)).as_matrix()
        Rj = Rotation.from_rotvec(anim.jaw_pose[k].astype(np.float64)).as_matrix()
        tr = anim.transl[k].astype(np.float64)
        head = self._rigid(R, tr)
        j1 = self.joints[1]
        jaw = lambda p: head((p - j1) @ Rj.T + j1)  # noqa: E731
        Rc = self.m2c[:3, :3]
        light = self.light

        def gouraud(points, normals, albedo, faces, cull=True, rot=R):
            n = (normals @ (Rc @ rot).T).astype(np.float32)
            n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-9)
            alb = np.broadcast_to(np.asarray(albedo, np.float32), (len(points), 3))
            col = _shade(alb, n, light, spec=0.03, shininess=10.0)
            attrs = np.concatenate([col, np.zeros((len(points), 2), np.float32)], 1)
            return _Layer(points.astype(np.float32), faces, attrs, _M_GOURAUD, cull)

        out = []
        # neck: translates with the head but does not turn with it
        neck_pts = (self.neck_unit + tr) @ Rc.T + self.m2c[:3, 3]
        n_neck = self.neck_normals @ Rc.T
        col = _shade(self.neck_albedo, n_neck, light, 0.0, 1.0)
        out.append(_Layer(neck_pts.astype(np.float32), self.neck_faces,
                          np.concatenate([col, np.zeros((len(col), 2), np.float32)], 1), _M_GOURAUD, True))
        skull_pts = head(self.skull_unit * self.skull_axes + self.skull_centre)
        skull_n = self.skull_unit / self.skull_axes
        out.append(gouraud(skull_pts, skull_n, self.skull_albedo, self.skull_faces))
        for c in self.ear_centres:
            out.append(gouraud(head(self.ear_unit * self.ear_axes + c), self.ear_unit / self.ear_axes,
                               _srgb_to_linear(self.face.skin) * np.array([0.95, 0.85, 0.85]), self.ear_faces))
        # eyes: the iris is where the surface normal is near the gaze (towards the camera)
        for c in self.face.eye_centres:
            centre_cam = head(c[None].astype(np.float64))[0]
            to_cam = -centre_cam / np.linalg.norm(centre_cam)
            gy, gp = anim.gaze[k]
            g = Rotation.from_euler("YX", [gy, gp]).apply(to_cam)
            pts = head(self.eye_unit * _EYE_RADIUS_M + c)
            n = (pts - centre_cam) / _EYE_RADIUS_M
            attrs = np.concatenate([n, (n @ g)[:, None], np.zeros((len(n), 1))], 1).astype(np.float32)
            out.append(_Layer(pts.astype(np.float32), self.eye_faces, attrs, _M_EYE, True))
        # mouth interior, back to front
        cav_pts, cav_f = self.cavity
        cav_col = np.broadcast_to(self.cavity_colour, (len(cav_pts), 3)) * (1.0 - 0.5 * np.linspace(0, 1, len(cav_pts)))[:, None]
        cav_pts_cam = (1.0 - self.cavity_jaw) * head(cav_pts) + self.cavity_jaw * jaw(cav_pts)
        out.append(_Layer(cav_pts_cam.astype(np.float32), cav_f,
                          np.concatenate([cav_col, np.zeros((len(cav_pts), 2))], 1).astype(np.float32), _M_FLAT, False))
        tongue = jaw(self.tongue_unit * self.tongue_axes + self.tongue_centre)
        out.append(gouraud(tongue, self.tongue_unit / self.tongue_axes, self.tongue_albedo * 0.6, self.tongue_faces,
                           rot=R @ Rj))
        tooth_n = np.tile([[0.0, 0.0, 1.0]], (len(self.teeth_upper), 1))
        out.append(_teeth_layer(jaw(self.teeth_lower), tooth_n, self.teeth_albedo * 0.75, self.teeth_faces, R @ Rj, Rc,
                                light))
        out.append(_teeth_layer(head(self.teeth_upper), tooth_n, self.teeth_albedo * 0.85, self.teeth_faces, R, Rc, light))
        # the face
        n_face = self.normals_face(verts_cam)
        attrs = np.concatenate([n_face, self.face.uv], 1).astype(np.float32)
        out.append(_Layer(verts_cam.astype(np.float32), self.face.faces, attrs, _M_FACE, True))
        return out


def _teeth_layer(points, normals, albedo, faces, R, Rc, light) -> _Layer:
    n = (normals @ (Rc @ R).T).astype(np.float32)
    col = _shade(albedo, n, light, spec=0.15, shininess=30.0)
    return _Layer(points.astype(np.float32), faces, np.concatenate([col, np.zeros((len(col), 2), np.float32)], 1),
                  _M_GOURAUD, False)


# --------------------------------------------------------------------------- occluder


@dataclass
class _Hand:
    """A hand drawn over the lower face: palm ellipse, four finger capsules and a thumb,
    defined in units of the face's projected width."""

    colour: np.ndarray  # (3,) linear
    span: tuple[float, float]
    hold: np.ndarray  # (T, 2) offset of the palm centre from the mouth, face widths
    angle: np.ndarray  # (T,) degrees
    side: float  # +1: enters from the subject's left (image right)


def _make_hand(rng: np.random.Generator, span: tuple[float, float], n_frames: int, fps: float, face_skin) -> _Hand:
    tones = [np.asarray(t) for t in _SKIN_TONES]
    far = sorted(tones, key=lambda t: -float(np.abs(t - face_skin).sum()))[:3]
    colour = far[rng.integers(len(far))] * np.array([1.0, 0.96, 0.95])
    hold = np.stack([0.04 * _smooth_noise(rng, n_frames, fps, 1.5), 0.03 * _smooth_noise(rng, n_frames, fps, 1.5)], 1)
    angle = 4.0 * _smooth_noise(rng, n_frames, fps, 1.2) + rng.uniform(-12, 12)
    side = float(rng.choice([-1.0, 1.0]))
    return _Hand(_srgb_to_linear(colour), span, hold, angle, side)


def _draw_hand(img: np.ndarray, hand: _Hand, k: int, t: float, mouth_px: np.ndarray,
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


def _occluder_span(rng: np.random.Generator, phonemes, duration_s: float) -> tuple[float, float]:
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


# --------------------------------------------------------------------------- speech


@functools.lru_cache(maxsize=16)
def _default_text(duration_s: float) -> str:
    """The longest run of DEFAULT_SENTENCES that fits in the clip at the default rate."""
    from avface.tts import synthesise

    room = duration_s - LEAD_SILENCE_S - MIN_TAIL_SILENCE_S
    chosen: list[str] = []
    for sentence in DEFAULT_SENTENCES:
        trial = " ".join(chosen + [sentence])
        speech = synthesise(trial)
        if speech.phonemes and speech.phonemes[-1][2] <= room:
            chosen.append(sentence)  # a sentence that does not fit is skipped; a shorter one may
    return " ".join(chosen) if chosen else DEFAULT_SENTENCES[0]


def _place_speech(speech, duration_s: float):
    """(wave at AUDIO_RATE_HZ of exactly the clip's length, phonemes and words on the clip's
    time line, offset s). Speech that runs past the clip is cut at the last word that fits."""
    from math import gcd

    offset = LEAD_SILENCE_S
    g = gcd(AUDIO_RATE_HZ, speech.sample_rate)
    wave = scipy.signal.resample_poly(speech.wave.astype(np.float64), AUDIO_RATE_HZ // g, speech.sample_rate // g)
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    if peak > 0:
        wave *= AUDIO_PEAK / peak
    n = int(round(duration_s * AUDIO_RATE_HZ))
    out = np.zeros(n, np.float32)
    a = int(round(offset * AUDIO_RATE_HZ))
    limit = duration_s - MIN_TAIL_SILENCE_S * 0.5
    words = [(w, s + offset, e + offset) for w, s, e in speech.words]
    phonemes = [(p, s + offset, e + offset) for p, s, e in speech.phonemes]
    if phonemes and phonemes[-1][2] > limit:
        keep_until = max([e for _, _, e in words if e <= limit] or [offset])
        log.warning("the speech (%.2f s) does not fit the %.2f s clip; cut after %.2f s", phonemes[-1][2], duration_s,
                    keep_until)
        phonemes = [p for p in phonemes if p[2] <= keep_until + 1e-6]
        words = [w for w in words if w[2] <= keep_until + 1e-6]
        cut = int(round((keep_until - offset + 0.03) * AUDIO_RATE_HZ))
        fade = np.ones(cut)
        m = min(cut, int(0.03 * AUDIO_RATE_HZ))
        fade[cut - m:] = np.linspace(1, 0, m)
        wave = wave[:cut] * fade
    m = max(0, min(len(wave), n - a))
    out[a:a + m] = wave[:m]
    return out, phonemes, words, offset


# --------------------------------------------------------------------------- public API


def _render_frames(scene: _Scene, anim: _Animation, verts_cam: np.ndarray, fps: float,
                  hand: _Hand | None, timings: list | None = None,
                  coverage: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Yield (H, W, 3) uint8 RGB frames; fills ``coverage[t]`` with the fraction of the lips
    under the hand and appends per-frame render seconds to ``timings``."""
    from avface.models.canonical import LIPS_LOWER_OUTER, LIPS_UPPER_OUTER

    r = scene.renderer
    s = r.s
    lip_ring = np.asarray(LIPS_UPPER_OUTER + LIPS_LOWER_OUTER[::-1])
    for k in range(len(verts_cam)):
        t0 = time.perf_counter()
        v = verts_cam[k]
        img = r.render(scene.layers(k, anim, v), scene.background, scene.face.texture, scene.eye, scene.light)
        if hand is not None:
            xy = r.project(v.astype(np.float64))
            mouth = xy[lip_ring].mean(0)
            face_w = float(np.linalg.norm(xy[454] - xy[234]))
            drawn = _draw_hand(img, hand, k, k / fps, mouth, face_w)
            if drawn is not None and coverage is not None:
                # the hand's cover of the lips' projected area, at the render's resolution
                lips = np.zeros(img.shape[:2], np.uint8)
                cv2.fillPoly(lips, [np.round((xy[lip_ring] - 0.5) * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
                area = float(lips.sum())
                roi, mask = drawn
                coverage[k] = float((mask * lips[roi]).sum()) / area if area > 0 else 0.0
        small = cv2.resize(img, (r.w // s, r.h // s), interpolation=cv2.INTER_AREA) if s > 1 else img
        frame = (np.clip(_linear_to_srgb(small), 0, 1) * 255.0 + 0.5).astype(np.uint8)
        if timings is not None:
            timings.append(time.perf_counter() - t0)
        yield frame


def _ground_truth(scene: _Scene, anim: _Animation) -> np.ndarray:
    """(T, 468, 3) float32 camera-frame vertices through the canonical model."""
    import torch

    from avface.models.base import FaceParams

    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    n = len(anim.expression)
    params = FaceParams.zeros(n, 0, anim.expression.shape[1])
    params = FaceParams(params.betas, t(anim.expression), t(anim.global_orient), params.neck_pose, t(anim.jaw_pose),
                        params.leye_pose, params.reye_pose, t(anim.transl))
    with torch.no_grad():
        v = scene.model.forward(params).vertices.numpy().astype(np.float64)
    m = scene.m2c
    return (v @ m[:3, :3].T + m[:3, 3]).astype(np.float32)


@dataclass
class _Prepared:
    """Everything a clip needs before its frames are drawn."""

    n_frames: int
    text: str
    wave: np.ndarray  # (N,) float32 at AUDIO_RATE_HZ
    phonemes: list
    words: list
    audio_offset_s: float
    face: _Face
    K: np.ndarray
    m2c: np.ndarray
    scene: _Scene
    anim: _Animation
    span: tuple[float, float] | None
    hand: _Hand | None
    gt: np.ndarray  # (T, 468, 3) camera frame


def _prepare(seed: int, duration_s: float, fps: float, size: int, text: str | None, occluder: bool,
             occluder_span_s, supersample: int) -> _Prepared:
    from avface.tts import synthesise

    if not (isinstance(size, (int, np.integer)) and 64 <= size <= 4096 and size % 2 == 0):
        # even, because H.264 in yuv420p needs even frame sizes
        raise InputError(f"size must be an even number of pixels in [64, 4096], got {size!r}")
    if not (isinstance(supersample, (int, np.integer)) and 1 <= supersample <= 4):
        raise InputError(f"supersample must be an integer in [1, 4], got {supersample!r}")
    if not (fps > 0 and math.isfinite(fps)):
        raise InputError(f"fps must be positive, got {fps!r}")
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise InputError(f"duration_s must be positive, got {duration_s!r}")
    n_frames = int(round(duration_s * fps))
    if n_frames < 1:
        raise InputError(f"a {duration_s} s clip at {fps} fps has no frames")
    duration_s = n_frames / fps
    rng = np.random.default_rng(seed)
    spoken = text if text is not None else _default_text(duration_s)
    speech = synthesise(spoken)
    wave, phonemes, words, offset = _place_speech(speech, duration_s)

    face = _build_face(rng)
    K = intrinsics(size, size)
    m2c = _model_to_camera(face.neutral, K, size)
    scene = _Scene(rng, face, K, m2c, size, size, supersample)
    anim = _animate(phonemes, n_frames, fps, rng)
    span = None
    hand = None
    if occluder:
        if occluder_span_s is not None:
            a, b = (float(x) for x in occluder_span_s)
            if not 0 <= a < b:
                raise InputError(f"occluder_span_s must be (start, end) with 0 <= start < end, got {occluder_span_s!r}")
            span = (a, b)
        else:
            span = _occluder_span(rng, phonemes, duration_s)
        hand = _make_hand(rng, span, n_frames, fps, face.skin)
    gt = _ground_truth(scene, anim)
    return _Prepared(n_frames, spoken, wave, phonemes, words, offset, face, K, m2c, scene, anim, span, hand, gt)


def make_demo_clip(out_dir, *, seed: int = 0, duration_s: float = 6.0, fps: float = 25, size: int = 512,
                   text: str | None = None, occluder: bool = True,
                   occluder_span_s: tuple[float, float] | None = None,
                   supersample: int = SUPERSAMPLE) -> SynthClip:
    """Render the synthetic talking-face clip into ``out_dir``: ``demo.mp4`` (H.264 video
    with the speech as AAC), ``demo.wav`` (16 kHz mono) and ``demo_gt.npz`` (ground truth,
    read back with :func:`load_demo_gt`). Same arguments, same clip: the ground truth and
    the frames depend only on them.

    ``text`` defaults to English sentences that fill the clip; speech starts after
    LEAD_SILENCE_S. With ``occluder`` a hand slides over the mouth for OCCLUDER_SPAN_S
    (seeded, while someone speaks) or over ``occluder_span_s``.
    """
    from avface import media

    out_dir = Path(out_dir).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder {out_dir}: {e.strerror or e}") from e
    t_start = time.perf_counter()
    p = _prepare(seed, duration_s, fps, size, text, occluder, occluder_span_s, supersample)
    wav_path = media.write_wav(out_dir / WAV_NAME, p.wave, AUDIO_RATE_HZ)
    coverage = np.zeros(p.n_frames, np.float32)
    timings: list[float] = []
    frames = _render_frames(p.scene, p.anim, p.gt, fps, p.hand, timings, coverage)
    video_path = media.write_video(frames, out_dir / VIDEO_NAME, fps, audio=wav_path)
    occluded = coverage >= OCCLUDED_MIN_FRACTION
    clip = SynthClip(
        video_path=Path(video_path), wav_path=Path(wav_path), gt_path=out_dir / GT_NAME, fps=float(fps),
        n_frames=p.n_frames, width=size, height=size, gt_vertices=p.gt, K=p.K, occluded=occluded,
        occlusion_fraction=coverage, occluder_span_s=p.span, phonemes=p.phonemes, words=p.words, text=p.text,
        seed=int(seed), neutral_vertices=p.face.neutral, expression_names=EXPRESSION_NAMES,
        expression_basis=p.face.basis, expression=p.anim.expression, jaw_pose=p.anim.jaw_pose,
        global_orient=p.anim.global_orient, transl=p.anim.transl, model_to_camera=p.m2c,
    )
    _save_gt(clip, p.audio_offset_s)
    log.info("demo clip: %d frames %dx%d in %.1f s (render %.1f ms/frame), %d occluded, text %r", p.n_frames, size,
             size, time.perf_counter() - t_start, 1e3 * float(np.mean(timings)) if timings else 0.0,
             int(occluded.sum()), p.text)
    return clip


def _save_gt(clip: SynthClip, audio_offset_s: float) -> None:
    meta = dict(format=GT_FORMAT, fps=clip.fps, n_frames=clip.n_frames, width=clip.width, height=clip.height,
                text=clip.text, seed=clip.seed, audio_offset_s=audio_offset_s,
                occluder_span_s=list(clip.occluder_span_s) if clip.occluder_span_s else None,
                phonemes=clip.phonemes, words=clip.words, expression_names=list(clip.expression_names),
                video=clip.video_path.name, wav=clip.wav_path.name,
                conventions="vertices: metres, OpenCV camera frame (x right, y down, z forward); pixels: continuous "
                            "(pixel i spans [i, i+1)); model frame: y up, z towards the viewer")
    tmp = clip.gt_path.with_name(clip.gt_path.stem + ".partial.npz")
    np.savez_compressed(
        tmp, meta=json.dumps(meta, allow_nan=False), gt_vertices=clip.gt_vertices, K=clip.K, occluded=clip.occluded,
        occlusion_fraction=clip.occlusion_fraction, neutral_vertices=clip.neutral_vertices,
        expression_basis=clip.expression_basis, expression=clip.expression, jaw_pose=clip.jaw_pose,
        global_orient=clip.global_orient, transl=clip.transl, model_to_camera=clip.model_to_camera,
    )
    tmp.replace(clip.gt_path)


def load_demo_gt(path) -> SynthClip:
    """Read ``demo_gt.npz`` (or the folder holding it) back into a :class:`SynthClip`; the
    video and wav paths point beside it."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / GT_NAME
    if not path.is_file():
        raise InputError(f"no synthetic clip ground truth at {path} (make one with make_demo_clip)")
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != GT_FORMAT:
            raise InputError(f"{path} is not a synthetic clip's ground truth ({GT_FORMAT}), format {meta.get('format')!r}")
        arrays = {k: z[k] for k in z.files if k != "meta"}
    span = meta["occluder_span_s"]
    return SynthClip(
        video_path=path.parent / meta["video"], wav_path=path.parent / meta["wav"], gt_path=path, fps=float(meta["fps"]),
        n_frames=int(meta["n_frames"]), width=int(meta["width"]), height=int(meta["height"]),
        gt_vertices=arrays["gt_vertices"], K=arrays["K"], occluded=arrays["occluded"].astype(bool),
        occlusion_fraction=arrays["occlusion_fraction"], occluder_span_s=tuple(span) if span else None,
        phonemes=[tuple(p) for p in meta["phonemes"]], words=[tuple(w) for w in meta["words"]], text=meta["text"],
        seed=int(meta["seed"]), neutral_vertices=arrays["neutral_vertices"],
        expression_names=tuple(meta["expression_names"]), expression_basis=arrays["expression_basis"],
        expression=arrays["expression"], jaw_pose=arrays["jaw_pose"], global_orient=arrays["global_orient"],
        transl=arrays["transl"], model_to_camera=arrays["model_to_camera"],
    )
