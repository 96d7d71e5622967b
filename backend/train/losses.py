"""Training losses of the AVFace networks, without 3D ground truth (docs/networks.md, docs/design.md
section 2): the tracker's landmarks on frames the visual confidence trusts, the paper's
mouth-closure and lip-corner distances, lip landmarks for the SIREN, and lip offsets sent to
zero in silence.

Every term is a pure function of tensors. Landmark errors are in percent of the
inter-ocular distance (the unit of NME), so weights read alike across terms. ``weight``
arguments are per frame, (B, W), 0 on frames that must not count (untrusted or padding);
every term is a mean over all frames of the batch (see ``weighted_mean``).
"""
from __future__ import annotations

import torch

from avface.core.topology import LIPS
from avface.models.avnets import LOWER_FACE_LANDMARKS
from avface.models.lbs import batch_rodrigues

#: Upper/lower lip landmark pairs whose distance is the mouth's opening (inner contour
#: centre and sides, outer centre): the paper's mouth-closure term.
MOUTH_CLOSURE_PAIRS = ((13, 14), (82, 87), (312, 317), (81, 178), (311, 402), (0, 17), (37, 84), (267, 314))
#: Left/right mouth corners (outer, inner): the paper's lip-corner term.
LIP_CORNER_PAIRS = ((61, 291), (78, 308))
#: Weight of the tracker's depth against x and y in the landmark term: MediaPipe's relative
#: depth is its least reliable coordinate.
DEPTH_WEIGHT = 0.5
#: Offsets are in inter-ocular units; losses in percent of it.
PERCENT = 100.0


def _pair_index(pairs) -> tuple[list[int], list[int]]:
    pos = {lid: i for i, lid in enumerate(LOWER_FACE_LANDMARKS)}
    return [pos[a] for a, _ in pairs], [pos[b] for _, b in pairs]


def weighted_mean(per_frame: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over all B x W frames of (B, W) values times their weight. Frames that do not
    count add zero but still count in the denominator: then equal shards of a batch average
    to exactly the whole batch's loss, so data-parallel training matches one process."""
    return (per_frame * weight).sum() / max(weight.numel(), 1)


def landmark_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                  depth_weight: float = DEPTH_WEIGHT) -> torch.Tensor:
    """Squared landmark error, percent IOD. pred, target: (B, W, M, 3) offsets; weight (B, W)."""
    err = (PERCENT * (pred - target)).pow(2)  # (B, W, M, 3)
    scale = torch.tensor([1.0, 1.0, depth_weight], dtype=pred.dtype, device=pred.device)
    return weighted_mean((err * scale).sum(-1).mean(-1), weight)


def canonical_neutral() -> torch.Tensor:
    """(M, 3) the canonical face's lower-face landmarks, centred, in inter-ocular units: the
    neutral to use when a clip's own is not at hand."""
    from avface.core.topology import OUTER_EYE_CORNERS
    from avface.models.canonical_mesh import load_canonical_mesh

    v = torch.as_tensor(load_canonical_mesh().vertices, dtype=torch.float32)
    iod = torch.linalg.norm(v[OUTER_EYE_CORNERS[0]] - v[OUTER_EYE_CORNERS[1]])
    p = v[list(LOWER_FACE_LANDMARKS)]
    return (p - p.mean(0)) / iod


def pair_distance_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, pairs,
                       neutral: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error of the distances between landmark pairs (MediaPipe ids), percent IOD.

    pred, target: (B, W, M, 3) offsets over LOWER_FACE_LANDMARKS; neutral: (B, M, 3) or
    (M, 3) the clip's neutral landmarks in inter-ocular units (positions = neutral + offsets);
    None uses the canonical face's."""
    if neutral is None:
        neutral = canonical_neutral().to(pred)
    if neutral.ndim == 3:
        neutral = neutral[:, None]  # (B, 1, M, 3)
    ia, ib = _pair_index(pairs)
    p, t = pred + neutral, target + neutral
    d_pred = torch.linalg.norm(p[..., ia, :] - p[..., ib, :], dim=-1)  # (B, W, K)
    d_tgt = torch.linalg.norm(t[..., ia, :] - t[..., ib, :], dim=-1)
    return weighted_mean((PERCENT * (d_pred - d_tgt)).pow(2).mean(-1), weight)


