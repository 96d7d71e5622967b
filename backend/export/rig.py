"""What every writer needs from a result: a blend-shape + skeleton rig that reproduces its mesh.

Pure numpy (torch only when a FLAME model has to be read), no bpy, no format library.

How a result's ``vertices`` come about (``avface.stages.assemble.run.result_arrays`` -> ``CoarseFit`` ->
``FaceModel.forward`` -> ``models.lbs.lbs``), per frame t, in the world (model) frame:

    shaped[t]  = neutral + expression[t] . expression_basis            (+ lip offsets, see below)
    posed[t]   = shaped[t] + pose_feature[t] . posedirs                (FLAME only)
    joints[t]  = joints_rest + J_regressor . (expression[t] . expression_basis)   (FLAME only;
                 the default model's joints do not move)
    world[t]   = sum_j skin_weights[:, j] * A_j[t](posed[t]) + transl[t]
    vertices[t] = world[t] @ WORLD_TO_CAMERA.T                        (the result's camera frame)

where A_j[t] is the rigid transform that forward kinematics over ``joint_parents`` gives joint j
for the local rotations (global_rot, [neck,] jaw[, left eye, right eye]) about ``joints[t]``.

The rig here reproduces that exactly:
- blend shapes = the expression basis, the lip basis (scattered onto ``lip_vertex_ids``) and, for
  FLAME, one shape per pose-corrective entry: ``pose_feature`` is linear in the entries of
  (R_j - I) of the non-root joints, so shape ``pose_<joint>_<row><col>`` has the delta
  ``posedirs[:, :, k]`` and the per-frame weight ``R_j[row, col] - delta(row, col)``;
- one skeleton whose bind pose puts every joint at ``joints_rest`` with no rotation, and whose
  per-frame joint transforms are ``A_j[t]`` composed with the bind pose. Expression-driven joint
  motion (FLAME) and ``transl`` therefore live in the animated joint translations. That maths
  is in ``kinematics`` (numpy only), which the Blender add-on vendors to pose its bones alike.

Lip offsets (``lip_basis``, ``lip_coeffs``) are taken as rest-frame offsets added to ``shaped``
before skinning, like the expression basis (they move with the jaw and the head); they do not
move the joints. That is the only reading under which they are blend shapes at all.

FLAME results need the FLAME model itself (the result stores neither the identity's shape
directions, nor ``posedirs``, nor the joint regressor): pass its folder, or let the exporter
find it in the ``config.yaml`` the job wrote beside the result.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from scipy.spatial.transform import Rotation

from avface.errors import ModelFileError, SchemaError
from avface.export import axes
from avface.export.kinematics import joint_transforms, posed_rest_joints
from avface.result import Result

log = logging.getLogger(__name__)

#: Above float16 rounding, how far the rig may be from a result's stored vertices, metres.
EXACT_ATOL_M = 1e-4
DEFAULT_JOINTS = ("root", "jaw")
FLAME_MODELS = ("flame2020", "flame2023")


@dataclass(frozen=True)
class RigCamera:
    """The video's camera, as every writer needs it: pinhole ``intrinsics`` (3, 3) in
    continuous pixel coordinates (the frame spans [0, width] x [0, height], y down) and its
    ``pose`` (4, 4), world-from-camera in the world frame, for a camera that looks down its
    local -z with y up (``axes.camera_pose``): USD's and glTF's convention. Still: the
    result's first extrinsic (the contract's camera sits at the origin)."""

    intrinsics: np.ndarray
    width: int
    height: int
    pose: np.ndarray

    @property
    def focal_px(self) -> tuple[float, float]:
        return float(self.intrinsics[0, 0]), float(self.intrinsics[1, 1])

    @property
    def principal_px(self) -> tuple[float, float]:
        return float(self.intrinsics[0, 2]), float(self.intrinsics[1, 2])


@dataclass(frozen=True)
class Rig:
    """A result as a rig: rest mesh + blend shapes + skeleton, all in the world (model) frame,
    metres, y up, z towards the viewer. T frames, V vertices, B blend shapes, J joints."""

    model: str  #: the result's meta.model
    fps: float
    neutral: np.ndarray  #: (V, 3) float64 rest mesh of the clip's identity
    faces: np.ndarray  #: (F, 3) int64, counter-clockwise seen from outside
    uv: np.ndarray  #: (Vt, 2) float32, v up
    uv_faces: np.ndarray  #: (F, 3) int64 ids into uv
    shape_names: tuple[str, ...]  #: (B,) valid identifiers in USD, glTF and Blender
    shape_deltas: np.ndarray  #: (B, V, 3) float32 offsets per unit weight
    #: per shape, the only vertices it moves (None: any); lets USD store sparse offsets
    shape_vertex_ids: tuple[np.ndarray | None, ...]
    weights: np.ndarray  #: (T, B) float32 per-frame blend-shape weights
    joint_names: tuple[str, ...]  #: (J,)
    joint_parents: np.ndarray  #: (J,) int64, -1 for the root, parents[j] < j
    bind_positions: np.ndarray  #: (J, 3) float64: the bind pose is a pure translation to these
    skin_weights: np.ndarray  #: (V, J) float32, rows sum to 1
    joint_rotations: np.ndarray  #: (T, J, 3, 3) float64 world rotation of each joint
    joint_translations: np.ndarray  #: (T, J, 3) float64 world position of each joint (bind origin)
    local_rotations: np.ndarray  #: (T, J, 3, 3) float64 rotation relative to the parent joint
    local_translations: np.ndarray  #: (T, J, 3) float64 position in the parent joint's frame
    arkit_names: tuple[str, ...]  #: (52,)
    arkit: np.ndarray  #: (T, 52) float32 in [0, 1]
    global_rot: np.ndarray  #: (T, 3) axis-angle head rotation (world frame)
    eyes: np.ndarray  #: (T, 6) axis-angle left eye, right eye (zero for the default model)
    detail_maps: tuple[Path, ...] = ()  #: one displacement map per frame, in frame order, or none
    detail: dict = field(default_factory=dict)  #: the result's meta.detail
    source: str = ""  #: the result file the rig came from
    #: (B, 2) per shape, the (lo, hi) that ``unit_weights`` mapped to (0, 1); None: not remapped
    weight_ranges: np.ndarray | None = None
    camera: RigCamera | None = None  #: the video's camera; None when the result has none

    @property
    def n_frames(self) -> int:
        return int(self.weights.shape[0])

    @property
    def n_vertices(self) -> int:
        return int(self.neutral.shape[0])

    def unit_weights(self) -> "Rig":
        """The same mesh at every frame with every blend-shape weight in [0, 1].

        Importers and engines clamp shape weights to their slider range (Blender's glTF and
        USD importers to [0, 1]), while expression coefficients and corrective entries are
        negative and above 1 too. Per shape, with lo = min(0, min w) and hi = max(1, max w):
        w' = (w - lo) / (hi - lo), delta' = (hi - lo) delta, and lo delta folds into the rest
        mesh, so rest + sum w' delta' = rest + sum w delta exactly. Shapes already in [0, 1]
        are unchanged. ``weight_ranges`` keeps (lo, hi) to recover the original weights."""
        w = self.weights.astype(np.float64)
        lo = np.minimum(0.0, w.min(axis=0)) if len(w) else np.zeros(w.shape[1])
        hi = np.maximum(1.0, w.max(axis=0)) if len(w) else np.ones(w.shape[1])
        span = hi - lo
        deltas = self.shape_deltas.astype(np.float64)
        # neutral'[v, k] = neutral[v, k] + sum_b lo[b] * deltas[b, v, k]
        neutral = self.neutral + np.einsum("b,bvk->vk", lo, deltas)
        return dataclasses.replace(
            self, neutral=neutral, shape_deltas=(deltas * span[:, None, None]).astype(np.float32),
            weights=((w - lo) / span).astype(np.float32), weight_ranges=np.stack([lo, hi], axis=1))

    def skinning_transforms(self, frames) -> tuple[np.ndarray, np.ndarray]:
        """(rotations (n, J, 3, 3), translations (n, J, 3)) mapping bind-pose (rest) points to
        posed points for the given frames: the world joint transform times the inverse bind."""
        frames = np.atleast_1d(np.asarray(frames, np.int64))
        rot = self.joint_rotations[frames]
        # A = W B^-1 with B = translate(bind): A(p) = R (p - bind) + t
        t = self.joint_translations[frames] - np.einsum("njab,jb->nja", rot, self.bind_positions)
        return rot, t

    def evaluate(self, frames) -> np.ndarray:
        """(n, V, 3) float64 posed world-frame vertices at `frames`: blend shapes, then linear
        blend skinning. The reference the writers' files are checked against."""
        frames = np.atleast_1d(np.asarray(frames, np.int64))
        # rest[n, v, k] = neutral[v, k] + sum_b weights[n, b] * deltas[b, v, k]
        rest = self.neutral[None] + np.einsum("nb,bvk->nvk", self.weights[frames].astype(np.float64),
                                              self.shape_deltas.astype(np.float64))
        rot, t = self.skinning_transforms(frames)
        w = self.skin_weights.astype(np.float64)
        # posed[n, v] = sum_j w[v, j] (rot[n, j] rest[n, v] + t[n, j])
        per_joint = np.einsum("njab,nvb->njva", rot, rest)
        return np.einsum("vj,njva->nva", w, per_joint) + np.einsum("vj,nja->nva", w, t)


