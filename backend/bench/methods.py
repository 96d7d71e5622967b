"""Reconstruction methods the benchmark compares, as named, registered variants.

A method is a function from one clip variant's evidence (:class:`MethodInput`: the
tracker's output, the speech features, the frame rate) to a mesh per frame
(:class:`MethodOutput`: (T, 468, 3) vertices in metres in the OpenCV camera frame, and the
intrinsics they project with). Every method must return a finite mesh for every frame: a
method that has nothing for a frame says how it fills it.

Later stages add their variants without touching the harness: decorate a function with
:func:`register_method` in a module named ``bench_methods`` inside any ``avface``
subpackage (``avface/<pkg>/bench_methods.py``), which :func:`load_plugins` imports, or
pass the module with ``avface bench --plugin MODULE``.

Built in:

* ``tracker``: raw per-frame MediaPipe. Its 3D is the tracker's own landmarks made metric
  by :func:`avface.core.geometry.backproject`; frames without a detection hold the nearest detected
  frame (what a keyframed animation would show).
* ``coarse_video``: the coarse fit, video only, every detected frame fitted as seen
  (``FitConfig.use_visual_confidence=False``).
* ``interp``: the coarse fit where frames flagged occluded by the visual confidence
  (:mod:`avface.stages.confidence`, below ``OCCLUDED_BELOW``) get no lower-face data term and are
  filled by temporal smoothness from their neighbours.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import pkgutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from avface.config import FitConfig
from avface.core.geometry import WORLD_TO_CAMERA, backproject, intrinsics_for
from avface.core.timeseries import hold_nearest
from avface.stages.fit import CoarseFit, fit_default
from avface.stages.tracking import Tracking

log = logging.getLogger(__name__)

N_VERTICES = 468
REFERENCE_METHOD = "coarse_video"
"""Occlusion errors are reported as ratios to this method's, measured on the same clips."""


@dataclass(frozen=True)
class MethodInput:
    """What a method sees of one clip variant."""

    clip_id: str
    variant: str
    """``clean``, an occluded variant (``hand``, ``object``), ``audio_only`` (black frames
    over spans of speech) or ``synth``."""
    tracking: Tracking
    """The tracker's output on this variant's frames."""
    features: object | None
    """:class:`avface.stages.audio.AudioFeatures` of the clip's speech (never occluded), or None."""
    wave: np.ndarray | None
    """(N,) float32 mono speech at 16 kHz, or None."""
    fps: float
    fit_config: FitConfig
    """The benchmark's base fit options (field of view, iterations, ...); methods replace
    what they must."""
    visual_conf: np.ndarray
    """(T,) float32 mouth confidence of this variant (:func:`avface.stages.confidence.visual_confidence`),
    computed once per variant."""
    occluded: np.ndarray
    """(T,) bool: frames the visual confidence flags occluded."""
    video: Path | None = None
    """This variant's video file (its frames, for a method that looks at the pixels: the
    fine stage), or None."""


@dataclass
class MethodOutput:
    vertices: np.ndarray
    """(T, 468, 3) float32 metres, OpenCV camera frame (x right, y down, z forward)."""
    intrinsics: np.ndarray
    """(3, 3) pixel intrinsics the vertices project with."""
    fit: CoarseFit | None = None
    """The coarse fit behind the vertices, when there is one (the export stage is timed on it)."""
    filled: np.ndarray | None = None
    """(T,) bool: frames the method had no evidence for and filled."""
    occluded: np.ndarray | None = None
    """(T,) bool: frames the method flags as occluded, for a method that judges occlusion
    itself; None: the variant's visual-confidence flags (``MethodInput.occluded``)."""
    seconds: float = 0.0
    """Wall time of the method itself (set by :func:`run_method`)."""
    cpu_seconds: float = 0.0
    """Process CPU time of the method itself (set by :func:`run_method`)."""
    detail: object | None = None
    """What a method with a fine stage measured of its detail maps
    (:class:`avface.bench.metrics.DetailFigures`), or None."""


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[[MethodInput], MethodOutput]
    description: str
    stages: tuple[str, ...]
    """Pipeline stages this method needs, in order: its real-time factor is their sum."""
    unavailable: Callable[[], str | None] | None = None
    """Why the method cannot run here (a missing checkpoint, say), or None when it can."""
    reference: str | None = None
    """The method whose clean-clip mesh this one's occlusion errors are measured against
    (None: its own). A method that ignores the video on the clean clip too would otherwise
    measure only its own consistency: an audio-only method scores near zero that way."""

    def why_unavailable(self) -> str | None:
        return self.unavailable() if self.unavailable is not None else None

    @property
    def uses_audio(self) -> bool:
        return "audio" in self.stages


_REGISTRY: dict[str, Method] = {}

