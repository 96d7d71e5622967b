"""Skin detail for the synthetic face: a height field in UV space (metres along the surface
normal, positive outwards) that the renderer shades as a bump map, so that the fine stage
has folds, creases and wrinkles to learn from on clips the project may redistribute.

The field is a per-identity static part plus one part per expression that scales with that
expression's coefficient, as real folds deepen with the expression that makes them:

- nasolabial folds, from beside the nose wings past the mouth corners (deepen with
  ``lips_spread``, a smile);
- the mentolabial sulcus, the crease under the lower lip (``lips_round``);
- vertical lip lines on the lips (``lips_round``, a pucker);
- forehead lines above the brows (``brow_raise``);
- crow's feet at the outer eye corners (``lips_spread``);
- a faint, fine skin grain everywhere (static).

Depths and widths are those of adult skin at a glance: folds 1-4 mm deep (the nasolabial
fold of a smile), wrinkles 0.1-1.5 mm, 1-3 mm wide, lip lines 0.05-0.5 mm. Creases also
darken, as skin does where little light reaches (:meth:`Wrinkles.gradient`'s third
channel). Every shape is placed from the canonical mesh's landmark UVs
(as :mod:`.texture` paints the albedo) and jittered per identity, and the field is made
from its own random stream, so turning the detail on changes nothing else in a clip.

Conventions as the fine stage's maps (docs/fine_stage.md): texel (row i, column j) of a map
of side S is centred at u = (j + 1/2) / S, v = 1 - (i + 1/2) / S.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import scipy.ndimage

from avface.synth.common import MM

WRINKLE_MAP_SIZE = 512
"""Side of the height maps the renderer samples, texels."""
#: Approximate metres per UV unit across the canonical face (its UVs span about 155 mm).
_M_PER_UV = 0.155
CAVITY_SCALE_M = 3 * MM
"""A crease darkens by its depth below the skin's mean over this radius..."""
CAVITY_PER_MM = 0.25
"""... this much per millimetre (the light a fold's walls keep from its floor)..."""
CAVITY_MAX = 0.5
"""... at most this much."""


