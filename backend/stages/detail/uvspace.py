"""UV-space machinery of the fine stage (docs/design.md sections 2 and 3), with no rasteriser
dependency: every fine-stage quantity lives on a texel grid over the model's UV layout.

1. :func:`rasterise_uv` rasterises the mesh once in UV space: per texel, the triangle that
   covers it and its barycentric coordinates (numpy, vectorised over triangles).
2. Per frame, :func:`interpolate` turns per-vertex values (camera-frame vertices, normals,
   region weights) into maps, and :func:`unwrap` projects each texel's 3D point through the
   intrinsics and samples the frame with ``grid_sample``: the frame unwrapped into UV space.
3. :func:`visibility` says which texels the camera sees: the surface faces it, the texel
   projects inside the frame and no nearer surface covers it (a point z-buffer).
4. :func:`detail_normals` gives the normals of the displaced surface V_d = V_c + D * N_c.

Texel grid. A map of side S has texel (row i, column j) centred at
``u = (j + 0.5) / S``, ``v = 1 - (i + 0.5) / S``: v runs up (the result contract's UVs) and
row 0 is the top of the image, as image files and Blender's image textures lay it out.

Frames. Vertices and points passed here are in the OpenCV camera frame (x right, y down,
z forward, metres; ``CoarseFit.camera_vertices``, the result's ``vertices``); pixels are
continuous, pixel (x, y) covering [x, x + 1) x [y, y + 1), as ``avface.stages.fit.project``.

Maps are channels-last torch tensors ``(B, H, W, C)`` unless a docstring says otherwise; the
network and ``grid_sample`` take channels-first ``(B, C, H, W)``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

UV_SIZE_CPU = 128
"""Default side of the UV maps on the CPU, texels: what the mesh can show. At 128 the default
face's median UV edge spans 4 texels (its shortest tenth 1.6), so the maps still sample the
surface several times between two vertices, where the Displace modifier reads them; at 256 the
stage cost 2.9x as much on a 20-s clip (unwrap, shading, training and prediction all scale
with the texels) for maps no vertex could show."""
UV_SIZE_CUDA = 512
"""Default side of the UV maps on a CUDA device, texels."""
MIN_FACING_COS = 0.2
"""A texel counts as facing the camera when the cosine between its normal and the direction
to the camera is above this (about 78 degrees): grazing texels are stretched in the frame and
their colour mixes the silhouette's background. Measured on a rendered known texture at 384 px
(99th percentile of the unwrapping error, frontal / 45 degrees of yaw): 0.1 -> 0.039 / 0.025,
0.2 -> 0.010 / 0.013, 0.3 -> 0.008 / 0.008 with 8 % fewer texels."""
ZBUFFER_CELL_PX = 4
"""Cell side of the point z-buffer, pixels: coarser than the texels' footprint in the frame,
so that every cell under the face receives a texel and no gaps let hidden texels through."""
ZBUFFER_TOLERANCE_M = 0.006
"""A texel is hidden when it lies this much behind the nearest texel of its z-buffer cell.
Larger than the depth change across one cell on a steep cheek (about 4 mm at a 60 cm
distance), smaller than the nose's height over the cheek (about 2 cm)."""
ZBUFFER_MAX_SLOPE = 3.0
"""Cap on the slope (tan of the angle between the normal and the view) that widens a texel's
z-buffer tolerance: about 72 degrees; steeper texels are nearly grazing anyway."""
_INSIDE_EPS = 1e-7
"""Texel centres on a shared edge count as inside both triangles; the tie is resolved below."""


def default_uv_size(device: str | torch.device) -> int:
    """128 texels on the CPU (:data:`UV_SIZE_CPU`), 512 on CUDA."""
    return UV_SIZE_CUDA if torch.device(device).type == "cuda" else UV_SIZE_CPU


