"""The networks stage of `reconstruct` (docs/networks.md): a tiny checkpoint trained in the test for a
few steps, on a short synthetic clip with speech and a hand over the mouth. The result holds
a lip basis, validates and round-trips; the same seed gives the same result; a missing
checkpoint is the ModelFileError; the fit without networks is the video-only one."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_train import training_clip

from avface.config import NetworksStageConfig, ReconstructOptions
from avface.errors import ModelFileError
from avface.pipeline import reconstruct
from avface.result import load_result, validate, write_result
from avface.train.loop import TrainConfig, train

# reconstruct end to end with trained networks: `make test`, not `make check`
pytestmark = [pytest.mark.usefixtures("torch_one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """3.4 s: long enough for adaptation to hold a part out (its last fifth: 17 frames)."""
    from avface.synth import make_demo_clip

    return make_demo_clip(tmp_path_factory.mktemp("clip"), seed=2, duration_s=3.4, size=256)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "tiny.pt"
    train([training_clip(40, 0), training_clip(30, 1)], path, TrainConfig(steps=5, batch=4, lr=1e-3, save_every=0))
    return path


def _options(clip, tmp_path, checkpoint=None, **networks) -> ReconstructOptions:
    fov = math.degrees(2 * math.atan(clip.height / 2.0 / clip.K[1, 1]))
    return ReconstructOptions(fov_deg=fov, cache_dir=str(tmp_path.parent / "cache"), detail=False,  # tests/test_detail_stage.py
                              networks_checkpoint=str(checkpoint) if checkpoint else None,
                              networks=NetworksStageConfig(adapt_steps=4, **networks))


def test_result_with_lips_validates_round_trips_and_repeats(clip, checkpoint, tmp_path):
    path = reconstruct(clip.video_path, tmp_path / "a", _options(clip, tmp_path, checkpoint))
    meta = validate(path)
    r = load_result(path)
    a = r.arrays
    assert "networks" in meta["stages_run"] and meta["stage_seconds"]["networks"] > 0
    assert "lips" in meta["stages_run"] and meta["stage_seconds"]["lips"] > 0
    # the field of view the caller gave is used as given, not estimated
    assert meta["camera"]["estimated"] is False
    assert meta["camera"]["fov_deg"] == pytest.approx(math.degrees(2 * math.atan(clip.height / 2.0 / clip.K[1, 1])), abs=0.01)
    net = meta["networks"]
    assert net["checkpoint_sha256"] and net["lips"] and net["adapt"]["steps"] == 4
    assert len(net["adapt"]["train_losses"]) == 4 and all(math.isfinite(v) for v in net["adapt"]["train_losses"])
    # the closed-form adaptation chose the fill on hidden trusted frames, and says so
    readout = net["readout"]
    assert readout["hidden_frames"] > 0 and readout["choice"] == min(readout["scores"], key=readout["scores"].get)
    assert {"interp", "network"} <= set(readout["scores"]) and any(n.startswith("ridge") for n in readout["scores"])
    # the frames whose mouth the speech carried: not seen, speech active, and not the straight line
    unseen = a["visual_conf"] < 0.5  # 0 where no face was found
    carried = unseen & (a["speech_activity"] > 0.5) & (readout["choice"] != "interp")
    assert net["audio_frames"] == int(carried.sum())
    k = a["lip_basis"].shape[0]
    assert 0 <= k <= 16 and a["lip_coeffs"].shape == (meta["n_frames"], k)
    # the SIREN's gain was chosen on the hidden spans, and the lips are in the result iff it is not 0
    assert readout["lip_gain"] == float(min(readout["lip_scores"], key=readout["lip_scores"].get))
    assert (k > 0) == (readout["lip_gain"] > 0)
    assert np.isfinite(a["vertices"].astype(np.float32)).all() and meta["lip_pca_residual"] >= 0
    # the lips are in the mesh: vertices differ from the coarse mesh on lip vertices only
    # where the SIREN speaks (an untrained SIREN's offsets are small but not zero)
    lips = a["lip_vertex_ids"]
    rest = np.einsum("tk,klc->tlc", a["lip_coeffs"], a["lip_basis"])
    silent = a["speech_activity"] == 0
    if silent.any() and k:
        assert np.abs(rest[silent]).max() < 1e-6  # exactly zero in silence, up to the PCA
    # round trip through the writer and reader
    again = write_result(tmp_path / "copy.npz", a, meta)
    b = load_result(again).arrays
    for key in ("lip_basis", "lip_coeffs", "vertices", "lip_vertex_ids"):
        assert np.array_equal(a[key], b[key]), key
    # the same seed, the same result
    path2 = reconstruct(clip.video_path, tmp_path / "b", _options(clip, tmp_path, checkpoint))
    c = load_result(path2).arrays
    for key in ("lip_basis", "lip_coeffs", "vertices", "expression", "jaw", "global_rot"):
        assert np.array_equal(a[key], c[key]), key
    assert load_result(path2).meta["networks"]["adapt"] == net["adapt"]
    assert load_result(path2).meta["networks"]["readout"] == readout
    assert len(lips) == a["lip_basis"].shape[1]


def test_lips_without_adaptation_are_where_the_mouth_is_not_seen(clip, checkpoint, tmp_path):
    path = reconstruct(clip.video_path, tmp_path / "a", _options(clip, tmp_path, checkpoint, adapt=False))
    meta = validate(path)
    a = load_result(path).arrays
    k = a["lip_basis"].shape[0]
    assert meta["networks"]["readout"] is None and 1 <= k <= 16
    rest = np.linalg.norm(np.einsum("tk,klc->tlc", a["lip_coeffs"], a["lip_basis"]), axis=-1).max(1)
    seen = a["visual_conf"] >= 1.0
    assert rest.max() > 0 and seen.any()
    assert rest[seen].max() < 1e-3 * rest.max()  # fully seen mouths keep the tracker's lips


def test_without_lips_or_adaptation(clip, checkpoint, tmp_path):
    path = reconstruct(clip.video_path, tmp_path / "a", _options(clip, tmp_path, checkpoint, lips=False, adapt=False))
    meta = validate(path)
    a = load_result(path).arrays
    assert a["lip_basis"].shape[0] == 0 and meta["networks"]["adapt"] is None and not meta["networks"]["lips"]
    assert meta["networks"]["readout"] is None


def test_missing_checkpoint_stops_before_any_work(clip, tmp_path):
    with pytest.raises(ModelFileError, match="not found.*avface.train"):
        reconstruct(clip.video_path, tmp_path / "a", _options(clip, tmp_path, tmp_path / "nope.pt"))
    assert not (tmp_path / "a" / "result.npz").exists()


def test_damaged_checkpoint_is_refused(clip, checkpoint, tmp_path):
    bad = tmp_path / "bad.pt"
    data = bytearray(checkpoint.read_bytes())
    bad.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ModelFileError, match="damaged"):
        reconstruct(clip.video_path, tmp_path / "a", _options(clip, tmp_path, bad))


def test_rest_frame_offsets_are_what_skinning_turns_into_the_head_frame_offsets():
    """A rest-frame lip offset added before skinning moves the posed vertex by exactly
    posed_displacement; rest_frame_offsets inverts the head-frame part of it."""
    from scipy.spatial.transform import Rotation

    from avface.models.canonical import CanonicalModel
    from avface.models.canonical_mesh import load_canonical_mesh
    from avface.stages.lips import posed_displacement, rest_frame_offsets

    rng = np.random.default_rng(0)
    neutral = load_canonical_mesh().vertices.astype(np.float32)
    model = CanonicalModel(neutral)
    t, lips = 5, np.asarray(model.lip_vertex_ids)
    p = model.zero_params(t)
    p.global_orient[:] = torch.as_tensor(rng.normal(0, 0.3, (t, 3)), dtype=torch.float32)
    p.jaw_pose[:, 0] = torch.as_tensor(rng.uniform(0, 0.3, t), dtype=torch.float32)
    p.transl[:] = torch.as_tensor(rng.normal(0, 0.1, (t, 3)), dtype=torch.float32)
    rest = rng.normal(0, 2e-3, (t, len(lips), 3))
    moved = []
    with torch.no_grad():
        base = model.forward(p).vertices.numpy().astype(np.float64)
        for i in range(t):
            shifted = neutral.copy()
            shifted[lips] += rest[i].astype(np.float32)
            pi = type(p)(*(getattr(p, f)[i:i + 1] for f in p.__dataclass_fields__))
            moved.append(CanonicalModel(shifted).forward(pi).vertices.numpy()[0])
    want = np.stack(moved)[:, lips] - base[:, lips]
    got = posed_displacement(model, p, rest)
    assert np.abs(got - want).max() < 2e-6
    head = Rotation.from_rotvec(p.global_orient.numpy()).as_matrix()
    head_frame = np.einsum("tba,tlb->tla", head, got)  # world -> head frame
    assert np.abs(rest_frame_offsets(model, p, head_frame) - rest).max() < 1e-9


# --------------------------------------------------------------------------- benchmark methods


def test_bench_methods_run_and_give_finite_meshes(clip, checkpoint, tmp_path, monkeypatch):
    from avface import media
    from avface.bench.methods import MethodInput, get_method, load_plugins, run_method
    from avface.config import FitConfig
    from avface.stages.audio import extract_features
    from avface.stages.confidence import visual_confidence
    from avface.stages.tracking import track

    load_plugins()
    info = media.probe(clip.video_path)
    tracking = track(info, 0, info.n_frames, cache_dir=tmp_path / "cache")
    wave = media.read_audio(clip.video_path)
    features = extract_features(wave, media.SAMPLE_RATE_HZ, tracking.n_frames, info.fps)
    conf, occluded = visual_confidence(tracking)
    fov = math.degrees(2 * math.atan(clip.height / 2.0 / clip.K[1, 1]))
    inp = MethodInput("synth", "clean", tracking, features, wave, info.fps, FitConfig(fov_deg=fov), conf, occluded)

    monkeypatch.setenv("AVFACE_BENCH_NETWORKS", "none")
    with pytest.raises(ModelFileError, match="AVFACE_BENCH_NETWORKS"):
        run_method(get_method("av"), inp)

    monkeypatch.setenv("AVFACE_BENCH_NETWORKS", str(checkpoint))
    monkeypatch.setenv("AVFACE_BENCH_ADAPT_STEPS", "2")
    coarse = run_method(get_method("interp"), inp).vertices
    outs = {}
    for name in ("audio_only", "av", "av_lips"):
        m = get_method(name)
        assert "networks" in m.stages and "audio" in m.stages
        outs[name] = run_method(m, inp)
        v = outs[name].vertices
        assert v.shape == coarse.shape and np.isfinite(v).all(), name
        # a head where the coarse fit puts it: within 2 cm everywhere
        assert np.abs(v - coarse).max() < 0.02, (name, np.abs(v - coarse).max())
    # the lips are what av_lips adds to av (without adaptation, which may choose no lips, and
    # would choose them alike for both)
    monkeypatch.setenv("AVFACE_BENCH_ADAPT", "0")
    av, av_lips = run_method(get_method("av"), inp), run_method(get_method("av_lips"), inp)
    lips = av_lips.fit.model.lip_vertex_ids
    other = np.setdiff1d(np.arange(468), lips)
    assert np.array_equal(av_lips.vertices[:, other], av.vertices[:, other])
    assert np.abs(av_lips.vertices[:, lips] - av.vertices[:, lips]).max() > 0
    lips_adapted = outs["av_lips"].vertices[:, lips] - outs["av"].vertices[:, lips]
    assert np.array_equal(outs["av_lips"].vertices[:, other], outs["av"].vertices[:, other])
    assert np.isfinite(lips_adapted).all()


def test_preview_marks_the_frames_the_audio_carried():
    from avface.stages.preview import AUDIO_LIPS_RGB, LIPS_RGB, draw_mesh

    frame = np.zeros((120, 160, 3), np.uint8)
    pts = np.array([[40.0, 40.0], [120.0, 40.0], [80.0, 100.0]])
    faces = np.array([[0, 2, 1]])
    edges = np.array([[0, 1], [1, 2], [2, 0]])
    plain = draw_mesh(frame, pts, faces, edges, "7: occluded")
    carried = draw_mesh(frame, pts, faces, edges, "7: occluded - mouth from the audio", AUDIO_LIPS_RGB)
    has = lambda img, rgb: bool((np.abs(img.astype(int) - np.array(rgb)).sum(-1) < 30).any())  # noqa: E731
    assert has(plain, LIPS_RGB) and not has(plain, AUDIO_LIPS_RGB)
    assert has(carried, AUDIO_LIPS_RGB) and not has(carried, LIPS_RGB)
