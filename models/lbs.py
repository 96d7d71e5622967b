"""Pure, stateless maths of linear-blend-skinned face models (FLAME layout).

Every function takes tensors and returns tensors; nothing here holds state, so the same
code serves FLAME, the embedded default model and the tests' hand-computed cases.
"""
from __future__ import annotations

import torch


def batch_rodrigues(rot_vecs: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Axis-angle vectors (N, 3) to rotation matrices (N, 3, 3); exact at zero angle."""
    if rot_vecs.ndim != 2 or rot_vecs.shape[-1] != 3:
        raise ValueError(f"expected (N, 3) axis-angle vectors, got {tuple(rot_vecs.shape)}")
    angle = torch.linalg.norm(rot_vecs + eps, dim=1, keepdim=True)  # (N, 1)
    axis = rot_vecs / angle
    cos = torch.cos(angle)[:, :, None]
    sin = torch.sin(angle)[:, :, None]
    rx, ry, rz = axis[:, 0], axis[:, 1], axis[:, 2]
    zeros = torch.zeros_like(rx)
    # K is the cross-product matrix of the unit axis.
    k = torch.stack([zeros, -rz, ry, rz, zeros, -rx, -ry, rx, zeros], dim=1).view(-1, 3, 3)
    eye = torch.eye(3, dtype=rot_vecs.dtype, device=rot_vecs.device)[None]
    return eye + sin * k + (1 - cos) * torch.bmm(k, k)


def blend_shapes(coeffs: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Linear blend shapes.

    coeffs: (B, K); basis: (V, 3, K). Returns offsets (B, V, 3).
    """
    # offsets[b, v, k3] = sum_l coeffs[b, l] * basis[v, k3, l]
    return torch.einsum("bl,vkl->bvk", coeffs, basis)


def vertices2joints(j_regressor: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """Joint locations (B, J, 3) from a regressor (J, V) and vertices (B, V, 3)."""
    return torch.einsum("jv,bvk->bjk", j_regressor, vertices)


def transform_mat(rot: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Stack rotations (N, 3, 3) and translations (N, 3, 1) into (N, 4, 4) rigid transforms."""
    bottom = torch.zeros(rot.shape[0], 1, 4, dtype=rot.dtype, device=rot.device)
    bottom[:, 0, 3] = 1
    return torch.cat([torch.cat([rot, t], dim=2), bottom], dim=1)


def rigid_transform_chain(rot_mats: torch.Tensor, joints: torch.Tensor, parents: torch.Tensor):
    """Forward kinematics.

    rot_mats: (B, J, 3, 3) local rotations; joints: (B, J, 3) rest joint locations;
    parents: (J,) with parents[0] == -1. Returns (posed joints (B, J, 3), relative transforms
    (B, J, 4, 4)) where the relative transform maps a rest-pose point to its posed location.
    """
    batch, n_joints = joints.shape[:2]
    rel_joints = joints.clone()
    rel_joints[:, 1:] = joints[:, 1:] - joints[:, parents[1:]]
    local = transform_mat(rot_mats.reshape(-1, 3, 3), rel_joints.reshape(-1, 3, 1)).reshape(batch, n_joints, 4, 4)
    chain = [local[:, 0]]
    for j in range(1, n_joints):
        chain.append(torch.matmul(chain[int(parents[j])], local[:, j]))
    transforms = torch.stack(chain, dim=1)  # (B, J, 4, 4)
    posed_joints = transforms[:, :, :3, 3]
    # Remove the rest-pose joint location so that the transform applies to rest-pose vertices.
    joints_h = torch.cat([joints, torch.zeros_like(joints[..., :1])], dim=-1)[..., None]  # (B, J, 4, 1)
    rel = transforms - torch.nn.functional.pad(torch.matmul(transforms, joints_h), (3, 0))
    return posed_joints, rel


def lbs(
    shaped: torch.Tensor,
    pose: torch.Tensor,
    j_regressor: torch.Tensor,
    parents: torch.Tensor,
    weights: torch.Tensor,
    posedirs: torch.Tensor | None = None,
    joints: torch.Tensor | None = None,
):
    """Linear blend skinning of already shaped vertices.

    shaped: (B, V, 3) template + shape + expression offsets; pose: (B, J, 3) axis-angle per
    joint; j_regressor: (J, V') regressing rest joints from `shaped` when `joints` is None;
    weights: (V, J); posedirs: (P, V*3) pose correctives with P = (J-1)*9, or None.
    Returns (vertices (B, V, 3), posed joints (B, J, 3)).
    """
    batch, n_verts = shaped.shape[:2]
    n_joints = pose.shape[1]
    if joints is None:
        joints = vertices2joints(j_regressor, shaped)
    rot_mats = batch_rodrigues(pose.reshape(-1, 3)).view(batch, n_joints, 3, 3)
    if posedirs is not None:
        eye = torch.eye(3, dtype=shaped.dtype, device=shaped.device)
        pose_feature = (rot_mats[:, 1:] - eye).reshape(batch, -1)  # (B, (J-1)*9)
        shaped = shaped + torch.matmul(pose_feature, posedirs).view(batch, n_verts, 3)
    posed_joints, rel = rigid_transform_chain(rot_mats, joints, parents)
    # verts[b, v] = sum_j weights[v, j] * (R[b, j] @ shaped[b, v] + t[b, j]); transforming the
    # points once per joint is far cheaper than forming a 4x4 matrix per vertex.
    per_joint = torch.einsum("bjmn,bvn->bjvm", rel[:, :, :3, :3], shaped)  # (B, J, V, 3)
    verts = torch.einsum("vj,bjvm->bvm", weights, per_joint) + torch.einsum("vj,bjm->bvm", weights, rel[:, :, :3, 3])
    return verts, posed_joints


def vertices2landmarks(vertices: torch.Tensor, faces: torch.Tensor, lmk_faces_idx: torch.Tensor,
                       lmk_bary_coords: torch.Tensor) -> torch.Tensor:
    """Points on the surface given by triangle index and barycentric coordinates.

    vertices: (B, V, 3); faces: (F, 3) long; lmk_faces_idx: (M,) long; lmk_bary_coords: (M, 3).
    Returns (B, M, 3).
    """
    tri = faces[lmk_faces_idx]  # (M, 3) vertex ids
    corners = vertices[:, tri.reshape(-1)].view(vertices.shape[0], -1, 3, 3)  # (B, M, 3 corners, 3)
    return torch.einsum("bmcx,mc->bmx", corners, lmk_bary_coords)
