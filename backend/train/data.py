"""Training clips: everything the losses and the networks need from one tracked clip, as
plain arrays in one ``.npz`` (tracking and speech features are slow; training reads these).

Keys (T frames, M = 97 lower-face landmarks, N = 25 skull-rigid points):

- the expression branch's inputs, named as :class:`~avface.models.avnets.ExpressionNet`'s
  arguments: ``phones`` (T, 16, P), ``mel`` (T, 16, 80), ``audio_present`` (T,),
  ``landmarks`` (T, M, 3), ``blendshapes`` (T, 52), ``region_conf`` (T, 3), ``usable`` (T,);
- ``activity`` (T,) speech activity; ``frontal`` (T,) how far the landmarks are trusted
  given the head's turn (avface.stages.networks.evidence.frontal_weight);
- the pose encoder's inputs ``pose`` (T, 6), ``camera`` (T, 3);
- for the reprojection loss: ``rigid_points`` (N, 3) the neutral's skull-rigid points in
  metres, ``origin`` (3,) and ``depth`` () the clip's median head position and depth,
  ``focal`` () pixels, ``rigid_px`` (T, N, 2) the tracker's rigid points relative to the
  principal point, ``iod_px`` (T,) the head's 3D inter-ocular distance in pixels at its depth;
- ``lip_positions`` (40, 3) the neutral's lip landmarks, centred, in inter-ocular units (the
  SIREN's input).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from avface.core.topology import LIPS, RIGID
from avface.errors import InputError
from avface.stages.networks.evidence import build_evidence, frontal_weight

EXPRESSION_KEYS = ("phones", "mel", "audio_present", "landmarks", "blendshapes", "region_conf", "usable")
POSE_KEYS = ("pose", "camera")
#: Per-frame keys (time first) and per-clip keys.
FRAME_KEYS = EXPRESSION_KEYS + POSE_KEYS + ("activity", "rigid_px", "iod_px", "frontal")
CLIP_KEYS = ("rigid_points", "origin", "depth", "focal", "lip_positions")


def prepare_clip(tracking, features=None, *, mouth_conf: np.ndarray | None = None,
                 fov_deg: float = 63.0) -> dict[str, np.ndarray]:
    """A training clip from a :class:`~avface.stages.tracking.Tracking` and optional
    :class:`~avface.stages.audio.AudioFeatures`."""
    from avface.core.geometry import intrinsics_for

    ev = build_evidence(tracking, features, mouth_conf=mouth_conf, fov_deg=fov_deg)
    k = intrinsics_for(tracking.width, tracking.height, fov_deg)
    frame = ev.frame
    det = np.isfinite(frame.translation[:, 0])
    out = {key: v.numpy() for key, v in ev.expression.items()}
    out.update({key: v.numpy() for key, v in ev.pose.items() if key in POSE_KEYS})
    out["activity"] = ev.activity.numpy()
    pos = frame.translation[det] if det.any() else np.array([[0.0, 0.0, -0.6]])
    out["origin"] = np.median(pos, axis=0).astype(np.float32)
    out["depth"] = np.float32(np.median(-pos[:, 2]))
    out["focal"] = np.float32(k[0, 0])
    out["rigid_points"] = frame.neutral[list(RIGID)].astype(np.float32)
    lm = np.nan_to_num(np.asarray(tracking.landmarks, np.float64))
    out["rigid_px"] = (lm[:, list(RIGID), :2] - k[:2, 2]).astype(np.float32)
    # the head's inter-ocular distance in pixels at its depth: unlike the 2D eye-corner
    # distance it does not shrink when the head turns, so a profile frame's errors are not
    # blown up (LRS3's 62-degree turn made them 4x larger)
    depth_t = np.where(det, -np.nan_to_num(frame.translation[:, 2], nan=1.0), 1.0)
    out["iod_px"] = np.where(det, k[0, 0] * frame.iod / depth_t, 0.0).astype(np.float32)
    out["frontal"] = frontal_weight(frame)
    lips = frame.neutral[list(LIPS)]
    out["lip_positions"] = ((lips - lips.mean(0)) / frame.iod).astype(np.float32)
    check_clip(out, "prepared clip")
    return out


def check_clip(clip: dict, name: str) -> int:
    """Check a training clip's keys and shapes; returns its frame count."""
    missing = [k for k in FRAME_KEYS + CLIP_KEYS if k not in clip]
    if missing:
        raise InputError(f"{name} is not a training clip: it lacks {missing}")
    t = len(clip["usable"])
    bad = [k for k in FRAME_KEYS if len(clip[k]) != t]
    if bad:
        raise InputError(f"{name}: {bad} do not have {t} frames like 'usable'")
    return t


def save_clip(path: str | Path, clip: dict) -> None:
    """Write a training clip atomically (a reader never sees half a file)."""
    import os
    import uuid

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.npz")
    np.savez_compressed(tmp, **clip)
    os.replace(tmp, path)


def load_clip(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            clip = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read training clip {path}: {e}") from e
    check_clip(clip, str(path))
    return clip
