"""Training of the networks (backend/train/): losses, training occluders, the loop, and
data parallelism under torchrun (2 CPU processes match one)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import assert_close
from test_evidence import talking_head
from test_fit import FOV, H, W, synthetic_tracking

from avface.core.geometry import intrinsics_for
from avface.core.topology import LIPS
from avface.models.avnets import LOWER_FACE_LANDMARKS
from avface.models.checkpoint import load_checkpoint
from avface.train import losses as L
from avface.train.data import load_clip, prepare_clip, save_clip
from avface.train.loop import TrainConfig, make_batch, make_sample, train
from avface.train.occluders import SHAPES, OccluderConfig, OccluderTrack, face_points_2d, occlude_window, paste, random_track, region_cover

pytestmark = pytest.mark.usefixtures("torch_one_thread")

REPO = Path(__file__).resolve().parents[1]


def fake_features(t: int, seed: int):
    """Speech features with phones in 4-frame runs and speech on two thirds of the frames."""
    rng = np.random.default_rng(seed)
    phone = np.repeat(rng.integers(2, 41, (t + 3) // 4), 4)[:t]
    phones = np.zeros((t, 16, 41), np.float32)
    phones[np.arange(t), :, phone] = 1.0
    activity = (np.arange(t) % 12 < 8).astype(np.float32)
    mel = (rng.normal(size=(t, 16, 80)) + phone[:, None, None] / 10.0).astype(np.float32)
    return SimpleNamespace(mel=mel, phones=phones, activity=activity)


def training_clip(t: int = 40, seed: int = 0) -> dict:
    k = intrinsics_for(W, H, FOV)
    world, _, _ = talking_head(t=t, seed=seed)
    det = np.ones(t, bool)
    det[20:23] = False
    tracking = synthetic_tracking(world, k, det)
    tracking.blendshapes[:] = np.random.default_rng(seed).random((t, 52))
    return prepare_clip(tracking, fake_features(t, seed), fov_deg=FOV)


@pytest.fixture(scope="module")
def clips() -> list[dict]:
    return [training_clip(40, 0), training_clip(30, 1)]


# --------------------------------------------------------------------------- losses


def test_prepared_clip_and_reprojection_agree(clips):
    """The pose the evidence gives, put through the reprojection loss, lands on the
    tracker's rigid points: under 1 % of the inter-ocular distance."""
    c = clips[0]
    det = c["usable"] > 0
    tt = lambda a: torch.as_tensor(np.asarray(a))[None]  # noqa: E731
    loss = L.reprojection_loss(tt(c["pose"]), tt(c["rigid_points"]), tt(c["origin"]), tt(c["depth"]),
                               tt(c["focal"]), tt(c["rigid_px"]), tt(c["iod_px"]), tt(det.astype(np.float32)))
    per_frame_pct2 = loss.item() * len(det) / det.sum()
    assert per_frame_pct2 < 1.0, f"mean squared reprojection error {per_frame_pct2:.3f} %^2 of the IOD"
    # a wrong pose is far off
    bad = torch.as_tensor(c["pose"]).clone()[None]
    bad[..., 1] += 0.1
    assert L.reprojection_loss(bad, tt(c["rigid_points"]), tt(c["origin"]), tt(c["depth"]), tt(c["focal"]),
                               tt(c["rigid_px"]), tt(c["iod_px"]), tt(det.astype(np.float32))) > 10 * loss
    assert c["lip_positions"].shape == (40, 3) and abs(c["lip_positions"].mean()) < 1e-6


def test_landmark_terms():
    g = torch.Generator().manual_seed(0)
    target = 0.02 * torch.randn(2, 16, 97, 3, generator=g)
    trust = torch.ones(2, 16)
    assert L.landmark_loss(target, target, trust) == 0
    assert L.mouth_closure_loss(target, target, trust) == 0
    # a rigid shift of the whole lower face keeps every distance: no closure or corner loss
    shifted = target + torch.tensor([0.01, -0.02, 0.005])
    assert L.mouth_closure_loss(shifted, target, trust) < 1e-8
    assert L.lip_corner_loss(shifted, target, trust) < 1e-8
    assert L.landmark_loss(shifted, target, trust) > 1.0
    # opening the mouth by 1 % IOD at the inner centre is seen by the closure term
    pos = {lid: i for i, lid in enumerate(LOWER_FACE_LANDMARKS)}
    opened = target.clone()
    opened[..., pos[14], 1] -= 0.01
    assert L.mouth_closure_loss(opened, target, trust) > 0.05
    # untrusted frames do not count
    half = torch.ones(2, 16)
    half[:, 8:] = 0
    noisy = target.clone()
    noisy[:, 8:] += 1.0
    assert L.landmark_loss(noisy, target, half) == 0


