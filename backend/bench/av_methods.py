"""The benchmark's audio-visual methods (docs/networks.md), loaded by ``avface bench`` as every
``avface/<pkg>/bench_methods.py`` is (avface.bench.methods):

* ``audio_only``: the networks with no video evidence for the lower face (the expression
  branch sees the face as missing, and the fit's tracker term on the lower face is off on
  every frame; no adaptation, which learns from trusted mouths), so the mouth comes from the
  speech, the head pose and the context (the clip's expression basis is still the PCA of
  the tracker's motion). It ignores the video on the clean clip too, so its occlusion
  errors are measured against ``coarse_video``'s clean mesh (``reference``), not its own:
  against itself it scored 0.25x ``interp``'s, which was consistency, not accuracy;
* ``av``: the coarse audio-visual stage: the networks' landmarks join the fit where the
  mouth is not seen (what ``reconstruct --networks CKPT`` does, lips off);
* ``av_lips``: ``av`` with the SIREN's lip refinement added to the mesh (what
  ``reconstruct --networks CKPT`` does by default);
* ``av_full``: ``av_lips`` and the fine stage (``reconstruct --detail``): per-frame UV
  displacement maps, measured by their held-out photometric residual (``detail_gain``) and
  by what a hand over the mouth leaves in them (``detail_occluder_ratio``). The maps change
  no vertex, so the stage runs on the variants those figures read (``DETAIL_VARIANTS``: the
  clean clip and the hand); elsewhere the method is ``av_lips``. Its speed is measured on
  the clean clip, the fine stage included;
* ``ict_av_lips`` and ``ict_audio_only``: ``av_lips`` and ``audio_only`` on the ICT head
  (``reconstruct --model ict``), measured at the surface points under the tracker's 468
  landmarks (:func:`mesh_landmarks`), as every method is.

Each runs the very functions ``reconstruct`` runs (avface.stages.networks.run), adaptation included.

The checkpoint comes from the environment, since a method sees only its clip:
``AVFACE_BENCH_NETWORKS=CKPT`` (``avface bench --networks CKPT`` sets it); unset, the
checkpoint that ships (what ``reconstruct`` uses). ``AVFACE_BENCH_NETWORKS=none`` leaves
these methods out of a default run with one log line each, and naming them with
``--methods`` is then an error that says so.
``AVFACE_BENCH_ADAPT_STEPS=N`` adds N steps of gradient fine-tuning to the per-clip
adaptation (default: reconstruct's ``NetworksStageConfig.adapt_steps``, 0), and
``AVFACE_BENCH_ADAPT=0`` turns the adaptation off (an ablation: the generic networks fill).

The occlusion flags are the variant's visual-confidence flags (``MethodOutput.occluded``
is left None): the networks do not flag occlusion themselves yet.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from avface.bench.methods import MethodInput, MethodOutput, register_method
from avface.config import NetworksStageConfig
from avface.errors import InputError, ModelFileError
from avface.pipeline import gradient_adapter
from avface.stages.fit import fit_default
from avface.stages.lips import refine_lips, vertices_with_lips
from avface.stages.networks.run import ClipInputs, run_networks

log = logging.getLogger(__name__)

CHECKPOINT_ENV = "AVFACE_BENCH_NETWORKS"
ADAPT_STEPS_ENV = "AVFACE_BENCH_ADAPT_STEPS"
ADAPT_ENV = "AVFACE_BENCH_ADAPT"
STAGES = ("probe", "tracking", "audio", "confidence", "camera", "networks", "fit", "export")

_LOADED: dict = {}
_NO_CHECKPOINT = (f"{CHECKPOINT_ENV}=none turns the networks off; pass `avface bench --networks CKPT`, or leave "
                  f"{CHECKPOINT_ENV} unset for the checkpoint that ships")


def _without_checkpoint() -> str | None:
    """Why the audio-visual methods cannot run (``AVFACE_BENCH_NETWORKS=none``), or None."""
    return _NO_CHECKPOINT if os.environ.get(CHECKPOINT_ENV) == "none" else None


def checkpoint():
    """The loaded checkpoint named by AVFACE_BENCH_NETWORKS (read once per file), the shipped
    one when it names none or ``default``, or ModelFileError saying how to give one."""
    path = os.environ.get(CHECKPOINT_ENV) or "default"
    if path == "none":
        raise ModelFileError(f"no networks checkpoint for the audio-visual methods: {_NO_CHECKPOINT}")
    from avface.models.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, load_default_checkpoint

    file = DEFAULT_CHECKPOINT if path == "default" else Path(path)
    key = (str(file), file.stat().st_mtime_ns if file.exists() else None)
    if _LOADED.get("key") != key:
        _LOADED.update(key=key, checkpoint=load_default_checkpoint() if path == "default" else load_checkpoint(path))
    return _LOADED["checkpoint"]


def stage_config() -> NetworksStageConfig:
    cfg = NetworksStageConfig(adapt=os.environ.get(ADAPT_ENV, "1") != "0")
    steps = os.environ.get(ADAPT_STEPS_ENV)
    if steps:
        try:
            n = int(steps)
        except ValueError:
            raise InputError(f"{ADAPT_STEPS_ENV} must be a whole number of steps, got {steps!r}") from None
        cfg = dataclasses.replace(cfg, adapt_steps=max(n, 0))
    return cfg


def _run(inp: MethodInput, *, video: bool, lips: bool, detail: bool = False, model: str = "default") -> MethodOutput:
    ck = checkpoint()
    cfg = stage_config()
    if not video:  # adaptation learns from the clip's trusted mouths, and there are none
        cfg = dataclasses.replace(cfg, adapt=False)
    # no video for the lower face: the tracker's lower face counts on no frame
    conf = inp.visual_conf if video else np.zeros_like(inp.visual_conf)
    fit_cfg = dataclasses.replace(inp.fit_config, use_visual_confidence=True)
    net = run_networks(ck, ClipInputs(inp.tracking, inp.features, conf, fit_cfg.fov_deg), config=cfg, video=video,
                       adapter=gradient_adapter(cfg))
    if model == "ict":
        from avface.models.ict import load_ict
        from avface.stages.fit import fit_model

        fit = fit_model(load_ict(), inp.tracking, fit_cfg, mouth_conf=conf, net_points=net.points)
    else:
        fit = fit_default(inp.tracking, fit_cfg, mouth_conf=conf, net_points=net.points)
    pca = refine_lips(net, fit, tracking=inp.tracking) if lips else None
    vertices = mesh_landmarks(fit.model, vertices_with_lips(fit, pca))
    figures = None
    if detail and inp.variant in DETAIL_VARIANTS and inp.video is not None:
        figures = _detail_figures(inp, fit, vertices, net)
    return MethodOutput(vertices, fit.intrinsics, fit=fit, filled=fit.filled, detail=figures)


def mesh_landmarks(model, vertices: np.ndarray) -> np.ndarray:
    """(T, 468, 3) the points under MediaPipe's 468 face-mesh landmarks of a model's vertices
    (T, V, 3), which the benchmark measures: the vertices themselves for the default model
    (vertex i is landmark i), the embedded surface points for another (the ICT head)."""
    if vertices.shape[1] == 468 and model.name == "mediapipe_canonical":
        return vertices
    ids = np.asarray(model.landmark_ids)
    order = np.array([int(np.flatnonzero(ids == i)[0]) for i in range(468)])
    tri = np.asarray(model.faces)[np.asarray(model.landmark_faces)[order]]  # (468, 3)
    bary = np.asarray(model.landmark_bary, np.float64)[order]
    return np.einsum("mc,tmcx->tmx", bary, vertices[:, tri].astype(np.float64)).astype(np.float32)


DETAIL_VARIANTS = ("clean", "hand")
"""Where av_full runs its fine stage (the variants its detail figures are measured on)."""


def _detail_figures(inp: MethodInput, fit, vertices: np.ndarray, net):
    """The fine stage on one variant's frames, as reconstruct --detail runs it."""
    from avface import media
    from avface.bench.metrics import DetailFigures
    from avface.config import DetailStageConfig
    from avface.stages.detail.run import DetailInputs, mouth_texels, run_detail

    info = media.probe(inp.video)
    frames = media.iter_frames(info, 0, len(vertices))
    run = run_detail(DetailInputs(frames, vertices, fit.model, fit.intrinsics, inp.visual_conf, inp.tracking.detected,
                                  net.f_a), DetailStageConfig(), start=net.networks.fine)
    if run is None:
        return None
    return DetailFigures(run.displacement, mouth_texels(run.raster, fit.model), run.adapt.photo_residual_coarse,
                         run.adapt.photo_residual_detail, len(run.adapt.held_out), _normal_maps(run, fit, vertices))


