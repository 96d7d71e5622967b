"""``avface bench``: every registered method on every clip, side by side, in one run.

For each real clip: probe, a decode-only pass, the clean clip's tracking (always run, since
it is timed), the speech features, the occlusion plan (:mod:`avface.bench.occluders`), the
variants (``hand``, ``object``, ``audio_only``) written in one decode pass and tracked
(cached by content in ``OUT/cache``), then every method on the clean clip and on each
variant. For each synthetic clip (the demo generator, with its own hand occluder): the
methods against the ground truth. Then metrics.json, report.md and the plots.

Everything random is seeded from ``--seed`` and the clip's id; with the same seed, the same
clips and the same code, a second run gives the same occlusions and the same figures (the
timing and memory figures aside).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import resource
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from avface import __version__, media
from avface.bench import metrics as M
from avface.bench.methods import (REFERENCE_METHOD, Method, MethodInput, MethodOutput, available_methods, get_method,
    load_plugins, run_method)
from avface.bench.occluders import OCCLUDER_VARIANTS, VARIANTS, OcclusionPlan, make_plan, occluded_frames, write_variants
from avface.config import FitConfig, TrackingConfig
from avface.core.clips import Clip, discover_clips
from avface.core.geometry import fov_of, project
from avface.core.jsonutil import json_safe
from avface.core.topology import LIPS
from avface.errors import AVFaceError, InputError
from avface.result import ensure_writable
from avface.stages.confidence import OCCLUDED_BELOW, mouth_visible, visual_confidence
from avface.stages.tracking import Tracking, track

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Version of metrics.json's layout; bumped when a reader would have to change."""

STAGES = ("probe", "decode", "tracking", "audio", "confidence", "camera", "fit", "networks", "export")
"""Stages whose real-time factor is reported. ``decode`` is a decode-only pass shown for
reference: the pipeline decodes while it tracks, so ``tracking`` already includes it and
``decode`` never counts towards a total. ``networks`` has no method yet."""

UNOCCLUDED_DISTANCE_S = 1.0
"""Frames at least this far from every occluder span measure how much an occlusion
disturbs the rest of the clip (the fit is global over the clip) plus the re-encoding floor."""

STRIP_MARGIN_S = 0.4
"""The side-by-side strip shows this much before and after its occluded span."""

TIMING_METRICS_PREFIXES = ("rtf_", "cpu_rtf_")
TIMING_METRICS = ("ratio_to_tracking", "peak_rss_mb", "cuda_peak_mb")

METRIC_DEFINITIONS = {
    "nme_visible": "NME (% of the inter-ocular distance) of all 468 projected vertices against the tracker's "
                   f"landmarks on the clean clip's visible frames (detected, mouth confidence >= {OCCLUDED_BELOW:g})",
    "nme_lips_visible": "the same NME over the 40 lip landmarks",
    "auc_visible": "area under the cumulative per-frame NME curve from 0 to 10 %, divided by 10 % (1 is perfect)",
    "lip_err_occluded": "mm: mean lip-vertex error on occluded frames (both occluders pooled), the method on the "
                        "occluded clip against the same method on the clean clip (a method that ignores the video "
                        "everywhere: against its reference method's, see Method.reference), after rigid alignment "
                        "on the skull vertices",
    "lip_err_occluded_hand": "lip_err_occluded with the hand occluder only",
    "lip_err_occluded_object": "lip_err_occluded with the plain object (bar or microphone) only",
    "lip_err_occluded_ratio": "lip_err_occluded / coarse_video's on the same clip (< 1 is better than the video-only fit)",
    "nme_lips_occluded": "lips NME (%) of the occluded clip's projection against the clean clip's, occluded frames",
    "lip_err_unoccluded": "mm: lip-vertex error of the hand variant against the clean clip on frames >= 1 s from "
                          "every occluder (how far an occlusion leaks into the rest of the clip, plus the "
                          "re-encoding floor)",
    "lip_err_audio_only": "mm: the lip-vertex error on audio-only spans (black frames, speech kept)",
    "lip_err_audio_only_ratio": "lip_err_audio_only / coarse_video's on the same clip",
    "nme_lips_audio_only": "lips NME (%) on audio-only spans against the clean clip",
    "jitter": "mm/frame^2: mean vertex acceleration |x[t+1] - 2x[t] + x[t-1]| over all vertices, rigid head "
              "motion removed, on frames where the head is still, clean clip",
    "mm_synth_visible": "mm: mean vertex error against ground truth after a per-frame similarity alignment, "
                        "synthetic clips, frames with no occluder",
    "mm_synth_occluded": "the same on the synthetic clips' occluded frames (hand over >= 30 % of the lips)",
    "mm_synth_lips_visible": "mm: lip-vertex error against ground truth (similarity on the skull vertices), "
                             "synthetic clips, frames with no occluder",
    "mm_synth_lips_occluded": "the same on occluded frames",
    "occl_recall": "share of the occluded frames of the hand and object variants (pooled) that the method flags "
                   "as occluded",
    "occl_recall_hand": "occl_recall on the hand variant only",
    "occl_recall_object": "occl_recall on the object variant only",
    "occl_precision": "share of the frames the method flags on the hand and object variants (pooled) that are "
                      "occluded frames",
    "occl_clean_flagged": "share of the clean clip's detected frames that the method flags as occluded "
                          "(false alarms)",
    "photo_residual_coarse": "8-bit levels: mean absolute photometric residual of the clean clip's held-out frames "
                             "(never trained on) over trusted face texels, the per-clip albedo and light shading the "
                             "coarse (+ lips) normals (methods with a fine stage)",
    "photo_residual_detail": "the same shading the detailed normals (V_d = V_c + D N_c)",
    "detail_gain": "1 - photo_residual_detail / photo_residual_coarse: the share of the coarse residual the detail "
                   "explains on frames it did not see",
    "detail_occluder_ratio": "mean |D| over the mouth's texels on the hand variant's occluded frames, divided by "
                             "the same on the same frames of the clean clip (1: the hand left no imprint)",
    "rtf_<stage>": "seconds of that stage per second of video (real-time factor)",
    "rtf_total": "the sum of the real-time factors of the stages the method needs (decode excluded)",
    "cpu_rtf_total": "process CPU seconds (ffmpeg children included) of those stages per second of video",
    "ratio_to_tracking": "rtf_total / rtf_tracking, measured in the same run",
    "peak_rss_mb": "peak resident memory of the benchmark process so far (MiB)",
    "cuda_peak_mb": "peak CUDA memory allocated by torch (MiB), where a GPU is present",
}