DEFAULT_STAGES = ("probe", "tracking", "confidence", "camera", "fit", "export")


def register_method(name: str, *, description: str, stages: tuple[str, ...] = DEFAULT_STAGES,
                    replace: bool = False, unavailable: Callable[[], str | None] | None = None,
                    reference: str | None = None):
    """Decorator: register ``fn(MethodInput) -> MethodOutput`` under ``name``. ``unavailable()``
    says why the method cannot run here (None when it can): a default run leaves such a
    method out with one log line, and naming it with ``--methods`` is an error that says why.
    ``reference``: see :attr:`Method.reference`."""
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"method names are identifiers (letters, digits, _), got {name!r}")

    def deco(fn: Callable[[MethodInput], MethodOutput]):
        if name in _REGISTRY and not replace:
            raise ValueError(f"a bench method named {name!r} is already registered")
        _REGISTRY[name] = Method(name, fn, description, tuple(stages), unavailable, reference)
        return fn

    return deco


def unregister_method(name: str) -> None:
    _REGISTRY.pop(name, None)


def available_methods() -> dict[str, Method]:
    """Registered methods by name, in registration order."""
    return dict(_REGISTRY)


def get_method(name: str) -> Method:
    from avface.errors import InputError

    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown bench method {name!r}; registered: {', '.join(_REGISTRY)}") from None


def load_plugins(extra_modules: tuple[str, ...] = ()) -> list[str]:
    """Import ``avface.<pkg>.bench_methods`` for every avface subpackage that has one, then
    ``extra_modules``; returns the modules imported. Registration happens on import."""
    import avface

    importlib.import_module("avface.bench.av_methods")  # the networks' methods (audio_only, av, av_lips, av_full)
    loaded = ["avface.bench.av_methods"]
    for info in pkgutil.iter_modules(avface.__path__):
        if not info.ispkg or info.name == "bench":
            continue
        name = f"avface.{info.name}.bench_methods"
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name)
        loaded.append(name)
    for name in extra_modules:
        importlib.import_module(name)
        loaded.append(name)
    return loaded


def run_method(method: Method, inp: MethodInput) -> MethodOutput:
    """Run a method and check what it returned; records its wall and CPU time."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = method.run(inp)
    out.seconds = time.perf_counter() - t0
    out.cpu_seconds = time.process_time() - c0
    n = inp.tracking.n_frames
    v = np.asarray(out.vertices)
    if v.shape != (n, N_VERTICES, 3):
        raise ValueError(f"method {method.name!r} returned vertices of shape {v.shape}, expected ({n}, {N_VERTICES}, 3)")
    if not np.isfinite(v).all():
        raise ValueError(f"method {method.name!r} returned NaN or infinite vertices; methods must fill every frame")
    if np.asarray(out.intrinsics).shape != (3, 3):
        raise ValueError(f"method {method.name!r} returned intrinsics of shape {np.shape(out.intrinsics)}")
    out.vertices = v.astype(np.float32, copy=False)
    return out


# --------------------------------------------------------------------------- built-in methods


@register_method("tracker", description="raw per-frame MediaPipe landmarks, made metric by back-projection",
                 stages=("probe", "tracking"))
def tracker_method(inp: MethodInput) -> MethodOutput:
    from avface.core.topology import rigid_weights
    from avface.errors import NoFaceError
    from avface.models.canonical_mesh import load_canonical_mesh

    tr = inp.tracking
    det = np.asarray(tr.detected, bool)
    if not det.any():
        raise NoFaceError()
    k = intrinsics_for(tr.width, tr.height, inp.fit_config.fov_deg)
    rigid_w = rigid_weights()
    world = backproject(tr, k, load_canonical_mesh().vertices.astype(np.float64), rigid_w)
    cam = hold_nearest(world, det) @ WORLD_TO_CAMERA.T
    return MethodOutput(cam.astype(np.float32), k, filled=~det)


def _fit_output(fit: CoarseFit) -> MethodOutput:
    return MethodOutput(fit.camera_vertices(), fit.intrinsics, fit=fit, filled=fit.filled)


@register_method("coarse_video", description="coarse fit, video only, every frame fitted as the tracker sees it")
def coarse_video_method(inp: MethodInput) -> MethodOutput:
    cfg = dataclasses.replace(inp.fit_config, use_visual_confidence=False)
    return _fit_output(fit_default(inp.tracking, cfg))


@register_method("interp", description="coarse fit; frames flagged occluded filled by temporal interpolation")
def interp_method(inp: MethodInput) -> MethodOutput:
    cfg = dataclasses.replace(inp.fit_config, use_visual_confidence=True)
    return _fit_output(fit_default(inp.tracking, cfg, mouth_conf=inp.visual_conf))
