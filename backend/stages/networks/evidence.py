"""What the AVFace networks read, built from a clip's tracking and speech features
(docs/networks.md, "Network inputs"), and the way back from their lower-face offsets to
head-frame points that the fit can use.

The head frame: each detected frame's 468 landmarks are back-projected to metric points
under the assumed camera (as the fit does), then rigidly aligned on the skull-rigid points
onto the clip's neutral face, re-estimated as the per-landmark median of the aligned frames
(the fit's initial alignment). Offsets are divided by the neutral's 3D inter-ocular
distance, so they carry neither the speaker's size nor their distance to the camera.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from avface.core.geometry import backproject, turn_from_camera_deg, umeyama
from avface.core.topology import N_MESH_VERTICES, OUTER_EYE_CORNERS, rigid_weights

#: Alignment rounds: similarity onto the neutral, then the neutral re-estimated.
ALIGN_ROUNDS = 3
#: A per-clip log-mel spread below this (a silent or constant clip) is not divided by.
MEL_MIN_SPREAD = 0.1
#: The MAD of a normal distribution times this is its standard deviation.
MAD_TO_STD = 1.4826


@dataclass(frozen=True)
class HeadFrame:
    """A clip's pose-normalised landmarks."""

    neutral: np.ndarray
    """(468, 3) the clip's neutral face, metres, model frame."""
    iod: float
    """3D inter-ocular distance (outer eye corners) of the neutral, metres."""
    aligned: np.ndarray
    """(T, 468, 3) each frame's landmarks in the neutral's frame, metres; NaN where undetected."""
    rotation: np.ndarray
    """(T, 3, 3) head rotation, model to world frame; identity where undetected."""
    translation: np.ndarray
    """(T, 3) head position in the world frame (y up, the camera at the origin looking down
    -z), metres; NaN where undetected. world = rotation @ aligned + translation."""


def head_frame(landmarks: np.ndarray, detected: np.ndarray, k: np.ndarray) -> HeadFrame:
    """Pose-normalise a clip's tracker landmarks (T, >=468, 3) pixels (NaN where undetected)
    seen by a camera with intrinsics ``k`` (3, 3). Each frame is back-projected to metric
    points (the fit's :func:`~avface.core.geometry.backproject`: perspective, so a turning head
    does not bend the mouth), then rigidly aligned onto the neutral."""
    from types import SimpleNamespace

    from avface.models.canonical_mesh import load_canonical_mesh

    landmarks = np.asarray(landmarks)
    det = np.asarray(detected, bool)
    if landmarks.ndim != 3 or landmarks.shape[1] < N_MESH_VERTICES or landmarks.shape[2] != 3:
        raise ValueError(f"expected (T, 478, 3) landmarks, got {landmarks.shape}")
    if det.shape != landmarks.shape[:1]:
        raise ValueError(f"expected ({len(landmarks)},) detected flags, got {det.shape}")
    t = len(det)
    w = rigid_weights()
    neutral = load_canonical_mesh().vertices.astype(np.float64)
    aligned = np.full((t, N_MESH_VERTICES, 3), np.nan)
    transl = np.full((t, 3), np.nan)
    rot = np.tile(np.eye(3), (t, 1, 1))
    if det.any():
        pts = backproject(SimpleNamespace(landmarks=landmarks, detected=det), k, neutral, w)[det]  # (Td, 468, 3)
        for _ in range(ALIGN_ROUNDS):
            _, r, tr = umeyama(neutral, pts, w, False)  # pts = R x + t
            # al[i] = R_i^T (pts_i - t_i)
            al = np.einsum("tji,tvj->tvi", r, pts - tr[:, None])
            neutral = np.median(al, axis=0)
        aligned[det], rot[det], transl[det] = al, r, tr
    iod = float(np.linalg.norm(neutral[OUTER_EYE_CORNERS[0]] - neutral[OUTER_EYE_CORNERS[1]]))
    return HeadFrame(neutral, iod, aligned, rot, transl)


def lower_face_offsets(frame: HeadFrame, ids=None) -> np.ndarray:
    """(T, M, 3) offsets of the lower-face landmarks from the neutral, in inter-ocular units;
    0 where undetected."""
    from avface.models.avnets import LOWER_FACE_LANDMARKS

    ids = list(LOWER_FACE_LANDMARKS if ids is None else ids)
    off = (frame.aligned[:, ids] - frame.neutral[ids]) / frame.iod
    return np.nan_to_num(off, nan=0.0).astype(np.float32)