@dataclass(frozen=True)
class BenchConfig:
    """Options of a benchmark run."""

    seed: int = 0
    """Seeds the occlusion spans, the occluders' motion and the synthetic clips."""
    methods: tuple[str, ...] | None = None
    """Methods to run, by registered name; None runs all. ``coarse_video`` always runs (the
    ratios are to it)."""
    clip_ids: tuple[str, ...] | None = None
    """Only these clips of the folder (by id); None: all."""
    synth_clips: int = 3
    """Synthetic clips with ground truth (seeds seed, seed+1, ...); 0 skips them."""
    synth_duration_s: float = 4.0
    synth_size: int = 256
    """Frame size of the synthetic clips, pixels (square)."""
    plots: bool = True
    strip: bool = True
    """Also write the side-by-side strip video (one occluded span, every method's mesh)."""
    cache_dir: str | None = None
    """Tracking and variant cache; None: OUT/cache."""
    plugins: tuple[str, ...] = ()
    """Extra modules that register methods."""
    fov_deg: float | None = None
    """Every clip's vertical field of view, degrees; None estimates each clip's from its clean
    clip, as reconstruct does (avface.stages.fit.estimate_fov)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    fit: FitConfig = field(default_factory=FitConfig)


# --------------------------------------------------------------------------- timing


def _cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (ru_maxrss is KiB on Linux, bytes on
    macOS). Children are left out: a child's ru_maxrss counts the parent's pages it was
    forked with before it exec'd ffmpeg, so it says nothing about ffmpeg."""
    k = 1024.0 if platform.system() != "Darwin" else 1024.0 * 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / k


@contextmanager
def _timed(store: dict, key: str):
    t0, c0 = time.perf_counter(), _cpu_seconds()
    try:
        yield
    finally:
        wall, cpu = store.get(key, (0.0, 0.0))
        store[key] = (wall + time.perf_counter() - t0, cpu + _cpu_seconds() - c0)


def _cuda_peak_mb() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    except Exception:  # pragma: no cover - torch import problems are not the benchmark's
        return None
    return None


# --------------------------------------------------------------------------- per-clip work


@dataclass
class ClipResult:
    clip_id: str
    kind: str  #: real | synth
    records: list[dict]
    info: dict
    series: dict[str, np.ndarray] = field(default_factory=dict)
    strip: dict | None = None
    detail: dict | None = None
    """The fine stage's pictures for the report (:func:`_detail_pictures`)."""


def _rec(out: list, clip: str, method: str, metric: str, value) -> None:
    v = float(value) if value is not None else float("nan")
    out.append({"clip": clip, "method": method, "metric": metric, "value": v})


def _read_speech(path: Path | None, n_frames: int, fps: float):
    """(wave, AudioFeatures) of a clip's speech, (None, None) without audio."""
    from avface.stages import audio as audio_mod

    if path is None:
        return None, None
    try:
        wave = media.read_audio(path)
    except AVFaceError as e:
        log.warning("no speech for %s (%s): spans are placed without speech activity", path, e)
        return None, None
    return wave, audio_mod.extract_features(wave, media.SAMPLE_RATE_HZ, n_frames, fps)


def _time_export(out: MethodOutput, inp: MethodInput, info: "media.VideoInfo", tmp: Path) -> tuple[float, float]:
    """(wall, cpu) seconds of the pipeline's export stage (:func:`avface.stages.assemble.run.build_result`
    and the write) on a method's fit."""
    from avface.result import write_result
    from avface.stages.assemble.run import ResultEvidence, ResultRun, ResultSource, build_result

    store: dict = {}
    with _timed(store, "export"):
        features = inp.features
        src = ResultSource(fps=float(info.fps), width=info.width, height=info.height, source={"path": str(info.path)},
                           audio_present=features is not None)
        evidence = ResultEvidence(inp.visual_conf, inp.occluded, features.activity if features is not None else None)
        arrays, meta = build_result(out.fit, inp.tracking, evidence, src,
                                    ResultRun(stages_run=["tracking", "confidence", "fit", "export"], stage_seconds={}))
        write_result(tmp / "result.npz", arrays, meta)
    (tmp / "result.npz").unlink(missing_ok=True)
    return store["export"]


def _variant_paths(cache: Path, clip_id: str) -> dict[str, Path]:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in clip_id)
    return {v: cache / "variants" / safe / f"{v}.mp4" for v in VARIANTS}