def test_siren_and_silence_terms():
    target = 0.02 * torch.randn(1, 16, 97, 3)
    idx = L.lip_indices()
    assert [LOWER_FACE_LANDMARKS[i] for i in idx] == list(LIPS)
    coarse = target.clone()
    coarse[..., idx, :] += 0.01
    fix = -0.01 * torch.ones(1, 16, 40, 3)
    assert L.siren_lip_loss(coarse, fix, target, torch.ones(1, 16)) < 1e-8
    act = torch.zeros(1, 16)
    act[:, :8] = 1
    assert L.silence_loss(fix * act[..., None, None], act) == 0
    assert L.silence_loss(fix, act) > 0


# --------------------------------------------------------------------------- occluders


def test_every_occluder_shape_is_a_closed_outline_near_the_mouth():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        tr = random_track(rng, 16)
        seen.add(tr.shape)
        assert tr.outlines.shape == (16, 48, 2) and np.isfinite(tr.outlines).all()
        mouth = face_points_2d()[list(LIPS)].mean(0)
        assert np.linalg.norm(tr.outlines.mean(1)[0] - mouth) < 2.0
    assert seen == set(SHAPES)


def test_cover_is_measured_as_the_detector_measures_it():
    mouth = face_points_2d()[list(LIPS)]
    c = mouth.mean(0)
    a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    r = np.abs(mouth - c).max() * 1.6
    over_mouth = (c + r * np.stack([np.cos(a), np.sin(a)], 1))[None]
    cover = region_cover(over_mouth)
    assert cover[0, 0] == 1.0 and cover[0, 1] == 0.0 and 0.05 < cover[0, 2] < 0.5
    far = over_mouth + 10.0
    assert (region_cover(far) == 0).all()


def test_occluded_window_looks_as_the_detector_would_report_it(clips):
    c = clips[0]
    inputs = {k: c[k][:16].copy() for k in ("phones", "mel", "audio_present", "landmarks", "blendshapes",
                                            "region_conf", "usable")}
    mouth = face_points_2d()[list(LIPS)].mean(0)
    a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    outline = mouth + 0.6 * np.stack([np.cos(a), np.sin(a)], 1)
    track = OccluderTrack(np.repeat(outline[None], 16, 0), "ellipse", "solid", np.array([200, 150, 120], np.uint8), 0)
    before = {k: v.copy() for k, v in inputs.items()}
    out = occlude_window(inputs, track, np.random.default_rng(0))
    for k, v in before.items():
        assert np.array_equal(inputs[k], v), f"clean {k} was modified"
    assert (out["region_conf"][:, 0] == 0).all()  # mouth fully covered
    assert (out["region_conf"][:, 1] == before["region_conf"][:, 1]).all()  # eyes free
    lips = [list(LOWER_FACE_LANDMARKS).index(i) for i in LIPS]
    assert not np.allclose(out["landmarks"][:, lips], before["landmarks"][:, lips])
    jaw_far = list(LOWER_FACE_LANDMARKS).index(132)  # the jaw line's far end: not under it
    assert np.array_equal(out["landmarks"][:, jaw_far], before["landmarks"][:, jaw_far])
    assert (out["usable"] == 1).all()
    # a face-sized occluder makes the detector lose the face
    big = OccluderTrack(np.repeat((face_points_2d().mean(0) + 3.0 * np.stack([np.cos(a), np.sin(a)], 1))[None], 16, 0),
                        "ellipse", "solid", np.zeros(3, np.uint8), 0)
    lost = occlude_window(inputs, big, np.random.default_rng(0), OccluderConfig())
    assert (lost["usable"] == 0).all() and (lost["landmarks"] == 0).all() and (lost["region_conf"] == 0).all()


