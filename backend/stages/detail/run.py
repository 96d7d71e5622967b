"""The fine stage of a reconstruction job (docs/fine_stage.md): the coarse (+ lips) mesh of
every frame unwrapped into UV space, the detail network adapted to the clip's trusted
texels, one displacement map per frame carried over what was not trusted, written as the
result's ``detail/`` maps.

The pieces live in :mod:`avface.stages.detail.uvspace` (rasterising, unwrapping, visibility),
:mod:`avface.stages.detail.fine` (losses, carrying, the 16-bit maps) and :mod:`avface.stages.detail.adapt` (the
per-clip adaptation); this module strings them together for :mod:`avface.pipeline` and the
benchmark's ``av_full`` method.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from avface.config import DetailStageConfig
from avface.errors import CancelledError

log = logging.getLogger(__name__)

LOWER_FACE_INNER = 0.9
"""Vertices within this many mouth widths of the mouth's centre (at rest) belong wholly to
the lower face, whose visual confidence is the mouth's..."""
LOWER_FACE_OUTER = 1.5
"""... and beyond this many not at all (a linear blend between): the mouth, chin and lower
cheeks, where a hand or a microphone over the mouth lands."""

PAD_TEXELS = 4
"""Gutter around the UV islands of the written maps (``uvspace.pad_maps``)."""


def mouth_distance(rest: np.ndarray, lip_ids) -> np.ndarray:
    """(V,) each vertex's distance from the lips' centre on the rest shape (V, 3), in mouth
    widths (the lips' extent across the face). Any topology: only the lip vertices need be
    known."""
    rest = np.asarray(rest, np.float64)
    lips = rest[np.asarray(lip_ids, int)]
    width = np.ptp(lips[:, 0])
    if width <= 0:
        raise ValueError("the lip vertices have no width: cannot place the mouth")
    return np.linalg.norm(rest - lips.mean(0), axis=1) / width


def lower_face_weights(rest: np.ndarray, lip_ids) -> np.ndarray:
    """(1, V) float32 in [0, 1]: how much each vertex of the rest shape (V, 3) belongs to the
    lower face, by its :func:`mouth_distance`."""
    d = mouth_distance(rest, lip_ids)
    w = np.clip((LOWER_FACE_OUTER - d) / (LOWER_FACE_OUTER - LOWER_FACE_INNER), 0.0, 1.0)
    return w[None].astype(np.float32)


MOUTH_RADIUS = 0.75
"""The mouth's texels lie within this many mouth widths of its centre at rest: the lips and
the skin around them, where a hand over the mouth lands (the benchmark's
``detail_occluder_ratio``)."""


def mouth_texels(raster, model, radius: float = MOUTH_RADIUS) -> np.ndarray:
    """(S, S) bool: covered texels whose rest-shape point lies within ``radius`` mouth widths
    of the lips' centre."""
    import torch

    from avface.stages.detail import uvspace

    d = mouth_distance(model.neutral_vertices(None), model.lip_vertex_ids)
    texel_d = uvspace.interpolate(raster, np.asarray(model.faces), torch.as_tensor(d, dtype=torch.float32)[None, :, None],
                                  fill=np.inf)[0, ..., 0].numpy()
    return raster.mask & (texel_d <= radius)


def symmetric_rest(model) -> np.ndarray:
    """(V, 3) a rest shape symmetric about x = 0 in the model's frame, for the symmetry
    term's mirror map: the canonical mesh for the default model (whose per-clip identity is
    in the tracker's frame), the template for FLAME."""
    if model.name == "mediapipe_canonical":
        from avface.models.canonical_mesh import load_canonical_mesh

        return load_canonical_mesh().vertices
    return model.neutral_vertices(None)


@dataclass(eq=False)
class DetailRun:
    """What the fine stage hands to the export and the preview."""

    displacement: np.ndarray
    """(T, S, S) float32 metres along the coarse normal, carried over untrusted texels, with a
    gutter around the UV islands."""
    encoding: object
    """The maps' :class:`~avface.result.DetailEncoding`."""
    raster: object
    """The layout's :class:`~avface.stages.detail.uvspace.UVRaster`."""
    adapt: object
    """The :class:`~avface.stages.detail.adapt.FineAdaptResult` (network, albedo, light, residuals)."""
    meta: dict
    """The record for ``meta.detail`` besides the encoding."""
    vertices: np.ndarray
    """(T, V, 3) the camera-frame mesh the maps were made against (coarse + lips): D is
    along its normals."""