@dataclass(frozen=True, eq=False)
class UVRaster:
    """A mesh rasterised in UV space. Only covered texels are stored, as flat arrays, so
    per-texel work scales with the face's area, not with the square."""

    size: int  #: S: the maps are (S, S)
    texel: np.ndarray  #: (N,) int64 flat index row * S + col of each covered texel, ascending
    face: np.ndarray  #: (N,) int64 triangle covering the texel
    bary: np.ndarray  #: (N, 3) float32 barycentric coordinates of the texel centre in it
    n_faces: int  #: F, the mesh's triangle count

    @property
    def n_texels(self) -> int:
        return int(self.texel.shape[0])

    @property
    def mask(self) -> np.ndarray:
        """(S, S) bool: the texels some triangle covers."""
        m = np.zeros(self.size * self.size, bool)
        m[self.texel] = True
        return m.reshape(self.size, self.size)

    def face_id(self) -> np.ndarray:
        """(S, S) int64 triangle per texel, -1 where none."""
        out = np.full(self.size * self.size, -1, np.int64)
        out[self.texel] = self.face
        return out.reshape(self.size, self.size)

    def texels_per_face(self) -> np.ndarray:
        """(F,) how many texels each triangle holds."""
        return np.bincount(self.face, minlength=self.n_faces)


def texel_centres(size: int) -> np.ndarray:
    """(S, S, 2) float64 (u, v) of each texel centre (v up, row 0 at the top)."""
    c = (np.arange(size) + 0.5) / size
    u, v = np.meshgrid(c, 1.0 - c, indexing="xy")  # u varies along columns, v down the rows
    return np.stack([u, v], axis=-1)


def _ragged_arange(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For counts (F,), the owner (sum counts,) of each slot and its index within its owner."""
    owner = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    return owner, np.arange(int(counts.sum())) - starts[owner]


def _barycentric(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(N, 3) barycentric coordinates of points p (N, 2) in triangles (a, b, c), each (N, 2)."""
    v0, v1, v2 = b - a, c - a, p - a
    den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]  # twice the signed area
    w1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den
    w2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den
    return np.stack([1.0 - w1 - w2, w1, w2], axis=1)