def _ensure_variants(info: "media.VideoInfo", plan: OcclusionPlan, paths: dict[str, Path]) -> bool:
    """Write the variants unless the cache holds them for this exact plan; True if written."""
    stamp = next(iter(paths.values())).parent / "plan.json"
    key = {"digest": plan.digest(), "source": str(info.path), "source_size": info.path.stat().st_size,
           "n_frames": info.n_frames, "fps": info.fps, "plan": plan.describe()}
    if stamp.is_file() and all(p.is_file() for p in paths.values()):
        try:
            if json.loads(stamp.read_text()).get("digest") == key["digest"]:
                return False
        except (OSError, json.JSONDecodeError):
            pass
    stamp.unlink(missing_ok=True)
    write_variants(info, plan, paths)
    stamp.write_text(json.dumps(key, indent=1))
    return True


def _track_variant(path: Path, n_frames: int, cfg: BenchConfig, cache: Path) -> Tracking:
    info = media.probe(path)
    if abs(info.n_frames - n_frames) > 1:
        raise AVFaceError(f"variant {path} has {info.n_frames} frames, the clean clip {n_frames}")
    tr = track(info, 0, min(info.n_frames, n_frames), config=cfg.tracking, cache_dir=cache / "tracking")
    if tr.n_frames < n_frames:  # one frame short from rounding at the end: repeat the last
        tr = _pad_tracking(tr, n_frames)
    return tr


def _pad_tracking(tr: Tracking, n: int) -> Tracking:
    k = n - tr.n_frames
    arrays = {f.name: getattr(tr, f.name) for f in dataclasses.fields(tr)}
    for name, val in arrays.items():
        if isinstance(val, np.ndarray) and val.ndim >= 1 and len(val) == tr.n_frames:
            arrays[name] = np.concatenate([val, np.repeat(val[-1:], k, axis=0)])
    return Tracking(**arrays)


def _run_all(methods: list[Method], inputs: dict[str, MethodInput]) -> dict[str, dict[str, MethodOutput | None]]:
    outs: dict[str, dict[str, MethodOutput | None]] = {}
    for m in methods:
        outs[m.name] = {}
        for v, inp in inputs.items():
            try:
                outs[m.name][v] = run_method(m, inp)
            except AVFaceError as e:
                log.warning("%s on %s/%s failed: %s", m.name, inp.clip_id, v, e)
                outs[m.name][v] = None
    return outs


def _frames_far_from(spans, n: int, distance: int) -> np.ndarray:
    far = np.ones(n, bool)
    for a, b in spans:
        far[max(0, a - distance):min(n, b + distance)] = False
    return far


@dataclass
class _RealClip:
    """What every method's figures on one real clip are measured against."""

    clip_id: str
    info: "media.VideoInfo"
    plan: OcclusionPlan
    inputs: dict[str, MethodInput]
    stage: dict[str, tuple[float, float]]
    visible: np.ndarray  #: (T,) clean frames detected with the mouth seen
    ref2d: np.ndarray  #: (T, 468, 2) the clean clip's tracker landmarks
    iod: np.ndarray  #: (T,) inter-ocular distance, pixels
    occ_frames: dict[str, np.ndarray]  #: variant -> (T,) bool frames it occludes
    far: np.ndarray  #: (T,) frames far from every occluder
    still: np.ndarray  #: (T,) frames where the head is still

    @property
    def duration(self) -> float:
        return self.info.n_frames / float(self.info.fps)


def bench_real_clip(clip: Clip, methods: list[Method], cfg: BenchConfig, cache: Path) -> ClipResult:
    """Everything the benchmark measures on one real clip."""
    stage: dict[str, tuple[float, float]] = {}
    bench_time: dict[str, tuple[float, float]] = {}
    info, clean, wave, features = _measure_front_end(clip, cfg, cache, stage)
    if not clean.detected.any():
        log.warning("%s: no face detected in any frame; skipped", clip.id)
        return ClipResult(clip.id, "real", [], {"kind": "real", "skipped": "no face detected"})
    n, fps = clean.n_frames, float(info.fps)
    plan = make_plan(clip.id, cfg.seed, clean, features.activity if features is not None else None)
    paths = _variant_paths(cache, clip.id)
    with _timed(bench_time, "variants"):
        written = _ensure_variants(info, plan, paths)
    log.info("%s: variants %s (%s)", clip.id, "written" if written else "from the cache", plan.describe())
    trackings = {"clean": clean}
    with _timed(bench_time, "variant_tracking"):
        for v in VARIANTS:
            trackings[v] = _track_variant(paths[v], n, cfg, cache)
    _warm_up(clean, cfg.fit)  # before the camera's quick fits, which would pay torch's start-up
    confidences = _confidences(trackings, stage)
    fit_cfg, camera = _clip_camera(clean, confidences["clean"][0], cfg, stage)
    inputs = _method_inputs(clip.id, trackings, confidences, features, wave, fps, fit_cfg,
                            videos={"clean": clip.video, **{v: paths[v] for v in VARIANTS}})
    with _timed(bench_time, "methods"):
        outs = _run_all(methods, inputs)

    ctx = _real_context(clip.id, info, plan, inputs, stage, fit_cfg)
    rss, cuda = peak_rss_mb(), _cuda_peak_mb()
    records: list[dict] = []
    series: dict[str, np.ndarray] = {"fps": np.array(fps), "n_frames": np.array(n)}
    for v in VARIANTS:
        series[f"spans_{v}"] = np.asarray(plan.spans(v), np.int64).reshape(-1, 2)
        series[f"occluded_{v}"] = ctx.occ_frames[v]
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        for m in methods:
            o = outs[m.name]
            if o.get("clean") is None:
                continue
            ref = outs.get(m.reference, {}).get("clean") if m.reference else None
            _accuracy_records(records, series, ctx, m.name, o, ref)
            _flag_records(records, ctx, m.name, o)
            _detail_records(records, ctx, m.name, o)
            _speed_records(records, ctx, m, o["clean"], Path(tmp), rss, cuda)
            for v in ("clean",) + VARIANTS:
                if o.get(v) is not None:
                    series[f"lip_open_{m.name}_{v}"] = 1000.0 * M.lip_opening(o[v].vertices)
    _add_ratios(records, clip.id, [m.name for m in methods])
    strip = _strip_data(plan, outs, paths, info, records, clip.id)
    return ClipResult(clip.id, "real", records, _real_clip_info(clip, ctx, features, bench_time, camera), series, strip,
                      _detail_pictures(ctx, methods, outs))


