"""Where MediaPipe's 468 face-mesh landmarks lie on the ICT head: made once from the two
meshes, stored as ``models/data/ict_face_light/mediapipe_embedding.npz`` and rebuilt by
``scripts/build_ict_embedding.py``.

How. MediaPipe's canonical face mesh (the tracker's own 468 points in their rest shape) is
brought onto the ICT neutral in three steps:

1. **Anchors.** 51 of the 68 Multi-PIE landmarks that ICT marks on its mesh
   (``vertex_indices.json``: brows, nose, eyes, lips and the chin; the jaw line's 16 others
   are a silhouette, which has no fixed place on a 3D surface) have a MediaPipe landmark at
   the same anatomical place (:data:`MULTIPIE_TO_MEDIAPIPE`).
2. **Similarity.** The scaled rotation and translation that take the canonical anchors onto
   ICT's, weighted, with the anchors whose residual stays above 10 mm dropped once (a landmark
   convention that differs between the two sets).
3. **Non-rigid registration.** The canonical mesh deforms towards the ICT skin: each step
   solves one sparse least-squares problem for all vertices: anchors on their ICT vertex,
   every vertex on its closest point of the ICT skin, and a smooth deformation (the
   Laplacian of the displacement, over the canonical mesh's edges, with a stiffness that
   falls over the steps).

Each landmark then sits at the closest point of the ICT skin to its registered position, as
a triangle and barycentric coordinates. :func:`build_embedding` returns the residuals that say
how well the two faces agree, per landmark group; the fit's NME on real clips measures the
rest.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from avface.core import topology
from avface.core.geometry import similarity
from avface.models.canonical_mesh import mesh_laplacian
from avface.models.surface import closest_points

#: Multi-PIE landmark (0-based, as ICT's ``idx_to_landmark_verts``) -> MediaPipe landmark at
#: the same anatomical place. Brows (17-26) follow the brow's upper edge, the nose (27-35)
#: its ridge, tip and base, the eyes (36-47) the lid margins, the lips (48-67) their outer
#: and inner contours; 8 is the chin.
MULTIPIE_TO_MEDIAPIPE = {
    8: 152,
    17: 70, 18: 63, 19: 105, 20: 66, 21: 107, 22: 336, 23: 296, 24: 334, 25: 293, 26: 300,
    27: 168, 28: 197, 29: 5, 30: 1, 31: 98, 32: 97, 33: 2, 34: 326, 35: 327,
    36: 33, 37: 160, 38: 158, 39: 133, 40: 153, 41: 144,
    42: 362, 43: 385, 44: 387, 45: 263, 46: 373, 47: 380,
    48: 61, 49: 39, 50: 37, 51: 0, 52: 267, 53: 269, 54: 291, 55: 405, 56: 314, 57: 17, 58: 84, 59: 181,
    60: 78, 61: 82, 62: 13, 63: 312, 64: 308, 65: 317, 66: 14, 67: 87,
}
#: Anchor weights: the points both conventions place exactly (eye and mouth corners, the
#: lips' midline, the nose tip, the chin) count fully, the rest half.
FIRM_ANCHORS = (8, 30, 36, 39, 42, 45, 48, 51, 54, 57, 60, 62, 64, 66)
#: Stiffness of the deformation over the registration's steps (Laplacian weight against the
#: closest-point term, both in metres).
STIFFNESS = (30.0, 10.0, 3.0, 1.0, 1.0)
ANCHOR_WEIGHT = 10.0
DROP_ABOVE_M = 0.010

GROUPS = {
    "lips": topology.LIPS,
    "eyes": topology.RIGHT_EYE + topology.LEFT_EYE,
    "brows": topology.RIGHT_EYEBROW + topology.LEFT_EYEBROW,
    "nose": topology.NOSE_BRIDGE,
    "chin": topology.CHIN,
}


@dataclass(frozen=True)
class EmbeddingBuild:
    landmark_ids: np.ndarray  #: (468,)
    face_idx: np.ndarray  #: (468,) ICT triangle
    bary: np.ndarray  #: (468, 3)
    anchors_used: np.ndarray  #: Multi-PIE ids kept for the registration
    anchor_residual_mm: dict  #: after the similarity, per anchor kept
    moved_mm: dict  #: per landmark group: mean distance the registration moved the canonical landmark
    surface_mm: dict  #: per landmark group: mean distance from the registered point to the ICT skin


def _laplacian(faces: np.ndarray, n: int) -> sp.csr_matrix:
    """Uniform graph Laplacian I - D^-1 A (n, n) of a triangle mesh."""
    lap = mesh_laplacian(faces, n)
    return (sp.diags(1.0 / np.maximum(lap.diagonal(), 1.0)) @ lap).tocsr()


def build_embedding(canonical_vertices: np.ndarray, canonical_faces: np.ndarray, ict_vertices: np.ndarray,
                    ict_faces: np.ndarray, skin_faces: np.ndarray, landmark68: np.ndarray) -> EmbeddingBuild:
    """The embedding of the canonical mesh's vertices (metres) on the ICT skin.

    ict_vertices (V, 3) metres, ict_faces (F, 3); skin_faces: ids into ict_faces of the
    triangles the landmarks may land on; landmark68: ICT's Multi-PIE landmark vertices."""
    src = np.asarray(canonical_vertices, np.float64)
    dst = np.asarray(ict_vertices, np.float64)
    n = len(src)
    mp = np.array(list(MULTIPIE_TO_MEDIAPIPE.values()))
    pie = np.array(list(MULTIPIE_TO_MEDIAPIPE.keys()))
    w = np.where(np.isin(pie, FIRM_ANCHORS), 1.0, 0.5)
    target = dst[np.asarray(landmark68)[pie]]
    # 2. similarity, then once more without the anchors it cannot bring within DROP_ABOVE_M
    for _ in range(2):
        s, r, t = similarity(src[mp], target, w)
        moved = s * src @ r.T + t
        res = np.linalg.norm(moved[mp] - target, axis=1)
        keep = (res < DROP_ABOVE_M) | np.isin(pie, FIRM_ANCHORS)
        w = np.where(keep, w, 0.0)
    anchor_res = {int(p): float(1000 * d) for p, d, k in zip(pie, res, keep) if k}
    # 3. non-rigid registration
    lap = _laplacian(np.asarray(canonical_faces, np.int64), n)
    skin = np.asarray(ict_faces, np.int64)[np.asarray(skin_faces)]
    x = moved.copy()
    sel = w > 0
    a_rows = sp.coo_matrix((np.sqrt(ANCHOR_WEIGHT * w[sel]), (np.arange(sel.sum()), mp[sel])),
                           shape=(int(sel.sum()), n)).tocsr()
    eye = sp.identity(n, format="csr")
    for stiff in STIFFNESS:
        f_id, bary, _ = closest_points(x, dst, skin)
        cp = np.einsum("nk,nkc->nc", bary, dst[skin[f_id]])
        a = sp.vstack([a_rows, eye, np.sqrt(stiff) * lap]).tocsc()
        rhs = np.concatenate([np.sqrt(ANCHOR_WEIGHT * w[sel])[:, None] * target[sel], cp,
                              np.sqrt(stiff) * (lap @ moved)])
        normal = (a.T @ a).tocsc()
        x = np.stack([spla.spsolve(normal, a.T @ rhs[:, c]) for c in range(3)], 1)
    f_id, bary, dist = closest_points(x, dst, skin)
    faces = np.asarray(skin_faces)[f_id]
    moved_by = np.linalg.norm(x - moved, axis=1)
    group = lambda v: {g: float(1000 * v[list(ids)].mean()) for g, ids in GROUPS.items()}  # noqa: E731
    return EmbeddingBuild(np.arange(n, dtype=np.int64), faces.astype(np.int64), bary, pie[sel],
                          anchor_res, {"all": float(1000 * moved_by.mean()), **group(moved_by)},
                          {"all": float(1000 * dist.mean()), **group(dist)})
