"""Network inputs from tracking and speech (backend/evidence.py): lower-face offsets in the
pose-normalised head frame recover a known mouth motion whatever the head pose and distance."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close
from scipy.spatial.transform import Rotation
from test_fit import FOV, H, W, _with_iris, synthetic_tracking

from avface.core.geometry import intrinsics_for
from avface.core.topology import LIPS_LOWER_INNER, LIPS_LOWER_OUTER
from avface.models.avnets import LOWER_FACE_LANDMARKS, N_LOWER_FACE
from avface.models.canonical_mesh import load_canonical_mesh
from avface.stages.networks.evidence import (build_evidence, head_frame, lower_face_offsets, normalise_mel,
    offsets_to_points, pose_and_camera, region_confidence)

IDS = list(LOWER_FACE_LANDMARKS)


def talking_head(t: int = 30, depth: float = 0.6, seed: int = 0):
    """World points (T, 478, 3) of the canonical face whose lower lip drops by up to 6 mm,
    under a few degrees of head motion; and the true offsets (T, 97, 3) in metres."""
    rng = np.random.default_rng(seed)
    v = load_canonical_mesh().vertices.astype(np.float64)
    s = np.linspace(0, 2 * np.pi, t)
    open_ = 0.006 * (1 + np.sin(3 * s)) / 2  # metres
    motion = np.zeros((t, 468, 3))
    lower = list(set(LIPS_LOWER_OUTER + LIPS_LOWER_INNER))
    motion[:, lower, 1] = -open_[:, None]
    rot = Rotation.from_rotvec(np.stack([0.08 * np.sin(s), 0.15 * np.cos(s), 0.03 * np.sin(2 * s)], 1))
    shaped = v[None] + motion
    world = np.einsum("tij,tvj->tvi", rot.as_matrix(), shaped) + np.array([0.01, -0.005, -depth])
    world += rng.normal(scale=1e-5, size=world.shape)
    return _with_iris(world), motion[:, IDS], rot


def test_offsets_recover_the_mouth_motion_under_head_motion():
    k = intrinsics_for(W, H, FOV)
    world, truth, _ = talking_head()
    frame = head_frame(synthetic_tracking(world, k).landmarks, np.ones(len(world), bool), k)
    iod = np.linalg.norm(load_canonical_mesh().vertices[33] - load_canonical_mesh().vertices[263])
    off = lower_face_offsets(frame)
    assert off.shape == (len(world), N_LOWER_FACE, 3)
    # the neutral is the clip's median mouth, so compare motion about the clip's median
    truth_rel = (truth - np.median(truth, axis=0)) / iod
    err = np.abs(off - truth_rel).max()
    # 15 degrees of yaw, MediaPipe-like relative depth: under 1 % IOD (0.9 mm) everywhere
    assert err < 0.01, f"worst offset error {err:.4f} IOD"
    assert abs(frame.iod / iod - 1) < 0.05
    # and the motion itself is there: the lower lip drops by up to 6 mm = 0.065 IOD
    lip = IDS.index(LIPS_LOWER_OUTER[4])
    assert np.ptp(off[:, lip, 1]) > 0.05


def test_offsets_do_not_depend_on_distance():
    k = intrinsics_for(W, H, FOV)
    near, _, _ = talking_head(depth=0.5)
    far, _, _ = talking_head(depth=0.9)
    det = np.ones(len(near), bool)
    a = lower_face_offsets(head_frame(synthetic_tracking(near, k).landmarks, det, k))
    b = lower_face_offsets(head_frame(synthetic_tracking(far, k).landmarks, det, k))
    assert np.abs(a - b).max() < 0.006


def test_undetected_frames_are_zero_and_the_way_back_is_exact():
    k = intrinsics_for(W, H, FOV)
    world, _, _ = talking_head()
    det = np.ones(len(world), bool)
    det[5:9] = False
    tracking = synthetic_tracking(world, k, det)
    frame = head_frame(tracking.landmarks, det, k)
    off = lower_face_offsets(frame)
    assert (off[5:9] == 0).all() and np.isnan(frame.aligned[5:9]).all()
    back = offsets_to_points(off, frame.neutral, frame.iod)
    assert_close(back[det], frame.aligned[det][:, IDS], atol=1e-6, rtol=0, what="offsets to points")


def test_pose_and_camera_follow_the_head():
    k = intrinsics_for(W, H, FOV)
    world, _, rot = talking_head()
    frame = head_frame(synthetic_tracking(world, k).landmarks, np.ones(len(world), bool), k)
    pose, cam = pose_and_camera(frame, k, H)
    # rotation recovered to within half a degree
    rel = Rotation.from_rotvec(pose[:, :3]) * rot.inv()
    assert np.degrees(rel.magnitude()).max() < 0.5
    # a head that turns in place: translation and scale change little
    assert np.abs(pose[:, 3:]).max() < 0.01 and np.abs(cam[:, 0]).max() < 0.01
    # the same clip further away: scale drops by the depth ratio
    world2 = world.copy()
    world2[:, :, 2] -= 0.3
    frame2 = head_frame(synthetic_tracking(np.concatenate([world, world2]), k).landmarks, np.ones(2 * len(world), bool), k)
    _, cam2 = pose_and_camera(frame2, k, H)
    assert abs((cam2[:30, 0] - cam2[30:, 0]).mean() - np.log(0.9 / 0.6)) < 0.02


def test_mel_normalisation_removes_level_and_channel():
    rng = np.random.default_rng(0)
    mel = rng.normal(size=(40, 16, 80)) * 2 - 5
    louder = mel + 3.0 + np.linspace(0, 1, 80)  # level and a tilted channel
    assert_close(normalise_mel(louder), normalise_mel(mel), atol=1e-5, rtol=0, what="normalised log-mel")
    silent = np.full((10, 16, 80), -23.0)
    assert (normalise_mel(silent) == 0).all()


def test_region_confidence():
    det = np.array([True, True, False])
    cover = np.array([[0.5, 0.0, 0.2], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    conf = region_confidence(det, cover)
    assert_close(conf, [[0.5, 1.0, 0.8], [1, 1, 1], [0, 0, 0]], atol=1e-6, what="region confidence")
    conf = region_confidence(det, cover, mouth_conf=np.array([0.2, 0.9, 0.9]))
    assert_close(conf[:, 0], [0.2, 0.9, 0.0], atol=1e-6, what="mouth confidence")


def test_build_evidence_without_audio():
    k = intrinsics_for(W, H, FOV)
    world, _, _ = talking_head(t=20)
    det = np.ones(20, bool)
    det[3] = False
    ev = build_evidence(synthetic_tracking(world, k, det), None, fov_deg=FOV)
    x = ev.expression
    assert x["phones"].shape == (20, 16, 41) and x["mel"].shape == (20, 16, 80)
    assert (x["audio_present"] == 0).all() and (ev.activity == 0).all()
    assert x["landmarks"].shape == (20, N_LOWER_FACE, 3) and x["usable"][3] == 0 and x["usable"].sum() == 19
    assert ev.pose["pose"].shape == (20, 6) and ev.pose["camera"].shape == (20, 3)
    assert ev.n_frames == 20


def test_bad_landmarks_are_refused():
    with pytest.raises(ValueError, match="landmarks"):
        head_frame(np.zeros((5, 100, 3)), np.ones(5, bool), np.eye(3))
    with pytest.raises(ValueError, match="detected"):
        head_frame(np.zeros((5, 478, 3)), np.ones(4, bool), np.eye(3))


def test_landmarks_from_offsets_reproduce_the_tracker():
    """Offsets and head pose taken from a tracked clip, mapped back to pixels, land on the
    tracker's landmarks; the pose encoder's representation maps back to the same pose."""
    from avface.stages.networks.evidence import landmarks_from_offsets, pose_reference, pose_to_rigid

    k = intrinsics_for(W, H, FOV)
    world, _, _ = talking_head()
    tracking = synthetic_tracking(world, k)
    frame = head_frame(tracking.landmarks, np.ones(len(world), bool), k)
    px = landmarks_from_offsets(lower_face_offsets(frame), frame, k)
    err = np.linalg.norm(px[:, IDS, :2] - tracking.landmarks[:, IDS, :2], axis=-1)
    iod_px = np.linalg.norm(tracking.landmarks[:, 33, :2] - tracking.landmarks[:, 263, :2], axis=-1)
    assert (err / iod_px[:, None]).max() < 0.01, f"worst {err.max():.2f} px"
    pose, _ = pose_and_camera(frame, k, H)
    rot, pos = pose_to_rigid(pose, *pose_reference(frame))
    assert_close(rot, frame.rotation, atol=1e-5, rtol=0, what="rotation")
    assert_close(pos, frame.translation, atol=1e-6, rtol=0, what="position")
    px2 = landmarks_from_offsets(lower_face_offsets(frame), frame, k, rot, pos)
    assert_close(px2[..., :2], px[..., :2], atol=1e-3, rtol=0, what="pixels through the pose encoder's pose")


def test_frontal_weight_falls_as_the_head_turns_away():
    from avface.stages.networks.evidence import HeadFrame, frontal_weight

    t = 5
    yaw = np.radians([0.0, 25.0, 45.0, 70.0, 0.0])
    rot = Rotation.from_rotvec(np.stack([np.zeros(t), yaw, np.zeros(t)], 1)).as_matrix()
    transl = np.tile([0.0, 0.0, -0.6], (t, 1))
    transl[4] = np.nan  # undetected
    frame = HeadFrame(np.zeros((468, 3)), 0.09, np.zeros((t, 468, 3)), rot, transl)
    assert_close(frontal_weight(frame), [1.0, 1.0, 0.5, 0.0, 0.0], atol=1e-5, what="frontal weight")
