"""Per-clip adaptation of the fine stage: its parts, its refusals, and the whole loop on a
synthetic clip whose surface carries known detail."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from avface.models.canonical_mesh import load_canonical_mesh
from avface.models.fine import DetailNet, FineNetConfig
from avface.stages.detail import fine, uvspace
from avface.stages.detail.adapt import AdaptInputs, FineAdaptConfig, _split, adapt_clip, blur_masked

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY_NET = FineNetConfig(widths=(8, 16, 16, 32, 32), audio_dim=8)


def test_blur_masked_keeps_constants_and_removes_fine_ripples():
    s = 64
    mask = torch.zeros(s, s, dtype=torch.bool)
    mask[8:56, 10:50] = True
    const = torch.full((s, s, 3), 0.4)
    out = blur_masked(const, mask, 3.0)
    assert (out[mask] - 0.4).abs().max() < 1e-6  # no darkening at the mask's border
    assert out[~mask].abs().max() == 0
    cols = torch.arange(s, dtype=torch.float32)
    ripple = 0.4 + 0.1 * torch.sin(2 * np.pi * cols / 6.0)[None, :, None].expand(s, s, 3)  # 6-texel waves
    out = blur_masked(ripple, mask, 3.0)
    inner = torch.zeros_like(mask)
    inner[20:44, 22:38] = True
    assert (out[inner] - 0.4).abs().max() < 0.01  # attenuated by exp(-2 pi^2 9 / 36) ~ 0.007


def test_split_holds_out_every_stride_th_frame():
    train, held = _split(12, 5)
    assert held.tolist() == [1, 6, 11]
    assert sorted(train.tolist() + held.tolist()) == list(range(12))
    train, held = _split(12, 0)
    assert len(held) == 0 and len(train) == 12


def _tiny_clip(n_frames=3, size=32):
    mesh = load_canonical_mesh()
    r = uvspace.rasterise_uv(mesh.uv, mesh.faces, size)
    image = torch.full((n_frames, size, size, 3), 128, dtype=torch.uint8)
    trust = torch.as_tensor(r.mask, dtype=torch.float32).expand(n_frames, size, size).clone()
    from uv_util import posed_camera_vertices

    verts = torch.as_tensor(np.stack([posed_camera_vertices(y) for y in np.linspace(-10, 10, n_frames)]),
                            dtype=torch.float32)
    return fine.ClipUV(image, trust), verts, mesh.faces, r


def test_adapt_refusals():
    clip, verts, faces, r = _tiny_clip()
    cfg = FineAdaptConfig(steps=1, net=TINY_NET)
    with pytest.raises(ValueError, match=r"\(3, 8\) audio"):
        adapt_clip(AdaptInputs(clip, verts, faces, r, torch.zeros(3, 5)), cfg)
    with pytest.raises(ValueError, match="vertex sets"):
        adapt_clip(AdaptInputs(clip, verts[:2], faces, r), cfg)
    dark = fine.ClipUV(clip.image, torch.zeros_like(clip.trust))
    with pytest.raises(ValueError, match="no frame has a trusted texel"):
        adapt_clip(AdaptInputs(dark, verts, faces, r), cfg)


def test_adapt_runs_and_carries_detail_over_untrusted_texels():
    clip, verts, faces, r = _tiny_clip()
    trust = clip.trust.clone()
    trust[2] = 0  # frame 2 entirely occluded
    clip = fine.ClipUV(clip.image, trust)
    res = adapt_clip(AdaptInputs(clip, verts, faces, r), FineAdaptConfig(steps=3, batch=2, holdout_stride=0, net=TINY_NET))
    assert res.displacement.shape == (3, 32, 32) and res.displacement.dtype == np.float32
    assert len(res.losses) == 3 and np.isfinite(res.losses).all()
    # frame 2 had no evidence: its D is frame 1's, carried (the nearest trusted frame)
    np.testing.assert_array_equal(res.displacement[2], res.displacement[1])
    assert (res.displacement[:, ~r.mask] == 0).all()


def test_a_batch_that_lost_frames_weighs_each_remaining_frame_as_a_full_one():
    """Half of every batch untrusted: with frame_weight the first step's loss (before any
    update, from the same seeded network) is half the plain batch mean, so the two frames
    left teach the network no harder than in a batch of four."""
    clip, verts, faces, r = _tiny_clip(n_frames=4)
    trust = clip.trust.clone()
    trust[2:] = 0
    clip = fine.ClipUV(clip.image, trust)
    first = {}
    for weighted in (True, False):
        cfg = FineAdaptConfig(steps=1, batch=4, holdout_stride=0, net=TINY_NET, frame_weight=weighted)
        first[weighted] = adapt_clip(AdaptInputs(clip, verts, faces, r), cfg, predict=False).losses[0]
    assert first[False] > 0 and first[True] == pytest.approx(0.5 * first[False], rel=1e-5)


@pytest.mark.slow
def test_detail_learnt_on_a_clip_explains_held_out_frames_and_ignores_a_hand():
    """The whole stage on a synthetic clip: 15 frames of the canonical face, yaw -30..30
    degrees, whose surface carries ripples of 0.4 mm, shaded under one light and rendered by
    the reference renderer; a dark hand over the mouth in frame 7, which the confidence
    marks. Paper weights, a small network, 100 steps at 96^2."""
    from uv_util import render_detail_clip

    from avface.models.canonical_mesh import lower_face_ids

    amp, cycles = 0.4e-3, 15.0

    def d_true(u, v):
        return amp * np.sin(2 * np.pi * cycles * u) * np.sin(2 * np.pi * cycles * 0.7 * v)

    n_frames = 15
    yaws = np.linspace(-30, 30, n_frames)
    pitches = 6 * np.sin(np.arange(n_frames))
    frames, verts, k = render_detail_clip(d_true, yaws, pitches, size=384, uv_size=256)
    mesh = load_canonical_mesh()
    # the hand: a dark box over the mouth in frame 7
    mouth = verts[7][list(lower_face_ids())] @ k.T
    mouth = mouth[:, :2] / mouth[:, 2:]
    (x0, y0), (x1, y1) = mouth.min(0).astype(int), mouth.max(0).astype(int)
    frames[7, y0:y1, x0:x1] = (40, 30, 25)
    r = uvspace.rasterise_uv(mesh.uv, mesh.faces, 96)
    w = np.zeros((1, len(mesh.vertices)), np.float32)
    w[0, list(lower_face_ids())] = 1.0
    region = torch.ones(n_frames, 1)
    region[7] = 0.0
    conf = uvspace.confidence_map(r, mesh.faces, w, region)
    vt = torch.as_tensor(verts)
    clip = fine.unwrap_clip(frames, vt, mesh.faces, r, k, confidence=conf)
    mirror = uvspace.mirror_texels(r, mesh.faces, mesh.vertices)
    res = adapt_clip(AdaptInputs(clip, vt, mesh.faces, r, mirror=mirror), FineAdaptConfig(steps=100, batch=2, net=TINY_NET))

    # Detail helps on frames it never trained on (measured: residual 3.46 -> 2.15 levels,
    # gain 0.38; FineLossConfig.normal_sigma_texels lists how the normal term's low-pass
    # moves it).
    assert res.held_out.tolist() == [1, 6, 11]
    assert res.detail_gain > 0.15, (res.photo_residual_coarse, res.photo_residual_detail)
    # ...because it found the ripples (measured correlation 0.37)
    uvc = uvspace.texel_centres(96)
    truth = d_true(uvc[..., 0], uvc[..., 1])
    corr = np.mean([np.corrcoef(res.displacement[t][r.mask], truth[r.mask])[0, 1] for t in range(n_frames)])
    assert corr > 0.25, corr
    # No imprint of the hand: frame 7's lower face is carried from frames 6 and 8.
    hidden = (conf[7] < 0.5).numpy() & r.mask & (clip.trust[6] >= 0.5).numpy() & (clip.trust[8] >= 0.5).numpy()
    assert hidden.sum() > 200
    carried = 0.5 * (res.displacement[6] + res.displacement[8])
    assert np.abs(res.displacement[7][hidden] - carried[hidden]).max() < 1e-9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the 512^2 path of the fine stage)")
def test_fine_stage_on_cuda_matches_the_cpu():
    """Unwrap, shading, network, normals and loss on CUDA at 512^2 give the CPU's numbers."""
    from uv_util import intrinsics, posed_camera_vertices, render_textured

    mesh = load_canonical_mesh()
    size = uvspace.default_uv_size("cuda")
    assert size == 512
    r = uvspace.rasterise_uv(mesh.uv, mesh.faces, size)
    k = intrinsics(512)
    verts = np.stack([posed_camera_vertices(y) for y in (-15.0, 15.0)]).astype(np.float32)
    frames = np.stack([np.round(255 * render_textured(v, mesh.faces, mesh.uv.astype(np.float64), k, 512)[0])
                       .astype(np.uint8) for v in verts])
    outputs = {}
    for device in ("cpu", "cuda"):
        vt = torch.as_tensor(verts, device=device)
        clip = fine.unwrap_clip(frames, vt, mesh.faces, r, k)
        net = DetailNet(seed=0).to(device)
        image = clip.frames(torch.arange(2, device=clip.image.device)).to(device)
        pts, n = uvspace.texel_geometry(r, mesh.faces, vt)
        valid = clip.trust.to(device) >= 0.5
        with torch.no_grad():
            d = net(image, n, valid, torch.zeros(2, net.cfg.audio_dim, device=device))
            nd = uvspace.detail_normals(pts, n, d, uvspace.texel_mask(r, device))
        outputs[device] = (clip.image.cpu(), clip.trust.cpu(), d.cpu(), nd.cpu())
    for a, b in zip(outputs["cpu"], outputs["cuda"]):
        if a.dtype == torch.uint8:
            assert (a.int() - b.int()).abs().max() <= 1
        else:
            assert (a.float() - b.float()).abs().max() < 1e-3 * max(1.0, float(a.float().abs().max()))
