"""The benchmark's measures against hand-computed cases, and the pieces of the harness that
are pure arithmetic (aggregation, span choice, the colour transfer, the method registry)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import assert_close
from scipy.spatial.transform import Rotation

from avface.bench import metrics as M
from avface.bench.harness import aggregate, is_timing_metric
from avface.bench.methods import MethodOutput, available_methods, get_method, register_method, unregister_method
from avface.bench.occluders import SlicedOT, choose_spans, clip_rng
from avface.core.timeseries import hold_nearest
from avface.core.topology import LIPS
from avface.errors import InputError
from avface.models.canonical_mesh import load_canonical_mesh


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    """(468, 3) the canonical face in millimetres."""
    return load_canonical_mesh().vertices.astype(np.float64) * 1000.0


def _pose(v: np.ndarray, rotvec, shift) -> np.ndarray:
    return v @ Rotation.from_rotvec(rotvec).as_matrix().T + np.asarray(shift)


# --------------------------------------------------------------------------- NME and AUC


def test_nme_hand_computed():
    # two frames, three landmarks; the eye corners 33 and 263 are 100 px apart in frame 0, 50 in frame 1
    ref = np.zeros((2, 468, 2))
    ref[:, 263, 0] = [100.0, 50.0]
    pred = ref.copy()
    pred[0, :, 0] += 3.0  # every landmark 3 px off: 3 % of 100 px
    pred[1, :, 1] += 4.0  # 4 px off: 8 % of 50 px
    iod = M.inter_ocular(ref)
    assert_close(iod, [100.0, 50.0], what="inter-ocular distance")
    assert_close(M.nme_frames(pred, ref, iod), [3.0, 8.0], what="NME %")
    # lips only: move just the lips of frame 0 by 10 px -> lips NME 10 %, all-landmark NME 10 * 40 / 468
    pred = ref.copy()
    pred[0, list(LIPS), 1] += 10.0
    assert_close(M.nme_frames(pred, ref, iod, LIPS), [10.0, 0.0], what="lips NME")
    assert_close(M.nme_frames(pred, ref, iod)[0], 10.0 * 40 / 468, what="NME")
    assert_close(M.lips_nme_between(pred, ref), [10.0, 0.0], what="lips NME between reconstructions")


def test_auc_hand_computed():
    # CED area up to 10 %: a frame with error e contributes max(0, 1 - e / 10)
    assert_close(M.auc([0.0, 5.0, 10.0, 20.0]), (1 + 0.5 + 0 + 0) / 4, what="AUC")
    assert_close(M.auc([2.5]), 0.75, what="AUC")
    assert math.isnan(M.auc([]))
    # the closed form equals the integral of the step curve
    e = np.random.default_rng(0).uniform(0, 12, 200)
    x, f = M.ced_curve(e, n=20001)
    assert abs(np.trapezoid(f, x) / 10.0 - M.auc(e)) < 1e-3


# --------------------------------------------------------------------------- lip-vertex error


def test_lip_vertex_error_ignores_head_pose_and_measures_the_lips(face):
    t = 3
    ref = np.stack([_pose(face, [0.0, 0.1 * i, 0.0], [0.0, 0.0, 600.0]) for i in range(t)])
    pred = np.stack([_pose(face, [0.2, -0.3, 0.1 * i], [15.0, -4.0, 550.0 + i]) for i in range(t)])
    assert_close(M.lip_vertex_error(pred, ref), np.zeros(t), atol=1e-9, what="pose alone")
    # lips moved by (3, 4, 0) mm in the face's own frame: 5 mm, whatever the poses
    moved = face.copy()
    moved[list(LIPS)] += [3.0, 4.0, 0.0]
    pred = np.stack([_pose(moved, [0.2, -0.3, 0.1 * i], [15.0, -4.0, 550.0]) for i in range(t)])
    ref = np.stack([_pose(face, [0.0, 0.0, 0.0], [0.0, 0.0, 600.0])] * t)
    assert_close(M.lip_vertex_error(pred, ref), np.full(t, 5.0), rtol=1e-9, what="lip error mm")
    # frame selection by mask and by index
    assert_close(M.lip_vertex_error(pred, ref, np.array([False, True, False])), [5.0], rtol=1e-9, what="masked")
    assert len(M.lip_vertex_error(pred, ref, [0, 2])) == 2
    with pytest.raises(ValueError, match="differ in shape"):
        M.lip_vertex_error(pred[:2], ref)


def test_similarity_errors_against_ground_truth(face):
    gt = np.stack([face, _pose(face, [0.0, 0.2, 0.0], [5.0, 0.0, 0.0])]) / 1000.0
    pred = 1.3 * _pose(gt.reshape(-1, 3), [0.1, 0.0, 0.0], [0.1, 0.2, 0.3]).reshape(gt.shape)  # scaled, posed copy
    assert_close(M.vertex_error_similarity(pred, gt), [0.0, 0.0], atol=1e-9, what="similarity-aligned error")
    assert_close(M.lip_error_similarity(pred, gt), [0.0, 0.0], atol=1e-9, what="lip error vs GT")
    lips_off = gt.copy()
    lips_off[:, list(LIPS), 2] += 0.002  # 2 mm forward, lips only
    assert_close(M.lip_error_similarity(lips_off, gt), [0.002, 0.002], rtol=1e-6, what="lip error vs GT")
    # noise that no similarity can explain shows up, and more noise shows more
    noise = np.random.default_rng(0).normal(size=gt.shape)
    e1 = M.vertex_error_similarity(gt + 0.001 * noise, gt)
    e2 = M.vertex_error_similarity(gt + 0.002 * noise, gt)
    assert np.all(e1 > 0.0005) and np.all(e2 > 1.8 * e1)


# --------------------------------------------------------------------------- stillness and jitter


def test_jitter_hand_computed_with_head_motion_removed(face):
    t = 12
    a = 0.5  # mm per frame^2: vertex 13 moves as x = a t^2 / 2 in the face's frame
    frames = []
    for i in range(t):
        v = face.copy()
        v[13, 0] += 0.5 * a * i * i
        frames.append(_pose(v, [0.0, 0.03 * i, 0.01 * i], [2.0 * i, 0.0, 600.0]))  # a turning, moving head
    v = np.stack(frames)
    still = np.ones(t, bool)
    # second difference of a t^2 / 2 is a, on one vertex of 468
    assert_close(M.jitter(v, still), a / 468, rtol=1e-6, what="jitter mm/frame^2")
    # only frames whose neighbours are still count; a clip without a still triple has no jitter
    none = np.zeros(t, bool)
    none[::2] = True
    assert math.isnan(M.jitter(v, none))


def test_still_frames_from_head_speed(face):
    fps = 25.0
    n = 50
    # the head turns at 20 deg/s for the first 2 s... then stops for 2 s
    angle = np.radians(np.concatenate([20.0 * np.arange(25) / fps, np.full(25, 20.0 * 24 / fps)]))
    pts = np.stack([_pose(face / 1000.0, [0.0, a, 0.0], [0.0, 0.0, 0.6]) for a in angle])
    rot, trans = M.head_speed(pts, fps)
    assert_close(rot[5:20], np.full(15, 20.0), rtol=1e-6, what="rotation speed deg/s")
    assert_close(rot[30:], np.zeros(20), atol=1e-3, what="still head")
    still = M.still_frames(pts, fps)
    assert not still[:22].any() and still[27:].all()
    # a tracker that loses the face breaks the measurement there
    valid = np.ones(n, bool)
    valid[40] = False
    assert not M.still_frames(pts, fps, valid)[38:43].any()


def test_runs_ratio_and_means():
    assert M.runs(np.array([0, 1, 1, 0, 1], bool)) == [(1, 3), (4, 5)]
    assert M.ratio(2.0, 4.0) == 0.5
    assert math.isnan(M.ratio(1.0, 0.0)) and math.isnan(M.ratio(float("nan"), 1.0))
    assert_close(M.geometric_mean([0.5, 2.0, float("nan")]), 1.0, what="geometric mean")
    assert_close(M.safe_mean([1.0, float("nan"), 3.0]), 2.0, what="mean")
    v = np.zeros((2, 468, 3))
    v[:, 14, 1] = [3.0, 4.0]
    assert_close(M.lip_opening(v), [3.0, 4.0], what="lip opening")


def test_aggregate_means_ratios_and_pooled_speed():
    info = {"a": {"duration_s": 1.0}, "b": {"duration_s": 3.0}}
    recs = []
    for clip, vals in (("a", dict(nme_visible=1.0, lip_err_occluded_ratio=0.5, rtf_total=2.0, rtf_tracking=1.0,
                                  peak_rss_mb=100.0)),
                       ("b", dict(nme_visible=3.0, lip_err_occluded_ratio=2.0, rtf_total=1.0, rtf_tracking=0.5,
                                  peak_rss_mb=300.0))):
        for metric, v in vals.items():
            recs.append({"clip": clip, "method": "m", "metric": metric, "value": v})
    agg = aggregate(recs, info)["m"]
    assert_close(agg["nme_visible"], 2.0, what="mean over clips")
    assert_close(agg["lip_err_occluded_ratio"], 1.0, what="geometric mean of ratios")
    assert_close(agg["rtf_total"], (2.0 * 1 + 1.0 * 3) / 4, what="duration-weighted RTF")
    assert_close(agg["ratio_to_tracking"], (5.0 / 4) / (2.5 / 4), what="pooled ratio to tracking")
    assert agg["peak_rss_mb"] == 300.0
    assert is_timing_metric("rtf_fit") and is_timing_metric("peak_rss_mb") and not is_timing_metric("jitter")


# --------------------------------------------------------------------------- spans and colour transfer


def test_choose_spans_follow_speech_and_keep_margins():
    fps, n = 25.0, 250
    act = np.zeros(n)
    act[150:200] = 1.0  # speech only in 6.0 ... 8.0 s
    for seed in range(5):
        spans = choose_spans(n, fps, act, clip_rng(seed, "clip", "x"), count=1, min_s=0.5, max_s=1.5)
        assert len(spans) == 1
        a, b = spans[0]
        # 0.5 to 1.5 s, and at least 80 % of it speech (the best candidates are all speech)
        assert 12 <= b - a <= 38 and act[a:b].mean() >= 0.8, spans
    spans = choose_spans(n, fps, None, clip_rng(0, "clip", "x"), count=3, min_s=0.5, max_s=1.5)
    assert len(spans) == 3
    margin, gap = int(math.ceil(0.3 * fps)), int(math.ceil(0.5 * fps))
    for (a, b), (c, d) in zip(spans, spans[1:]):
        assert b + gap <= c
    assert spans[0][0] >= margin and spans[-1][1] <= n - margin
    # the same seed and clip give the same spans; another seed or clip, others
    again = choose_spans(n, fps, None, clip_rng(0, "clip", "x"), count=3, min_s=0.5, max_s=1.5)
    assert again == spans
    assert choose_spans(n, fps, None, clip_rng(1, "clip", "x"), count=3, min_s=0.5, max_s=1.5) != spans
    # a clip too short for a span gets none
    assert choose_spans(20, fps, None, clip_rng(0, "c", "x"), count=1, min_s=1.0, max_s=2.0) == []


def test_sliced_ot_moves_one_colour_distribution_onto_another():
    rng = np.random.default_rng(0)
    src = rng.normal([200, 150, 120], [30, 25, 20], size=(4000, 3))
    mix = rng.normal([0.0, 0.0, 0.0], 1.0, size=(4000, 3)) @ np.array([[12, 3, 1], [0, 8, 2], [0, 0, 5]])
    dst = mix + [120, 80, 70]
    ot = SlicedOT.fit(src, dst, np.random.default_rng(1))
    out = ot.apply(src)
    assert_close(out.mean(0), dst.mean(0), atol=1.0, what="transferred mean")
    assert_close(np.cov(out.T), np.cov(dst.T), atol=4.0, rtol=0.1, what="transferred covariance")
    # within the source's range the map keeps brightness in order: a shading ramp stays a ramp
    ramp = np.array([200.0, 150.0, 120.0]) + np.linspace(-1.5, 1.5, 11)[:, None] * np.array([30.0, 25.0, 20.0])
    lum = ot.apply(ramp) @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(lum) > 0), lum


# --------------------------------------------------------------------------- the registry


def test_registry_and_hold_nearest():
    names = available_methods()
    assert {"tracker", "coarse_video", "interp"} <= set(names)
    assert names["tracker"].stages == ("probe", "tracking") and not names["interp"].uses_audio

    @register_method("bench_test_dummy", description="test", stages=("probe", "tracking", "audio"))
    def dummy(inp):  # pragma: no cover - only registered
        return MethodOutput(np.zeros((1, 468, 3)), np.eye(3))

    try:
        assert get_method("bench_test_dummy").uses_audio
        with pytest.raises(ValueError, match="already registered"):
            register_method("bench_test_dummy", description="again")(dummy)
    finally:
        unregister_method("bench_test_dummy")
    with pytest.raises(InputError, match="unknown bench method"):
        get_method("bench_test_dummy")
    x = np.arange(6.0)
    valid = np.array([False, True, False, False, True, False])
    assert_close(hold_nearest(x, valid), [1, 1, 1, 4, 4, 4], what="held frames")


def test_occlusion_flag_recall_precision_and_clean_false_alarms_by_hand():
    """_flag_records on hand-made flags: 6 of 8 occluded frames flagged, 1 false flag, 1 of 10
    clean frames flagged; a method's own flags replace the variant's."""
    from types import SimpleNamespace

    from avface.bench.harness import _flag_records

    n = 10
    truth_hand = np.zeros(n, bool)
    truth_hand[2:6] = True
    truth_obj = np.zeros(n, bool)
    truth_obj[5:9] = True
    flags_hand = np.zeros(n, bool)
    flags_hand[[2, 3, 4, 9]] = True  # 3 of 4 occluded frames, and one false flag
    flags_obj = np.zeros(n, bool)
    flags_obj[[5, 6, 7]] = True  # 3 of 4
    flags_clean = np.zeros(n, bool)
    flags_clean[0] = True
    inp = lambda f: SimpleNamespace(occluded=f, tracking=SimpleNamespace(detected=np.ones(n, bool)))  # noqa: E731
    ctx = SimpleNamespace(clip_id="c", occ_frames={"hand": truth_hand, "object": truth_obj, "audio_only": np.zeros(n, bool)},
                          inputs={"clean": inp(flags_clean), "hand": inp(flags_hand), "object": inp(flags_obj)})
    outs = {v: MethodOutput(np.zeros((n, 468, 3), np.float32), np.eye(3)) for v in ("clean", "hand", "object")}
    records: list[dict] = []
    _flag_records(records, ctx, "m", outs)
    got = {r["metric"]: r["value"] for r in records}
    assert got["occl_recall_hand"] == 0.75 and got["occl_recall_object"] == 0.75
    assert got["occl_recall"] == 6 / 8
    assert got["occl_precision"] == 6 / 7
    assert got["occl_clean_flagged"] == 0.1
    # a method that judges occlusion itself is measured on its own flags
    outs["hand"].occluded = truth_hand.copy()
    records = []
    _flag_records(records, ctx, "m", outs)
    got = {r["metric"]: r["value"] for r in records}
    assert got["occl_recall_hand"] == 1.0 and got["occl_precision"] == 7 / 7


def test_a_method_that_cannot_run_here_is_left_out_or_refused_with_its_reason():
    from avface.bench.harness import BenchConfig, _resolve_methods

    @register_method("needs_a_file", description="test method with a missing requirement",
                     unavailable=lambda: "no such file; make one with `avface train`")
    def _needs(inp):  # pragma: no cover - never run
        raise AssertionError("must not run")

    try:
        names = [m.name for m in _resolve_methods(BenchConfig())]
        assert "needs_a_file" not in names and "coarse_video" in names
        with pytest.raises(InputError, match="needs_a_file.*cannot run here: no such file"):
            _resolve_methods(BenchConfig(methods=("needs_a_file",)))
    finally:
        unregister_method("needs_a_file")
