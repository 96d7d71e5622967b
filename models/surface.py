"""Closest points on a triangle mesh: pure numpy/scipy functions, no state.

Used to embed one mesh's points on another's surface (the tracker's landmarks on the ICT
head, :mod:`avface.models.ict_embedding`) as a triangle and barycentric coordinates, the form
:func:`avface.models.lbs.vertices2landmarks` evaluates.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def closest_on_triangles(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closest point of each triangle (a, b, c) to p, all (N, 3). Returns (points (N, 3),
    barycentric coordinates (N, 3) of the points in their triangle).

    The point's projection onto the plane when it falls inside; otherwise the closest point
    of the three edges (the region tests of Ericson, *Real-Time Collision Detection* 5.1.5,
    written as edge clamps)."""
    p, a, b, c = (np.asarray(x, np.float64) for x in (p, a, b, c))
    ab, ac, ap = b - a, c - a, p - a
    d00 = (ab * ab).sum(1)
    d01 = (ab * ac).sum(1)
    d11 = (ac * ac).sum(1)
    d20 = (ap * ab).sum(1)
    d21 = (ap * ac).sum(1)
    den = np.where(np.abs(d00 * d11 - d01 ** 2) > 1e-30, d00 * d11 - d01 ** 2, 1e-30)
    v = (d11 * d20 - d01 * d21) / den
    w = (d00 * d21 - d01 * d20) / den
    bary = np.stack([1.0 - v - w, v, w], 1)
    inside = (bary >= 0).all(1)
    best_bary = bary.copy()
    best_d = np.where(inside, 0.0, np.inf)
    corners = (a, b, c)
    for i, j in ((0, 1), (1, 2), (0, 2)):  # each edge: the clamped projection
        e0, e1 = corners[i], corners[j]
        e = e1 - e0
        t = np.clip(((p - e0) * e).sum(1) / np.maximum((e * e).sum(1), 1e-30), 0.0, 1.0)
        q = e0 + t[:, None] * e
        d = ((p - q) ** 2).sum(1)
        better = ~inside & (d < best_d)
        bb = np.zeros_like(bary)
        bb[:, i], bb[:, j] = 1.0 - t, t
        best_bary[better] = bb[better]
        best_d[better] = d[better]
    points = best_bary[:, :1] * a + best_bary[:, 1:2] * b + best_bary[:, 2:] * c
    return points, best_bary


def closest_points(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray, *,
                   candidates: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of ``points`` (N, 3), the closest point of the mesh (vertices (V, 3), triangles
    faces (F, 3)): (triangle ids (N,), barycentric coordinates (N, 3), distances (N,)).

    Candidate triangles are the ``candidates`` whose centroids lie nearest; on a mesh whose
    triangles are small against their distance to the point that contains the closest one."""
    points = np.asarray(points, np.float64)
    vertices = np.asarray(vertices, np.float64)
    faces = np.asarray(faces, np.int64)
    tri = vertices[faces]  # (F, 3, 3)
    k = int(min(candidates, len(faces)))
    _, cand = cKDTree(tri.mean(1)).query(points, k=k)
    cand = np.asarray(cand).reshape(len(points), k)
    rep = np.repeat(points, k, axis=0)
    flat = cand.reshape(-1)
    q, bary = closest_on_triangles(rep, tri[flat, 0], tri[flat, 1], tri[flat, 2])
    d = np.linalg.norm(rep - q, axis=1).reshape(len(points), k)
    best = d.argmin(1)
    rows = np.arange(len(points))
    pick = rows * k + best
    return cand[rows, best], bary[pick], d[rows, best]


def triangulate(polygons: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(F, 4) quads and triangles (-1 as a triangle's fourth index) to (F', 3) triangles, each
    quad split along its 0-2 diagonal; returns (triangles, the polygon each came from)."""
    polygons = np.asarray(polygons, np.int64)
    quad = polygons[:, 3] >= 0
    first = polygons[:, [0, 1, 2]]
    second = polygons[quad][:, [0, 2, 3]]
    tris = np.concatenate([first, second])
    source = np.concatenate([np.arange(len(polygons)), np.flatnonzero(quad)])
    order = np.argsort(source, kind="stable")  # each polygon's triangles stay together
    return tris[order], source[order]