def float16_tolerance(reference: np.ndarray, atol: float = EXACT_ATOL_M) -> np.ndarray:
    """Elementwise tolerance for comparing against float16-stored values: the float16 spacing
    at each value's magnitude (twice the worst rounding error) plus `atol`."""
    mag = np.abs(np.asarray(reference, np.float64)).astype(np.float16)
    return np.spacing(mag).astype(np.float64) + atol


def stored_world_vertices(result: Result, frames) -> np.ndarray:
    """(n, V, 3) the result's stored ``vertices`` at `frames`, camera frame -> world frame."""
    frames = np.atleast_1d(np.asarray(frames, np.int64))
    return axes.camera_to_world(result["vertices"][frames].astype(np.float64),
                                result["extrinsics"][frames].astype(np.float64))


# --------------------------------------------------------------------------------------
# Building the rig


def _rotations(rotvecs: np.ndarray) -> np.ndarray:
    """(T, 3) axis-angle -> (T, 3, 3)."""
    rotvecs = np.asarray(rotvecs, np.float64)
    if len(rotvecs) == 0:
        return np.zeros((0, 3, 3))
    return Rotation.from_rotvec(rotvecs).as_matrix()


def _flame_dir_from_config(result_path: Path | None) -> str | None:
    """The FLAME folder the job used, from the config.yaml it wrote beside the result."""
    if result_path is None:
        return None
    cfg = Path(result_path).parent / "config.yaml"
    try:
        data = yaml.safe_load(cfg.read_text()) if cfg.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    return data.get("flame_dir") if isinstance(data, dict) else None


