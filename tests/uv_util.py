"""Test helpers for the fine stage: the canonical face posed before a camera, a smooth known
texture, and a small reference renderer written independently of ``avface.stages.detail.uvspace`` (a
painter's algorithm with OpenCV's polygon fill, perspective-correct UVs), so that unwrapping
its frames tests the UV machinery against something it does not share code with."""
from __future__ import annotations

import math

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

from avface.models.canonical_mesh import load_canonical_mesh

WORLD_TO_CAMERA = np.diag([1.0, -1.0, -1.0])
DISTANCE_M = 0.45


def intrinsics(size: int, fov_deg: float = 40.0) -> np.ndarray:
    f = (size / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    return np.array([[f, 0, size / 2.0], [0, f, size / 2.0], [0, 0, 1]], np.float64)


def posed_camera_vertices(yaw_deg: float = 0.0, pitch_deg: float = 0.0, vertices=None) -> np.ndarray:
    """(V, 3) canonical vertices rotated about the head's centre and placed DISTANCE_M in
    front of the camera, in the OpenCV camera frame."""
    v = load_canonical_mesh().vertices.astype(np.float64) if vertices is None else np.asarray(vertices, np.float64)
    r = Rotation.from_euler("yx", [yaw_deg, pitch_deg], degrees=True).as_matrix()
    world = v @ r.T + np.array([0.0, 0.0, -DISTANCE_M])
    return world @ WORLD_TO_CAMERA.T


def smooth_texture(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(..., 3) colour in [0.1, 0.9] of a smooth function of (u, v): a few cycles across the
    layout, different per channel, so that the nose and the cheeks differ."""
    r = 0.5 + 0.4 * np.sin(2 * np.pi * 2.0 * u) * np.cos(2 * np.pi * 1.5 * v)
    g = 0.5 + 0.4 * np.cos(2 * np.pi * 1.0 * u + 0.7) * np.sin(2 * np.pi * 2.5 * v + 0.3)
    b = 0.5 + 0.4 * np.sin(2 * np.pi * (1.5 * u + v))
    return np.stack([r, g, b], axis=-1)


def render_textured(vertices_cam: np.ndarray, faces: np.ndarray, uv: np.ndarray, k: np.ndarray, size: int,
                    texture=smooth_texture, background=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """Render a mesh whose colour is ``texture(u, v)``. Returns (image (H, W, 3) float32,
    triangle id per pixel (H, W), -1 on the background)."""
    p = vertices_cam @ k.T
    px = p[:, :2] / p[:, 2:3]
    tri = px[faces]  # (F, 3, 2)
    # back-face culling in the camera frame: the normal must point towards the camera
    e1 = vertices_cam[faces[:, 1]] - vertices_cam[faces[:, 0]]
    e2 = vertices_cam[faces[:, 2]] - vertices_cam[faces[:, 0]]
    n = np.cross(e1, e2)
    front = (n * -vertices_cam[faces[:, 0]]).sum(1) > 0
    depth = vertices_cam[faces, 2].mean(1)
    ids = np.full((size, size), -1, np.int32)
    shift = 4  # sub-pixel vertex positions for fillConvexPoly; pixel centres at +0.5
    for f in np.argsort(-depth):  # back to front
        if not front[f]:
            continue
        poly = np.round((tri[f] - 0.5) * (1 << shift)).astype(np.int32)
        cv2.fillConvexPoly(ids, poly, int(f), lineType=cv2.LINE_8, shift=shift)
    img = np.tile(np.asarray(background, np.float64), (size, size, 1))
    ys, xs = np.nonzero(ids >= 0)
    f = ids[ys, xs]
    c = np.stack([xs + 0.5, ys + 0.5], 1)
    a, b, cc = tri[f, 0], tri[f, 1], tri[f, 2]
    v0, v1, v2 = b - a, cc - a, c - a
    den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
    w1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den
    w2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den
    bary = np.clip(np.stack([1 - w1 - w2, w1, w2], 1), 0, 1)
    # perspective-correct: screen-space weights divided by depth, renormalised
    z = vertices_cam[faces[f], 2]
    bary = bary / z
    bary /= bary.sum(1, keepdims=True)
    uv_px = np.einsum("nk,nkc->nc", bary, uv[faces[f]])
    img[ys, xs] = texture(uv_px[:, 0], uv_px[:, 1])
    return img.astype(np.float32), ids


def detail_light():
    """(9, 3) a light with a key from the camera's right, above and in front (camera frame:
    x right, y down, z forward), so that detail of any direction shades."""
    import torch

    sh = torch.zeros(9, 3, dtype=torch.float64)
    sh[0] = 1.0  # ambient shading 0.89
    sh[3] = 0.5  # from the right (+x)
    sh[1] = -0.25  # from above (-y)
    sh[2] = -0.45  # from the camera (-z)
    return sh


def render_detail_clip(d_true, yaws, pitches, *, size: int = 192, uv_size: int = 192, albedo=None, light=None):
    """Frames of the canonical face whose surface carries a displacement d_true(u, v)
    (metres along the normal), shaded under ``light``: per frame, the colour of every texel
    (albedo x SH shading of the displaced surface's normals) is painted in UV space, then
    drawn with the reference renderer. Returns (frames (T, size, size, 3) uint8, camera-
    frame coarse vertices (T, V, 3), intrinsics)."""
    import torch

    from avface.stages.detail import shading, uvspace

    mesh = load_canonical_mesh()
    r = uvspace.rasterise_uv(mesh.uv, mesh.faces, uv_size)
    k = intrinsics(size)
    uvc = uvspace.texel_centres(uv_size)
    d = torch.as_tensor(d_true(uvc[..., 0], uvc[..., 1]) * r.mask)[None]
    alb = torch.as_tensor(0.25 + 0.4 * smooth_texture(uvc[..., 0], uvc[..., 1]) if albedo is None else albedo)
    light = detail_light() if light is None else light
    covered = torch.as_tensor(r.mask)
    frames, verts = [], []
    for yaw, pitch in zip(yaws, pitches):
        v = posed_camera_vertices(yaw, pitch)
        pts, n = uvspace.texel_geometry(r, mesh.faces, torch.as_tensor(v)[None])
        nd = uvspace.detail_normals(pts, n, d, covered)
        colour = shading.render(alb, nd, light[None])[0].clamp(0, 1).numpy().astype(np.float32)  # (S, S, 3)

        def texture(u, vv, colour=colour):
            # bilinear lookup of the painted map at continuous texel coordinates
            x = np.clip(u * uv_size - 0.5, 0, uv_size - 1.001)
            y = np.clip((1.0 - vv) * uv_size - 0.5, 0, uv_size - 1.001)
            x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
            fx, fy = (x - x0)[:, None], (y - y0)[:, None]
            return ((1 - fy) * ((1 - fx) * colour[y0, x0] + fx * colour[y0, x0 + 1])
                    + fy * ((1 - fx) * colour[y0 + 1, x0] + fx * colour[y0 + 1, x0 + 1]))

        img, _ = render_textured(v, mesh.faces, mesh.uv.astype(np.float64), k, size, texture=texture)
        frames.append(np.round(255 * img).astype(np.uint8))
        verts.append(v)
    return np.stack(frames), np.stack(verts).astype(np.float32), k