@dataclass(frozen=True, eq=False)
class DetailInputs:
    """One clip as the fine stage reads it."""

    frames: Iterable
    """The clip's (H, W, 3) uint8 RGB frames in order (``media.iter_frames``)."""
    vertices: np.ndarray
    """(T, V, 3) the result's camera-frame coarse + lips mesh."""
    model: object
    """The fitted face model (its faces, UV layout, lips and rest shape)."""
    intrinsics: np.ndarray
    """(3, 3) the camera's."""
    mouth_conf: np.ndarray
    """(T,) the visual confidence of the mouth (the lower face's texels get it)."""
    detected: np.ndarray
    """(T,) bool: the tracker found the face."""
    audio: np.ndarray | None = None
    """(T, 64) the audio encoder's f_a (``NetworkRun.f_a``), or None."""


@dataclass(frozen=True)
class DetailHooks:
    """How the fine stage reports its progress and learns that the job was cancelled."""

    report: Callable[[float, str], None] | None = None
    """``report(fraction, message)``, called now and then."""
    should_cancel: Callable[[], bool] | None = None
    """Polled; True stops the stage with CancelledError."""


def _unwrap_trusted(clip: DetailInputs, raster, v, weights: np.ndarray, device: str,
                    report: Callable[[float, str], None], should_cancel: Callable[[], bool] | None):
    """(ClipUV, outliers (T,) bool, occluded (T,) bool): every frame unwrapped, its texels'
    trust from the visual confidence, and the frames the stage finds occluded (its own
    appearance outliers or the flagged ones) untrusted whole."""
    import torch

    from avface.stages.confidence import OCCLUDED_BELOW
    from avface.stages.detail import uvspace
    from avface.stages.detail.fine import ClipUV, appearance_outlier_frames, unwrap_clip

    n = len(clip.vertices)
    faces = np.asarray(clip.model.faces)
    mouth_conf, detected = clip.mouth_conf, clip.detected
    conf = uvspace.confidence_map(raster, faces, weights,
                                  torch.as_tensor(np.asarray(mouth_conf, np.float32), device=device)[:, None],
                                  torch.as_tensor(np.asarray(detected, np.float32), device=device))

    def stream():
        for i, frame in enumerate(clip.frames):
            if should_cancel is not None and should_cancel():
                raise CancelledError("cancelled while unwrapping the frames")
            if i % 25 == 0:
                report(0.25 * i / max(n, 1), "unwrapping the frames")
            yield frame

    uv = unwrap_clip(stream(), v, faces, raster, clip.intrinsics, confidence=conf)
    # the stage's own occlusion evidence: a lower face that does not look like itself (a
    # skin-toned hand the visual confidence missed) is not detail, and is carried over
    lower = uvspace.interpolate(raster, faces, torch.as_tensor(weights, device=device).T[None])[0, ..., 0]
    flagged = np.asarray(mouth_conf) < OCCLUDED_BELOW
    outliers = appearance_outlier_frames(uv, lower > 0.5, reference=~flagged & np.asarray(detected, bool))
    # a frame with something over the mouth teaches nothing anywhere (the occluder reaches
    # past the lower face: fingers over a cheek, a microphone's stand) and is carried whole
    occluded = outliers | flagged
    if occluded.any():
        drop = torch.as_tensor(occluded, device=uv.trust.device)
        uv = ClipUV(uv.image, torch.where(drop[:, None, None], torch.zeros_like(uv.trust), uv.trust))
    return uv, outliers, occluded


def _adapt_progress(report: Callable[[float, str], None], should_cancel: Callable[[], bool] | None):
    """The adaptation's ``progress(fraction)``: the stage's last 70 %, and a cancellation point."""

    def progress(fraction):
        if should_cancel is not None and should_cancel():
            raise CancelledError("cancelled while adapting the detail")
        report(0.25 + 0.7 * fraction, "adapting the detail network")

    return progress