@dataclass(frozen=True)
class _FlameParts:
    neutral: np.ndarray  #: (V, 3) template + identity
    posedirs: np.ndarray  #: (V, 3, 36)
    j_regressor: np.ndarray  #: (J, V)


def _flame_parts(result: Result, flame_dir, result_path: Path | None) -> _FlameParts:
    from avface.models.flame import load_flame

    folder = flame_dir or _flame_dir_from_config(result_path)
    if not folder:
        raise ModelFileError(
            f"this result was made with {result.meta['model']}; exporting it needs the same FLAME files "
            f"(pose correctives and the identity's shape are not stored in the result): pass --flame-dir DIR")
    a = result.arrays
    n_shape, n_expr = int(a["shape"].shape[0]), int(a["expression_basis"].shape[0])
    try:
        model = load_flame(folder, n_shape=n_shape, n_expression=n_expr)
    except ValueError as e:  # fewer components in the file than the result uses
        raise ModelFileError(f"the FLAME model in {folder} does not fit this result: {e}") from e
    basis = model.expression_basis()
    joints = model.rest_joints(a["shape"] if n_shape else None)
    if (model.name != result.meta["model"] or basis.shape != a["expression_basis"].shape
            or not np.allclose(basis, a["expression_basis"], atol=1e-6)
            or not np.allclose(joints, a["joints_rest"], atol=1e-5)):
        raise ModelFileError(
            f"the FLAME model in {folder} ({model.name}) is not the one this result was made with "
            f"({result.meta['model']}): its expression basis or joints differ; pass the folder the job used")
    neutral = model.neutral_vertices(a["shape"] if n_shape else None).astype(np.float64)
    return _FlameParts(neutral, model.arrays.posedirs, model.arrays.j_regressor)


def _camera(result: Result, result_path) -> RigCamera | None:
    """The result's camera (its first extrinsic), or None when it has no intrinsics or frame size."""
    a, meta = result.arrays, result.meta
    width, height = meta.get("width"), meta.get("height")
    if "intrinsics" not in a or "extrinsics" not in a or not width or not height or not len(a["extrinsics"]):
        return None
    try:
        k = axes.pinhole(a["intrinsics"])
    except ValueError as e:
        raise SchemaError(str(e)) from e
    extrinsic, moves = axes.still_extrinsic(a["extrinsics"])
    if moves:
        log.warning("%s: the camera moves over the clip; the exported camera takes its first frame",
                    result_path or "the result")
    return RigCamera(intrinsics=k, width=int(width), height=int(height), pose=axes.camera_pose(extrinsic))


