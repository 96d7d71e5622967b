"""The per-clip face: identity (the canonical mesh, scaled and bent), a linear expression
basis of harmonic displacement fields, eye placement and colours."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from avface.models.canonical_mesh import mesh_laplacian
from avface.synth.common import MM
from avface.synth.texture import paint_texture

EYE_RADIUS_M = 0.012
_EYE_FRONT_M = 0.0015
"""The cornea's apex lies this far in front of the centroid of the eye ring."""

EXPRESSION_NAMES = ("lips_round", "lips_spread", "lips_close", "blink_right", "blink_left", "brow_raise")

# Skin albedos (sRGB, 0-1): a spread of skin tones; the hand takes another one.
SKIN_TONES = (
    (0.90, 0.72, 0.62), (0.86, 0.66, 0.54), (0.80, 0.60, 0.47), (0.72, 0.52, 0.40),
    (0.62, 0.43, 0.32), (0.52, 0.35, 0.26),
)
_HAIR_COLOURS = ((0.10, 0.07, 0.05), (0.22, 0.14, 0.08), (0.35, 0.24, 0.14), (0.06, 0.06, 0.06), (0.45, 0.33, 0.20))
_IRIS_COLOURS = ((0.30, 0.18, 0.08), (0.22, 0.32, 0.45), (0.30, 0.35, 0.20), (0.18, 0.11, 0.06))


def _opening_faces(faces: np.ndarray) -> np.ndarray:
    """(F,) bool: the triangles that close the eyes and the mouth in the canonical mesh."""
    from avface.core.topology import LEFT_EYE, LIPS_LOWER_INNER, LIPS_UPPER_INNER, RIGHT_EYE

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


@dataclass
class Face:
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
    from avface.core.topology import (LEFT_EYE, LEFT_EYEBROW, LIPS, LIPS_LOWER_INNER, LIPS_LOWER_OUTER,
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


def build_face(rng: np.random.Generator) -> Face:
    from avface.core.topology import LEFT_EYE, RIGHT_EYE
    from avface.models.canonical_mesh import load_canonical_mesh

    mesh = load_canonical_mesh()
    faces_drawn = mesh.faces[~_opening_faces(mesh.faces)]
    neutral = _identity(rng, mesh.vertices.astype(np.float64))
    basis = _expression_basis(neutral.astype(np.float64), faces_drawn)
    skin = np.asarray(SKIN_TONES[rng.integers(len(SKIN_TONES))], np.float32) * rng.uniform(0.97, 1.03, 3).astype(np.float32)
    hair = np.asarray(_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))], np.float32)
    iris = np.asarray(_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))], np.float32)
    texture = paint_texture(rng, mesh.uv, np.clip(skin, 0, 1), hair)
    centres = []
    for ring in (RIGHT_EYE, LEFT_EYE):
        c = neutral[list(ring)].mean(0)
        centres.append(c + np.array([0.0, 0.0, _EYE_FRONT_M - EYE_RADIUS_M], np.float32))
    return Face(neutral, basis, faces_drawn, mesh.uv, texture, np.asarray(centres, np.float32), skin, hair, iris)
