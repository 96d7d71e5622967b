"""The axis and unit conversion shared by every exporter and the Blender importer.

Pure numpy, no torch and no bpy, so the add-on can vendor this file as it is.

Frames (``avface.result.CONVENTIONS``):
- world (the face model's frame): right-handed, metres, y up, z towards the viewer;
- camera (OpenCV): x right, y down, z forward; ``extrinsics[t]`` maps world to camera and the
  result's ``vertices`` are in this frame;
- Blender: right-handed, z up, the front view looks along +y, so a face that looks towards the
  viewer in the world frame looks along -y in Blender: (x, y, z)_world -> (x, -z, y)_blender.

``WORLD_TO_BLENDER`` is a proper rotation (+90 degrees about x, determinant +1), so rotations
convert by conjugation and axis-angle vectors simply rotate with it.
"""
from __future__ import annotations

import numpy as np

METRES_PER_UNIT = 1.0
"""Every length in a result is in metres."""

# blender[i] = sum_j WORLD_TO_BLENDER[i, j] * world[j]
WORLD_TO_BLENDER = np.array([[1.0, 0.0, 0.0],
                             [0.0, 0.0, -1.0],
                             [0.0, 1.0, 0.0]])


def world_to_blender(points: np.ndarray) -> np.ndarray:
    """(..., 3) world-frame points or directions -> (..., 3) in Blender's frame, float64."""
    points = np.asarray(points, np.float64)
    if points.shape[-1] != 3:
        raise ValueError(f"expected (..., 3) points, got {points.shape}")
    return points @ WORLD_TO_BLENDER.T


def rotvec_world_to_blender(rotvec: np.ndarray) -> np.ndarray:
    """(..., 3) axis-angle rotations in the world frame -> the same rotations in Blender's frame.

    R_b = M R_w M^T for the proper rotation M, whose axis is M times the world axis and whose
    angle is unchanged.
    """
    return world_to_blender(rotvec)


def camera_to_world(points_cam: np.ndarray, extrinsics: np.ndarray) -> np.ndarray:
    """(T, N, 3) camera-frame points and (T, 4, 4) world-to-camera extrinsics -> (T, N, 3) world."""
    points_cam = np.asarray(points_cam, np.float64)
    ext = np.asarray(extrinsics, np.float64)
    if points_cam.ndim != 3 or points_cam.shape[-1] != 3:
        raise ValueError(f"expected (T, N, 3) points, got {points_cam.shape}")
    if ext.shape != (points_cam.shape[0], 4, 4):
        raise ValueError(f"expected ({points_cam.shape[0]}, 4, 4) extrinsics, got {ext.shape}")
    rot = ext[:, :3, :3]
    t = ext[:, :3, 3]
    # cam = R world + t  ->  world = R^T (cam - t); world[t, n, i] = sum_j (cam - t)[t, n, j] R[t, j, i]
    return np.einsum("tnj,tji->tni", points_cam - t[:, None, :], rot)


def camera_to_blender(points_cam: np.ndarray, extrinsics: np.ndarray) -> np.ndarray:
    """(T, N, 3) camera-frame points (a result's ``vertices``) -> (T, N, 3) in Blender's frame."""
    return world_to_blender(camera_to_world(points_cam, extrinsics))


# A camera in Blender, USD and glTF looks down its local -z with y up; an OpenCV camera (the
# result's ``extrinsics``) looks down +z with y down.
GL_CAMERA_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])

#: The filmback of every camera made from a result (the add-on's, USD's): a full-frame 35 mm
#: sensor's width, so that its focal length reads as a photographer's.
SENSOR_WIDTH_M = 0.036
#: Near and far clipping distances of every camera made from a result, metres.
CAMERA_CLIP_M = (0.01, 100.0)


def pinhole(intrinsics: np.ndarray) -> np.ndarray:
    """(3, 3) float64 ``intrinsics``, or ValueError when they are not a pinhole camera's
    (finite, with positive focal lengths)."""
    k = np.asarray(intrinsics, np.float64)
    if k.shape != (3, 3) or not np.all(np.isfinite(k)) or k[0, 0] <= 0 or k[1, 1] <= 0:
        raise ValueError(f"intrinsics {k.tolist()} are not a pinhole camera's")
    return k


def still_extrinsic(extrinsics: np.ndarray) -> tuple[np.ndarray, bool]:
    """(the first frame's (4, 4) extrinsic, whether the camera moves over the clip) of (T, 4, 4)
    ``extrinsics``: the cameras made from a result are still, as the contract's camera is."""
    ext = np.asarray(extrinsics, np.float64)
    return ext[0], not np.allclose(ext, ext[:1], atol=1e-6)


def camera_pose(extrinsic: np.ndarray) -> np.ndarray:
    """(4, 4) world-from-camera matrix, in the world frame, of the camera that looks down its
    local -z with y up (Blender's, USD's and glTF's convention) and sees what the result's
    world-to-camera ``extrinsic`` (4, 4, OpenCV) sees. For the contract's camera (at the
    origin, looking down world -z) it is the identity."""
    ext = np.asarray(extrinsic, np.float64)
    if ext.shape != (4, 4):
        raise ValueError(f"expected a (4, 4) extrinsic, got {ext.shape}")
    return np.linalg.inv(ext) @ GL_CAMERA_TO_OPENCV
