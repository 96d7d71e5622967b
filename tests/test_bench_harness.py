"""``avface bench`` end to end on tiny generated clips: it writes metrics.json (schema v1),
report.md and the plots; a method that returns the ground truth scores zero error; the
occluder in the variant video really covers the true lips; and a second run with the same
seed gives the same occlusions and the same figures."""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil

import numpy as np
import pytest

from avface import media
from avface.bench import occluders as O
from avface.bench.cli import register
from avface.bench.harness import SCHEMA_VERSION, BenchConfig, is_timing_metric, run_bench
from avface.bench.methods import MethodOutput, register_method, unregister_method
from avface.cli import main as avface_main
from avface.core.topology import LIPS

# the benchmark end to end on synthetic clips: `make test`, not `make check`
pytestmark = pytest.mark.slow

SEED = 3
CLIP_S = 1.6
SIZE = 224
REQUIRED = ("nme_visible", "nme_lips_visible", "auc_visible", "lip_err_occluded", "lip_err_occluded_ratio",
            "lip_err_audio_only", "rtf_tracking", "rtf_total", "ratio_to_tracking", "peak_rss_mb")


def _gt_method(truths: dict):
    """A method that returns the ground truth of the clip, whatever the variant shows."""

    def run(inp):
        if inp.clip_id not in truths:
            from avface.synth import load_demo_gt

            c = load_demo_gt(truths["_synth_dir"] / inp.clip_id)
            truths[inp.clip_id] = (c.gt_vertices, c.K)
        v, k = truths[inp.clip_id]
        return MethodOutput(np.asarray(v[:inp.tracking.n_frames], np.float32), np.asarray(k))

    return run


def _still_method(truths: dict):
    """A method that ignores the video: the ground truth's first frame on every frame, the
    same on the clean clip and every variant."""
    truth = _gt_method(truths)

    def run(inp):
        out = truth(inp)
        return MethodOutput(np.repeat(out.vertices[:1], len(out.vertices), axis=0), out.intrinsics)

    return run


DETAIL_S = 16


