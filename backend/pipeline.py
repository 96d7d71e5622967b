"""The whole reconstruction job, one short function per stage (docs/architecture.md):
probe -> tracking -> audio -> confidence -> camera (-> networks) -> fit (-> lips) -> export, which
writes the head, (-> detail, which adds its maps) (-> preview). Used by the CLI, the demo and the
service's workers. The networks stage (docs/networks.md) runs
when a checkpoint is given: it feeds the fit the networks' landmarks where the mouth is not
seen, and after the fit gives the lips. The fine stage (``detail``, docs/fine_stage.md) writes one
displacement map per frame into ``detail/``.

``progress(stage, fraction, message)`` is called with a stage name from ``STAGES`` and the
fraction of that stage done; ``should_cancel()`` is polled and stops the job with
CancelledError.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from avface import media
from avface.config import ReconstructOptions
from avface.core import threads
from avface.errors import CancelledError, InputError, MediaError
from avface.models.registry import available_models, load_model  # noqa: F401  (the service's workers ask the pipeline)
from avface.result import ensure_writable, write_result
from avface.stages.assemble.run import ResultEvidence, ResultRun, ResultSource, build_result
from avface.stages.camera import CameraEstimate, clip_camera
from avface.stages.confidence import visual_confidence
from avface.stages.fit import CoarseFit, fit_default, fit_metrics, fit_model
from avface.stages.lips import refine_lips
from avface.stages.networks.run import ClipInputs, NetworkRun, run_networks
from avface.stages.tracking import Tracking, track

log = logging.getLogger(__name__)

STAGES = ("probe", "tracking", "audio", "confidence", "camera", "networks", "fit", "lips", "export", "detail", "preview")
Progress = Callable[[str, float, str], None]


@dataclass
class _Run:
    """One job's progress reporting, cancellation and per-stage timing."""

    report: Progress
    should_cancel: Callable[[], bool] | None
    seconds: dict[str, float] = field(default_factory=dict)

    def check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise CancelledError("the job was cancelled")

    @contextlib.contextmanager
    def stage(self, name: str):
        self.check_cancel()
        self.report(name, 0.0, "")
        self.seconds.setdefault(name, 0.0)  # a stage that has begun is among the stages run
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        self.report(name, 1.0, "done")

    def progress_of(self, name: str) -> Callable[[float, str], None]:
        return lambda fraction, message: self.report(name, fraction, message)


@dataclass(frozen=True)
class _Inputs:
    """Everything read before the long stages, so a bad input fails in seconds."""

    video: Path
    info: media.VideoInfo
    start: int
    end: int
    transcript: str | None
    wave: np.ndarray | None
    audio_source: str | None


def reconstruct(
    video: Path,
    out_dir: Path,
    options: ReconstructOptions = ReconstructOptions(),
    *,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_head: Callable[[Path], None] | None = None,
) -> Path:
    """Run the whole job; returns the path of result.npz.

    The head comes first: once the coarse fit, the networks and the lips are done,
    ``result.npz`` is written complete but for its detail maps (``meta.detail.state`` is
    ``pending``) and ``on_head(path)`` is called, so that a user can import it while the fine
    stage runs. The fine stage then writes ``detail/`` and writes ``result.npz`` again with
    the state ``complete``; a cancelled or failed fine stage leaves the head with the state
    ``cancelled`` or ``failed`` before the error goes on.
    """
    with threads.job_pool(options.threads) as thread_record:
        return _reconstruct(Path(video), Path(out_dir), options, _Run(progress or (lambda stage, fraction, message: None),
                                                                       should_cancel), on_head, thread_record)


def _reconstruct(video: Path, out_dir: Path, options: ReconstructOptions, run: _Run, on_head, thread_record: dict) -> Path:
    _check_device(options.device)
    ensure_writable(out_dir)
    model = load_model(options.model, options.flame_dir)  # a missing FLAME file stops here, before any work
    checkpoint = _load_networks(options)  # and so does a missing or damaged checkpoint

    with run.stage("probe"):
        inputs = _read_inputs(video, options)
    coarse = _coarse(inputs, model, checkpoint, options, run)
    with run.stage("export"):
        arrays, meta = _assemble(inputs, coarse, options, run)
        meta["threads"] = thread_record
        (out_dir / "config.yaml").write_text(yaml.safe_dump(options.to_dict(), sort_keys=False))
        from avface.stages.detail.run import clear_detail

        clear_detail(out_dir)  # never the maps of an earlier job beside this one's head
        if options.detail:
            meta["detail"]["state"] = "pending"
        path = _write(out_dir, arrays, meta, run)  # the head (its meta gives export's seconds as 0: under way)
    if on_head is not None:
        on_head(path)
    detail = _detail_after(inputs, coarse, options, run, (out_dir, arrays, meta)) if options.detail else None
    if options.preview:
        try:
            with run.stage("preview"):
                _preview(inputs, coarse.fit, arrays["occluded"], out_dir, run,
                         coarse.net.audio_frames if coarse.net is not None else None, detail=detail, device=options.device)
        finally:
            # the result again, so that meta records the preview's time too (even when the
            # preview fails or is cancelled: the result itself is complete)
            _write(out_dir, arrays, meta, run)
    (out_dir / "timings.json").write_text(json.dumps({"stage_seconds": run.seconds,
                                                      "tracker_seconds": coarse.tracking.seconds}))
    return path


