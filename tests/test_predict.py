"""Running the networks on a clip (backend/predict.py)."""
from __future__ import annotations

import numpy as np
import torch
from test_evidence import talking_head
from test_fit import FOV, H, W, synthetic_tracking
from test_train import fake_features

from avface.core.geometry import intrinsics_for
from avface.models.avnets import LOWER_FACE_LANDMARKS, N_LOWER_FACE
from avface.models.canonical import CanonicalModel
from avface.models.checkpoint import build_networks
from avface.stages.networks.evidence import build_evidence, lower_face_offsets
from avface.stages.networks.predict import predict


def test_prediction_shapes_silence_and_repeatability():
    torch.set_num_threads(1)
    t = 30
    k = intrinsics_for(W, H, FOV)
    world, _, _ = talking_head(t=t)
    det = np.ones(t, bool)
    det[10:14] = False
    tracking = synthetic_tracking(world, k, det)
    ev = build_evidence(tracking, fake_features(t, 0), fov_deg=FOV)
    model = CanonicalModel()
    lips = model.neutral_vertices()[model.lip_vertex_ids]
    nets = build_networks(seed=0)
    p = predict(nets, ev, k, lip_positions=lips)
    assert p.offsets.shape == (t, N_LOWER_FACE, 3) and p.pose.shape == (t, 6) and p.camera.shape == (t, 3)
    assert p.landmarks.shape == (t, 468, 3) and np.isfinite(p.landmarks).all()  # undetected frames too
    assert p.lip_offsets.shape == (t, len(lips), 3)
    silent = ev.activity.numpy() == 0
    assert silent.any() and (p.lip_offsets[silent] == 0).all() and np.abs(p.lip_offsets[~silent]).max() > 0
    # untrained, the pose encoder's residual is small (its output is scaled by 0.1), so the
    # posed neutral's nose tip lands within a few per cent of the IOD of the tracker's
    ids = list(LOWER_FACE_LANDMARKS)
    iod_px = np.linalg.norm(tracking.landmarks[det][:, 33, :2] - tracking.landmarks[det][:, 263, :2], axis=-1)
    err = np.linalg.norm(p.landmarks[det][:, 1, :2] - tracking.landmarks[det][:, 1, :2], axis=-1) / iod_px
    assert err.max() < 0.05
    again = predict(nets, ev, k, lip_positions=lips)
    assert np.array_equal(again.landmarks, p.landmarks) and np.array_equal(again.lip_offsets, p.lip_offsets)
    assert lower_face_offsets(ev.frame).shape == p.offsets.shape and len(ids) == N_LOWER_FACE