def mouth_closure_loss(pred, target, weight, neutral=None) -> torch.Tensor:
    """The paper's mouth-closure term: lip opening distances over MOUTH_CLOSURE_PAIRS."""
    return pair_distance_loss(pred, target, weight, MOUTH_CLOSURE_PAIRS, neutral)


def lip_corner_loss(pred, target, weight, neutral=None) -> torch.Tensor:
    """The paper's lip-corner term: mouth width over LIP_CORNER_PAIRS."""
    return pair_distance_loss(pred, target, weight, LIP_CORNER_PAIRS, neutral)


def lip_indices() -> list[int]:
    """Positions of the 40 lip landmarks in LOWER_FACE_LANDMARKS."""
    pos = {lid: i for i, lid in enumerate(LOWER_FACE_LANDMARKS)}
    return [pos[i] for i in LIPS]


def siren_lip_loss(coarse: torch.Tensor, lip_offsets: torch.Tensor, target: torch.Tensor,
                   weight: torch.Tensor) -> torch.Tensor:
    """Lip landmarks after refinement against the tracker's. coarse: (B, T, M, 3) the
    expression branch's offsets (detached by the caller when the SIREN trains alone);
    lip_offsets: (B, T, 40, 3) the SIREN's at the lip landmarks; target (B, T, M, 3)."""
    idx = lip_indices()
    refined = coarse[..., idx, :] + lip_offsets
    return landmark_loss(refined, target[..., idx, :], weight)


def silence_loss(lip_offsets: torch.Tensor, activity: torch.Tensor) -> torch.Tensor:
    """Lip offsets (B, T, L, 3) pulled to zero where nobody speaks (activity (B, T) ~ 0)."""
    per_frame = (PERCENT * lip_offsets).pow(2).sum(-1).mean(-1)  # (B, T)
    silent = 1.0 - activity.clamp(0.0, 1.0)
    return (per_frame * silent).mean()


def reprojection_loss(pose: torch.Tensor, points: torch.Tensor, origin: torch.Tensor, depth: torch.Tensor,
                      focal_px: torch.Tensor, target_px: torch.Tensor, iod_px: torch.Tensor,
                      weight: torch.Tensor) -> torch.Tensor:
    """2D landmark reprojection of the pose encoder's head pose, percent IOD.

    pose: (B, W, 6) rotation (axis-angle) and position relative to ``origin`` in units of
    ``depth`` (as avface.stages.networks.evidence.pose_and_camera writes them); points: (B, N, 3) the clip's
    neutral skull-rigid landmarks, metres; origin: (B, 3) the clip's median head position;
    depth: (B,) its median depth; focal_px: (B,); target_px: (B, W, N, 2) the tracker's
    landmarks relative to the principal point, image y down; iod_px: (B, W); weight (B, W).
    """
    b, w = pose.shape[:2]
    rot = batch_rodrigues(pose[..., :3].reshape(-1, 3)).view(b, w, 3, 3)
    pos = origin[:, None] + pose[..., 3:] * depth[:, None, None]  # (B, W, 3) world, y up
    # world[b, w, n] = rot[b, w] @ points[b, n] + pos[b, w]
    world = torch.einsum("bwij,bnj->bwni", rot, points) + pos[:, :, None]
    z = (-world[..., 2]).clamp(min=1e-3)  # the camera looks down -z
    uv = torch.stack([world[..., 0], -world[..., 1]], -1) / z[..., None] * focal_px[:, None, None, None]
    err = (PERCENT * (uv - target_px) / iod_px[..., None, None].clamp(min=1.0)).pow(2).sum(-1).mean(-1)
    return weighted_mean(err, weight)


def camera_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Squared error of the weak-perspective camera (B, W, 3) against the tracker's, in per
    cent (log scale and frame heights), on frames with weight (B, W)."""
    return weighted_mean((PERCENT * (pred - target)).pow(2).sum(-1), weight)


def smoothness_loss(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared second difference over time of (B, W, D) values."""
    d2 = x[:, 2:] - 2 * x[:, 1:-1] + x[:, :-2]
    per = d2.pow(2).sum(-1)
    if valid is None:
        return per.mean()
    v = (valid[:, 2:] & valid[:, 1:-1] & valid[:, :-2]).float()
    return weighted_mean(per, v)