def run_detail(clip: DetailInputs, config: DetailStageConfig = DetailStageConfig(), *, device: str = "cpu",
               hooks: DetailHooks = DetailHooks(), start=None) -> DetailRun | None:
    """The fine stage on one clip.

    clip: the frames, mesh, model, camera, mouth confidence, detections and audio
    (:class:`DetailInputs`); hooks: progress and cancellation (:class:`DetailHooks`); start:
    the checkpoint's generic :class:`~avface.models.fine.DetailNet` (``AVFaceNetworks.fine``)
    to adapt a copy of, or None for a fresh, seeded network. Returns None, with a warning,
    when no frame has a texel to learn from (a face never seen).
    """
    import torch

    from avface.models.fine import FineNetConfig
    from avface.result import DetailEncoding
    from avface.stages.detail import uvspace
    from avface.stages.detail.adapt import AdaptInputs, FineAdaptConfig, adapt_clip

    t0 = time.perf_counter()
    report = hooks.report or (lambda fraction, message: None)
    model, vertices, audio = clip.model, clip.vertices, clip.audio
    n = len(vertices)
    size = config.map_size or uvspace.default_uv_size(device)
    faces = np.asarray(model.faces)
    raster = uvspace.rasterise_uv(model.uv, model.uv_faces, size, getattr(model, "detail_faces", None))
    v = torch.as_tensor(np.asarray(vertices, np.float32), device=device)
    weights = lower_face_weights(model.neutral_vertices(None), model.lip_vertex_ids)
    uv, outliers, occluded = _unwrap_trusted(clip, raster, v, weights, device, report, hooks.should_cancel)
    t_unwrap = time.perf_counter() - t0
    net = None
    if start is not None:
        import copy

        net = copy.deepcopy(start).to(device)
    cfg = FineAdaptConfig(steps=config.steps, batch=config.batch, holdout_stride=config.holdout_stride,
                          max_train_frames=config.train_frames, seed=config.seed,
                          net=net.cfg if net is not None else FineNetConfig())
    a = None if audio is None else torch.as_tensor(np.asarray(audio, np.float32), device=device)
    mirror = uvspace.mirror_texels(raster, faces, symmetric_rest(model))
    progress = _adapt_progress(report, hooks.should_cancel)
    try:
        res = adapt_clip(AdaptInputs(uv, v, faces, raster, a, mirror), cfg, net=net, progress=progress)
    except ValueError as e:
        if "no frame has a trusted texel" not in str(e):
            raise
        log.warning("fine stage skipped: %s", e)
        return None
    maps = uvspace.pad_maps(res.displacement, raster.mask, PAD_TEXELS).astype(np.float32)
    enc = DetailEncoding.for_range(size, cfg.net.max_displacement_m, n_maps=n)
    face = np.abs(res.displacement[:, raster.mask])
    meta = {
        "steps": cfg.steps, "train_frames": int(len(res.train_frames)), "held_out_frames": int(len(res.held_out)),
        "photo_residual_coarse": _finite(res.photo_residual_coarse),
        "photo_residual_detail": _finite(res.photo_residual_detail),
        "detail_gain": _finite(res.detail_gain), "outlier_frames": int(outliers.sum()),
        "carried_frames": int(occluded.sum()), "mean_abs_mm": float(1000.0 * face.mean()),
        "max_abs_mm": float(1000.0 * face.max()), "audio": audio is not None, "seed": config.seed,
        "seconds": {"unwrap": t_unwrap, **{k: float(s) for k, s in res.phase_seconds.items()}},
        "start": "generic (the checkpoint's fine part)" if start is not None else "fresh network",
    }
    log.info("detail: %d maps of %d^2, held-out photometric residual %.2f -> %.2f (gain %.2f), mean |D| %.2f mm, "
             "%.1f s", n, size, res.photo_residual_coarse, res.photo_residual_detail, res.detail_gain,
             meta["mean_abs_mm"], time.perf_counter() - t0)
    report(1.0, "done")
    return DetailRun(maps, enc, raster, res, meta, np.asarray(vertices, np.float32))


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def clear_detail(out_dir: Path) -> None:
    """Remove the maps an earlier job left in ``out_dir/detail`` (every file the result's
    validator would count, ``fine.detail_files``): a result must never be read with another
    run's maps."""
    from avface.result import detail_files

    for p in detail_files(out_dir):
        p.unlink()


def write_detail(out_dir: Path, run: DetailRun) -> dict:
    """Write the maps into ``out_dir/detail`` (replacing an earlier job's) and return
    ``meta.detail``."""
    from avface.stages.detail.fine import write_detail_maps

    clear_detail(out_dir)
    write_detail_maps(out_dir, run.displacement, run.encoding)
    return {**run.encoding.to_meta(), **run.meta}


def detail_panels(run: DetailRun, model, intrinsics: np.ndarray, image_size: tuple[int, int],
                  device: str = "cpu") -> Callable[[int], np.ndarray]:
    """frame -> (H, W, 3) uint8: the run's mesh shaded grey with the detail's normals, the
    preview's second panel."""
    import torch

    from avface.stages.detail.fine import shaded_detail_panel

    faces = np.asarray(model.faces)

    def panel(i: int) -> np.ndarray:
        v = torch.as_tensor(run.vertices[i], device=device)
        d = torch.as_tensor(run.displacement[i], device=device)
        return shaded_detail_panel(v, faces, run.raster, intrinsics, image_size, d)

    return panel