def offsets_to_points(offsets, neutral: np.ndarray, iod: float, ids=None) -> np.ndarray:
    """The way back: (T, M, 3) offsets in inter-ocular units to (T, M, 3) head-frame points
    in metres, for the fit to solve a face model's parameters from."""
    from avface.models.avnets import LOWER_FACE_LANDMARKS

    ids = list(LOWER_FACE_LANDMARKS if ids is None else ids)
    return np.asarray(neutral)[ids] + float(iod) * np.asarray(offsets, np.float64)


def pose_and_camera(frame: HeadFrame, k: np.ndarray, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(pose (T, 6), camera (T, 3)) as the pose encoder reads them; 0 where undetected.

    pose: the head's axis-angle rotation, and its position relative to the clip's median
    position in units of the median depth. camera: the weak-perspective camera this implies,
    log of the scale (focal / depth) relative to the clip's median, and the head origin's
    image position relative to the principal point, in frame heights."""
    det = np.isfinite(frame.translation[:, 0])
    t = len(det)
    pose, cam = np.zeros((t, 6), np.float32), np.zeros((t, 3), np.float32)
    if not det.any():
        return pose, cam
    pos = frame.translation[det]
    depth = -pos[:, 2]
    origin, med_depth = pose_reference(frame)
    pose[det, :3] = Rotation.from_matrix(frame.rotation[det]).as_rotvec()
    pose[det, 3:] = (pos - origin) / med_depth
    cam[det, 0] = -np.log(depth / med_depth)
    # image position: u - cx = f X / depth, v - cy = -f Y / depth (image y runs down)
    cam[det, 1] = k[0, 0] * pos[:, 0] / depth / height
    cam[det, 2] = -k[1, 1] * pos[:, 1] / depth / height
    return pose, cam


def pose_reference(frame: HeadFrame) -> tuple[np.ndarray, float]:
    """(origin (3,), depth) the clip's median head position and depth, metres: what pose
    positions are relative to and scaled by."""
    det = np.isfinite(frame.translation[:, 0])
    if not det.any():
        raise ValueError("no frame with a face: the clip has no head position")
    pos = frame.translation[det]
    return np.median(pos, axis=0), float(np.median(-pos[:, 2]))


def pose_to_rigid(pose, origin: np.ndarray, depth: float) -> tuple[np.ndarray, np.ndarray]:
    """The way back from the pose encoder's (T, 6) poses to (rotation (T, 3, 3), head
    position (T, 3) metres, world frame)."""
    pose = np.asarray(pose, np.float64)
    return Rotation.from_rotvec(pose[:, :3]).as_matrix(), np.asarray(origin) + pose[:, 3:] * float(depth)


def landmarks_from_offsets(offsets, frame: HeadFrame, k: np.ndarray, rotation: np.ndarray | None = None,
                           translation: np.ndarray | None = None) -> np.ndarray:
    """(T, 468, 3) tracker-like landmarks (pixels, MediaPipe's relative depth in pixels) of
    the clip's neutral face with its lower-face landmarks moved by ``offsets`` (T, M, 3),
    posed by ``rotation`` (T, 3, 3) and ``translation`` (T, 3) (default: the head frame's
    own, NaN where undetected) and projected by ``k``. This is how the networks' output
    reaches any fit: as landmarks where the tracker's are occluded or missing.

    The relative depth is (Z - head depth) * focal / head depth, as MediaPipe scales its z
    like x; the fit centres it per frame, so the reference does not matter."""
    from avface.core.geometry import WORLD_TO_CAMERA
    from avface.models.avnets import LOWER_FACE_LANDMARKS

    rotation = frame.rotation if rotation is None else np.asarray(rotation, np.float64)
    translation = frame.translation if translation is None else np.asarray(translation, np.float64)
    offsets = np.asarray(offsets, np.float64)
    shape = np.repeat(frame.neutral[None], len(offsets), axis=0)  # (T, 468, 3)
    shape[:, list(LOWER_FACE_LANDMARKS)] += frame.iod * offsets
    # world[t, v] = rotation[t] @ shape[t, v] + translation[t]
    world = np.einsum("tij,tvj->tvi", rotation, shape) + translation[:, None]
    cam = world @ WORLD_TO_CAMERA.T.astype(np.float64)  # OpenCV: x right, y down, z forward
    z = np.maximum(cam[..., 2], 1e-6)
    uv = cam[..., :2] / z[..., None] * np.array([k[0, 0], k[1, 1]]) + np.array([k[0, 2], k[1, 2]])
    head = -translation[:, 2:3]
    zpx = (z - head) * k[0, 0] / head
    return np.concatenate([uv, zpx[..., None]], axis=-1)


#: Head turns (away from facing the camera) where the tracker's far-side landmarks stop being
#: trusted: full trust up to the first, none from the second, degrees.
FRONTAL_FULL_DEG = 30.0
FRONTAL_NONE_DEG = 60.0


def frontal_weight(frame: HeadFrame) -> np.ndarray:
    """(T,) in [0, 1]: 1 for a head facing the camera within FRONTAL_FULL_DEG, 0 beyond
    FRONTAL_NONE_DEG (MediaPipe guesses the far side of a profile), 0 where undetected."""
    det = np.isfinite(frame.translation[:, 0])
    w = np.zeros(len(det), np.float32)
    if not det.any():
        return w
    # the head's +z (out of the face) in the world, against the way to the camera
    angle = turn_from_camera_deg(frame.rotation[det][:, :, 2], frame.translation[det])
    w[det] = np.clip((FRONTAL_NONE_DEG - angle) / (FRONTAL_NONE_DEG - FRONTAL_FULL_DEG), 0.0, 1.0)
    return w


def normalise_mel(mel: np.ndarray) -> np.ndarray:
    """(T, 16, 80) log-mel to zero median and unit robust spread per band over the clip, so
    that recording level and channel colour drop out."""
    mel = np.asarray(mel, np.float64)
    flat = mel.reshape(-1, mel.shape[-1])
    med = np.median(flat, axis=0)
    spread = np.maximum(MAD_TO_STD * np.median(np.abs(flat - med), axis=0), MEL_MIN_SPREAD)
    return ((mel - med) / spread).astype(np.float32)


def region_confidence(detected: np.ndarray, hand_cover: np.ndarray, mouth_conf: np.ndarray | None = None) -> np.ndarray:
    """(T, 3) visual confidence of the mouth, eyes and whole face: 1 minus the hand-covered
    share of each region, the mouth's replaced by the clip's own mouth confidence when one is
    given (it also weighs landmark jumps and appearance); 0 where undetected."""
    det = np.asarray(detected, bool).astype(np.float32)
    conf = (1.0 - np.clip(np.asarray(hand_cover, np.float32), 0.0, 1.0)) * det[:, None]
    if mouth_conf is not None:
        conf[:, 0] = np.clip(np.asarray(mouth_conf, np.float32), 0.0, 1.0) * det
    return conf


@dataclass(frozen=True)
class Evidence:
    """Every per-frame network input of one clip, (T, ...) float32 tensors named as the
    networks' arguments, plus the head frame to map predictions back."""

    expression: dict[str, torch.Tensor]
    """ExpressionNet inputs: phones, mel, audio_present, landmarks, blendshapes, region_conf, usable."""
    pose: dict[str, torch.Tensor]
    """PoseEncoder inputs: pose, camera, usable, face_conf."""
    activity: torch.Tensor
    """(T,) speech activity in [0, 1] (0 without audio)."""
    frame: HeadFrame

    @property
    def n_frames(self) -> int:
        return int(self.activity.shape[0])


def build_evidence(tracking, features=None, *, mouth_conf: np.ndarray | None = None,
                   fov_deg: float = 63.0, n_phones: int = 41) -> Evidence:
    """Network inputs from a :class:`~avface.stages.tracking.Tracking` and optional
    :class:`~avface.stages.audio.AudioFeatures` (None: no audio, the audio inputs are zero and
    ``audio_present`` is 0)."""
    from avface.core.geometry import intrinsics_for

    det = np.asarray(tracking.detected, bool)
    t = len(det)
    k = intrinsics_for(tracking.width, tracking.height, fov_deg)
    frame = head_frame(tracking.landmarks, det, k)
    pose, cam = pose_and_camera(frame, k, tracking.height)
    region = region_confidence(det, tracking.hand_cover, mouth_conf)
    if features is not None:
        if features.mel.shape[0] != t:
            raise ValueError(f"speech features cover {features.mel.shape[0]} frames, the tracking {t}")
        phones = np.asarray(features.phones, np.float32)
        mel = normalise_mel(features.mel)
        present = np.ones(t, np.float32)
        activity = np.clip(np.asarray(features.activity, np.float32), 0.0, 1.0)
    else:
        phones = np.zeros((t, 16, n_phones), np.float32)
        mel = np.zeros((t, 16, 80), np.float32)
        present = np.zeros(t, np.float32)
        activity = np.zeros(t, np.float32)
    usable = det.astype(np.float32)
    f = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    expression = dict(
        phones=f(phones), mel=f(mel), audio_present=f(present), landmarks=f(lower_face_offsets(frame)),
        blendshapes=f(np.nan_to_num(tracking.blendshapes, nan=0.0) * usable[:, None]),
        region_conf=f(region), usable=f(usable),
    )
    pose_in = dict(pose=f(pose), camera=f(cam), usable=f(usable), face_conf=f(region[:, 2]))
    return Evidence(expression, pose_in, f(activity), frame)
