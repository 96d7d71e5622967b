"""The face models' kinematic chain in plain numpy: what a skeleton needs per frame to
reproduce a result's mesh, for every writer of rigs.

numpy only, nothing from ``avface``: ``build_addon.py`` vendors this file into the Blender
add-on (``_vendor/kinematics.py``), so that the exporters (``avface.export.rig``) and the
add-on's importer pose their bones by the same maths.

Conventions (those of ``models.lbs``): J joints with ``parents[j] < j`` and ``parents[0] == -1``;
``local_rot[t, j]`` rotates joint j relative to its parent, about the joint's location
``joints[t, j]`` on the unposed mesh of frame t; ``transl[t]`` is added last. For FLAME the
joints are regressed from the shaped mesh, so they move with the expression
(:func:`posed_rest_joints`); for the default model they stay at ``joints_rest``.

A skeleton whose bind pose puts joint j at ``joints_rest[j]`` with no rotation reproduces that
with per-frame joint transforms (:func:`joint_transforms`): the expression-driven joint motion
and ``transl`` live in the animated joint translations.
"""
from __future__ import annotations

import numpy as np


def posed_rest_joints(joints_rest: np.ndarray, expression: np.ndarray, expression_joints: np.ndarray | None) -> np.ndarray:
    """(T, J, 3) the unposed joint locations of each frame.

    joints_rest: (J, 3) of the identity at rest; expression: (T, E); expression_joints:
    (E, J, 3) how far one unit of each expression coefficient moves each joint (FLAME:
    ``J_regressor . expression_basis``), or None where the joints do not move.
    """
    joints_rest = np.asarray(joints_rest, np.float64)
    n_frames = len(expression)
    if expression_joints is None:
        return np.broadcast_to(joints_rest, (n_frames,) + joints_rest.shape).copy()
    # joints[t, j, k] = joints_rest[j, k] + sum_e expression[t, e] * expression_joints[e, j, k]
    return joints_rest[None] + np.einsum("te,ejk->tjk", np.asarray(expression, np.float64),
                                         np.asarray(expression_joints, np.float64))


def forward_kinematics(local_rot: np.ndarray, joints: np.ndarray, parents: np.ndarray, transl: np.ndarray):
    """The models' kinematic chain (``models.lbs.rigid_transform_chain``) in numpy.

    local_rot: (T, J, 3, 3); joints: (T, J, 3) rest joint locations of each frame; parents (J,);
    transl: (T, 3) added last. Returns the world rotations (T, J, 3, 3) and the translations
    (T, J, 3) of the rest-to-posed transforms A_j(p) = R_j p + t_j.
    """
    n_frames, n_joints = joints.shape[:2]
    g_rot = np.zeros((n_frames, n_joints, 3, 3))
    g_t = np.zeros((n_frames, n_joints, 3))
    for j in range(n_joints):
        p = int(parents[j])
        if p < 0:
            g_rot[:, j] = local_rot[:, j]
            g_t[:, j] = joints[:, j]
        else:
            g_rot[:, j] = g_rot[:, p] @ local_rot[:, j]
            g_t[:, j] = np.einsum("tab,tb->ta", g_rot[:, p], joints[:, j] - joints[:, p]) + g_t[:, p]
    a_t = g_t - np.einsum("tjab,tjb->tja", g_rot, joints) + transl[:, None, :]
    return g_rot, a_t


def joint_transforms(local_rot: np.ndarray, joints: np.ndarray, joints_rest: np.ndarray, parents: np.ndarray,
                     transl: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame transforms of a skeleton bound at ``joints_rest`` (J, 3) with no rotation,
    which skins the frame's shaped mesh exactly as :func:`forward_kinematics` does.

    Returns (world rotations (T, J, 3, 3), world translations (T, J, 3): where each joint's
    bind origin goes, and local translations (T, J, 3): that position in the parent joint's
    posed frame; the root's is its world translation).
    """
    parents = np.asarray(parents, np.int64)
    joints_rest = np.asarray(joints_rest, np.float64)
    g_rot, a_t = forward_kinematics(local_rot, joints, parents, np.asarray(transl, np.float64))
    # world joint transform W = A B with the bind B = translate(joints_rest)
    world_t = a_t + np.einsum("tjab,jb->tja", g_rot, joints_rest)
    local_t = world_t.copy()
    for j in range(1, len(parents)):
        p = parents[j]
        local_t[:, j] = np.einsum("tba,tb->ta", g_rot[:, p], world_t[:, j] - world_t[:, p])
    return g_rot, world_t, local_t


def bone_locations(local_translations: np.ndarray, joints_rest: np.ndarray, parents: np.ndarray) -> np.ndarray:
    """(T, J, 3) pose-bone locations (Blender's ``pose.bones[...].location``) of bones whose
    heads sit at ``joints_rest`` with the model's axes as their rest axes (no rest rotation):
    how far each joint is from where its rest offset to its parent puts it, in the parent's
    posed frame. Zero for a joint that does not move relative to its parent; the root's is
    its displacement from its rest location (``transl`` when the joints do not move)."""
    joints_rest = np.asarray(joints_rest, np.float64)
    parents = np.asarray(parents, np.int64)
    rest_offset = joints_rest.copy()
    has_parent = parents >= 0
    rest_offset[has_parent] = joints_rest[has_parent] - joints_rest[parents[has_parent]]
    return np.asarray(local_translations, np.float64) - rest_offset[None]
