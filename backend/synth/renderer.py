"""The software rasteriser: painter's algorithm into a triangle-id buffer, then one
vectorised shading pass (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

SUPERSAMPLE = 2
"""Each output pixel averages SUPERSAMPLE x SUPERSAMPLE rendered pixels."""
SLIVER_HEIGHT_PX = 1.0
"""Triangles less high than this (rendered pixels) are shaded flat (see Renderer.render)."""

# materials of the shading pass
M_GOURAUD, M_FACE, M_EYE, M_FLAT = 0, 1, 2, 3


@dataclass
class Layer:
    verts: np.ndarray  # (N, 3) camera frame
    faces: np.ndarray  # (F, 3) CCW seen from outside / front
    attrs: np.ndarray  # (N, 5): lit colour or normal (3), u, v; a bumped face adds dP/du, dP/dv (N, 11)
    material: int
    cull: bool = True


@dataclass
class Light:
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


def shade(albedo: np.ndarray, n: np.ndarray, light: Light, spec: float, shininess: float,
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


class Renderer:
    def __init__(self, width: int, height: int, K: np.ndarray, supersample: int):
        self.s = supersample
        self.w, self.h = width * supersample, height * supersample
        self.K = K.copy()
        self.K[:2] *= supersample  # continuous coordinates scale exactly
        self.K_inv = np.linalg.inv(self.K)

    def project(self, p: np.ndarray) -> np.ndarray:
        uvw = p @ self.K.T
        return uvw[:, :2] / uvw[:, 2:3]

    def render(self, layers: list[Layer], background: np.ndarray, texture: np.ndarray, eye: dict,
               light: Light, bump: np.ndarray | None = None) -> np.ndarray:
        """Linear RGB (H*s, W*s, 3) float32. ``bump``: (S, S, 3) the face's height gradient in
        UV space and the creases' darkening (dH/du, dH/dv, cavity;
        :meth:`.wrinkles.Wrinkles.gradient`), which tilt the face's normals and darken its
        albedo; its layer then carries dP/du and dP/dv after the UVs."""
        ids, xy, attrs, faces, mats = self._rasterise(layers)

        img = background.copy()
        flat = np.flatnonzero(ids >= 0)
        if flat.size == 0:
            return img
        base, gx, gy = _attribute_planes(xy, attrs, faces)
        out = self._shade_pixels(flat, ids.ravel()[flat], mats, (base, gx, gy), texture, eye, light, bump)
        img.reshape(-1, 3)[flat] = out
        return img

    def _rasterise(self, layers: list[Layer]):
        """Painter's pass into a triangle-id buffer; returns (ids, xy, attrs, faces, materials) of all layers."""
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
        width = max(a.shape[1] for a in all_attr)  # layers without tangents get zeros there
        attrs = np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in all_attr]).astype(np.float64)
        faces = np.concatenate(all_faces)
        mats = np.concatenate(all_mat)
        return ids, xy, attrs, faces, mats

    def _shade_pixels(self, flat: np.ndarray, tri: np.ndarray, mats: np.ndarray, planes, texture: np.ndarray,
                      eye: dict, light: Light, bump: np.ndarray | None) -> np.ndarray:
        """(P, 3) linear colour of the covered pixels ``flat`` (triangle ``tri`` each), material by material."""
        base, gx, gy = planes
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
        sel = np.flatnonzero((mat == M_GOURAUD) | (mat == M_FLAT))
        out[sel] = interpolate(sel, 3)
        for m in (M_FACE, M_EYE):
            sel = np.flatnonzero(mat == m)
            if sel.size == 0:
                continue
            bumped = m == M_FACE and bump is not None
            a = interpolate(sel, 11 if bumped else 5)
            n = a[:, :3]
            n /= np.maximum(np.sqrt(n[:, 0] * n[:, 0] + n[:, 1] * n[:, 1] + n[:, 2] * n[:, 2]), 1e-9)[:, None]
            if bumped:
                from avface.synth.wrinkles import bump_normals

                grad = _sample(bump, a[:, 3] * bump.shape[1] - 0.5, (1.0 - a[:, 4]) * bump.shape[0] - 0.5)
                n = bump_normals(n, a[:, 5:8], a[:, 8:11], grad[:, :2]).astype(np.float32)
            if m == M_FACE:
                albedo = _sample(texture, a[:, 3] * texture.shape[1] - 0.5, (1.0 - a[:, 4]) * texture.shape[0] - 0.5)
                if bumped:  # a crease's floor gets less light
                    albedo = albedo * (1.0 - grad[:, 2:3])
                out[sel] = shade(albedo, n, light, spec=0.06, shininess=18.0)
            else:
                out[sel] = shade(_eye_albedo(a[:, 3], eye), n, light, spec=0.9, shininess=120.0, wrap=0.1)
        return out


def _attribute_planes(xy: np.ndarray, attrs: np.ndarray, faces: np.ndarray):
    """Per-triangle float32 tables (base, gx, gy) with attr = base + x gx + y gy (flat on slivers)."""
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
    return base.astype(np.float32), gx.astype(np.float32), gy.astype(np.float32)


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
