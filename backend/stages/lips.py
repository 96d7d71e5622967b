"""Lip offsets into the result contract (docs/design.md section 5): ``lip_basis`` (K, L, 3) and
``lip_coeffs`` (T, K), a PCA of the per-frame lip vertex offsets with K <= 16, and the
residual it leaves, for ``meta``.

The basis is not centred: silence has zero offsets and must stay exactly zero (coefficients
0), so the components are the right singular vectors of the offsets themselves, not of their
deviations from a mean.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from avface.stages.networks.run import NetworkRun

log = logging.getLogger(__name__)

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

    pose = model.joint_pose(params).detach().cpu().numpy()
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


#: Spread of a lip landmark's residual over the lip vertices around it (metres).
RESIDUAL_SIGMA_M = 0.003


def tracker_lip_offsets(fit, tracking, seen: np.ndarray) -> np.ndarray:
    """(T, L, 3) head-frame offsets of the lip vertices that take the fitted lip landmarks onto
    the tracker's in the image, times ``seen`` (T,) (how much each frame's mouth is seen), for
    a model whose fixed shapes cannot take every lip shape the tracker sees (the ICT head:
    ``FaceModel.lip_residual``). Each landmark's target keeps its fitted depth; its residual
    spreads over the lip vertices near it (Gaussian weights, normalised)."""
    import torch

    from avface.core.geometry import WORLD_TO_CAMERA
    from avface.core.topology import LIPS
    from scipy.spatial.transform import Rotation

    m, p, k = fit.model, fit.params, fit.intrinsics
    ids = np.asarray(m.landmark_ids)
    cols = np.flatnonzero(np.isin(ids, LIPS))
    with torch.no_grad():
        lmk = m.forward(p, full=False).landmarks.numpy().astype(np.float64)[:, cols]
    cam = lmk @ WORLD_TO_CAMERA.T
    z = cam[..., 2:3]
    uv = np.nan_to_num(tracking.landmarks[:, ids[cols], :2].astype(np.float64))
    target = np.concatenate([(uv - k[:2, 2]) / np.array([k[0, 0], k[1, 1]]) * z, z], -1)
    world = (target - cam) @ WORLD_TO_CAMERA  # camera -> world (its own inverse)
    head = np.einsum("tji,tmj->tmi", Rotation.from_rotvec(p.global_orient.numpy().astype(np.float64)).as_matrix(), world)
    head *= (np.clip(seen, 0.0, 1.0) * np.asarray(tracking.detected, bool))[:, None, None]
    betas = p.betas[:1] if p.betas.shape[1] else None
    with torch.no_grad():
        rest_lmk = m.forward(m.zero_params(1) if betas is None else _with_betas(m, betas), full=False).landmarks[0].numpy()[cols]
    verts = m.neutral_vertices(betas)[np.asarray(m.lip_vertex_ids)]
    d2 = ((verts[:, None] - rest_lmk[None]) ** 2).sum(-1)
    w = np.exp(-0.5 * d2 / RESIDUAL_SIGMA_M ** 2)
    w = w / np.maximum(w.sum(1, keepdims=True), 1e-12) * np.clip(w.sum(1, keepdims=True), 0.0, 1.0)
    return np.einsum("lm,tmc->tlc", w, head)


def _with_betas(model, betas):
    from avface.models.base import FaceParams

    z = model.zero_params(1)
    return FaceParams(betas, z.expression, z.global_orient, z.neck_pose, z.jaw_pose, z.leye_pose, z.reye_pose, z.transl)


def refine_lips(net: NetworkRun, fit, *, device: str = "cpu", tracking=None) -> LipPCA:
    """The SIREN's offsets for the fitted model's lip vertices, weighted by how little the
    mouth is seen (1 - its confidence) and by the gain the clip's adaptation chose, moved
    from the head frame to the rest frame (before skinning, as the result contract wants),
    as a PCA. With ``tracking``, a model whose shapes cannot take every lip shape the tracker
    sees (``lip_residual``) adds, as much as the mouth is seen, what its fit leaves of the
    tracker's lips (:func:`tracker_lip_offsets`)."""
    from avface.stages.networks.predict import predict_lips

    m, p = fit.model, fit.params
    betas = p.betas[:1] if p.betas.shape[1] else None
    positions = m.neutral_vertices(betas)[np.asarray(m.lip_vertex_ids)]
    head = predict_lips(net.networks, net.evidence, positions, device=device)
    # where the tracker sees the lips the fit already follows them: the SIREN's offsets count
    # as much as the mouth is not seen (measured: on every frame they cost visible frames'
    # lips NME 0.89 -> 1.21 %)
    unseen = 1.0 - np.clip(net.evidence.expression["region_conf"][:, 0].numpy(), 0.0, 1.0)
    # and as much as they helped on the trusted frames the adaptation hid (all without it)
    gain = net.meta["readout"]["lip_gain"] if net.meta.get("readout") else 1.0
    head = head * (gain * unseen)[:, None, None]
    if tracking is not None and getattr(m, "lip_residual", False):
        head = head + tracker_lip_offsets(fit, tracking, 1.0 - unseen)
    pca = lip_pca(rest_frame_offsets(m, p, head))
    log.info("lips: %d components, PCA residual %.2e m", pca.basis.shape[0], pca.residual_m)
    return pca


def vertices_with_lips(fit, lips: LipPCA | None) -> np.ndarray:
    """(T, V, 3) float32 camera-frame vertices of the coarse fit plus the lips' rest-frame
    offsets (``lip_coeffs . lip_basis``) as skinning moves them."""
    from avface.core.geometry import WORLD_TO_CAMERA

    vertices = fit.camera_vertices()
    if lips is not None and lips.basis.shape[0]:
        ids = np.asarray(fit.model.lip_vertex_ids)
        rest = np.einsum("tk,klc->tlc", lips.coeffs, lips.basis)
        world = posed_displacement(fit.model, fit.params, rest)
        vertices[:, ids] += (world @ WORLD_TO_CAMERA.T.astype(np.float64)).astype(np.float32)
    return vertices
