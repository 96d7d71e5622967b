"""The export stage: a job's result contract v1 (``avface.result``) from its coarse fit,
tracking, confidence and speech, built in one place so that the pipeline writes it and the
benchmark times the same code."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from avface import __version__
from avface.core.geometry import WORLD_TO_CAMERA
from avface.result import SCHEMA_VERSION
from avface.result.arkit_names import apple_spelling
from avface.stages.assemble.arkit import ARKIT_NAMES, arkit_curves, arkit_from_weights
from avface.stages.fit import CoarseFit
from avface.stages.lips import LipPCA, vertices_with_lips
from avface.stages.tracking import Tracking


@dataclass(frozen=True)
class ResultSource:
    """Where a result came from, as its ``meta`` records it."""

    fps: float
    width: int
    height: int
    source: dict
    """``path``, ``frame_start``, ``frame_end``, ``vfr`` and ``audio`` of the input."""
    audio_present: bool


@dataclass(frozen=True, eq=False)
class ResultEvidence:
    """The per-frame evidence the result records beside the fit."""

    conf: np.ndarray
    """(T,) the visual confidence of the mouth."""
    occluded: np.ndarray
    """(T,) bool: the frames the confidence found occluded."""
    activity: np.ndarray | None = None
    """(T,) speech activity, or None (no speech: zeros)."""


@dataclass(frozen=True, eq=False)
class ResultRun:
    """How the job ran, as the result's ``meta`` records it."""

    stages_run: list[str]
    stage_seconds: dict[str, float]
    extra_meta: dict | None = None
    """Further ``meta`` entries (the fit's metrics, the camera, the networks...)."""


def build_result(fit: CoarseFit, tracking: Tracking, evidence: ResultEvidence, src: ResultSource, run: ResultRun, *,
                 write_vertices: bool = True, lips: LipPCA | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta) of the result contract. Frames the fit filled count as occluded; the
    ARKit curves are interpolated over occluded frames before filtering. ``lips``: the lip
    refinement's rest-frame offsets as a PCA (avface.stages.lips.lip_pca), or None for none."""
    conf, activity = evidence.conf, evidence.activity
    stages_run, stage_seconds, extra_meta = run.stages_run, run.stage_seconds, run.extra_meta
    n = tracking.n_frames
    occluded = evidence.occluded | fit.filled
    shape_names = getattr(fit.model, "expression_names", None)
    if shape_names is not None:  # the model's shapes are ARKit's: the curves are its weights
        arkit = arkit_from_weights(fit.params.expression.numpy(), [apple_spelling(n) for n in shape_names])
        arkit_source = "the fitted weights of the model's ARKit shapes"
    else:
        arkit = arkit_curves(tracking.blendshapes, tracking.blendshape_names, ~occluded, src.fps)
        arkit_source = "MediaPipe's blendshape scores, low-passed"
    activity = activity if activity is not None else np.zeros(n, np.float32)
    arrays = result_arrays(fit, arkit, conf, occluded, activity, write_vertices=write_vertices, lips=lips)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "model": fit.model.name,
        "fps": float(src.fps),
        "n_frames": int(n),
        "width": int(src.width),
        "height": int(src.height),
        "source": src.source,
        "audio_present": bool(src.audio_present),
        "stages_run": list(stages_run),
        "stage_seconds": stage_seconds,
        "backend_version": __version__,
        "lip_pca_residual": float(lips.residual_m) if lips is not None else 0.0,
        "arkit_source": arkit_source,
        "detail": {"n_maps": 0, "folder": "detail", "map_size": 0, "metres_per_unit": 0.0, "format": "png16"},
        **(extra_meta or {}),
    }
    return arrays, meta


def result_arrays(fit: CoarseFit, arkit: np.ndarray, conf: np.ndarray, occluded: np.ndarray,
                  activity: np.ndarray, *, write_vertices: bool = True,
                  lips: LipPCA | None = None) -> dict[str, np.ndarray]:
    """The contract's arrays from a coarse fit and, if given, its lip refinement; ``vertices``
    is the coarse mesh plus the lips (no detail yet)."""
    m = fit.model
    p = fit.params
    n = p.batch
    lip_ids = np.asarray(m.lip_vertex_ids, np.int32)
    betas = p.betas[:1] if p.betas.shape[1] else None
    arrays = {
        # the clip's identity at rest (FLAME: the template plus its shape blend shapes)
        "vertices_neutral": m.neutral_vertices(betas).astype(np.float32),
        "faces": m.faces.astype(np.int32),
        "uv": m.uv.astype(np.float32),
        "uv_faces": m.uv_faces.astype(np.int32),
        "shape": p.betas[0].numpy().astype(np.float32) if p.betas.shape[1] else np.zeros(0, np.float32),
        "expression_basis": m.expression_basis().astype(np.float32),
        "expression": p.expression.numpy().astype(np.float32),
        "global_rot": p.global_orient.numpy().astype(np.float32),
        "transl": p.transl.numpy().astype(np.float32),
        "neck": p.neck_pose.numpy().astype(np.float32),
        "jaw": p.jaw_pose.numpy().astype(np.float32),
        "eyes": np.concatenate([p.leye_pose.numpy(), p.reye_pose.numpy()], axis=1).astype(np.float32),
        "joint_names": np.asarray(m.joint_names),
        "joint_parents": np.asarray(m.parents, np.int32),
        "joints_rest": np.asarray(m.rest_joints(betas), np.float32),
        "skin_weights": np.asarray(m.skin_weights, np.float32),
        "intrinsics": fit.intrinsics.astype(np.float32),
        "extrinsics": np.tile(_extrinsic(), (n, 1, 1)),
        "lip_vertex_ids": lip_ids,
        "lip_basis": lips.basis if lips is not None else np.zeros((0, len(lip_ids), 3), np.float32),
        "lip_coeffs": lips.coeffs if lips is not None else np.zeros((n, 0), np.float32),
        "arkit_names": np.asarray(ARKIT_NAMES),
        "arkit": arkit.astype(np.float32),
        "visual_conf": conf.astype(np.float32),
        "occluded": occluded.astype(bool),
        "speech_activity": np.asarray(activity, np.float32),
    }
    if write_vertices:
        arrays["vertices"] = vertices_with_lips(fit, lips).astype(np.float16)
    posedirs = getattr(getattr(m, "arrays", None), "posedirs", None)
    if posedirs is not None:  # FLAME: (V, 3, P) in the file's layout -> (P, V, 3)
        arrays["pose_correctives"] = np.ascontiguousarray(np.transpose(posedirs, (2, 0, 1)), np.float32)
    names = getattr(m, "expression_names", None)
    if names is not None:
        arrays["expression_names"] = np.asarray([apple_spelling(n) for n in names])
    template = getattr(m, "template_vertices", None)
    if template is not None:
        arrays["vertices_template"] = np.asarray(template(), np.float32)
    materials = getattr(m, "face_materials", None)
    if materials is not None:
        arrays["face_material"], arrays["material_names"] = np.asarray(materials[0], np.int32), np.asarray(materials[1])
    expression_joints = m.expression_joints()
    if expression_joints is not None:  # FLAME: the joints move with the expression
        arrays["expression_joints"] = np.ascontiguousarray(expression_joints, np.float32)
    return arrays


def _extrinsic() -> np.ndarray:
    e = np.eye(4, dtype=np.float32)
    e[:3, :3] = WORLD_TO_CAMERA
    return e