def _detail_method(truths: dict):
    """A method with a fine stage whose figures are known: D is 0.1 mm over the mouth on the
    clean clip and 0.3 mm on the hand variant's occluded frames (an imprint of ratio 3), and
    the held-out residual goes 10 -> 8 levels (gain 0.2)."""
    from avface.bench.metrics import DetailFigures

    truth = _gt_method(truths)

    def run(inp):
        out = truth(inp)
        assert inp.video is not None and inp.video.is_file(), "a method sees its variant's video"
        n = len(out.vertices)
        mouth = np.zeros((DETAIL_S, DETAIL_S), bool)
        mouth[10:14, 5:11] = True
        d = np.where(mouth, 1e-4, 0.0)[None].repeat(n, 0).astype(np.float32)
        if inp.variant == "hand":
            d[inp.occluded | ~inp.tracking.detected] *= 3.0
        grey = np.full((DETAIL_S, DETAIL_S, 3), 128, np.uint8)
        out.detail = DetailFigures(d, mouth, 10.0, 8.0, n // 5, (1, grey, grey))
        return out

    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from avface.synth import make_demo_clip

    root = tmp_path_factory.mktemp("bench")
    clip = make_demo_clip(root / "clips" / "talk", seed=5, duration_s=CLIP_S, size=SIZE, occluder=False)
    truths = {"demo": (clip.gt_vertices, clip.K), "_synth_dir": root / "out1" / "synth"}
    register_method("ground_truth", description="returns the ground truth (test only)")(_gt_method(truths))
    # a method blind to the video, measured against coarse_video's clean mesh (test only)
    register_method("still_face", description="the first frame's truth on every frame (test only)",
                    reference="coarse_video")(_still_method(truths))
    register_method("fake_detail", description="the truth, with known detail figures (test only)")(_detail_method(truths))
    try:
        cfg = BenchConfig(seed=SEED, methods=("tracker", "coarse_video", "interp", "ground_truth", "still_face",
                                              "fake_detail"), synth_clips=1,
                          synth_duration_s=CLIP_S, synth_size=SIZE)
        doc1 = run_bench(root / "clips", root / "out1", cfg)
        # the second run renders nothing new for the synthetic clip (same parameters), but
        # tracks, writes variants and fits everything again in an empty cache
        shutil.copytree(root / "out1" / "synth", root / "out2" / "synth")
        doc2 = run_bench(root / "clips", root / "out2", BenchConfig(**{**cfg.__dict__, "plots": False}))
    finally:
        unregister_method("ground_truth")
        unregister_method("still_face")
        unregister_method("fake_detail")
    return root, clip, doc1, doc2


def _values(doc, clip=None):
    return {(r["clip"], r["method"], r["metric"]): r["value"] for r in doc["records"] if clip in (None, r["clip"])}


def bench_main(argv):
    return avface_main(["bench", *argv])


def test_writes_metrics_report_and_plots(runs):
    root, _, doc, _ = runs
    out = root / "out1"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["schema_version"] == SCHEMA_VERSION == 1
    assert on_disk["clips"] == ["demo", f"synth_seed{SEED}"]
    assert on_disk["methods"] == ["tracker", "coarse_video", "interp", "ground_truth", "still_face", "fake_detail"]
    for r in on_disk["records"]:
        assert set(r) == {"clip", "method", "metric", "value"}
        assert r["value"] is None or isinstance(r["value"], float)
    vals = _values(on_disk, "demo")
    for m in ("tracker", "coarse_video", "interp"):
        for metric in REQUIRED:
            assert vals.get(("demo", m, metric)) is not None, (m, metric)
        assert on_disk["aggregate"][m]["mm_synth_visible"] is not None
        # jitter needs spans where the head is still; the synthetic head keeps moving (~20 deg/s)
        still = on_disk["clip_info"]["demo"]["still_frames"]
        assert (vals[("demo", m, "jitter")] is None) == (still == 0)
    assert ("demo", "coarse_video", "rtf_fit") in vals and ("demo", "tracker", "rtf_fit") not in vals
    assert vals[("demo", "coarse_video", "lip_err_occluded_ratio")] == pytest.approx(1.0)
    # the raw tracker's own landmarks are the NME reference on visible frames
    assert vals[("demo", "tracker", "nme_visible")] == pytest.approx(0.0, abs=1e-3)
    assert 0 < vals[("demo", "coarse_video", "nme_visible")] < 5
    report = (out / "report.md").read_text()
    assert "## Main table" in report and "| `interp` |" in report and "Lip-vertex error, precisely" in report
    # every clip's camera is estimated from its video, as reconstruct does (how close it
    # comes is test_fit's and test_service_real's: these clips are short and small), and
    # the residuals it chose by are recorded
    for c in ("demo", f"synth_seed{SEED}"):
        cam = on_disk["clip_info"][c]["camera"]
        assert cam["estimated"] and 15.0 <= cam["fov_deg"] <= 65.0, (c, cam)
        assert len(cam["residual_px"]) == len(cam["candidates_deg"]) == 7 and min(cam["residual_px"]) > 0
    assert on_disk["clip_info"][f"synth_seed{SEED}"]["camera_fov_true_deg"] == pytest.approx(40.0)
    assert ("demo", "coarse_video", "rtf_camera") in vals and ("demo", "tracker", "rtf_camera") not in vals
    for name in ("lip_error_ratio.png", "stage_timing.png", "nme_ced.png", "camera_fov.png", "lip_opening_demo.png",
                 f"lip_opening_synth_seed{SEED}.png", "strip.mp4", "strip.png"):
        assert (out / "plots" / name).stat().st_size > 1000, name
    info = media.probe(out / "plots" / "strip.mp4")
    assert info.width == 256 * 8 and info.n_frames > 10  # input, 6 methods, clean reference
    assert (out / "series" / "demo.npz").is_file()


def test_ground_truth_method_scores_zero(runs):
    _, _, doc, _ = runs
    vals = _values(doc)
    synth = f"synth_seed{SEED}"
    for metric in ("lip_err_occluded", "lip_err_occluded_hand", "lip_err_occluded_object", "lip_err_audio_only",
                   "nme_lips_occluded", "lip_err_occluded_ratio"):
        assert vals[("demo", "ground_truth", metric)] == pytest.approx(0.0, abs=1e-4), metric
    for metric in ("mm_synth_visible", "mm_synth_occluded", "mm_synth_lips_visible", "mm_synth_lips_occluded"):
        assert vals[(synth, "ground_truth", metric)] == pytest.approx(0.0, abs=1e-3), metric
        assert vals[(synth, "coarse_video", metric)] > 0.1, metric
    # an occlusion changes the other methods' lips
    assert vals[("demo", "coarse_video", "lip_err_occluded")] > 0.05


def test_occluder_covers_the_true_lips_in_the_variant_video(runs):
    """The plan re-made from the clean clip's tracking is the one the run used, and on every
    occluded frame its occluders cover the ground-truth lips; the variant video differs from
    the clean one where the true lips project."""
    from avface.stages import audio
    from avface.stages.tracking import track

    root, clip, doc, _ = runs
    info = media.probe(clip.video_path)
    tr = track(info, cache_dir=root / "tracking-check")
    feats = audio.extract_features(media.read_audio(clip.wav_path), media.SAMPLE_RATE_HZ, tr.n_frames, info.fps)
    plan = O.make_plan("demo", SEED, tr, feats.activity)
    assert plan.describe() == doc["clip_info"]["demo"]["occlusion"]
    lips = clip.project()[:, list(LIPS)]  # (T, 40, 2) the true lips in pixels
    for variant in O.OCCLUDER_VARIANTS:
        spans = plan.span_mask(variant)
        assert spans.any()
        assert doc["clip_info"]["demo"]["occluded_frames"][variant] == int(O.occluded_frames(plan, variant).sum()) > 0
        cover = [O.layer_at(plan, variant, int(t)).covers(lips[t]).mean() for t in np.nonzero(spans)[0]]
        assert min(cover) >= 0.6 and np.mean(cover) >= 0.9, (variant, cover)
    # in the pixels the tracker saw: the object variant differs from the clean clip at the lips
    a, b = plan.occluder_spans[0]
    path = root / "out1" / "cache" / "variants" / "demo" / "object.mp4"
    for i, (occ, clean) in enumerate(zip(media.iter_frames(media.probe(path), a, b), media.iter_frames(info, a, b))):
        xy = np.clip(np.floor(lips[a + i]).astype(int), 0, SIZE - 1)
        diff = np.abs(occ.astype(int) - clean.astype(int)).sum(-1)[xy[:, 1], xy[:, 0]]
        assert (diff > 30).mean() >= 0.6
    # and the audio-only variant is black in its spans
    s, e = plan.audio_spans[0]
    path = root / "out1" / "cache" / "variants" / "demo" / "audio_only.mp4"
    black = list(media.iter_frames(media.probe(path), s, e))
    assert max(int(f.max()) for f in black) <= 20


def test_same_seed_same_occlusions_and_figures(runs):
    root, _, doc1, doc2 = runs
    assert doc1["clip_info"]["demo"]["occlusion"] == doc2["clip_info"]["demo"]["occlusion"]
    for v in O.VARIANTS:
        digests = [hashlib.sha256((root / o / "cache" / "variants" / "demo" / f"{v}.mp4").read_bytes()).hexdigest()
                   for o in ("out1", "out2")]
        assert digests[0] == digests[1], f"{v} variant differs between runs"
    a, b = _values(doc1), _values(doc2)
    assert set(a) == set(b)
    for key, va in a.items():
        if is_timing_metric(key[2]):
            continue
        vb = b[key]
        if va is None or vb is None:
            assert va is None and vb is None, key
        else:
            assert vb == pytest.approx(va, rel=1e-5, abs=1e-6), key


def test_cli_registers_and_reports_errors(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="avface")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["bench", str(tmp_path), "-o", str(tmp_path / "o"), "--methods", "tracker,interp",
                              "--seed", "4"])
    assert callable(args.func) and args.seed == 4 and args.methods == ["tracker,interp"]
    assert bench_main([str(tmp_path), "--list-methods"]) == 0
    assert "coarse_video" in capsys.readouterr().out
    assert bench_main([str(tmp_path / "missing"), "-o", str(tmp_path / "o"), "-q"]) == 2
    assert bench_main([str(tmp_path), "-o", str(tmp_path / "o"), "--synth", "0", "-q"]) == 2  # no clips
    assert bench_main([str(tmp_path), "-o", str(tmp_path / "o"), "--methods", "nope", "-q"]) == 2
    assert "unknown bench method" in capsys.readouterr().err