def rasterise_uv(uv: np.ndarray, uv_faces: np.ndarray, size: int, only: np.ndarray | None = None) -> UVRaster:
    """Rasterise the UV layout: the triangle and barycentrics of every covered texel centre.

    uv: (Vt, 2) in [0, 1], v up; uv_faces: (F, 3) ids into uv; size: S texels a side; only:
    (F,) bool, the triangles the maps cover (None: all). A whole head's layout also holds its
    eyes and teeth, and its skin beyond the unit square: the detail is the face's alone.

    Candidates are the texels of each triangle's bounding box, enumerated for all triangles
    at once; a centre inside several triangles (shared edges, overlapping islands) goes to
    the triangle it is deepest inside. A triangle too small to hold any texel centre takes
    the texel under its centroid, so that every triangle owns at least one texel and per-
    triangle evidence (a region's confidence, a lip vertex) always reaches the maps.
    """
    uv = np.asarray(uv, np.float64)
    uv_faces = np.asarray(uv_faces, np.int64)
    if uv.ndim != 2 or uv.shape[1] != 2:
        raise ValueError(f"expected (Vt, 2) UVs, got {uv.shape}")
    if uv_faces.ndim != 2 or uv_faces.shape[1] != 3:
        raise ValueError(f"expected (F, 3) UV triangles, got {uv_faces.shape}")
    if uv_faces.size and (uv_faces.min() < 0 or uv_faces.max() >= len(uv)):
        raise ValueError(f"uv_faces index UVs outside [0, {len(uv)})")
    if size < 2:
        raise ValueError(f"UV map size must be at least 2 texels, got {size}")
    n_faces = len(uv_faces)
    # texel coordinates: x = column + 0.5 at a centre, y = row + 0.5 (rows run down)
    pts = np.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], axis=1)
    tri = pts[uv_faces]  # (F, 3 corners, 2)
    lo = np.clip(np.floor(tri.min(1) - 0.5).astype(np.int64) + 1, 0, size - 1)  # first centre >= min
    hi = np.clip(np.floor(tri.max(1) - 0.5).astype(np.int64), -1, size - 1)  # last centre <= max
    extent = np.maximum(hi - lo + 1, 0)  # (F, 2) columns, rows
    if only is not None:
        extent[~np.asarray(only, bool)] = 0
    counts = extent[:, 0] * extent[:, 1]
    owner, k = _ragged_arange(counts)
    col = lo[owner, 0] + k % extent[owner, 0]
    row = lo[owner, 1] + k // np.maximum(extent[owner, 0], 1)
    centre = np.stack([col + 0.5, row + 0.5], axis=1)
    t = tri[owner]
    with np.errstate(divide="ignore", invalid="ignore"):  # degenerate triangles give NaN: never inside
        bary = _barycentric(centre, t[:, 0], t[:, 1], t[:, 2])
    depth = bary.min(1)
    inside = depth >= -_INSIDE_EPS
    flat = (row * size + col)[inside]
    owner, bary, depth = owner[inside], bary[inside], depth[inside]
    # one triangle per texel: sort by texel, deepest first, and keep the first of each texel
    order = np.lexsort((-depth, flat))
    flat, owner, bary = flat[order], owner[order], bary[order]
    first = np.ones(len(flat), bool)
    first[1:] = flat[1:] != flat[:-1]
    flat, owner, bary = flat[first], owner[first], bary[first]

    face_of = np.full(size * size, -1, np.int64)
    bary_of = np.zeros((size * size, 3))
    face_of[flat], bary_of[flat] = owner, bary
    count = np.bincount(owner, minlength=n_faces)
    twice_area = np.abs((tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1])
                        - (tri[:, 2, 0] - tri[:, 0, 0]) * (tri[:, 1, 1] - tri[:, 0, 1]))
    # A loop over the few sliver triangles (none at 512^2 on the canonical layout), not texels.
    empty = np.nonzero((count == 0) & (twice_area > 0) & (True if only is None else np.asarray(only, bool)))[0]
    _give_slivers_a_texel(empty, tri, size, face_of, bary_of, count)
    if len(empty):
        log.debug("UV raster %d^2: %d triangles smaller than a texel took the texel nearest their centroid",
                  size, len(empty))
    flat = np.nonzero(face_of >= 0)[0]
    return UVRaster(size, flat, face_of[flat], bary_of[flat].astype(np.float32), n_faces)


# --------------------------------------------------------------------------- per-texel values



def _give_slivers_a_texel(empty: np.ndarray, tri: np.ndarray, size: int, face_of: np.ndarray, bary_of: np.ndarray,
                          count: np.ndarray) -> None:
    """Give each triangle of ``empty`` (too small to hold a texel centre) the texel nearest its
    centroid among those around it whose owner keeps another texel (or that nobody owns);
    updates ``face_of``, ``bary_of`` and ``count`` in place."""
    for f in empty:
        c = tri[f].mean(0)
        lo_f = np.clip(np.floor(tri[f].min(0)).astype(np.int64) - 1, 0, size - 1)
        hi_f = np.clip(np.floor(tri[f].max(0)).astype(np.int64) + 1, 0, size - 1)
        cols, rows = np.meshgrid(np.arange(lo_f[0], hi_f[0] + 1), np.arange(lo_f[1], hi_f[1] + 1))
        cells = (rows * size + cols).ravel()
        holder = face_of[cells]
        free = (holder < 0) | (count[np.maximum(holder, 0)] > 1)
        if not free.any():
            continue
        dist = (cols.ravel() + 0.5 - c[0]) ** 2 + (rows.ravel() + 0.5 - c[1]) ** 2
        cell = cells[free][np.argmin(dist[free])]
        if face_of[cell] >= 0:
            count[face_of[cell]] -= 1
        face_of[cell], bary_of[cell] = f, 1.0 / 3.0
        count[f] = 1

