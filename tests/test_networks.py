"""The AVFace networks (models/avnets.py, models/lip_siren.py, models/windows.py): shapes,
masking, modality dropout, window averaging, an overfit per network on a tiny synthetic
clip, silence, seeding. Everything runs on the CPU in seconds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close

from avface.core.topology import LIPS
from avface.models.avnets import (LOWER_FACE_LANDMARKS, N_LOWER_FACE, ExpressionNet, FusionConfig, PoseEncoder,
    TemporalConfig, infer_expression, infer_pose, key_padding_mask, modality_keep)
from avface.models.canonical_mesh import load_canonical_mesh
from avface.models.checkpoint import AVFaceNetworks, NetworksConfig, build_networks
from avface.models.lip_siren import LipSiren, normalise_lip_positions
from avface.models.windows import average, run_windowed, unfold, window_index

pytestmark = pytest.mark.usefixtures("torch_one_thread")

P = 41
W = 16


@pytest.fixture(scope="module")
def nets() -> AVFaceNetworks:
    return build_networks(seed=0)


def expression_inputs(b: int, w: int = W, *, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        phones=torch.softmax(torch.randn(b, w, 16, P, generator=g), -1),
        mel=torch.randn(b, w, 16, 80, generator=g),
        audio_present=torch.ones(b, w),
        landmarks=0.02 * torch.randn(b, w, N_LOWER_FACE, 3, generator=g),
        blendshapes=torch.rand(b, w, 52, generator=g),
        region_conf=torch.ones(b, w, 3),
        usable=torch.ones(b, w),
    )


# --------------------------------------------------------------------------- landmark set


def test_lower_face_landmarks_are_unique_symmetric_and_below_the_eyes():
    ids = np.asarray(LOWER_FACE_LANDMARKS)
    assert len(set(ids.tolist())) == len(ids) == 97
    assert set(LIPS) <= set(ids.tolist())
    v = load_canonical_mesh().vertices[ids]
    mirrored = v * np.array([-1.0, 1.0, 1.0])
    # every landmark has a mirror image in the set (the midline ones are their own)
    d = np.linalg.norm(mirrored[:, None] - v[None], axis=-1).min(1)
    assert d.max() < 1e-4, f"landmark without a mirror: {ids[d.argmax()]} ({d.max() * 1000:.2f} mm)"
    eye_y = load_canonical_mesh().vertices[[33, 263], 1].mean()
    assert (v[:, 1] < eye_y - 0.02).all()


# --------------------------------------------------------------------------- shapes


def test_shapes_of_every_network(nets):
    b = 3
    x = expression_inputs(b)
    nets.eval()
    assert nets.expression(**x).shape == (b, W, N_LOWER_FACE, 3)
    f_a = nets.expression.audio(x["phones"], x["mel"])
    assert f_a.shape == (b, W, 64)
    assert nets.expression.video(x["landmarks"], x["blendshapes"], x["region_conf"]).shape == (b, W, 64)
    pose, cam = nets.pose(torch.randn(b, W, 6), torch.randn(b, W, 3), torch.ones(b, W), torch.ones(b, W))
    assert pose.shape == (b, W, 6) and cam.shape == (b, W, 3)
    lips = nets.lip_offsets(torch.randn(40, 3), x["phones"], x["mel"], x["audio_present"], torch.ones(b, W))
    assert lips.shape == (b, W, 40, 3)
    # any lip count: one network serves every topology
    assert nets.lips(torch.randn(123, 3), f_a, torch.ones(b, W)).shape == (b, W, 123, 3)
    # a shorter window works (clip edges), a longer one does not
    assert nets.expression(**expression_inputs(2, 5)).shape == (2, 5, N_LOWER_FACE, 3)
    with pytest.raises(ValueError, match="positions for 16"):
        nets.expression(**expression_inputs(1, 17))


def test_bad_shapes_name_what_is_wrong(nets):
    x = expression_inputs(1)
    with pytest.raises(ValueError, match="phones"):
        nets.expression.audio(x["phones"][..., :40], x["mel"])
    with pytest.raises(ValueError, match="landmarks"):
        nets.expression.video(x["landmarks"][..., :90, :], x["blendshapes"], x["region_conf"])
    with pytest.raises(ValueError, match="pose"):
        nets.pose(torch.randn(1, W, 5), torch.randn(1, W, 3), torch.ones(1, W), torch.ones(1, W))
    with pytest.raises(ValueError, match="activity"):
        nets.lips(torch.randn(40, 3), torch.randn(1, W, 64), torch.ones(1, W + 1))
    with pytest.raises(ValueError, match="lip positions"):
        normalise_lip_positions(np.zeros((40, 2)), 0.06)
    with pytest.raises(ValueError, match="f_a"):
        FusionConfig(temporal=TemporalConfig(d_model=100))


# --------------------------------------------------------------------------- masking


def test_pose_of_an_unusable_frame_is_ignored_and_filled_from_context(nets):
    g = torch.Generator().manual_seed(1)
    pose, cam = 0.1 * torch.randn(1, W, 6, generator=g), 0.1 * torch.randn(1, W, 3, generator=g)
    usable = torch.ones(1, W)
    usable[0, 5:8] = 0
    nets.eval()
    with torch.no_grad():
        p1, c1 = nets.pose(pose, cam, usable, usable)
        pose2, cam2 = pose.clone(), cam.clone()
        pose2[0, 5:8] = 100.0  # whatever the fit made of frames without a face
        cam2[0, 5:8] = -100.0
        p2, c2 = nets.pose(pose2, cam2, usable, usable)
    assert_close(p2, p1, atol=0, rtol=0, what="pose with altered unusable frames")
    assert_close(c2, c1, atol=0, rtol=0, what="camera with altered unusable frames")
    # the filled pose depends on the context, so it is neither held nor zero
    with torch.no_grad():
        p3, _ = nets.pose(pose + 0.05, cam, usable, usable)
    assert (p3[0, 6] - p1[0, 6]).abs().max() > 1e-6


def test_padding_does_not_reach_real_frames(nets):
    x = expression_inputs(1)
    valid = torch.ones(1, W, dtype=torch.bool)
    valid[0, 10:] = False
    y = {k: v.clone() for k, v in x.items()}
    for k in ("phones", "mel", "landmarks", "blendshapes"):
        y[k][0, 10:] = y[k][0, 10:] * 3 + 1
    nets.eval()
    with torch.no_grad():
        a = nets.expression(**x, valid=valid)
        b = nets.expression(**y, valid=valid)
    assert_close(b[0, :10], a[0, :10], atol=1e-6, rtol=0, what="real frames with altered padding")


def test_absent_modality_is_exactly_zero_and_ignored(nets):
    x = expression_inputs(2)
    x["audio_present"][0] = 0
    x["usable"][1, :4] = 0
    f_a, f_v = nets.expression.embed(**x)
    assert (f_a[0] == 0).all() and (f_a[1] != 0).any()
    assert (f_v[1, :4] == 0).all() and (f_v[1, 4:] != 0).any()
    # the output of a window without audio does not depend on the audio features
    y = {k: v.clone() for k, v in x.items()}
    y["mel"][0] = torch.randn(W, 16, 80)
    nets.eval()
    with torch.no_grad():
        assert_close(nets.expression(**y)[0], nets.expression(**x)[0], atol=0, rtol=0, what="no-audio window")


def test_key_padding_mask_never_masks_a_whole_window():
    present = torch.tensor([[True, False, True], [False, False, False]])
    mask = key_padding_mask(present)
    assert mask.tolist() == [[False, True, False], [False, False, False]]


# --------------------------------------------------------------------------- modality dropout


def test_modality_dropout_zeroes_the_dropped_embedding(nets):
    x = expression_inputs(4)
    keep_a = torch.tensor([1.0, 0.0, 1.0, 0.0])
    keep_v = torch.tensor([1.0, 1.0, 0.0, 1.0])
    f_a, f_v = nets.expression.embed(**x, keep_audio=keep_a, keep_video=keep_v)
    assert (f_a[[1, 3]] == 0).all() and (f_v[2] == 0).all()
    assert (f_a[[0, 2]].abs().sum((1, 2)) > 0).all() and (f_v[[0, 1, 3]].abs().sum((1, 2)) > 0).all()
    # a dropped modality's features do not reach the output at all
    y = {k: v.clone() for k, v in x.items()}
    y["phones"][1] = torch.softmax(torch.randn(W, 16, P), -1)
    y["landmarks"][2] = torch.randn(W, N_LOWER_FACE, 3)
    nets.train()
    a = nets.expression(**x, keep_audio=keep_a, keep_video=keep_v)
    b = nets.expression(**y, keep_audio=keep_a, keep_video=keep_v)
    nets.eval()
    assert_close(b.detach(), a.detach(), atol=0, rtol=0, what="output with dropped modalities altered")


def test_modality_dropout_rates_and_never_both():
    g = torch.Generator().manual_seed(0)
    keep_a, keep_v = modality_keep(20_000, 0.4, 0.5, generator=g)
    assert ((keep_a + keep_v) > 0).all()
    # P(drop a) = 0.4 - P(both drawn) / 2 = 0.4 - 0.1 = 0.3; P(drop v) = 0.5 - 0.1 = 0.4
    assert abs(1 - keep_a.mean().item() - 0.3) < 0.015
    assert abs(1 - keep_v.mean().item() - 0.4) < 0.015


def test_training_mode_draws_dropout_and_eval_mode_does_not(nets):
    x = expression_inputs(64)
    nets.eval()
    with torch.no_grad():
        ref = nets.expression(**x)
        nets.train()
        g = torch.Generator().manual_seed(3)
        drop = nets.expression(**x, generator=g)
    nets.eval()
    changed = (drop - ref).abs().flatten(1).max(1).values > 1e-6
    assert 0.3 * 64 < changed.sum() < 0.95 * 64


# --------------------------------------------------------------------------- windows


def test_window_index_covers_every_frame_at_stride_one():
    index, valid = window_index(40)
    assert index.shape == (25, 16) and valid.all()
    assert (index[:, 1:] - index[:, :-1] == 1).all()
    counts = torch.bincount(index.reshape(-1), minlength=40)
    assert counts[0] == 1 and counts[15] == 16 and counts[39] == 1
    short, short_valid = window_index(5)
    assert short.shape == (1, 16) and short_valid.sum() == 5
    with pytest.raises(ValueError):
        window_index(0)


def test_window_average_is_identity_on_constant_input():
    for n in (1, 7, 16, 33):
        x = torch.randn(n, 4, 3)
        index, valid = window_index(n)
        windows = unfold(x, index)  # every window holds each frame's own value
        assert_close(average(windows, index, valid, n), x, atol=1e-6, rtol=0, what=f"average of {n} frames")
        const = torch.full((n, 2), 0.7)
        assert_close(average(unfold(const, index), index, valid, n), const, atol=1e-6, rtol=0, what="constant")


def test_run_windowed_batches_give_the_same_answer():
    x = torch.randn(50, 3)
    fn = lambda valid, x: x.cumsum(-1) * valid[..., None]  # noqa: E731 - per-window, position-independent
    a = run_windowed(fn, {"x": x}, 50, batch=7)
    b = run_windowed(fn, {"x": x}, 50, batch=1000)
    assert_close(a, b, atol=1e-6, rtol=0, what="batched windows")
    assert_close(a, x.cumsum(-1), atol=1e-6, rtol=0, what="per-frame function through windows")
    with pytest.raises(ValueError, match="frames"):
        run_windowed(fn, {"x": x}, 49)


def test_clip_inference_is_batched_windows_averaged(nets):
    t = 40
    x = {k: v[0].repeat(3, *([1] * (v.ndim - 2)))[:t] for k, v in expression_inputs(1).items()}
    a = infer_expression(nets.expression, x, batch=5)
    b = infer_expression(nets.expression, x, batch=512)
    assert a.shape == (t, N_LOWER_FACE, 3)
    assert_close(a, b, atol=1e-6, rtol=0, what="window batch size")
    # by hand: frame 20 is in windows starting 5..20
    index, valid = window_index(t)
    with torch.no_grad():
        per = nets.expression(**{k: unfold(v, index) for k, v in x.items()}, valid=valid)
    rows, cols = torch.nonzero(index == 20, as_tuple=True)
    assert len(rows) == 16
    assert_close(a[20], per[rows, cols].mean(0), atol=1e-6, rtol=0, what="frame 20")
    pose, cam = infer_pose(nets.pose, dict(pose=torch.zeros(t, 6), camera=torch.zeros(t, 3), usable=torch.ones(t),
                                           face_conf=torch.ones(t)), batch=4)
    assert pose.shape == (t, 6) and cam.shape == (t, 3)


# --------------------------------------------------------------------------- the lip SIREN


@torch.no_grad()
def test_siren_offsets_are_zero_in_silence(nets):
    b, t = 2, 12
    x = expression_inputs(b, t)
    pos = normalise_lip_positions(load_canonical_mesh().vertices[list(LIPS)], 0.09)
    activity = torch.zeros(b, t)
    activity[1, 6:] = 1.0
    out = nets.lip_offsets(pos, x["phones"], x["mel"], x["audio_present"], activity)
    assert (out[0] == 0).all() and (out[1, :6] == 0).all()
    assert (out[1, 6:].abs().amax((1, 2)) > 0).all()
    # nearly silent: nearly zero, in proportion
    quiet = nets.lip_offsets(pos, x["phones"], x["mel"], x["audio_present"], torch.full((b, t), 1e-3))
    loud = nets.lip_offsets(pos, x["phones"], x["mel"], x["audio_present"], torch.ones(b, t))
    assert_close(quiet, 1e-3 * loud, atol=1e-9, rtol=1e-4, what="offsets at activity 0.001")
    # no audio at all: zero too
    none = nets.lip_offsets(pos, x["phones"], x["mel"], torch.zeros(b, t), torch.ones(b, t))
    assert (none == 0).all()


def test_lip_positions_are_normalised_to_centroid_and_iod():
    p = np.random.default_rng(0).normal(size=(30, 3))
    n = normalise_lip_positions(p * 2.0 + 5.0, 2.0)
    assert_close(n.mean(0), np.zeros(3), atol=1e-6, what="centroid")
    assert_close(n, p - p.mean(0), atol=1e-5, rtol=0, what="scaled positions")


# --------------------------------------------------------------------------- seeding


def test_same_seed_same_networks_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = build_networks(seed=7), build_networks(seed=7), build_networks(seed=8)
    assert torch.equal(torch.rand(1), before), "build_networks changed the global random state"
    x = expression_inputs(2)
    for n in (a, b, c):
        n.eval()
    with torch.no_grad():
        ya, yb, yc = a.expression(**x), b.expression(**x), c.expression(**x)
    assert torch.equal(ya, yb)
    assert not torch.equal(ya, yc)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


# --------------------------------------------------------------------------- overfitting a tiny clip


def tiny_clip(t: int = 32, seed: int = 0):
    """A synthetic clip: phones in 4-frame runs, each phone its own mouth shape, log-mel that
    follows the phone, the tracker's landmarks = the mouth + noise, and a span without a face."""
    g = torch.Generator().manual_seed(seed)
    phone = torch.randint(0, P, (t // 4,), generator=g).repeat_interleave(4)
    pattern = 0.02 * torch.randn(P, N_LOWER_FACE, 3, generator=g)
    target = pattern[phone]  # (T, M, 3)
    usable = torch.ones(t)
    usable[12:20] = 0
    inputs = dict(
        phones=torch.nn.functional.one_hot(phone, P).float()[:, None].expand(t, 16, P).clone(),
        mel=0.1 * torch.randn(t, 16, 80, generator=g) + phone[:, None, None].float() / P,
        audio_present=torch.ones(t),
        landmarks=(target + 0.002 * torch.randn(t, N_LOWER_FACE, 3, generator=g)) * usable[:, None, None],
        blendshapes=torch.rand(t, 52, generator=g) * usable[:, None],
        region_conf=usable[:, None].expand(t, 3).clone(),
        usable=usable,
    )
    return inputs, target, usable


def test_expression_branch_overfits_a_tiny_clip():
    """Loss target: mean squared error below 2 % of the target's mean square (about 14 %
    RMS), on all frames and on the 8 frames without a face, where only speech can tell."""
    inputs, target, usable = tiny_clip()
    index, valid = window_index(len(target))
    win = {k: unfold(v, index) for k, v in inputs.items()}
    tgt = unfold(target, index)
    net = build_networks(seed=0).expression
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    scale = target.pow(2).mean()
    keep = torch.ones(index.shape[0])
    net.train()
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = (net(**win, valid=valid, keep_audio=keep, keep_video=keep) - tgt).pow(2).mean() / scale
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    pred = infer_expression(net, inputs)
    rel = ((pred - target).pow(2).mean() / scale).item()
    rel_hidden = ((pred - target)[usable == 0].pow(2).mean() / scale).item()
    assert rel < 0.02 and rel_hidden < 0.02, f"relative MSE {rel:.4f} (no face: {rel_hidden:.4f}), started at {first:.3f}"


def test_pose_encoder_overfits_a_tiny_clip():
    """Loss target: relative MSE below 2 % of the pose's mean square over the clip, and below
    5 % on the 6 frames without a face."""
    t = 32
    g = torch.Generator().manual_seed(0)
    s = torch.arange(t).float()
    true_pose = torch.stack([0.1 * torch.sin(s / 5), 0.05 * torch.cos(s / 7), 0.02 * torch.sin(s / 3),
                             0.03 * torch.sin(s / 6), 0.01 * s / t, 0.02 * torch.cos(s / 4)], 1)
    true_cam = torch.stack([0.1 * torch.sin(s / 8), 0.02 * torch.cos(s / 5), 0.01 * torch.sin(s / 9)], 1)
    usable = torch.ones(t)
    usable[12:18] = 0
    inputs = dict(pose=true_pose + 0.003 * torch.randn(t, 6, generator=g),
                  camera=true_cam + 0.003 * torch.randn(t, 3, generator=g), usable=usable, face_conf=usable)
    index, valid = window_index(t)
    win = {k: unfold(v, index) for k, v in inputs.items()}
    tp, tc = unfold(true_pose, index), unfold(true_cam, index)
    net = build_networks(seed=0).pose
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    scale = torch.cat([true_pose, true_cam], 1).pow(2).mean()
    for _ in range(200):
        opt.zero_grad()
        p, c = net(**win, valid=valid)
        loss = (torch.cat([p - tp, c - tc], -1)).pow(2).mean() / scale
        loss.backward()
        opt.step()
    pose, cam = infer_pose(net, inputs)
    err = torch.cat([pose - true_pose, cam - true_cam], 1).pow(2)
    rel, rel_hidden = (err.mean() / scale).item(), (err[usable == 0].mean() / scale).item()
    assert rel < 0.02 and rel_hidden < 0.05, f"relative MSE {rel:.4f} (no face: {rel_hidden:.4f})"


def test_lip_siren_overfits_a_tiny_clip():
    """Loss target: relative MSE below 1 % on a smooth speech-modulated lip field."""
    t, g = 32, torch.Generator().manual_seed(0)
    pos = normalise_lip_positions(load_canonical_mesh().vertices[list(LIPS)], 0.09)
    cond = torch.randn(1, t, 64, generator=g)
    activity = (torch.rand(1, t, generator=g) > 0.3).float()
    amp = torch.sin(torch.arange(t) / 3.0)[None]
    field = torch.stack([0.05 * pos[:, 1], 0.03 * torch.tanh(3 * pos[:, 0]), 0.1 * pos[:, 2] ** 2], 1)
    target = activity[..., None, None] * amp[..., None, None] * field  # (1, T, L, 3)
    net = LipSiren(build_networks(seed=0).config.lips)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    scale = target.pow(2).mean()
    for _ in range(200):
        opt.zero_grad()
        loss = (net(pos, cond, activity) - target).pow(2).mean() / scale
        loss.backward()
        opt.step()
    with torch.no_grad():
        rel = ((net(pos, cond, activity) - target).pow(2).mean() / scale).item()
    assert rel < 0.01, f"relative MSE {rel:.5f}"
    assert isinstance(net, torch.nn.Module) and NetworksConfig().lips == net.config


def test_expression_net_alone_matches_the_bundle():
    cfg = NetworksConfig()
    assert isinstance(build_networks(cfg).expression, ExpressionNet)
    assert isinstance(build_networks(cfg).pose, PoseEncoder)
