"""The demo clip's pinhole camera and where it places the face (see the package docstring
for the frames and pixel conventions)."""
from __future__ import annotations

import numpy as np

from avface.core.geometry import intrinsics_for

FOV_Y_DEG = 40.0
"""Vertical field of view of the camera."""
CAMERA_DISTANCE_M = 0.55
"""Distance from the camera centre to the model origin (the face is ~5 cm nearer)."""
FACE_CENTRE_V = 0.47
"""Where the face's centre sits, as a fraction of the frame height from the top."""


def intrinsics(width: int, height: int, fov_y_deg: float = FOV_Y_DEG) -> np.ndarray:
    """(3, 3) float64 pinhole intrinsics of the demo camera (:func:`avface.core.geometry.intrinsics_for`)."""
    return intrinsics_for(width, height, fov_y_deg, np.float64)


def model_to_camera(neutral: np.ndarray, K: np.ndarray, height: int) -> np.ndarray:
    """(4, 4): flip y and z, and place the face's centre at (image centre x, FACE_CENTRE_V of
    the height) at CAMERA_DISTANCE_M."""
    m = np.diag([1.0, -1.0, -1.0, 1.0])
    centre = neutral.mean(0) * np.array([1.0, -1.0, -1.0])
    z = CAMERA_DISTANCE_M + centre[2]
    want_y = (FACE_CENTRE_V * height - K[1, 2]) / K[1, 1] * z
    m[:3, 3] = [-centre[0], want_y - centre[1], CAMERA_DISTANCE_M]
    return m