def _coarse(inputs: _Inputs, model, checkpoint, options: ReconstructOptions, run: _Run) -> "_Coarse":
    """Tracking, speech, confidence, camera, networks, fit and lips: everything the head needs."""
    speech = _SpeechAhead(inputs)  # beside the tracking, which leaves a core's share idle
    with run.stage("tracking"):
        tracking = _track(inputs, options, run)
    with run.stage("audio"):
        features = speech.result(tracking.n_frames, run)
    with run.stage("confidence"):
        conf, occluded = visual_confidence(tracking)
    with run.stage("camera"), threads.single_thread(options.device):
        camera = clip_camera(tracking, conf, options.fit, options.fov_deg)
    fit_cfg = dataclasses.replace(options.fit, fov_deg=camera.fov_deg)
    net = None
    if checkpoint is not None and tracking.detected.any():  # no face at all: the fit says so
        with run.stage("networks"), threads.single_thread(options.device):
            net = _networks(checkpoint, tracking, features, conf, fit_cfg, options, run)
    with run.stage("fit"):
        fit, metrics = _fit(model, tracking, conf, fit_cfg, options, run, net)
    log.info("coarse fit: NME %.2f %% (lips %.2f %%) of the inter-ocular distance", metrics["nme"], metrics["nme_lips"])
    lips = None
    if net is not None and options.networks.lips:
        with run.stage("lips"), threads.single_thread(options.device):
            lips = _lips(net, fit, tracking, options)
    return _Coarse(tracking, features, conf, occluded, camera, fit, metrics, net, lips)


def _write(out_dir: Path, arrays: dict, meta: dict, run: _Run) -> Path:
    """Write result.npz with the stages run so far and their times."""
    meta["stage_seconds"] = dict(run.seconds)
    meta["stages_run"] = [s for s in STAGES if s in run.seconds]
    return write_result(out_dir / "result.npz", arrays, meta)


def _detail_after(inputs: _Inputs, coarse: "_Coarse", options: ReconstructOptions, run: _Run, written):
    """The fine stage after the head: the maps into ``detail/``, then result.npz again with
    ``meta.detail`` complete (or skipped). A cancel or an error leaves the head readable, its
    ``meta.detail.state`` saying what happened, and goes on. Returns the DetailRun or None."""
    from avface.stages.detail.run import clear_detail, write_detail

    out_dir, arrays, meta = written
    try:
        with run.stage("detail"):
            detail = _detail(inputs, coarse, options, run)
            if detail is not None:
                meta["detail"] = {**write_detail(out_dir, detail), "state": "complete"}
            else:
                meta["detail"].update(state="skipped",
                                      skipped="no frame had a trusted face texel to learn detail from")
    except BaseException as e:
        clear_detail(out_dir)  # no half-written set of maps beside the head
        cancelled = isinstance(e, (CancelledError, KeyboardInterrupt))
        meta["detail"].update(state="cancelled" if cancelled else "failed",
                              reason="cancelled" if cancelled else f"{type(e).__name__}: {e}")
        _write(out_dir, arrays, meta, run)
        raise
    _write(out_dir, arrays, meta, run)
    return detail


def warm_up() -> None:
    """Import what every job needs before its first frame (torch, MediaPipe, the speech
    recogniser, the later stages' modules): a few seconds that a spare service worker spends
    before its job arrives (``avface.service.worker``). Loads no model and reads no file."""
    import importlib

    # torch._dynamo: torch imports it on the first optimiser a process makes (2.6 s, inside
    # the camera stage's first fit)
    for name in ("torch", "torch._dynamo", "cv2", "mediapipe", "mediapipe.tasks.python.vision", "pocketsphinx",
                 "avface.models.checkpoint", "avface.train.adapt", "avface.stages.detail.run",
                 "avface.stages.detail.adapt", "avface.stages.preview"):
        try:
            importlib.import_module(name)
        except ImportError:  # the stage that needs it says so, with what to do, when it runs
            log.debug("warm-up: %s is not importable", name)


def _check_device(device: str) -> str:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but torch sees no CUDA device; use --device cpu "
                             "or install a CUDA build of torch (see README)")
    return device