@dataclass(frozen=True)
class Wrinkles:
    """A face's skin detail: height (S, S) = static + sum_e coefficient_e * dynamic[e]."""

    static: np.ndarray
    """(S, S) float32 metres."""
    dynamic: np.ndarray
    """(E, S, S) float32 metres per unit of each expression coefficient (E = the face's
    expression count; zero for expressions that fold nothing)."""

    def height(self, expression: np.ndarray) -> np.ndarray:
        """(S, S) float32 metres for one frame's (E,) expression coefficients."""
        w = np.asarray(expression, np.float32)
        return self.static + np.tensordot(w, self.dynamic, axes=1).astype(np.float32)

    def gradient(self, expression: np.ndarray) -> np.ndarray:
        """(S, S, 3) float32: dH/du and dH/dv (metres per UV unit) and the crease's darkening
        in [0, CAVITY_MAX] (its depth below the surrounding skin, CAVITY_PER_MM per
        millimetre): the bump map the renderer samples (three channels, as the albedo)."""
        h = self.height(expression)
        s = h.shape[0]
        d_row, d_col = np.gradient(h)
        below = cv2.GaussianBlur(h, (0, 0), CAVITY_SCALE_M * s / _M_PER_UV) - h
        cavity = np.clip(below / MM * CAVITY_PER_MM, 0.0, CAVITY_MAX)
        return np.stack([d_col * s, -d_row * s, cavity], -1).astype(np.float32)

    def resized(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(static, dynamic) area-averaged to ``size`` (the ground truth a fine stage at that
        map size is compared with)."""
        f = lambda m: cv2.resize(m, (size, size), interpolation=cv2.INTER_AREA)  # noqa: E731
        return f(self.static), np.stack([f(d) for d in self.dynamic])


def _groove(shape: tuple[int, int], polyline_px: np.ndarray, sigma_px: float) -> np.ndarray:
    """(S, S) in [0, 1]: a Gaussian profile of width ``sigma_px`` around an open polyline,
    fading out over its last fifth at each end."""
    s = shape[0]
    line = np.zeros(shape, np.uint8)
    pts = np.round(polyline_px * 16).astype(np.int32)
    cv2.polylines(line, [pts], False, 1, 1, cv2.LINE_8, 4)
    dist = scipy.ndimage.distance_transform_edt(line == 0)
    profile = np.exp(-0.5 * (dist / sigma_px) ** 2)
    # fade along the line: distance from each end, by nearest point on the polyline
    seg = np.linalg.norm(np.diff(polyline_px, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    dense = np.concatenate([np.linspace(polyline_px[i], polyline_px[i + 1], max(int(seg[i]) + 2, 2))
                            for i in range(len(seg))])
    dense_arc = np.concatenate([np.linspace(arc[i], arc[i + 1], max(int(seg[i]) + 2, 2)) for i in range(len(seg))])
    from scipy.spatial import cKDTree

    yy, xx = np.mgrid[0:s, 0:s]
    near = profile > 1e-3
    _, idx = cKDTree(dense).query(np.stack([xx[near] + 0.5, yy[near] + 0.5], 1))
    t = dense_arc[idx] / max(arc[-1], 1e-9)
    fade = np.clip(np.minimum(t, 1.0 - t) / 0.2, 0.0, 1.0)
    out = np.zeros(shape, np.float32)
    out[near] = profile[near] * (0.5 - 0.5 * np.cos(np.pi * fade))
    return out


def make_wrinkles(rng: np.random.Generator, uv: np.ndarray, n_expressions: int, expression_names: tuple[str, ...],
                  size: int = WRINKLE_MAP_SIZE) -> Wrinkles:
    """A face's skin detail from the canonical mesh's (468, 2) UVs, one random stream."""
    from avface.core.topology import LIPS_LOWER_OUTER, LIPS_UPPER_OUTER

    s = size
    px_per_m = s / _M_PER_UV

    def px(u, v):  # UV -> texel coordinates (x right, y down)
        return np.array([u * s, (1.0 - v) * s])

    static = np.zeros((s, s), np.float32)
    dynamic = np.zeros((n_expressions, s, s), np.float32)
    slot = {name: i for i, name in enumerate(expression_names)}

    def add(field: np.ndarray, depth_static: float, depth_dynamic: float, expression: str | None):
        static[:] -= depth_static * field
        if expression in slot:
            dynamic[slot[expression]] -= depth_dynamic * field

    j = lambda scale: rng.normal(0.0, scale)  # noqa: E731  UV jitter
    # nasolabial folds: beside the nose wing, down and out past the mouth corner
    depth, deepen = rng.uniform(0.8, 2.0) * MM, rng.uniform(1.0, 2.0) * MM
    width = rng.uniform(1.5, 2.5) * MM * px_per_m
    for side in (-1.0, 1.0):
        pts = np.array([[0.5 + side * (0.085 + j(0.006)), 0.425 + j(0.008)],
                        [0.5 + side * (0.125 + j(0.006)), 0.36 + j(0.008)],
                        [0.5 + side * (0.14 + j(0.008)), 0.29 + j(0.01)],
                        [0.5 + side * (0.135 + j(0.008)), 0.235 + j(0.01)]])
        add(_groove((s, s), np.stack([px(u, v) for u, v in pts]), width), depth, deepen, "lips_spread")
    # mentolabial sulcus: an arc under the lower lip
    depth, deepen = rng.uniform(0.6, 1.5) * MM, rng.uniform(0.3, 0.8) * MM
    v0 = 0.205 + j(0.008)
    arc = np.array([[0.5 + x, v0 + 0.9 * x * x + j(0.003)] for x in np.linspace(-0.07, 0.07, 7)])
    add(_groove((s, s), np.stack([px(u, v) for u, v in arc]), rng.uniform(1.2, 2.0) * MM * px_per_m), depth, deepen,
        "lips_round")
    # forehead lines: three or four gently curved horizontal grooves
    depth, deepen = rng.uniform(0.1, 0.4) * MM, rng.uniform(0.6, 1.2) * MM
    n_lines = int(rng.integers(3, 5))
    gap = rng.uniform(0.022, 0.03)
    base = 0.775 + j(0.01)
    field = np.zeros((s, s), np.float32)
    for k in range(n_lines):
        v = base + k * gap
        half = rng.uniform(0.09, 0.14)
        line = np.array([[0.5 + x, v - 0.6 * x * x + j(0.002)] for x in np.linspace(-half, half, 9)])
        field += rng.uniform(0.6, 1.0) * _groove((s, s), np.stack([px(u, vv) for u, vv in line]),
                                                 rng.uniform(0.6, 1.0) * MM * px_per_m)
    add(field, depth, deepen, "brow_raise")
    # crow's feet: three short rays out from each outer eye corner
    depth, deepen = rng.uniform(0.05, 0.2) * MM, rng.uniform(0.2, 0.5) * MM
    field = np.zeros((s, s), np.float32)
    for side, corner in ((-1.0, uv[33]), (1.0, uv[263])):
        for ang in np.radians([-25.0, 0.0, 25.0]) + rng.normal(0, 0.1, 3):
            start = corner + np.array([side * 0.02, 0.0])
            ray = np.stack([start + t * np.array([side * np.cos(ang), np.sin(ang)]) for t in np.linspace(0, 0.06, 5)])
            field += _groove((s, s), np.stack([px(u, v) for u, v in ray]), 0.6 * MM * px_per_m)
    add(field, depth, deepen, "lips_spread")
    # vertical lip lines, inside the lips' outline
    lips = np.zeros((s, s), np.float32)
    outer = list(LIPS_UPPER_OUTER) + list(LIPS_LOWER_OUTER[::-1])
    cv2.fillPoly(lips, [np.round(np.stack([px(*uv[i]) for i in outer]) * 16).astype(np.int32)], 1.0, cv2.LINE_AA, 4)
    lips = cv2.GaussianBlur(lips, (0, 0), 0.6 * MM * px_per_m)
    period = rng.uniform(1.0, 1.6) * MM * px_per_m
    xx = np.arange(s, dtype=np.float32)[None, :] + 0.5
    yy = np.arange(s, dtype=np.float32)[:, None] + 0.5
    wobble = 0.15 * period * np.sin(yy / (3.0 * period) + rng.uniform(0, 2 * np.pi))
    lines = (0.5 + 0.5 * np.cos(2 * np.pi * (xx + wobble) / period + rng.uniform(0, 2 * np.pi))) ** 3
    add(lips * lines, rng.uniform(0.05, 0.15) * MM, rng.uniform(0.15, 0.3) * MM, "lips_round")
    # skin grain: band-passed noise, a few hundredths of a millimetre
    grain = scipy.ndimage.gaussian_filter(rng.standard_normal((s, s)), 0.35 * MM * px_per_m)
    grain -= scipy.ndimage.gaussian_filter(grain, 2.0 * MM * px_per_m)
    static += (rng.uniform(0.01, 0.03) * MM * grain / max(float(grain.std()), 1e-12)).astype(np.float32)
    return Wrinkles(static.astype(np.float32), dynamic.astype(np.float32))


def vertex_tangents(verts: np.ndarray, faces: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(V, 3) dP/du and dP/dv of the mesh (area-weighted over the faces around each vertex):
    how a point moves per UV unit, what turns a UV-space height gradient into a tilt of the
    normal."""
    f = np.asarray(faces)
    p0, p1, p2 = verts[f[:, 0]], verts[f[:, 1]], verts[f[:, 2]]
    t0, t1, t2 = uv[f[:, 0]], uv[f[:, 1]], uv[f[:, 2]]
    e1, e2 = p1 - p0, p2 - p0
    d1, d2 = t1 - t0, t2 - t0
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    ok = np.abs(det) > 1e-12
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)[:, None]
    tu = (e1 * d2[:, 1:2] - e2 * d1[:, 1:2]) * inv
    tv = (e2 * d1[:, 0:1] - e1 * d2[:, 0:1]) * inv
    w = 0.5 * np.linalg.norm(np.cross(e1, e2), axis=1)[:, None]
    out_u = np.zeros_like(verts, dtype=np.float64)
    out_v = np.zeros_like(verts, dtype=np.float64)
    for k in range(3):
        np.add.at(out_u, f[:, k], w * tu)
        np.add.at(out_v, f[:, k], w * tv)
    count = np.zeros(len(verts))
    for k in range(3):
        np.add.at(count, f[:, k], w[:, 0])
    count = np.maximum(count, 1e-12)[:, None]
    return (out_u / count).astype(np.float32), (out_v / count).astype(np.float32)


def bump_normals(n: np.ndarray, tu: np.ndarray, tv: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """(P, 3) unit normals of the surface P + H n from the (P, 3) unit normals, the (P, 3)
    tangents dP/du and dP/dv and the (P, 2) height gradient (dH/du, dH/dv): to first order
    n - grad_s H, grad_s H = G^-1 (dH/du, dH/dv) in the tangent basis (G the metric)."""
    guu = (tu * tu).sum(1)
    guv = (tu * tv).sum(1)
    gvv = (tv * tv).sum(1)
    det = np.maximum(guu * gvv - guv * guv, 1e-20)
    hu, hv = grad[:, 0], grad[:, 1]
    cu = (gvv * hu - guv * hv) / det
    cv = (guu * hv - guv * hu) / det
    out = n - cu[:, None] * tu - cv[:, None] * tv
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)