def test_paste_draws_the_occluder_on_the_face_only_inside_its_outline():
    rng = np.random.default_rng(3)
    frame = np.full((120, 160, 3), 90, np.uint8)
    # the canonical face's points placed in the frame: 40 px per inter-ocular distance
    pts = face_points_2d() * np.array([40.0, -40.0]) + np.array([80.0, 60.0])
    for texture in ("solid", "skin", "noise", "stripes"):
        tr = dataclass_replace(random_track(rng, 4), texture=texture)
        out = paste(frame, tr.outlines[0], pts, tr)
        changed = np.any(out != frame, axis=-1)
        assert changed.any(), texture
        z = tr.outlines[0]
        centre_px = np.round(z.mean(0) * np.array([40.0, -40.0]) + np.array([80.0, 60.0])).astype(int)
        # far outside the outline the frame is untouched
        extent = np.linalg.norm(z - z.mean(0), axis=1).max() * 40 + 3
        yy, xx = np.mgrid[:120, :160]
        outside = np.hypot(xx - centre_px[0], yy - centre_px[1]) > extent
        assert not changed[outside].any(), texture
    # the same track draws the same pixels
    tr = random_track(np.random.default_rng(5), 4)
    assert np.array_equal(paste(frame, tr.outlines[1], pts, tr), paste(frame, tr.outlines[1], pts, tr))


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


# --------------------------------------------------------------------------- the loop


def test_samples_are_the_same_whoever_draws_them(clips):
    cfg = TrainConfig(batch=4)
    a = make_sample(clips, cfg, step=3, index=2)
    b = make_sample(clips, cfg, step=3, index=2)
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
    whole = make_batch(clips, cfg, 3)
    halves = [make_batch(clips, cfg, 3, rank=r, world=2) for r in (0, 1)]
    for k in whole:
        assert torch.equal(whole[k], torch.cat([h[k] for h in halves])), k
    assert whole["landmarks"].shape == (4, 16, 97, 3) and whole["valid"].dtype == torch.bool


