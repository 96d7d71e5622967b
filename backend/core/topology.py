"""MediaPipe face-mesh topology: landmark and vertex ids by region, and the lengths and weights
that depend only on them. Torch-free, so that tracking, confidence and the service can use
it without loading the face models.

Vertex i of the canonical mesh is MediaPipe landmark i (the first 468 of the tracker's 478;
the last 10 are the irises), so these ids index both.
"""
from __future__ import annotations

import numpy as np

N_MESH_VERTICES = 468
"""Vertices of MediaPipe's canonical face mesh, which are also the first 468 landmarks."""

# Landmark groups (from MediaPipe's face mesh annotations).
LIPS_UPPER_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LIPS_LOWER_OUTER = (146, 91, 181, 84, 17, 314, 405, 321, 375)
LIPS_UPPER_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIPS_LOWER_INNER = (95, 88, 178, 87, 14, 317, 402, 318, 324)
LIPS = tuple(sorted(set(LIPS_UPPER_OUTER + LIPS_LOWER_OUTER + LIPS_UPPER_INNER + LIPS_LOWER_INNER)))
#: The lips' red part between the outer and inner contours (the canonical mesh's vertices
#: inside the outer lip polygon and outside the inner one, in its frontal projection), and
#: the skin around it (within 0.3 mouth widths of the outer contour, outside it): what the
#: lip-contrast evidence compares. Each in the subject's right half (canonical x < 0) and
#: left half, the midline in both (tests/test_confidence.py derives them again).
VERMILION_RIGHT = (11, 12, 15, 16, 38, 41, 62, 72, 73, 74, 76, 77, 85, 86, 89, 90, 96, 179, 180, 184)
VERMILION_LEFT = (11, 12, 15, 16, 268, 271, 292, 302, 303, 304, 306, 307, 315, 316, 319, 320, 325, 403, 404, 408)
PERIORAL_RIGHT = (2, 18, 164, 43, 57, 83, 92, 97, 106, 165, 167, 182, 186, 202, 212)
PERIORAL_LEFT = (2, 18, 164, 273, 287, 313, 322, 326, 335, 391, 393, 406, 410, 422, 432)
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173)
LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398)
RIGHT_EYEBROW = (46, 53, 52, 65, 55, 70, 63, 105, 66, 107)
LEFT_EYEBROW = (276, 283, 282, 295, 285, 300, 293, 334, 296, 336)
NOSE_BRIDGE = (168, 6, 197, 195, 5, 4)
#: Points that move with the skull, not with expressions: pose is estimated on these.
RIGID = (10, 109, 338, 67, 297, 151, 9, 8, 168, 6, 197, 195, 5, 4, 1, 33, 133, 263, 362, 234, 454, 127, 356, 93, 323)
#: Outer eye corners: the inter-ocular distance that normalises NME.
OUTER_EYE_CORNERS = (33, 263)
CHIN = (152, 148, 176, 149, 150, 377, 400, 378, 379, 136, 365, 172, 397)
MOUTH_CORNERS = (61, 291, 78, 308)


def inter_ocular(points) -> np.ndarray:
    """(...,) distance between the outer eye corners of (..., >=468, >=2) MediaPipe-indexed
    points, using x and y only: the length NME is normalised by."""
    p = np.asarray(points, np.float64)
    return np.linalg.norm(p[..., OUTER_EYE_CORNERS[0], :2] - p[..., OUTER_EYE_CORNERS[1], :2], axis=-1)


#: Weight of every other vertex, against 1 for the skull-rigid points, when a rigid pose is
#: estimated: enough to keep the pose defined, too little for expressions to move it.
NON_RIGID_WEIGHT = 0.02


def rigid_weights() -> np.ndarray:
    """(468,) per-vertex weights for rigid pose estimation: 1 on ``RIGID``, ``NON_RIGID_WEIGHT`` elsewhere."""
    w = np.full(N_MESH_VERTICES, NON_RIGID_WEIGHT)
    w[list(RIGID)] = 1.0
    return w