def _detail_maps(result: Result, result_path: Path | None) -> tuple[Path, ...]:
    detail = result.meta.get("detail") or {}
    if not detail.get("n_maps") or result_path is None:
        return ()
    folder = Path(result_path).parent / detail.get("folder", "detail")
    maps = sorted(list(folder.glob("*.png")) + list(folder.glob("*.exr")))
    return tuple(p.resolve() for p in maps)


def _joint_tree(a) -> tuple[tuple[str, ...], np.ndarray]:
    """The result's joint names and parents, checked to be a tree rooted at joint 0, parents first."""
    names = tuple(str(n) for n in a["joint_names"])
    parents = np.asarray(a["joint_parents"], np.int64)
    if any(not -1 <= parents[j] < j for j in range(len(parents))) or (len(parents) and parents[0] != -1):
        raise SchemaError(f"joint_parents {parents.tolist()} is not a tree rooted at joint 0 with parents first")
    return names, parents


@dataclass
class _Shapes:
    """The rig's blend shapes as they are gathered, group by group (deltas and weights per group)."""

    names: list
    deltas: list
    vertex_ids: list
    weights: list


def _basis_shapes(a, n_verts: int, expr_basis: np.ndarray, expr: np.ndarray) -> _Shapes:
    """The expression basis, then the lip basis scattered onto ``lip_vertex_ids``, as blend shapes."""
    shape_names = [f"expression_{k:02d}" for k in range(len(expr_basis))]
    deltas = [expr_basis]
    vertex_ids: list = [None] * len(expr_basis)
    weights = [expr]

    lip_ids = np.asarray(a["lip_vertex_ids"], np.int64)
    lip_basis = np.asarray(a["lip_basis"], np.float32)
    if len(lip_basis):
        dense = np.zeros((len(lip_basis), n_verts, 3), np.float32)
        dense[:, lip_ids] = lip_basis
        deltas.append(dense)
        shape_names += [f"lip_{k:02d}" for k in range(len(lip_basis))]
        vertex_ids += [lip_ids] * len(lip_basis)
        weights.append(np.asarray(a["lip_coeffs"], np.float32))
    return _Shapes(shape_names, deltas, vertex_ids, weights)


def _model_pose_inputs(result: Result, names: tuple[str, ...], expr_basis: np.ndarray, expr: np.ndarray,
                       joints_rest: np.ndarray, flame_dir, result_path):
    """For the result's model: joint axis-angle tracks, rest mesh, FLAME parts (or None), rest joints."""
    a, model = result.arrays, result.meta["model"]
    if model in FLAME_MODELS:
        if names != ("global", "neck", "jaw", "left_eye", "right_eye"):
            raise SchemaError(f"a FLAME result has joints global, neck, jaw, left_eye, right_eye; got {names}")
        rotvecs = [a["global_rot"], a["neck"], a["jaw"], a["eyes"][:, :3], a["eyes"][:, 3:]]
        parts = _flame_parts(result, flame_dir, Path(result_path) if result_path else None)
        neutral = parts.neutral
        # joints regressed from the shaped mesh move with the expression:
        # j_expr[e, j, k] = sum_v J_regressor[j, v] * expression_basis[e, v, k]
        j_expr = np.einsum("jv,evk->ejk", parts.j_regressor, expr_basis.astype(np.float64))
        joints = posed_rest_joints(joints_rest, expr, j_expr)
    elif model == "mediapipe_canonical":
        if names != DEFAULT_JOINTS:
            raise SchemaError(f"a {model} result has joints {DEFAULT_JOINTS}; got {names}")
        rotvecs = [a["global_rot"], a["jaw"]]
        neutral = np.asarray(a["vertices_neutral"], np.float64)
        parts = None
        joints = posed_rest_joints(joints_rest, expr, None)
    else:  # check_arrays already refuses unknown models; keep the error if that changes
        raise SchemaError(f"cannot export a {model!r} result")
    return rotvecs, neutral, parts, joints


def _add_pose_correctives(shapes: _Shapes, local_rot: np.ndarray, posedirs: np.ndarray,
                          names: tuple[str, ...], n_frames: int) -> None:
    """Append one blend shape per FLAME pose-corrective entry that moves in this clip."""
    # pose_feature[t, 9 (j-1) + 3 r + c] = R_j[t, r, c] - delta(r, c), posedirs[:, :, same index]
    feature = (local_rot[:, 1:] - np.eye(3)).reshape(n_frames, -1)
    posedirs = posedirs.transpose(2, 0, 1).astype(np.float32)  # (36, V, 3)
    keep = np.any(feature != 0, axis=0)  # entries that never move this clip add nothing
    labels = [f"pose_{names[1 + k // 9]}_{(k % 9) // 3}{k % 3}" for k in range(feature.shape[1])]
    shapes.names += [lab for lab, ok in zip(labels, keep) if ok]
    shapes.deltas.append(posedirs[keep])
    shapes.vertex_ids += [None] * int(keep.sum())
    shapes.weights.append(feature[:, keep].astype(np.float32))
    log.info("%d of %d pose-corrective shapes move in this clip", int(keep.sum()), len(keep))