def _to_tensor(a, like: torch.Tensor | None = None, dtype=None) -> torch.Tensor:
    device = like.device if like is not None else None
    return torch.as_tensor(a, device=device, dtype=dtype)


def interpolate(raster: UVRaster, faces, values: torch.Tensor, *, fill: float = 0.0) -> torch.Tensor:
    """Per-vertex values to UV maps.

    faces: (F, 3) vertex ids (the geometry triangles matching ``raster``'s UV triangles);
    values: (B, V, C). Returns (B, S, S, C), ``fill`` where no triangle covers the texel.
    """
    if values.ndim != 3:
        raise ValueError(f"expected (B, V, C) vertex values, got {tuple(values.shape)}")
    faces_t = _to_tensor(faces, values, torch.long)
    if faces_t.shape != (raster.n_faces, 3):
        raise ValueError(f"faces {tuple(faces_t.shape)} do not match the raster's {raster.n_faces} triangles")
    b, _, c = values.shape
    corner = faces_t[_to_tensor(raster.face, values, torch.long)]  # (N, 3) vertex ids
    bary = _to_tensor(raster.bary, values, values.dtype)
    # texel_value[b, n, c] = sum_k bary[n, k] * values[b, corner[n, k], c]
    texel_values = torch.einsum("bnkc,nk->bnc", values[:, corner], bary)
    out = values.new_full((b, raster.size * raster.size, c), fill)
    out[:, _to_tensor(raster.texel, values, torch.long)] = texel_values
    return out.view(b, raster.size, raster.size, c)


def vertex_normals(vertices: torch.Tensor, faces) -> torch.Tensor:
    """(B, V, 3) unit area-weighted vertex normals of (B, V, 3) vertices.

    Orientation follows the triangles' winding: counter-clockwise seen from outside gives
    outward normals (both face models are wound so). A vertex that no triangle uses gets 0.
    """
    faces_t = _to_tensor(faces, vertices, torch.long)
    v0, v1, v2 = (vertices[:, faces_t[:, k]] for k in range(3))
    fn = torch.cross(v1 - v0, v2 - v0, dim=-1)  # (B, F, 3), length twice the area
    n = torch.zeros_like(vertices)
    for k in range(3):
        n.index_add_(1, faces_t[:, k], fn)
    return F.normalize(n, dim=-1, eps=1e-12)


def texel_normals(raster: UVRaster, faces, vertices: torch.Tensor) -> torch.Tensor:
    """(B, S, S, 3) unit normals N_c of the coarse surface (interpolated vertex normals,
    renormalised); 0 outside the layout."""
    return F.normalize(interpolate(raster, faces, vertex_normals(vertices, faces)), dim=-1, eps=1e-12)


def texel_mask(raster: UVRaster, device=None) -> torch.Tensor:
    """(S, S) bool tensor of covered texels."""
    return torch.as_tensor(raster.mask, device=device)


