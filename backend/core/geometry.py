"""Camera and alignment geometry shared by the fit, the benchmark and the synthetic clips.

Frames (``avface.result.CONVENTIONS``): the face model's frame has y up and z towards the
viewer; the camera sits at its origin looking down -z, so the world-to-camera rotation is
``WORLD_TO_CAMERA`` = diag(1, -1, -1) and camera-frame points are OpenCV's (x right, y down,
z forward).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from avface.core.topology import N_MESH_VERTICES

if TYPE_CHECKING:
    from avface.stages.tracking import Tracking

WORLD_TO_CAMERA = np.diag([1.0, -1.0, -1.0]).astype(np.float32)


def intrinsics_for(width: int, height: int, fov_deg: float, dtype=np.float32) -> np.ndarray:
    """(3, 3) pinhole intrinsics for a vertical field of view, principal point at the centre
    (continuous pixel coordinates)."""
    f = (height / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    return np.array([[f, 0, width / 2.0], [0, f, height / 2.0], [0, 0, 1]], dtype)


def fov_of(k: np.ndarray, height: int) -> float:
    """The vertical field of view, degrees, of intrinsics ``k`` for frames ``height`` pixels
    high (the inverse of :func:`intrinsics_for`)."""
    return math.degrees(2.0 * math.atan(height / 2.0 / float(k[1, 1])))


def project(points_cam: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(..., 3) camera-frame points to (..., 2) pixels."""
    z = np.maximum(points_cam[..., 2:3], 1e-6)
    return points_cam[..., :2] / z * np.array([k[0, 0], k[1, 1]]) + np.array([k[0, 2], k[1, 2]])


def turn_from_camera_deg(forward: np.ndarray, position: np.ndarray) -> np.ndarray:
    """(T,) degrees between a head's forward axis ``forward`` (T, 3) and the direction from
    the head at ``position`` (T, 3) to the camera at the origin: 0 facing the camera, 90 in
    profile (NaN where either is NaN)."""
    forward = np.asarray(forward, np.float64)
    to_camera = -np.asarray(position, np.float64)
    norms = np.linalg.norm(forward, axis=1) * np.linalg.norm(to_camera, axis=1)
    cos = (forward * to_camera).sum(1) / np.maximum(norms, 1e-9)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def umeyama(src: np.ndarray, dst: np.ndarray, w: np.ndarray | None, with_scale: bool):
    """Weighted Umeyama/Kabsch of src (N, 3) or (..., N, 3) onto dst (..., N, 3), batched over
    the leading axes in one SVD call. Returns s (...), R (..., 3, 3), t (..., 3)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    w = np.ones(src.shape[-2]) if w is None else np.asarray(w, np.float64)
    w = w / w.sum()
    mu_d = np.einsum("n,...nk->...k", w, dst)  # (..., 3)
    b = dst - mu_d[..., None, :]
    if src.ndim == 2:  # one source shape (kept as it was written: the fits' figures to the bit)
        mu_s = w @ src  # (3,)
        a = src - mu_s
        cov = np.einsum("n,...ni,nj->...ij", w, b, a)  # (..., 3, 3)
    else:  # a source shape per batch entry
        mu_s = np.einsum("n,...nk->...k", w, src)  # (..., 3)
        a = src - mu_s[..., None, :]
        cov = np.einsum("n,...ni,...nj->...ij", w, b, a)
    u, sig, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(u @ vt))
    u = u.copy()
    u[..., :, 2] *= d[..., None]  # u @ diag(1, 1, d): a rotation, never a reflection
    sig = sig.copy()
    sig[..., 2] *= d
    r = u @ vt
    scale = sig.sum(-1) / (w * (a ** 2).sum(-1)).sum(-1) if with_scale else np.ones(d.shape)
    if src.ndim == 2:
        t = mu_d - scale[..., None] * np.einsum("...ij,j->...i", r, mu_s)
    else:
        t = mu_d - scale[..., None] * np.einsum("...ij,...j->...i", r, mu_s)
    return scale, r, t


def similarity(src: np.ndarray, dst: np.ndarray, w: np.ndarray | None = None):
    """Weighted Umeyama: scale s, rotation R, translation t minimising
    sum w |s R src + t - dst|^2. src, dst: (N, 3)."""
    s, r, t = umeyama(src, dst, w, True)
    return float(s), r, t


def rigid(src: np.ndarray, dst: np.ndarray, w: np.ndarray):
    """Weighted Kabsch: R, t minimising sum w |R src + t - dst|^2; src and dst may be batched
    (..., N, 3)."""
    _, r, t = umeyama(src, dst, w, False)
    return r, t


def weak_perspective_points(tracking: Tracking) -> np.ndarray:
    """(T, 468, 3) tracker landmarks as pixel-unit points oriented like the model frame
    (x right, y up, z towards the viewer)."""
    p = tracking.landmarks[:, :N_MESH_VERTICES].astype(np.float64)
    return p * np.array([1.0, -1.0, -1.0])


def backproject(tracking: Tracking, k: np.ndarray, template: np.ndarray, rigid_w: np.ndarray) -> np.ndarray:
    """(T, 468, 3) metric world-frame points from the tracker's landmarks under camera `k`.

    The scale of a similarity onto the template gives the head's distance (pixels per metre
    = focal / depth); each landmark then gets its own depth from MediaPipe's relative z, and
    is back-projected through its pixel, so projecting the points gives the tracker's 2D
    landmarks exactly.
    """
    wp = weak_perspective_points(tracking)
    out = np.full(wp.shape, np.nan)
    focal = float(k[0, 0])
    det = np.nonzero(tracking.detected)[0]
    if len(det) == 0:
        return out
    s, _, _ = umeyama(template, wp[det], rigid_w, True)  # (Td,) pixels per metre
    lm = tracking.landmarks[det, :N_MESH_VERTICES].astype(np.float64)
    depth = (focal + lm[..., 2]) / s[:, None]  # (Td, V) metres, z grows away
    cam = np.stack([(lm[..., 0] - k[0, 2]) * depth / focal, (lm[..., 1] - k[1, 2]) * depth / focal, depth], axis=-1)
    out[det] = cam @ WORLD_TO_CAMERA  # camera -> world (F is its own inverse)
    return out
