"""Running the AVFace networks on one clip: evidence in, everything the fit and the result
need out (docs/networks.md). This is the one call the pipeline's audio-visual stage makes;
it does not fit a face model itself.

Outputs, per frame: the refined head pose, the expression branch's lower-face offsets, the
same as tracker-like landmarks in pixels (posed by the refined pose, so frames without a
face get landmarks too), and the lip SIREN's offsets for a face model's lip vertices in
metres, zero where nobody speaks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from avface.models.avnets import infer_expression, infer_pose
from avface.models.checkpoint import AVFaceNetworks
from avface.models.lip_siren import normalise_lip_positions
from avface.stages.networks.evidence import Evidence, landmarks_from_offsets, pose_reference, pose_to_rigid


@dataclass(frozen=True)
class Prediction:
    offsets: np.ndarray
    """(T, M, 3) lower-face offsets, inter-ocular units, head frame."""
    pose: np.ndarray
    """(T, 6) refined pose (avface.stages.networks.evidence.pose_and_camera's units)."""
    camera: np.ndarray
    """(T, 3) refined weak-perspective camera."""
    rotation: np.ndarray
    """(T, 3, 3) refined head rotation, model to world."""
    translation: np.ndarray
    """(T, 3) refined head position, world frame, metres."""
    landmarks: np.ndarray
    """(T, 468, 3) the neutral face with the predicted lower face, posed and projected:
    pixels and MediaPipe-style relative depth, for the fit's data term."""
    lip_offsets: np.ndarray | None
    """(T, L, 3) the SIREN's offsets of the given lip vertices, metres, in the head frame
    (after the jaw has moved the lips); None when no lip positions were given. The result
    contract wants rest-frame offsets added before skinning: the caller undoes each lip
    vertex's skinning rotation (its blended jaw transform) before the PCA."""


@torch.no_grad()
def predict(networks: AVFaceNetworks, evidence: Evidence, k: np.ndarray, *,
            lip_positions: np.ndarray | None = None, device: str = "cpu", batch: int = 256) -> Prediction:
    """Run every network on a clip's evidence. ``k`` (3, 3) is the camera the evidence was
    built with; ``lip_positions`` (L, 3) are a face model's neutral lip vertices in the head
    frame (metres), e.g. ``model.neutral_vertices()[model.lip_vertex_ids]``."""
    networks = networks.to(device).eval()
    to = lambda d: {name: v.to(device) for name, v in d.items()}  # noqa: E731
    offsets = infer_expression(networks.expression, to(evidence.expression), batch=batch).cpu().numpy()
    pose, camera = infer_pose(networks.pose, to(evidence.pose), batch=batch)
    pose, camera = pose.cpu().numpy().astype(np.float64), camera.cpu().numpy()
    rotation, translation = pose_to_rigid(pose, *pose_reference(evidence.frame))
    landmarks = landmarks_from_offsets(offsets, evidence.frame, k, rotation, translation)
    lips = None if lip_positions is None else predict_lips(networks, evidence, lip_positions, device=device)
    return Prediction(offsets, pose.astype(np.float32), camera, rotation, translation, landmarks, lips)


@torch.no_grad()
def predict_lips(networks: AVFaceNetworks, evidence: Evidence, lip_positions: np.ndarray, *,
                 device: str = "cpu") -> np.ndarray:
    """(T, L, 3) the SIREN's offsets of a face model's lip vertices ``lip_positions`` (L, 3)
    (neutral, head frame, metres), in metres, head frame; zero where nobody speaks. Separate
    from :func:`predict` because the lip vertices are known only once the fit has made the
    clip's identity."""
    networks = networks.to(device).eval()
    # the SIREN reads positions relative to the lip centroid in inter-ocular units; its
    # output, in the same units, is scaled back to metres by the clip's own distance
    iod = evidence.frame.iod
    pos = normalise_lip_positions(lip_positions, iod).to(device)
    x = {name: evidence.expression[name].to(device) for name in ("phones", "mel", "audio_present")}
    out = networks.lip_offsets(pos, x["phones"][None], x["mel"][None], x["audio_present"][None],
                               evidence.activity.to(device)[None])
    return out[0].cpu().numpy().astype(np.float64) * iod