def _read_inputs(video: Path, options: ReconstructOptions) -> _Inputs:
    """Probe the video, and read the transcript and the speech."""
    info = media.probe(video)
    start, end = info.frame_range(options.frame_start, options.frame_end)
    transcript = None
    if options.transcript:
        try:
            transcript = Path(options.transcript).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read the transcript {options.transcript}: {getattr(e, 'strerror', None) or e}") from e
    wave, audio_source = None, None
    if options.audio:
        wave, audio_source = media.read_audio(options.audio), options.audio
    elif info.has_audio:
        wave, audio_source = media.read_audio(video, start_s=start / info.fps), str(video)
    log.info("%s: %dx%d, %.3f fps, frames %d..%d, audio %s", video, info.width, info.height, info.fps,
             start, end, "yes" if info.has_audio else "no")
    return _Inputs(video, info, start, end, transcript, wave, audio_source)


def _track(inputs: _Inputs, options: ReconstructOptions, run: _Run) -> Tracking:
    tracking = track(inputs.info, inputs.start, inputs.end, config=options.tracking,
                     cache_dir=Path(options.cache_dir) if options.cache_dir else None,
                     progress=run.progress_of("tracking"), should_cancel=run.should_cancel)
    if tracking.n_frames == 0:
        raise MediaError(f"{inputs.video} delivered no frames in the range {inputs.start}..{inputs.end}")
    return tracking


def _speech(inputs: _Inputs, n_frames: int, run: _Run | None):
    """The clip's AudioFeatures, or None (video only) without speech; ``run``: where the
    audio stage's progress goes (None: nowhere, for the thread beside the tracking)."""
    if inputs.wave is None:
        log.warning("%s has no audio track and no --audio was given: reconstructing from video only", inputs.video)
        return None
    from avface.stages import audio as audio_mod

    return audio_mod.extract_features(inputs.wave, media.SAMPLE_RATE_HZ, n_frames, inputs.info.fps,
                                      transcript=inputs.transcript,
                                      progress=None if run is None else lambda f: run.report("audio", f, "phones"))