def _detail_pictures(ctx: _RealClip, methods: list[Method], outs) -> dict | None:
    """The first fine-stage method's pictures: one held-out frame's normal maps before and
    after the detail, and the displacement of the hand's most occluded frame next to the same
    frame of the clean clip."""
    for m in methods:
        o = outs[m.name]
        clean, hand = o.get("clean"), o.get("hand")
        if clean is None or clean.detail is None or clean.detail.normal_maps is None:
            continue
        pics = {"clip": ctx.clip_id, "method": m.name, "normal_maps": clean.detail.normal_maps}
        frames = np.nonzero(ctx.occ_frames["hand"])[0]
        if hand is not None and hand.detail is not None and len(frames):
            mouth = clean.detail.mouth
            t = int(frames[np.argmax(np.abs(hand.detail.displacement[frames][:, mouth]).mean(1))])
            pics["occluded"] = (t, hand.detail.displacement[t], clean.detail.displacement[t])
        return pics
    return None


def _measure_front_end(clip: Clip, cfg: BenchConfig, cache: Path, stage: dict):
    """(info, clean tracking, wave, features) of a real clip, timing probe, a decode-only pass,
    tracking (never from the cache) and the speech features."""
    with _timed(stage, "probe"):
        info = media.probe(clip.video)
    log.info("%s: %d frames %dx%d at %.3f fps (%.2f s)", clip.id, info.n_frames, info.width, info.height,
             float(info.fps), info.n_frames / float(info.fps))
    with _timed(stage, "decode"):
        for _ in media.iter_frames(info):
            pass
    with tempfile.TemporaryDirectory(dir=cache) as fresh:  # timed, so never read from the cache
        with _timed(stage, "tracking"):
            clean = track(info, config=cfg.tracking, cache_dir=Path(fresh))
    with _timed(stage, "audio"):
        audio_path = clip.audio if clip.audio is not None else (clip.video if info.has_audio else None)
        wave, features = _read_speech(audio_path, clean.n_frames, float(info.fps))
    return info, clean, wave, features


def _clip_camera(tracking: Tracking, mouth_conf: np.ndarray, cfg: BenchConfig, stage: dict):
    """(fit config, CameraEstimate) of a clip: BenchConfig.fov_deg, or the field of view
    estimated on its clean clip (``mouth_conf``: that clip's visual confidence) as
    reconstruct estimates it (timed as the ``camera`` stage). Every method and variant of the
    clip shares it, so a comparison within the clip is not moved by the estimate."""
    from avface.stages.camera import clip_camera

    if cfg.fov_deg is not None:
        camera = clip_camera(tracking, None, cfg.fit, cfg.fov_deg)
    else:
        with _timed(stage, "camera"):
            camera = clip_camera(tracking, mouth_conf, cfg.fit)
    return dataclasses.replace(cfg.fit, fov_deg=camera.fov_deg), camera