def rig_from_result(result: Result, result_path: str | Path | None = None, *, flame_dir=None,
                    check: bool = True) -> Rig:
    """The rig that reproduces `result` (see the module docstring).

    result_path locates ``detail/`` and ``config.yaml`` beside the result; flame_dir is needed for
    FLAME results unless that config names it. With `check`, the rig is evaluated at three frames
    and compared with the result's stored ``vertices`` (when stored): a result whose parameters
    do not give its own mesh gets a SchemaError instead of a silently wrong file.
    """
    a, meta = result.arrays, result.meta
    model = meta["model"]
    n_frames = int(meta["n_frames"])
    n_verts = int(a["vertices_neutral"].shape[0])
    names, parents = _joint_tree(a)
    joints_rest = np.asarray(a["joints_rest"], np.float64)
    transl = np.asarray(a["transl"], np.float64)

    expr_basis = np.asarray(a["expression_basis"], np.float32)
    expr = np.asarray(a["expression"], np.float32)
    shapes = _basis_shapes(a, n_verts, expr_basis, expr)
    rotvecs, neutral, parts, joints = _model_pose_inputs(result, names, expr_basis, expr, joints_rest,
                                                         flame_dir, result_path)

    local_rot = np.stack([_rotations(r) for r in rotvecs], axis=1) if n_frames else np.zeros((0, len(names), 3, 3))
    if parts is not None:
        _add_pose_correctives(shapes, local_rot, parts.posedirs, names, n_frames)
    weights = shapes.weights

    g_rot, world_t, local_t = joint_transforms(local_rot, joints, joints_rest, parents, transl)

    rig = Rig(
        model=model, fps=float(meta["fps"]), neutral=neutral,
        faces=np.asarray(a["faces"], np.int64), uv=np.asarray(a["uv"], np.float32),
        uv_faces=np.asarray(a["uv_faces"], np.int64),
        shape_names=tuple(shapes.names), shape_deltas=np.concatenate(shapes.deltas).astype(np.float32),
        shape_vertex_ids=tuple(shapes.vertex_ids),
        weights=np.concatenate(weights, axis=1).astype(np.float32) if weights else np.zeros((n_frames, 0), np.float32),
        joint_names=names, joint_parents=parents, bind_positions=joints_rest,
        skin_weights=np.asarray(a["skin_weights"], np.float32),
        joint_rotations=g_rot, joint_translations=world_t, local_rotations=local_rot, local_translations=local_t,
        arkit_names=tuple(str(n) for n in a["arkit_names"]), arkit=np.asarray(a["arkit"], np.float32),
        global_rot=np.asarray(a["global_rot"], np.float64), eyes=np.asarray(a["eyes"], np.float64),
        detail_maps=_detail_maps(result, Path(result_path) if result_path else None),
        detail=dict(meta.get("detail") or {}), source=str(result_path or ""),
        camera=_camera(result, result_path),
    )
    if check and "vertices" in a and n_frames:
        check_against_stored(rig, result)
    return rig


def check_frames(n_frames: int) -> np.ndarray:
    """The first, middle and last frame (fewer for short clips)."""
    return np.unique(np.array([0, n_frames // 2, n_frames - 1], np.int64).clip(0, max(n_frames - 1, 0)))


def check_against_stored(rig: Rig, result: Result, frames=None) -> None:
    """SchemaError when the rig does not give the result's stored ``vertices`` at `frames`
    (default: first, middle, last) within float16 precision plus EXACT_ATOL_M."""
    frames = check_frames(rig.n_frames) if frames is None else np.asarray(frames, np.int64)
    want = stored_world_vertices(result, frames)
    got = rig.evaluate(frames)
    excess = np.abs(got - want) - float16_tolerance(want)
    if (excess > 0).any():
        n, v, _ = np.unravel_index(int(np.argmax(excess)), excess.shape)
        err = np.abs(got - want)[n, v].max()
        raise SchemaError(
            f"the result's parameters do not reproduce its stored vertices (frame {int(frames[n])}, vertex {int(v)}: "
            f"{err * 1000:.3f} mm off); the file is inconsistent, so no exact rig can be exported. "
            f"Reconstruct it again, or pass --no-check to export the parameters anyway")