def _normal_maps(run, fit, vertices: np.ndarray):
    """(frame, coarse, detailed) UV normal maps of the middle held-out frame."""
    import torch

    from avface.stages.detail import uvspace

    held = run.adapt.held_out
    if len(held) == 0:
        return None
    t = int(held[len(held) // 2])
    faces = np.asarray(fit.model.faces)
    points, normals = uvspace.texel_geometry(run.raster, faces, torch.as_tensor(vertices[t:t + 1], dtype=torch.float32))
    covered = uvspace.texel_mask(run.raster)
    detailed = uvspace.detail_normals(points, normals, torch.as_tensor(run.displacement[t:t + 1]), covered)
    return t, uvspace.normal_map_image(normals[0], covered), uvspace.normal_map_image(detailed[0], covered)


@register_method("audio_only", description="networks with no video evidence for the lower face (speech and context)",
                 stages=STAGES, unavailable=_without_checkpoint, reference="coarse_video")
def audio_only_method(inp: MethodInput) -> MethodOutput:
    return _run(inp, video=False, lips=True)


@register_method("av", description="coarse audio-visual stage: the networks' landmarks where the mouth is not seen",
                 stages=STAGES, unavailable=_without_checkpoint)
def av_method(inp: MethodInput) -> MethodOutput:
    return _run(inp, video=True, lips=False)


@register_method("av_lips", description="av with the lip SIREN's refinement (what reconstruct --networks does)",
                 stages=STAGES, unavailable=_without_checkpoint)
def av_lips_method(inp: MethodInput) -> MethodOutput:
    return _run(inp, video=True, lips=True)


@register_method("av_full", description="av_lips with the fine stage's per-frame displacement maps "
                 "(what reconstruct --detail does)", stages=STAGES, unavailable=_without_checkpoint)
def av_full_method(inp: MethodInput) -> MethodOutput:
    return _run(inp, video=True, lips=True, detail=True)


@register_method("ict_audio_only", description="audio_only on the ICT head (--model ict)",
                 stages=STAGES, unavailable=_without_checkpoint, reference="coarse_video")
def ict_audio_only_method(inp: MethodInput) -> MethodOutput:
    return _run(inp, video=False, lips=True, model="ict")


@register_method("ict_av_lips", description="av_lips on the ICT head (reconstruct --model ict, without the detail)",
                 stages=STAGES, unavailable=_without_checkpoint)
def ict_av_lips_method(inp: MethodInput) -> MethodOutput:
    return _run(inp, video=True, lips=True, model="ict")