def _confidences(trackings: dict[str, Tracking], stage: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each variant's (visual confidence, occluded flags), computed once for the camera and
    the methods alike (timed as the ``confidence`` stage on the clean clip)."""
    out = {}
    for v, tr in trackings.items():
        with _timed(stage if v == "clean" else {}, "confidence"):
            out[v] = visual_confidence(tr)
    return out


def _method_inputs(clip_id: str, trackings: dict[str, Tracking], confidences: dict, features, wave, fps: float,
                   fit_cfg: FitConfig, videos: dict[str, Path] | None = None) -> dict[str, MethodInput]:
    """One MethodInput per variant, with its :func:`_confidences`; ``videos`` gives each
    variant's video file."""
    return {v: MethodInput(clip_id, v, tr, features, wave, fps, fit_cfg, *confidences[v], video=(videos or {}).get(v))
            for v, tr in trackings.items()}


def _real_context(clip_id: str, info, plan: OcclusionPlan, inputs: dict[str, MethodInput], stage: dict,
                  fit_cfg: FitConfig) -> _RealClip:
    clean = inputs["clean"].tracking
    n, fps = clean.n_frames, float(info.fps)
    ref2d = clean.landmarks[:, :468, :2].astype(np.float64)
    # one stillness mask for every method: the tracker's own metric points on the clean clip
    still = M.still_frames(_tracker_points(clean, fit_cfg), fps, clean.detected)
    return _RealClip(
        clip_id, info, plan, inputs, stage,
        visible=clean.detected & mouth_visible(inputs["clean"].visual_conf), ref2d=ref2d, iod=M.inter_ocular(ref2d),
        occ_frames={v: occluded_frames(plan, v) for v in VARIANTS},
        far=_frames_far_from(plan.occluder_spans, n, int(round(UNOCCLUDED_DISTANCE_S * fps))), still=still)


def _accuracy_records(records: list[dict], series: dict, ctx: _RealClip, name: str,
                      o: dict[str, MethodOutput | None], reference: MethodOutput | None = None) -> None:
    """NME on visible frames, lip errors on occluded and audio-only spans (against the
    method's own clean mesh, or ``reference``'s: Method.reference), and jitter."""
    cid, base = ctx.clip_id, o["clean"]
    vis = ctx.visible
    p_clean = project(base.vertices.astype(np.float64), base.intrinsics)
    ref = reference if reference is not None else base
    vc = ref.vertices
    p_ref = project(vc.astype(np.float64), ref.intrinsics)
    e_all = M.nme_frames(p_clean[vis], ctx.ref2d[vis], ctx.iod[vis])
    series[f"nme_{name}"] = e_all
    _rec(records, cid, name, "nme_visible", M.safe_mean(e_all))
    _rec(records, cid, name, "nme_lips_visible", M.safe_mean(M.nme_frames(p_clean[vis], ctx.ref2d[vis], ctx.iod[vis], LIPS)))
    _rec(records, cid, name, "auc_visible", M.auc(e_all))
    pooled, pooled_nme = [], []
    for v in OCCLUDER_VARIANTS:
        ov, frames = o.get(v), ctx.occ_frames[v]
        if ov is None or not frames.any():
            _rec(records, cid, name, f"lip_err_occluded_{v}", None)
            continue
        err = 1000.0 * M.lip_vertex_error(ov.vertices, vc, frames)
        pooled.append(err)
        pooled_nme.append(M.lips_nme_between(project(ov.vertices.astype(np.float64), ov.intrinsics), p_ref, frames))
        _rec(records, cid, name, f"lip_err_occluded_{v}", M.safe_mean(err))
    _rec(records, cid, name, "lip_err_occluded", M.safe_mean(np.concatenate(pooled)) if pooled else None)
    _rec(records, cid, name, "nme_lips_occluded", M.safe_mean(np.concatenate(pooled_nme)) if pooled_nme else None)
    oh = o.get("hand")
    _rec(records, cid, name, "lip_err_unoccluded",
         M.safe_mean(1000.0 * M.lip_vertex_error(oh.vertices, vc, ctx.far)) if oh is not None and ctx.far.any() else None)
    oa, frames = o.get("audio_only"), ctx.occ_frames["audio_only"]
    if oa is not None and frames.any():
        _rec(records, cid, name, "lip_err_audio_only", M.safe_mean(1000.0 * M.lip_vertex_error(oa.vertices, vc, frames)))
        _rec(records, cid, name, "nme_lips_audio_only",
             M.safe_mean(M.lips_nme_between(project(oa.vertices.astype(np.float64), oa.intrinsics), p_ref, frames)))
    else:
        _rec(records, cid, name, "lip_err_audio_only", None)
        _rec(records, cid, name, "nme_lips_audio_only", None)
    _rec(records, cid, name, "jitter", M.jitter(1000.0 * base.vertices, ctx.still) if ctx.still.any() else None)


def _flag_records(records: list[dict], ctx: _RealClip, name: str, o: dict[str, MethodOutput | None]) -> None:
    """Recall and precision of the method's occluded flags on the occluder variants, and its
    false alarms on the clean clip."""
    def flags(v: str) -> np.ndarray | None:
        out = o.get(v)
        if out is None:
            return None
        return np.asarray(out.occluded if out.occluded is not None else ctx.inputs[v].occluded, bool)

    cid, hits, truths, flagged_in = ctx.clip_id, [], [], []
    for v in OCCLUDER_VARIANTS:
        f, truth = flags(v), ctx.occ_frames[v]
        if f is None or not truth.any():
            _rec(records, cid, name, f"occl_recall_{v}", None)
            continue
        _rec(records, cid, name, f"occl_recall_{v}", f[truth].mean())
        hits.append(f[truth])
        truths.append(truth[f])
        flagged_in.append(f.sum())
    _rec(records, cid, name, "occl_recall", np.concatenate(hits).mean() if hits else None)
    _rec(records, cid, name, "occl_precision", np.concatenate(truths).mean() if sum(flagged_in) else None)
    clean, det = flags("clean"), ctx.inputs["clean"].tracking.detected
    _rec(records, cid, name, "occl_clean_flagged", clean[det].mean() if clean is not None and det.any() else None)


def _detail_records(records: list[dict], ctx: _RealClip, name: str, o: dict[str, MethodOutput | None]) -> None:
    """A fine stage's figures: the held-out photometric residuals of the clean clip with coarse
    and detailed normals, their detail_gain, and detail_occluder_ratio: mean |D| over the
    mouth's texels on the hand's occluded frames, against the same frames of the clean clip."""
    clean = o["clean"].detail
    if clean is None:
        return
    cid = ctx.clip_id
    _rec(records, cid, name, "photo_residual_coarse", clean.photo_residual_coarse)
    _rec(records, cid, name, "photo_residual_detail", clean.photo_residual_detail)
    _rec(records, cid, name, "detail_gain", M.detail_gain(clean.photo_residual_coarse, clean.photo_residual_detail))
    hand, frames = o.get("hand"), np.nonzero(ctx.occ_frames["hand"])[0]
    ratio = None
    if hand is not None and hand.detail is not None and len(frames) and clean.mouth.any():
        from avface.stages.detail.fine import detail_occluder_ratio

        ratio = detail_occluder_ratio(hand.detail.displacement, clean.displacement, frames, clean.mouth)
    _rec(records, cid, name, "detail_occluder_ratio", ratio)


def _speed_records(records: list[dict], ctx: _RealClip, m: Method, base: MethodOutput, tmp: Path,
                   rss: float, cuda: float | None) -> None:
    """Real-time factors of the stages this method needs, measured on the clean clip in this run."""
    cid, stage, duration = ctx.clip_id, ctx.stage, ctx.duration
    secs = {s: stage[s] for s in ("probe", "decode", "tracking", "audio", "confidence", "camera") if s in stage}
    secs["fit"] = (base.seconds, base.cpu_seconds)
    if "export" in m.stages and base.fit is not None:
        secs["export"] = _time_export(base, ctx.inputs["clean"], ctx.info, tmp)
    total = cpu_total = 0.0
    for s in STAGES:
        if s not in secs or (s not in m.stages and s != "decode"):
            continue
        _rec(records, cid, m.name, f"rtf_{s}", secs[s][0] / duration)
        if s != "decode":
            total += secs[s][0]
            cpu_total += secs[s][1]
    _rec(records, cid, m.name, "rtf_total", total / duration)
    _rec(records, cid, m.name, "cpu_rtf_total", cpu_total / duration)
    _rec(records, cid, m.name, "ratio_to_tracking", M.ratio(total, stage["tracking"][0]))
    _rec(records, cid, m.name, "peak_rss_mb", rss)
    if cuda is not None:
        _rec(records, cid, m.name, "cuda_peak_mb", cuda)


def _real_clip_info(clip: Clip, ctx: _RealClip, features, bench_time: dict, camera) -> dict:
    info, inputs, clean = ctx.info, ctx.inputs, ctx.inputs["clean"]
    flagged = {v: float(inputs[v].occluded[ctx.occ_frames[v]].mean()) if ctx.occ_frames[v].any() else float("nan")
               for v in VARIANTS}
    flagged["clean_false_positive"] = float(clean.occluded[clean.tracking.detected].mean())
    return {
        "kind": "real", "video": str(clip.video), "audio": str(clip.audio) if clip.audio else None,
        "n_frames": clean.tracking.n_frames, "fps": float(info.fps), "duration_s": ctx.duration,
        "width": info.width, "height": info.height,
        "detected_fraction": float(clean.tracking.detected.mean()), "visible_frames": int(ctx.visible.sum()),
        "still_frames": int(ctx.still.sum()), "occlusion": ctx.plan.describe(),
        "occluded_frames": {v: int(ctx.occ_frames[v].sum()) for v in VARIANTS},
        "flagged_by_visual_confidence": flagged,
        "stage_seconds": {k: round(w, 4) for k, (w, _) in ctx.stage.items()},
        "stage_cpu_seconds": {k: round(c, 4) for k, (_, c) in ctx.stage.items()},
        "bench_seconds": {k: round(w, 3) for k, (w, _) in bench_time.items()},
        "speech": features is not None,
        "camera": camera.to_meta(),
    }


_WARM = {"done": False}


def _warm_up(tracking: Tracking, fit_cfg: FitConfig) -> None:
    """One short fit before the first timed one, so that one-off start-up costs (torch's
    first calls, the model's skinning weights) are not charged to the first clip's fit."""
    if _WARM["done"]:
        return
    from avface.stages.fit import fit_default

    try:
        fit_default(tracking, dataclasses.replace(fit_cfg, iterations=2))
    except AVFaceError:
        return
    _WARM["done"] = True


def _tracker_points(tracking: Tracking, fit_cfg: FitConfig) -> np.ndarray:
    """(T, 468, 3) metric points of the tracker (NaN where undetected), for head motion."""
    from avface.core.geometry import backproject, intrinsics_for
    from avface.core.topology import rigid_weights
    from avface.models.canonical_mesh import load_canonical_mesh

    k = intrinsics_for(tracking.width, tracking.height, fit_cfg.fov_deg)
    w = rigid_weights()
    return backproject(tracking, k, load_canonical_mesh().vertices.astype(np.float64), w)


def _add_ratios(records: list[dict], clip_id: str, methods: list[str]) -> None:
    """Per-clip ratios of the occlusion errors to the reference method's."""
    val = {(r["method"], r["metric"]): r["value"] for r in records if r["clip"] == clip_id}
    for metric in ("lip_err_occluded", "lip_err_audio_only"):
        ref = val.get((REFERENCE_METHOD, metric), float("nan"))
        for m in methods:
            if (m, metric) in val:
                _rec(records, clip_id, m, f"{metric}_ratio", M.ratio(val[(m, metric)], ref))


def _strip_data(plan: OcclusionPlan, outs, paths, info, records, clip_id) -> dict | None:
    """What the side-by-side strip needs from this clip: its worst hand span for the
    reference method, and every method's vertices around it."""
    if not plan.occluder_spans:
        return None
    ref = outs.get(REFERENCE_METHOD, {})
    if ref.get("hand") is None or ref.get("clean") is None:
        return None
    best, best_err = None, -1.0
    for a, b in plan.occluder_spans:
        e = M.safe_mean(M.lip_vertex_error(ref["hand"].vertices, ref["clean"].vertices, np.arange(a, b)))
        if e > best_err:
            best, best_err = (a, b), e
    margin = int(round(STRIP_MARGIN_S * plan.fps))
    a, b = best
    lo, hi = max(0, a - margin), min(plan.n_frames, b + margin)
    verts = {m: (o["hand"].vertices[lo:hi].copy(), o["hand"].intrinsics) for m, o in outs.items() if o.get("hand") is not None}
    ref_clean = (ref["clean"].vertices[lo:hi].copy(), ref["clean"].intrinsics)
    return {"clip": clip_id, "span": best, "range": (lo, hi), "error_mm": 1000.0 * best_err, "vertices": verts,
            "clean_reference": ref_clean, "hand_video": paths["hand"], "clean_video": info.path, "fps": plan.fps}


# --------------------------------------------------------------------------- synthetic clips


def bench_synth_clip(index: int, methods: list[Method], cfg: BenchConfig, out_dir: Path, cache: Path) -> ClipResult:
    from avface.synth import GT_NAME, load_demo_gt, make_demo_clip

    seed = cfg.seed + index
    clip_id = f"synth_seed{seed}"
    folder = out_dir / "synth" / clip_id
    params = {"seed": seed, "duration_s": cfg.synth_duration_s, "size": cfg.synth_size, "occluder": True}
    stamp = folder / "params.json"
    clip = None
    if (folder / GT_NAME).is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == params:
                clip = load_demo_gt(folder)
        except (OSError, json.JSONDecodeError, AVFaceError):
            clip = None
    if clip is None:
        log.info("%s: rendering the synthetic clip", clip_id)
        clip = make_demo_clip(folder, seed=seed, duration_s=cfg.synth_duration_s, size=cfg.synth_size, occluder=True)
        stamp.write_text(json.dumps(params))
    info = media.probe(clip.video_path)
    tr = track(info, config=cfg.tracking, cache_dir=cache / "tracking")
    n = min(tr.n_frames, clip.n_frames)
    wave, features = _read_speech(clip.wav_path, tr.n_frames, float(info.fps))
    confidences = _confidences({"synth": tr}, {})
    fit_cfg, camera = _clip_camera(tr, confidences["synth"][0], cfg, {})
    inp = _method_inputs(clip_id, {"synth": tr}, confidences, features, wave, float(info.fps), fit_cfg,
                         videos={"synth": Path(clip.video_path)})
    outs = _run_all(methods, inp)
    gt = clip.gt_vertices[:n].astype(np.float64)
    visible = clip.occlusion_fraction[:n] <= 0.0
    occluded = clip.occluded[:n]
    records: list[dict] = []
    series: dict[str, np.ndarray] = {"fps": np.array(float(info.fps)), "n_frames": np.array(n),
                                     "occluded": occluded, "lip_open_gt": 1000.0 * M.lip_opening(gt)}
    for m in methods:
        o = outs[m.name]["synth"]
        if o is None:
            continue
        v = o.vertices[:n]
        for name, frames in (("visible", visible), ("occluded", occluded)):
            if frames.any():
                _rec(records, clip_id, m.name, f"mm_synth_{name}", 1000.0 * M.safe_mean(M.vertex_error_similarity(v, gt, frames)))
                _rec(records, clip_id, m.name, f"mm_synth_lips_{name}",
                     1000.0 * M.safe_mean(M.lip_error_similarity(v, gt, frames)))
        series[f"lip_open_{m.name}"] = 1000.0 * M.lip_opening(v)
    info_d = {"kind": "synth", "video": str(clip.video_path), "seed": seed, "n_frames": n, "fps": float(info.fps),
              "duration_s": n / float(info.fps), "width": info.width, "height": info.height,
              "occluder_span_s": list(clip.occluder_span_s) if clip.occluder_span_s else None,
              "occluded_frames": int(occluded.sum()), "visible_frames": int(visible.sum()), "text": clip.text,
              "camera": camera.to_meta(), "camera_fov_true_deg": round(fov_of(clip.K, clip.height), 2)}
    return ClipResult(clip_id, "synth", records, info_d, series)


# --------------------------------------------------------------------------- aggregate and run


def is_timing_metric(metric: str) -> bool:
    """Metrics that measure this machine, not the methods' output (excluded from the
    same-seed-same-figures check)."""
    return metric.startswith(TIMING_METRICS_PREFIXES) or metric in TIMING_METRICS


def aggregate(records: list[dict], clip_info: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per method and metric over clips: ratios by geometric mean; real-time factors weighted
    by clip duration (total seconds over total video seconds); memory by maximum; the rest by
    the mean over clips (each clip counts once, however long)."""
    by: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for r in records:
        by.setdefault((r["method"], r["metric"]), []).append((r["clip"], r["value"]))
    out: dict[str, dict[str, float]] = {}
    for (method, metric), vals in by.items():
        xs = np.array([v for _, v in vals], np.float64)
        if metric.endswith("_ratio") and metric != "ratio_to_tracking":
            agg = M.geometric_mean(xs)
        elif metric.startswith("peak_rss") or metric == "cuda_peak_mb":
            agg = float(np.nanmax(xs)) if np.isfinite(xs).any() else float("nan")
        elif metric.startswith(TIMING_METRICS_PREFIXES):
            d = np.array([clip_info[c]["duration_s"] for c, _ in vals])
            ok = np.isfinite(xs)
            agg = float((xs[ok] * d[ok]).sum() / d[ok].sum()) if ok.any() else float("nan")
        elif metric == "ratio_to_tracking":
            continue  # below, from the pooled real-time factors
        else:
            agg = M.safe_mean(xs)
        out.setdefault(method, {})[metric] = agg
    for method, d in out.items():
        if "rtf_total" in d and "rtf_tracking" in d:
            d["ratio_to_tracking"] = M.ratio(d["rtf_total"], d["rtf_tracking"])
    return out


def _resolve_methods(cfg: BenchConfig) -> list[Method]:
    load_plugins(cfg.plugins)
    names = list(cfg.methods) if cfg.methods else list(available_methods())
    if REFERENCE_METHOD not in names:
        log.info("adding %s: the occlusion ratios are measured against it", REFERENCE_METHOD)
        names.insert(0, REFERENCE_METHOD)
    methods = []
    for n in dict.fromkeys(names):
        m = get_method(n)
        why = m.why_unavailable()
        if why is None:
            methods.append(m)
        elif cfg.methods:
            raise InputError(f"bench method {n!r} cannot run here: {why}")
        else:
            log.warning("%s left out: %s", n, why)
    return methods


def run_bench(clips_dir: Path | str, out_dir: Path | str, config: BenchConfig = BenchConfig(), *,
              progress: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark; writes OUT/metrics.json, OUT/report.md, OUT/plots/ and returns the
    metrics document."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    clips_dir, out_dir = Path(clips_dir), Path(out_dir)
    ensure_writable(out_dir)
    cache = Path(config.cache_dir) if config.cache_dir else out_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    methods = _resolve_methods(config)
    clips = _select_clips(clips_dir, out_dir, config)
    say = progress or (lambda msg: log.info("%s", msg))
    results: list[ClipResult] = []
    for i, clip in enumerate(clips):
        say(f"[{i + 1}/{len(clips)}] {clip.id}")
        results.append(bench_real_clip(clip, methods, config, cache))
    for k in range(config.synth_clips):
        say(f"[synthetic {k + 1}/{config.synth_clips}]")
        results.append(bench_synth_clip(k, methods, config, out_dir, cache))

    records = [r for res in results for r in res.records]
    clip_info = {res.clip_id: res.info for res in results}
    method_order = {m.name: i for i, m in enumerate(methods)}
    clip_order = {res.clip_id: i for i, res in enumerate(results)}
    records.sort(key=lambda r: (clip_order[r["clip"]], method_order[r["method"]], r["metric"]))
    doc = {
        "schema_version": SCHEMA_VERSION,
        "clips": [res.clip_id for res in results],
        "methods": [m.name for m in methods],
        "records": records,
        "aggregate": aggregate(records, clip_info),
        "seed": config.seed,
        "clips_dir": str(clips_dir.resolve()),
        "clip_info": clip_info,
        "method_info": {m.name: {"description": m.description, "stages": list(m.stages)} for m in methods},
        "definitions": METRIC_DEFINITIONS,
        "run": {
            "avface_version": __version__,
            "wall_s": None, "cpu_s": None,  # filled in below, after the plots
            "peak_rss_mb": peak_rss_mb(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "cuda": _cuda_info(),
            "config": dataclasses.asdict(config),
        },
    }
    series = {res.clip_id: res.series for res in results}
    _save_series(out_dir, series)
    if config.plots:
        from avface.bench import plots

        say("plots")
        doc["plots"] = plots.write_all(doc, series, out_dir / "plots")
        if config.strip:
            strips = [res.strip for res in results if res.strip is not None]
            if strips:
                worst = max(strips, key=lambda s: s["error_mm"])
                say(f"side-by-side strip: {worst['clip']} frames {worst['range'][0]}..{worst['range'][1]}")
                doc["plots"]["strip"] = plots.write_strip(worst, out_dir / "plots")
        pictures = next((res.detail for res in results if res.detail is not None), None)
        if pictures is not None:
            doc["plots"]["detail"] = plots.write_detail_pictures(pictures, out_dir / "plots")
    doc["run"]["wall_s"] = time.perf_counter() - t0
    doc["run"]["cpu_s"] = _cpu_seconds() - c0
    doc["run"]["peak_rss_mb"] = peak_rss_mb()
    doc = json_safe(doc)
    (out_dir / "metrics.json").write_text(json.dumps(doc, indent=1, allow_nan=False))
    from avface.bench.report import write_report

    write_report(doc, out_dir / "report.md")
    return doc


def _select_clips(clips_dir: Path, out_dir: Path, config: BenchConfig) -> list[Clip]:
    # never benchmark our own output (variants, strips) when OUT lies inside the clips folder
    clips = [c for c in discover_clips(clips_dir) if not _inside(c.video, out_dir)]
    if config.clip_ids:
        unknown = set(config.clip_ids) - {c.id for c in clips}
        if unknown:
            raise InputError(f"no clips {sorted(unknown)} in {clips_dir}; it has {[c.id for c in clips]}")
        clips = [c for c in clips if c.id in config.clip_ids]
    if not clips and config.synth_clips <= 0:
        raise InputError(f"{clips_dir} holds no video clips (and --synth 0 asks for no synthetic ones)")
    return clips


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def _cuda_info() -> dict | None:
    try:
        import torch

        if torch.cuda.is_available():
            return {"device": torch.cuda.get_device_name(0), "peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20}
    except Exception:  # pragma: no cover
        return None
    return None


def _save_series(out_dir: Path, series: dict[str, dict[str, np.ndarray]]) -> None:
    """Per-clip time series (lip opening per method and variant, spans) for plots and people."""
    folder = out_dir / "series"
    folder.mkdir(parents=True, exist_ok=True)
    for clip_id, s in series.items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in clip_id)
        np.savez_compressed(folder / f"{safe}.npz", **{k: np.asarray(v) for k, v in s.items()})