def test_training_lowers_the_loss(clips, tmp_path):
    cfg = TrainConfig(steps=30, batch=4, lr=1e-3)
    history = train(clips, tmp_path / "ck.pt", cfg)
    first = np.mean([h["landmarks"] for h in history[:5]])
    last = np.mean([h["landmarks"] for h in history[-5:]])
    assert last < 0.7 * first, f"landmark loss {first:.3f} -> {last:.3f}"
    ck = load_checkpoint(tmp_path / "ck.pt")
    assert ck.meta["steps"] == 30 and ck.meta["processes"] == 1


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "tests"))
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one(clips, tmp_path):
    """DDP with gloo on 2 CPU processes, global batch 4, 3 steps of plain SGD: every weight
    within 1e-6 of the single-process run's, while training moved some by over 1e-3. (SGD,
    because Adam divides each step by the gradient's own size: an attention key bias, whose
    true gradient is zero, then steps by the learning rate on rounding noise, in either run.)"""
    paths = []
    for i, c in enumerate(clips):
        save_clip(tmp_path / f"clip{i}.npz", c)
        paths.append(str(tmp_path / f"clip{i}.npz"))
    common = paths + ["--steps", "3", "--batch", "4", "--lr", "2e-6", "--optimizer", "sgd", "--threads", "1"]
    one = _run([sys.executable, "-m", "avface.train", *common, "-o", "one.pt"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    # `python -m torch.distributed.run` is torchrun, run by this interpreter (a venv's torchrun
    # script may name another one in its first line)
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    two = _run([*torchrun, "--standalone", "--nproc-per-node", "2", "-m", "avface.train", *common, "-o", "two.pt"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "one.pt"), load_checkpoint(tmp_path / "two.pt")
    assert a.meta["processes"] == 1 and b.meta["processes"] == 2
    sa, sb = a.networks.state_dict(), b.networks.state_dict()
    for k in sa:
        assert_close(sb[k], sa[k], atol=1e-6, rtol=0, what=k)
    # the weights did move, so the comparison is not empty
    from avface.models.checkpoint import build_networks

    init = build_networks(seed=0).state_dict()
    moved = max(float((sa[k] - init[k]).abs().max()) for k in sa)
    assert moved > 1e-3, "training did not change the weights; the comparison would be empty"


def test_bad_training_clip_is_a_clear_error(tmp_path):
    np.savez(tmp_path / "bad.npz", usable=np.ones(3))
    with pytest.raises(Exception) as info:
        load_clip(tmp_path / "bad.npz")
    assert "lacks" in str(info.value)
    r = _run([sys.executable, "-m", "avface.train", str(tmp_path / "bad.npz"), "-o", "x.pt", "--steps", "1"], tmp_path)
    assert r.returncode == 2 and "is not a training clip" in r.stderr


def test_resumed_training_equals_an_uninterrupted_run(clips, tmp_path):
    import cv2

    from avface.errors import InputError
    from avface.train.loop import plot_path, state_path

    cfg = TrainConfig(steps=6, batch=2, lr=1e-3, save_every=0)
    straight = train(clips, tmp_path / "a.pt", cfg)
    first = train(clips, tmp_path / "b.pt", TrainConfig(steps=3, batch=2, lr=1e-3, save_every=0))
    assert state_path(tmp_path / "b.pt").is_file()
    resumed = train(clips, tmp_path / "b.pt", cfg)
    assert len(first) == 3 and len(resumed) == 6 and resumed[:3] == first
    assert_close([h["total"] for h in resumed], [h["total"] for h in straight], atol=0, rtol=1e-5, what="losses")
    a, b = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt")
    for k, v in a.networks.state_dict().items():
        assert_close(b.networks.state_dict()[k], v, atol=1e-6, rtol=0, what=k)
    assert b.meta["steps"] == 6
    img = cv2.imread(str(plot_path(tmp_path / "b.pt")))
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 100
    # another run's options are refused, naming what changed
    with pytest.raises(InputError, match="lr"):
        train(clips, tmp_path / "b.pt", TrainConfig(steps=8, batch=2, lr=2e-3, save_every=0))


@pytest.mark.shared
@pytest.mark.slow
def test_prepare_a_folder_of_real_clips(shared_data, tmp_path):
    """GRID's 3-second clip: tracked, heard and kept as a training clip that trains."""
    from avface.train.prepare import prepare_folder

    src = tmp_path / "clips"
    src.mkdir()
    (src / "grid.mpg").symlink_to(shared_data / "lipnet-grid" / "id2_vcd_swwp2s.mpg")
    files = prepare_folder(src, tmp_path / "prepared", cache_dir=tmp_path / "cache")
    assert [f.name for f in files] == ["grid.npz"]
    clip = load_clip(files[0])
    assert len(clip["usable"]) == 75 and clip["usable"].mean() == 1.0
    assert clip["audio_present"].all() and 0.2 < clip["activity"].mean() < 0.9
    # the mouth moves in the offsets: the inner-lip opening spans over 5 % of the IOD
    ids = list(LOWER_FACE_LANDMARKS)
    opening = clip["landmarks"][:, ids.index(14), 1] - clip["landmarks"][:, ids.index(13), 1]
    assert np.ptp(opening) > 0.05
    # a second call keeps the prepared file
    mtime = files[0].stat().st_mtime_ns
    prepare_folder(src, tmp_path / "prepared", cache_dir=tmp_path / "cache")
    assert files[0].stat().st_mtime_ns == mtime


def test_random_text_varies_and_fills_the_clip():
    from avface.train.synthetic import random_text

    a = random_text(np.random.default_rng(0), 6.0)
    b = random_text(np.random.default_rng(1), 6.0)
    assert a != b and a == random_text(np.random.default_rng(0), 6.0)
    assert 14 <= len(a.split()) <= 30


@pytest.mark.slow
def test_synthetic_corpus_is_a_folder_of_clips(tmp_path):
    """One short synthetic clip: a manifest the clip discovery reads, a video with speech."""
    from avface.core.clips import discover_clips
    from avface.media import probe
    from avface.train.synthetic import make_corpus

    manifest = make_corpus(tmp_path / "corpus", 1, seed=3, duration_s=1.6, size=160)
    clips = discover_clips(manifest.parent)
    assert len(clips) == 1 and clips[0].video.is_file()
    info = probe(clips[0].video)
    assert info.has_audio and info.width == 160 and abs(info.n_frames - 40) <= 1
    mtime = clips[0].video.stat().st_mtime_ns
    make_corpus(tmp_path / "corpus", 1, seed=3, duration_s=1.6, size=160)  # kept, not rendered again
    assert clips[0].video.stat().st_mtime_ns == mtime