class _SpeechAhead:
    """The speech features computed in a thread while the tracking runs: MediaPipe and the
    decoder leave part of the cores idle, and the features need only the audio and the
    frame count the probe expects. The result is the same as :func:`_speech` after the
    tracking (it is computed again, in the audio stage, if the tracking delivered another
    frame count)."""

    def __init__(self, inputs: _Inputs):
        import threading

        self.inputs = inputs
        self.expected = inputs.end - inputs.start
        self.seconds = 0.0
        self._value = self._error = None
        self._thread = None
        if inputs.wave is not None:
            self._thread = threading.Thread(target=self._work, name="speech-features", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        t0 = time.perf_counter()
        try:
            self._value = _speech(self.inputs, self.expected, None)
        except BaseException as e:  # raised in the audio stage, where it belongs
            self._error = e
        self.seconds = time.perf_counter() - t0

    def result(self, n_frames: int, run: _Run):
        if self._thread is None or n_frames != self.expected:
            return _speech(self.inputs, n_frames, run)
        self._thread.join()
        if self._error is not None:
            raise self._error
        log.info("speech features computed beside the tracking in %.1f s", self.seconds)
        return self._value


def _load_networks(options: ReconstructOptions):
    """The networks' Checkpoint, or None without one (video only); ModelFileError when the
    file is missing or damaged, never random weights."""
    from avface.config import networks_off

    if networks_off(options.networks_checkpoint):
        return None
    from avface.models.checkpoint import load_checkpoint, load_default_checkpoint

    if options.networks_checkpoint == "default":
        return load_default_checkpoint()
    return load_checkpoint(options.networks_checkpoint)


def _networks(checkpoint, tracking: Tracking, features, conf: np.ndarray, fit_cfg, options: ReconstructOptions,
              run: _Run) -> NetworkRun:
    """Evidence -> (adaptation, seeded) -> the networks' pose and lower-face landmarks."""
    return run_networks(checkpoint, ClipInputs(tracking, features, conf, fit_cfg.fov_deg), config=options.networks,
                        device=options.device, report=run.progress_of("networks"),
                        adapter=gradient_adapter(options.networks))


def gradient_adapter(config):
    """The training code's per-clip gradient adaptation when ``config`` (a
    ``NetworksStageConfig``) asks for it (``adapt_steps > 0``; off by default), else None: a
    default job never imports ``avface.train``."""
    if not (config.adapt and config.adapt_steps > 0):
        return None
    from avface.train.adapt import adapt_networks

    return adapt_networks


def _lips(net: NetworkRun, fit: CoarseFit, tracking: Tracking, options: ReconstructOptions):
    """The SIREN's lips for the fitted model (and, for a model whose shapes cannot follow the
    tracker's lips, what they leave), as the result's lip PCA."""
    return refine_lips(net, fit, device=options.device, tracking=tracking)


def _fit(model, tracking: Tracking, conf: np.ndarray, fit_cfg, options: ReconstructOptions, run: _Run,
         net: NetworkRun | None = None) -> tuple[CoarseFit, dict]:
    net_points = net.points if net is not None else None
    if model is None:
        fit = fit_default(tracking, fit_cfg, mouth_conf=conf, net_points=net_points,
                          progress=run.progress_of("fit"), should_cancel=run.should_cancel)
    else:
        fit = fit_model(model, tracking, fit_cfg, device=options.device, mouth_conf=conf, net_points=net_points,
                        progress=run.progress_of("fit"), should_cancel=run.should_cancel)
    return fit, fit_metrics(fit, tracking)


@dataclass(frozen=True, eq=False)
class _Coarse:
    """What the stages up to the lips made of the clip: what the detail and export stages read."""

    tracking: Tracking
    features: object
    """The clip's AudioFeatures, or None without speech."""
    conf: np.ndarray
    occluded: np.ndarray
    camera: CameraEstimate | None
    fit: CoarseFit
    metrics: dict
    net: NetworkRun | None = None
    lips: object = None
    """The lips' LipPCA, or None."""


def _detail(inputs: _Inputs, coarse: _Coarse, options: ReconstructOptions, run: _Run):
    """The fine stage on the final (coarse + lips) mesh, with the networks' f_a as its audio
    channel and their generic fine part as its start when they ran; None when no frame has a
    face texel to learn from."""
    from avface.stages.detail.run import DetailHooks, DetailInputs, run_detail
    from avface.stages.lips import vertices_with_lips

    tracking, fit, net = coarse.tracking, coarse.fit, coarse.net
    audio = net.f_a if net is not None else None
    frames = media.iter_frames(inputs.info, inputs.start, inputs.start + tracking.n_frames)
    clip = DetailInputs(frames, vertices_with_lips(fit, coarse.lips), fit.model, fit.intrinsics, coarse.conf,
                        tracking.detected, audio)
    return run_detail(clip, options.fine, device=options.device,
                      hooks=DetailHooks(report=run.progress_of("detail"), should_cancel=run.should_cancel),
                      start=net.networks.fine if net is not None else None)


def _assemble(inputs: _Inputs, coarse: _Coarse, options: ReconstructOptions, run: _Run) -> tuple[dict, dict]:
    info, start = inputs.info, inputs.start
    tracking, features, fit, net, lips = coarse.tracking, coarse.features, coarse.fit, coarse.net, coarse.lips
    src = ResultSource(
        fps=info.fps, width=info.width, height=info.height, audio_present=inputs.wave is not None,
        source={"path": str(inputs.video.resolve()), "frame_start": int(start), "frame_end": int(start + tracking.n_frames),
                "vfr": bool(info.vfr), "audio": inputs.audio_source})
    extra = {
        "fit_metrics": coarse.metrics,
        # the share of the clip's motion the per-clip basis keeps (None for a fixed-basis model)
        "expression_explained_variance": None if math.isnan(fit.explained_variance) else fit.explained_variance,
        "transcript_aligned": bool(features.aligned) if features is not None else False,
        "device": options.device,
    }
    if coarse.camera is not None:
        extra["camera"] = coarse.camera.to_meta()
    if net is not None:
        extra["networks"] = dict(net.meta, lips=lips is not None)
    evidence = ResultEvidence(coarse.conf, coarse.occluded, features.activity if features is not None else None)
    return build_result(fit, tracking, evidence, src,
                        ResultRun(stages_run=[s for s in STAGES if s in run.seconds],
                                  stage_seconds=run.seconds, extra_meta=extra),
                        write_vertices=options.write_vertices, lips=lips)


def _preview(inputs: _Inputs, fit: CoarseFit, occluded: np.ndarray, out_dir: Path, run: _Run,
             audio_frames: np.ndarray | None = None, *, detail=None, device: str = "cpu") -> None:
    from avface.stages.preview import PreviewAudio, PreviewHooks, write_preview

    panel = None
    if detail is not None:
        from avface.stages.detail.run import detail_panels

        panel = detail_panels(detail, fit.model, fit.intrinsics, (inputs.info.height, inputs.info.width), device)
    own_track = inputs.audio_source == str(inputs.video)
    audio = PreviewAudio(inputs.audio_source, inputs.start / inputs.info.fps if own_track else 0.0, audio_frames)
    write_preview(inputs.info, inputs.start, fit, occluded, out_dir / "preview.mp4", audio=audio, detail_panel=panel,
                  hooks=PreviewHooks(progress=lambda f: run.report("preview", f, "rendering"),
                                     should_cancel=run.should_cancel))
