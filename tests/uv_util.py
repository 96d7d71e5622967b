"""Test helpers for the fine stage: the canonical face posed before a camera, a smooth known
texture, and a small reference renderer written independently of ``avface.uvspace`` (a
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


def one_thread():
    """Context for a test module: torch on one thread. These tests work on small tensors,
    where two threads on a loaded two-core machine are many times slower than one (measured
    20x for a 6 x 2048 x 9 product under a load of 8), and the cores are shared."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def ctx():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)

    return ctx()