def test_a_method_blind_to_the_video_is_measured_against_its_reference(runs):
    """Against its own clean output a still face would score exactly 0 on the occluded and
    audio-only frames; against coarse_video's clean mesh it scores the mouth's motion."""
    _, _, doc, _ = runs
    v = _values(doc, "demo")
    for metric in ("lip_err_occluded", "lip_err_audio_only"):
        assert v[("demo", "still_face", metric)] > 0.3, (metric, v[("demo", "still_face", metric)])
    assert v[("demo", "still_face", "jitter")] in (0.0, None)  # its own mesh, which stands still


def test_fine_stage_figures_and_pictures(runs):
    root, _, doc1, _ = runs
    v = {(r["clip"], r["method"], r["metric"]): r["value"] for r in doc1["records"]}
    assert v[("demo", "fake_detail", "photo_residual_coarse")] == 10.0
    assert v[("demo", "fake_detail", "detail_gain")] == pytest.approx(0.2)
    # the hand's occluded frames as the plan places them: the method tripled D on the frames
    # the visual confidence flags, so the ratio is 3 where the flags cover the span and
    # between 1 and 3 where they miss part of it
    ratio = v[("demo", "fake_detail", "detail_occluder_ratio")]
    recall = v[("demo", "fake_detail", "occl_recall_hand")]
    assert ratio == pytest.approx(1.0 + 2.0 * recall, abs=1e-6)
    assert ("demo", "ground_truth", "detail_gain") not in v  # methods without a fine stage have none
    detail = doc1["plots"]["detail"]
    assert (root / "out1" / detail["normals"]).is_file() and (root / "out1" / detail["occluded"]).is_file()
    report = (root / "out1" / "report.md").read_text()
    assert "## Fine stage (`fake_detail`)" in report and detail["occluded"] in report