def displace(points: torch.Tensor, normals: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """V_d = V_c + D * N_c: points (B, S, S, 3), normals (B, S, S, 3), D (B, S, S) metres."""
    if displacement.shape != points.shape[:-1]:
        raise ValueError(f"expected a {tuple(points.shape[:-1])} displacement map, got {tuple(displacement.shape)}")
    return points + displacement[..., None] * normals


# --------------------------------------------------------------------------- frames


def project(points: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """(..., 3) camera-frame points to (..., 2) continuous pixels (``avface.stages.fit.project`` in torch)."""
    k = _to_tensor(intrinsics, points, points.dtype)
    z = points[..., 2:3].clamp_min(1e-6)
    focal = torch.stack([k[..., 0, 0], k[..., 1, 1]], dim=-1)
    centre = torch.stack([k[..., 0, 2], k[..., 1, 2]], dim=-1)
    if k.ndim == 3:  # per-frame intrinsics (B, 3, 3): broadcast over the map axes
        shape = (k.shape[0],) + (1,) * (points.ndim - 2) + (2,)
        focal, centre = focal.view(shape), centre.view(shape)
    return points[..., :2] / z * focal + centre


def unwrap(image: torch.Tensor, points: torch.Tensor, intrinsics) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the frame at each texel's projection: the frame unwrapped into UV space.

    image: (B, C, Hi, Wi) float; points: (B, S, S, 3) camera-frame texel points;
    intrinsics: (3, 3) or (B, 3, 3). Returns (unwrapped (B, S, S, C), in_frame (B, S, S) bool:
    the texel projects inside the image). Bilinear, differentiable in both the image and
    the points.
    """
    if image.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) frames, got {tuple(image.shape)}")
    if points.ndim != 4 or points.shape[-1] != 3 or points.shape[0] != image.shape[0]:
        raise ValueError(f"expected ({image.shape[0]}, S, S, 3) texel points, got {tuple(points.shape)}")
    height, width = image.shape[-2:]
    px = project(points, intrinsics)  # (B, S, S, 2)
    # align_corners=False: -1 is the left edge of pixel 0, i.e. continuous coordinate 0
    size = px.new_tensor([width, height])
    grid = 2.0 * px / size - 1.0
    sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    in_frame = (px >= 0).all(-1) & (px <= size).all(-1) & (points[..., 2] > 0)
    return sampled.permute(0, 2, 3, 1), in_frame


def facing(points: torch.Tensor, normals: torch.Tensor, min_cos: float = MIN_FACING_COS) -> torch.Tensor:
    """(B, S, S) bool: the surface faces the camera (camera-frame points and normals; the
    camera centre is the origin)."""
    to_camera = F.normalize(-points, dim=-1, eps=1e-12)
    return (normals * to_camera).sum(-1) > min_cos


def unoccluded(points: torch.Tensor, intrinsics, image_size: tuple[int, int], mask: torch.Tensor, *,
               normals: torch.Tensor | None = None, cell_px: int = ZBUFFER_CELL_PX,
               tolerance_m: float = ZBUFFER_TOLERANCE_M) -> torch.Tensor:
    """(B, S, S) bool: no nearer part of the surface covers the texel (the nose hiding a
    cheek on a turned head). A z-buffer of the texels themselves, splatted into cells of
    ``cell_px`` pixels with a scatter-min: no triangle rasteriser needed.

    points: (B, S, S, 3) camera frame; image_size: (height, width); mask: (S, S) or
    (B, S, S) bool texels that take part (the covered, facing ones); normals: (B, S, S, 3),
    optional: a surface sloped away from the camera changes depth across one cell by the
    cell's width times the slope, so each texel's tolerance grows by that (the slope capped
    at ZBUFFER_MAX_SLOPE); without it a steep cheek hid itself in stripes.
    """
    b, s = points.shape[0], points.shape[1]
    height, width = image_size
    ny, nx = -(-height // cell_px), -(-width // cell_px)
    px = project(points, intrinsics)
    cx = (px[..., 0] / cell_px).floor().long()
    cy = (px[..., 1] / cell_px).floor().long()
    m = mask.expand(b, s, s) & (cx >= 0) & (cx < nx) & (cy >= 0) & (cy < ny) & (points[..., 2] > 0)
    cell = (torch.arange(b, device=points.device).view(b, 1, 1) * (ny * nx) + cy.clamp(0, ny - 1) * nx
            + cx.clamp(0, nx - 1))  # (B, S, S) flat cell id per texel
    depth = points[..., 2].detach()
    zbuf = torch.full((b * ny * nx,), float("inf"), device=points.device, dtype=points.dtype)
    zbuf = zbuf.scatter_reduce(0, cell[m], depth[m], reduce="amin")
    tolerance = torch.full_like(depth, tolerance_m)
    if normals is not None:
        k = _to_tensor(intrinsics, points, points.dtype)
        cell_m = cell_px * depth / k[..., 0, 0].reshape(-1, 1, 1)  # cell width at the texel's depth
        cos = (normals.detach() * F.normalize(-points.detach(), dim=-1, eps=1e-12)).sum(-1).abs().clamp_min(1e-3)
        slope = (torch.sqrt((1 - cos * cos).clamp_min(0)) / cos).clamp_max(ZBUFFER_MAX_SLOPE)
        tolerance = tolerance + cell_m * slope
    return m & (depth <= zbuf[cell] + tolerance)


def visibility(points: torch.Tensor, normals: torch.Tensor, intrinsics, image_size: tuple[int, int],
               mask: torch.Tensor, *, min_cos: float = MIN_FACING_COS, occlusion_test: bool = True) -> torch.Tensor:
    """(B, S, S) bool: covered texels that face the camera, project into the frame and are
    not hidden by a nearer part of the face."""
    height, width = image_size
    px = project(points, intrinsics)
    inside = (px[..., 0] >= 0) & (px[..., 0] <= width) & (px[..., 1] >= 0) & (px[..., 1] <= height)
    vis = mask & facing(points, normals, min_cos) & inside & (points[..., 2] > 0)
    if occlusion_test:
        vis = vis & unoccluded(points, intrinsics, image_size, vis, normals=normals)
    return vis


def confidence_map(raster: UVRaster, faces, region_weights: np.ndarray, region_confidence: torch.Tensor,
                   frame_confidence: torch.Tensor | None = None) -> torch.Tensor:
    """(T, S, S) per-texel confidence in [0, 1] from per-region evidence.

    region_weights: (R, V) how much each vertex belongs to region r, in [0, 1] (for example
    1 on the lower face's vertices); region_confidence: (T, R) the visual confidence of each
    region per frame; frame_confidence: (T,) for the whole face, or None. A texel's
    confidence is the product over regions of 1 - w_r (1 - c_r): untouched outside every
    region, c_r well inside region r, blended across its border.
    """
    w = torch.as_tensor(np.asarray(region_weights, np.float32), device=region_confidence.device)
    if w.ndim != 2 or region_confidence.ndim != 2 or region_confidence.shape[1] != w.shape[0]:
        raise ValueError(f"expected (R, V) region weights and (T, R) confidences, got {tuple(w.shape)} "
                         f"and {tuple(region_confidence.shape)}")
    texel_w = interpolate(raster, faces, w.T[None])[0].clamp(0, 1)  # (S, S, R)
    # conf[t, i, j] = prod_r (1 - w[i, j, r] * (1 - c[t, r]))
    conf = (1.0 - texel_w[None] * (1.0 - region_confidence.clamp(0, 1))[:, None, None, :]).prod(-1)
    if frame_confidence is not None:
        conf = conf * frame_confidence.clamp(0, 1).view(-1, 1, 1)
    return conf


# --------------------------------------------------------------------------- differential geometry


def _masked_diff(x: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    """Central difference of x (B, S, S, C) along map axis ``dim`` (1 rows, 2 columns) using
    only covered neighbours (valid: (S, S) or (B, S, S) bool): central where both are,
    one-sided where one is, 0 where none."""
    valid = valid.expand(x.shape[:3])
    s = x.shape[dim]
    idx = torch.arange(s, device=x.device).view([s if a == dim else 1 for a in range(3)])
    has_next = ((idx < s - 1) & torch.roll(valid, -1, dim))[..., None].to(x.dtype)  # (B, S, S, 1)
    has_prev = ((idx > 0) & torch.roll(valid, 1, dim))[..., None].to(x.dtype)
    nxt, prv = torch.roll(x, -1, dim), torch.roll(x, 1, dim)
    # (nxt - prv) / 2 where both; nxt - x where only next; x - prv where only previous
    return (has_next * has_prev * 0.5 * (nxt - prv) + has_next * (1 - has_prev) * (nxt - x)
            + has_prev * (1 - has_next) * (x - prv))


def detail_normals(points: torch.Tensor, normals: torch.Tensor, displacement: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """(B, S, S, 3) unit normals of the displaced surface V_d = V_c + D * N_c.

    points: (B, S, S, 3) coarse texel points V_c; normals: (B, S, S, 3) coarse unit normals
    N_c; displacement: (B, S, S) D in metres; mask: (S, S) covered texels.

    To first order in D, n_d = normalize(N_c - grad_s D), with grad_s D the surface gradient
    of D: the tangents P_u, P_v (finite differences of V_c over the texel grid) projected
    onto N_c's tangent plane, and grad_s D = [P_u P_v] G^-1 [D_u, D_v]^T with G their metric.
    Unlike normals from finite differences of V_d itself, this gives exactly N_c where D is
    flat, so the coarse mesh's facets do not show up as detail the network must undo.
    """
    if displacement.shape != points.shape[:-1]:
        raise ValueError(f"expected a {tuple(points.shape[:-1])} displacement map, got {tuple(displacement.shape)}")
    n = normals
    pu = _masked_diff(points, mask, 2)  # (B, S, S, 3) metres per texel along columns
    pv = _masked_diff(points, mask, 1)  # along rows
    pu = pu - (pu * n).sum(-1, keepdim=True) * n
    pv = pv - (pv * n).sum(-1, keepdim=True) * n
    d = displacement[..., None]
    du = _masked_diff(d, mask, 2)[..., 0]  # (B, S, S) metres per texel
    dv = _masked_diff(d, mask, 1)[..., 0]
    g11, g12, g22 = (pu * pu).sum(-1), (pu * pv).sum(-1), (pv * pv).sum(-1)
    det = g11 * g22 - g12 * g12
    ok = det > 1e-20  # degenerate tangents (isolated texels): keep the coarse normal
    det = torch.where(ok, det, torch.ones_like(det))
    # [a, b] = G^-1 [du, dv]
    a = torch.where(ok, (g22 * du - g12 * dv) / det, torch.zeros_like(det))
    b = torch.where(ok, (g11 * dv - g12 * du) / det, torch.zeros_like(det))
    grad = a[..., None] * pu + b[..., None] * pv
    return F.normalize(n - grad, dim=-1, eps=1e-12)


def mirror_texels(raster: UVRaster, faces, rest_vertices: np.ndarray, *,
                  tolerance_m: float = 0.002) -> tuple[np.ndarray, np.ndarray]:
    """Each texel's mirror image across the face's plane of symmetry (x = 0 of the model
    frame), found on the rest shape, so no symmetric UV layout is assumed.

    rest_vertices: (V, 3) the model's rest shape in its own frame. Returns (mirror (S, S)
    int64 flat texel index, -1 where none; valid (S, S) bool: a covered texel lies within
    ``tolerance_m`` of the mirrored point).
    """
    from scipy.spatial import cKDTree

    rest = torch.as_tensor(np.asarray(rest_vertices, np.float32))[None]
    pts = interpolate(raster, faces, rest)[0].reshape(-1, 3).numpy()[raster.texel]  # (N, 3)
    dist, nearest = cKDTree(pts).query(pts * np.array([-1.0, 1.0, 1.0], np.float32))
    mirror = np.full(raster.size * raster.size, -1, np.int64)
    good = dist <= tolerance_m
    mirror[raster.texel[good]] = raster.texel[nearest[good]]
    mirror = mirror.reshape(raster.size, raster.size)
    return mirror, mirror >= 0


def texel_geometry(raster: UVRaster, faces, vertices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(points (B, S, S, 3), unit normals (B, S, S, 3)) of the coarse surface at each texel,
    from (B, V, 3) camera-frame vertices: V_c and N_c of V_d = V_c + D * N_c."""
    return interpolate(raster, faces, vertices), texel_normals(raster, faces, vertices)


def gutter_index(covered: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """For padding maps across the layout's borders: (source (S, S) flat index of the nearest
    covered texel, fill (S, S) bool: uncovered texels within ``width`` texels of the layout).
    Computed once per layout; see :func:`pad_maps`."""
    from scipy.ndimage import distance_transform_edt

    covered = np.asarray(covered, bool)
    dist, (rows, cols) = distance_transform_edt(~covered, return_indices=True)
    fill = ~covered & (dist <= width)
    return rows * covered.shape[1] + cols, fill


def pad_maps(maps: np.ndarray, covered: np.ndarray, width: int = 4) -> np.ndarray:
    """(T, S, S) maps with a gutter of ``width`` texels around each UV island, copied from
    the nearest covered texel, so that a renderer's bilinear or mip-mapped lookups near a
    seam do not blend in the empty background (Blender samples the image filtered)."""
    maps = np.asarray(maps)
    source, fill = gutter_index(covered, width)
    flat = maps.reshape(maps.shape[0], -1).copy()
    flat[:, fill.reshape(-1)] = flat[:, source[fill]]
    return flat.reshape(maps.shape)


def splat(values: torch.Tensor, points: torch.Tensor, intrinsics, image_size: tuple[int, int],
          mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw texel values into the frame: the inverse of :func:`unwrap`, for previews and
    reports (a shaded detail panel), with no rasteriser.

    values: (B, S, S, C); points: (B, S, S, 3) camera frame; mask: (S, S) or (B, S, S) bool
    texels to draw (the visible ones). Each texel covers the 2 x 2 pixels around its
    projection (a one-pixel footprint left holes along the triangles' edges, where two
    triangles' texel lattices meet in the frame), and each pixel takes, of the covering
    texels on the nearest surface, the one projecting nearest its centre. Returns (image (B, H, W, C), drawn (B, H, W) bool).
    """
    b, s = points.shape[0], points.shape[1]
    height, width = image_size
    c = values.shape[-1]
    px = project(points, intrinsics)
    x0 = (px[..., 0] - 0.5).floor().long()
    y0 = (px[..., 1] - 0.5).floor().long()
    base = mask.expand(b, s, s) & (points[..., 2] > 0)
    batch = torch.arange(b, device=points.device).view(b, 1, 1).expand(b, s, s)
    pixels, depths, dists, vals = [], [], [], []
    for dy in (0, 1):
        for dx in (0, 1):
            x, y = x0 + dx, y0 + dy
            m = base & (x >= 0) & (x < width) & (y >= 0) & (y < height)
            pixels.append(((batch * height + y) * width + x)[m])  # flat pixel per covering texel
            depths.append(points[..., 2][m])
            dists.append(((px[..., 0] - x - 0.5) ** 2 + (px[..., 1] - y - 0.5) ** 2)[m])
            vals.append(values[m])
    pixel, depth, dist, val = torch.cat(pixels), torch.cat(depths), torch.cat(dists), torch.cat(vals)
    n_px = b * height * width
    zbuf = torch.full((n_px,), float("inf"), device=points.device, dtype=depth.dtype)
    zbuf = zbuf.scatter_reduce(0, pixel, depth, reduce="amin")
    # the front surface's texels, and among them the one whose projection is nearest the
    # pixel's centre (ties write the same pixel; any one of them will do)
    front = depth <= zbuf[pixel] + ZBUFFER_TOLERANCE_M
    dbuf = torch.full((n_px,), float("inf"), device=points.device, dtype=dist.dtype)
    dbuf = dbuf.scatter_reduce(0, pixel[front], dist[front], reduce="amin")
    winner = front & (dist <= dbuf[pixel])
    image = values.new_zeros(b * height * width, c)
    image[pixel[winner]] = val[winner]
    drawn = torch.isfinite(zbuf).view(b, height, width)
    return image.view(b, height, width, c), drawn


def normal_map_image(normals: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
    """(..., H, W, 3) unit normals to uint8 RGB, the usual (n + 1) / 2 encoding (camera frame:
    x right is red, y down is green, z forward is blue); black where ``mask`` is False."""
    img = ((normals.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if mask is not None:
        img = img * mask.detach().cpu()[..., None].to(torch.uint8)
    return img.numpy()
