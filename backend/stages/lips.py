"""Lip offsets into the result contract (DESIGN.md section 5): ``lip_basis`` (K, L, 3) and
``lip_coeffs`` (T, K), a PCA of the per-frame lip vertex offsets with K <= 16, and the
residual it leaves, for ``meta``.

The basis is not centred: silence has zero offsets and must stay exactly zero (coefficients
0), so the components are the right singular vectors of the offsets themselves, not of their
deviations from a mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_COMPONENTS = 16
#: Keep the fewest components that explain this share of the offsets' energy.
EXPLAINED_ENERGY = 0.999


@dataclass(frozen=True)
class LipPCA:
    basis: np.ndarray
    """(K, L, 3) float32 metres per unit coefficient."""
    coeffs: np.ndarray
    """(T, K) float32."""
    residual_m: float
    """RMS over frames and lip vertices of what the basis leaves out, metres."""
    explained: float
    """Share of the offsets' energy the basis keeps (1 when there are no offsets)."""


def lip_pca(offsets: np.ndarray, *, max_components: int = MAX_COMPONENTS,
            explained_energy: float = EXPLAINED_ENERGY) -> LipPCA:
    """PCA (uncentred) of per-frame lip offsets (T, L, 3), metres."""
    x = np.asarray(offsets, np.float64)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"expected (T, L, 3) lip offsets, got {x.shape}")
    t, n_lips = x.shape[:2]
    flat = x.reshape(t, -1)
    energy = float((flat ** 2).sum())
    if t == 0 or energy == 0.0:
        return LipPCA(np.zeros((0, n_lips, 3), np.float32), np.zeros((t, 0), np.float32), 0.0, 1.0)
    u, sig, vt = np.linalg.svd(flat, full_matrices=False)
    cum = np.cumsum(sig ** 2) / energy
    k = int(min(max_components, np.searchsorted(cum, explained_energy) + 1, len(sig)))
    # flat ~ coeffs @ basis with unit-norm rows of vt scaled so coefficients have unit RMS
    scale = sig[:k] / np.sqrt(t)
    basis = vt[:k] * scale[:, None]
    coeffs = u[:, :k] * np.sqrt(t)
    residual = flat - coeffs @ basis
    return LipPCA(basis.reshape(k, n_lips, 3).astype(np.float32), coeffs.astype(np.float32),
                  float(np.sqrt((residual ** 2).sum() / (t * n_lips))), float(cum[k - 1]))


def _relative_rotations(model, params) -> np.ndarray:
    """(T, J, 3, 3) each joint's posed rotation relative to the root's: the head frame's view
    of the skinning (the root's rotation is the head pose)."""
    from scipy.spatial.transform import Rotation

    names = tuple(model.joint_names)
    if len(names) == 5:  # FLAME: global, neck, jaw, eyes
        pose = params.pose().detach().cpu().numpy()
    elif len(names) == 2:  # the default model: root and jaw
        pose = np.stack([params.global_orient.detach().cpu().numpy(), params.jaw_pose.detach().cpu().numpy()], 1)
    else:
        raise ValueError(f"no joint mapping for a skeleton of {names}")
    t, n_joints = pose.shape[:2]
    local = Rotation.from_rotvec(pose.reshape(-1, 3).astype(np.float64)).as_matrix().reshape(t, n_joints, 3, 3)
    local[:, 0] = np.eye(3)  # relative to the root
    chain = [local[:, 0]]
    for j in range(1, n_joints):
        chain.append(chain[int(model.parents[j])] @ local[:, j])
    return np.stack(chain, 1)


def _blended_rotations(model, params) -> np.ndarray:
    """(T, L, 3, 3) each lip vertex's skinning-blended rotation relative to the head."""
    rel = _relative_rotations(model, params)
    w = np.asarray(model.skin_weights, np.float64)[np.asarray(model.lip_vertex_ids)]  # (L, J)
    return np.einsum("lj,tjab->tlab", w, rel)


def rest_frame_offsets(model, params, head_offsets: np.ndarray) -> np.ndarray:
    """Head-frame lip offsets (T, L, 3) (after the jaw has moved the lips, as the SIREN
    predicts them) to the rest-frame offsets the result contract wants (added before
    skinning): each lip vertex's blended jaw rotation undone."""
    b = _blended_rotations(model, params)
    return np.linalg.solve(b, np.asarray(head_offsets, np.float64)[..., None])[..., 0]


def posed_displacement(model, params, rest_offsets: np.ndarray) -> np.ndarray:
    """(T, L, 3) world-frame displacement of the lip vertices that rest-frame offsets
    (T, L, 3) cause once skinned: the head's rotation after the blended joint rotations."""
    from scipy.spatial.transform import Rotation

    head = Rotation.from_rotvec(params.global_orient.detach().cpu().numpy().astype(np.float64)).as_matrix()
    b = _blended_rotations(model, params)
    return np.einsum("tab,tlbc,tlc->tla", head, b, np.asarray(rest_offsets, np.float64))
