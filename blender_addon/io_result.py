"""Read an AVFace result (``result.npz``, docs/design.md section 5) into arrays ready for bulk
Blender calls. No ``bpy`` here: this module is tested with plain pytest.

How the head is built in Blender, and why it reproduces the result's ``vertices``:

- an armature object whose world matrix is ``axes.WORLD_TO_BLENDER`` (+90 degrees about x),
  so everything inside it (bones, mesh) stays in the face model's own frame and the one
  conversion of ``avface.export.axes`` happens once, in the object transform;
- one bone per joint of the result, head at ``joints_rest``, pointing along +y with no roll,
  so that the bone's rest axes are the model axes and a pose rotation is the joint's
  axis-angle rotation as it is;
- each bone's location key is where its joint is on frame t relative to its rest offset from
  the parent (``_vendor/kinematics.py``, the maths the USD and glTF rig uses): for the root
  that is ``transl`` (the model rotates about the root joint, then translates: exactly a
  Blender bone's location then rotation) plus the root joint's own motion; FLAME's joints are
  regressed from the shaped mesh, so they move with the expression
  (``expression_joints``), and their bones then carry location keys too;
- the mesh is the neutral shape, skinned with ``skin_weights`` (vertex groups named after the
  bones); expression and lip offsets are shape keys, applied before the armature, as the
  model adds them before skinning. A result with ``vertices_template`` (the ICT model: an
  identity blended from modes) has the template as its basis and the clip's identity
  (``vertices_neutral - vertices_template``) as a key ``identity`` at 1, so the same rig takes
  another identity by that one key.

Named expressions (``expression_names``: the ICT model's 53 ARKit shapes in Apple's spelling)
name their keys, and their keys hold the shapes as they are (a key's value is the result's
weight, in [0, 1]), so that an FBX carries ARKit-named morph targets with ARKit's meaning.
Numbered ones are scaled (below). A whole head's parts (``face_material`` into
``material_names``) become one material each; the detail maps then displace the skin only
(:func:`skin_weights_for_detail`).

The posed mesh in Blender's world frame is then ``camera_to_blender(vertices, extrinsics)``.

Shape-key values of numbered components are kept within [-1, 1]: each key holds its basis
vector scaled by the largest coefficient magnitude over the clip (``*_scale``), and the
keyframes hold the coefficients divided by it, so no value is clamped by a slider range and
FBX keeps them. Named ones keep their own scale, with a slider range that holds their values.

The video's camera: the result's camera sits at the world origin looking down the world's -z
(``extrinsics``), which Blender sees as a camera at its origin looking along +y, rotated +90
degrees about x. Its ``intrinsics`` become a lens on a sensor 36 mm wide fitted to the
frame's width, with the principal point's distance from the frame's centre as the lens
shift (:func:`camera_settings`): looking through that camera at a scene whose resolution is
the video's, the head lies on the video's face pixel for pixel (checked in real Blender by
``tests/blender/bl_addon.py::camera_match``).

Detail maps (``detail/``, 16-bit PNG or EXR, one per frame): the displacement along the normal
is ``(value - midlevel) * metres_per_unit`` for a map value in [0, 1] (``meta.detail``;
midlevel 0.5 when absent), which is what a Displace modifier with ``mid_level = midlevel``
and ``strength = metres_per_unit`` computes.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import footage
from ._vendor import axes, kinematics
from ._vendor import result as contract
from ._vendor.errors import SchemaError

log = logging.getLogger(__name__)

#: Custom properties for the per-frame confidence (exact names; the ARKit curves keep theirs).
CONFIDENCE_PROPERTIES = {"visual_conf": "avface_visual_conf", "occluded": "avface_occluded",
                         "speech_activity": "avface_speech_activity"}
EXPRESSION_KEY = "expression_{:02d}"
LIP_KEY = "lip_{:02d}"
IDENTITY_KEY = "identity"
"""The key that turns the model's template into the clip's neutral (results with ``vertices_template``)."""
SKIN_MATERIAL = "skin"
"""The material (of ``material_names``) whose triangles the detail maps displace."""
MAX_NAMED_KEY_VALUE = 10.0
"""Blender's slider range ends at +-10: a named key whose weights go beyond is scaled as the
numbered ones are."""
#: Beside a result the add-on fetched: the user's own video, which ``meta.source.path`` does
#: not name when the backend read an uploaded copy (``footage.is_uploaded_copy``).
SOURCE_FILE = "avface_source.json"


class ResultError(Exception):
    """The file is not a result this add-on can import; the message says what is wrong."""


@dataclass(frozen=True)
class DetailMaps:
    folder: Path
    files: tuple[Path, ...]
    """One map per frame, in frame order."""
    map_size: int
    metres_per_unit: float
    """D = (value / 65535 - midlevel) * metres_per_unit, metres along the normal."""
    midlevel: float = 0.5


@dataclass(frozen=True)
class HeadData:
    """Everything the importer needs, as flat arrays for ``foreach_set``.

    Shapes: V vertices, F triangles, T frames, E expressions, K lip components, J joints.
    """

    path: Path
    meta: dict
    model: str
    fps: float
    n_frames: int
    source_frame_start: int
    vertices_neutral: np.ndarray
    """(V, 3) float32, the model frame."""
    faces: np.ndarray
    """(F, 3) int32."""
    uv_loops: np.ndarray
    """(F * 3 * 2,) float32: one UV per face corner, flattened for ``MeshUVLoopLayer.data``."""
    shape_key_names: tuple[str, ...]
    """Expression keys then lip keys."""
    shape_key_offsets: np.ndarray
    """(E + K, V, 3) float32: the scaled basis vector of each key (key = neutral + offset)."""
    shape_key_values: np.ndarray
    """(T, E + K) float32 within [-1, 1]."""
    shape_key_scales: np.ndarray
    """(E + K,) the factor each key's basis vector was multiplied by."""
    n_expression: int
    n_lip: int
    joint_names: tuple[str, ...]
    joint_parents: np.ndarray
    """(J,) int, -1 for the root."""
    joints_rest: np.ndarray
    """(J, 3) float32, the model frame."""
    skin_weights: np.ndarray
    """(V, J) float32."""
    bone_quaternions: np.ndarray
    """(T, J, 4) float32 (w, x, y, z), sign-continuous over time."""
    bone_locations: np.ndarray
    """(T, J, 3) float32 pose-bone locations: the root's is ``transl`` plus its joint's motion;
    the others' are zero unless the joints move with the expression."""
    located_joints: tuple[int, ...]
    """The joints whose bones get location keys: the root, and every joint when the result's
    joints move with the expression (FLAME)."""
    arkit_names: tuple[str, ...]
    arkit: np.ndarray
    """(T, 52) float32 in [0, 1]."""
    confidence: dict[str, np.ndarray]
    """custom property name -> (T,) float32 (``avface_occluded`` is 0 or 1)."""
    detail: DetailMaps | None
    object_matrix: np.ndarray
    """(4, 4) world matrix of the armature: the model frame into Blender's."""
    vertices: np.ndarray | None
    """(T, V, 3) the result's posed vertices in the camera frame, when stored."""
    extrinsics: np.ndarray
    """(T, 4, 4) world-to-camera."""
    correctives: tuple = ()
    """Pose correctives (FLAME): one :class:`Corrective` per entry of the pose feature."""
    camera: "CameraSettings | None" = None
    """The video's camera as Blender's camera settings; None when the result has no
    intrinsics or frame size."""
    video_path: Path | None = None
    """The user's video the result was made from (:func:`source_video`), when it is known."""
    shape_key_ranges: np.ndarray | None = None
    """(E + K, 2) each key's slider (min, max): [-1, 1] for a scaled key, for a named one the
    range of its values widened to [0, 1]. None: [-1, 1] for all."""
    vertices_template: np.ndarray | None = None
    """(V, 3) float32 the model's generic neutral, the basis shape (``vertices_template``), or
    None when ``vertices_neutral`` is the basis."""
    face_material: np.ndarray | None = None
    """(F,) int32 each triangle's index into :attr:`material_names`, or None: one material."""
    material_names: tuple[str, ...] = ()

    @property
    def vertices_basis(self) -> np.ndarray:
        """(V, 3) float32 the mesh's basis shape: the template when the result has one, else the neutral."""
        return self.vertices_neutral if self.vertices_template is None else self.vertices_template

    @property
    def identity_offset(self) -> np.ndarray | None:
        """(V, 3) float32 the ``identity`` key's offset from the basis (neutral - template), or None."""
        if self.vertices_template is None:
            return None
        return (self.vertices_neutral.astype(np.float64) - self.vertices_template).astype(np.float32)

    @property
    def key_names(self) -> tuple[str, ...]:
        """Every shape key the importer makes after the Basis, in order: ``identity`` (with a
        template), the expression and lip keys, the pose correctives."""
        identity = (IDENTITY_KEY,) if self.vertices_template is not None else ()
        return identity + self.shape_key_names + tuple(c.name for c in self.correctives)


def skin_weights_for_detail(head: HeadData) -> tuple[np.ndarray, np.ndarray] | None:
    """(vertex ids, weights) of the vertex group that limits the detail maps to the skin, or
    None when the result has no materials (the maps then cover the whole mesh).

    The group holds the vertices of the triangles whose material is ``skin``. The maps cover
    the UV square [0, 1]^2 (the backend rasterises that square); a skin vertex with a corner
    outside it (a head whose UV layout spans tiles, such as the ICT model's neck and the back
    of its head in the second tile) would read the maps wrapped round, another part of the
    face's detail: its weight is 0, the others' 1."""
    if head.face_material is None or SKIN_MATERIAL not in head.material_names:
        return None
    skin = head.face_material == head.material_names.index(SKIN_MATERIAL)
    ids = np.unique(head.faces[skin])
    n = len(head.vertices_neutral)
    uv = head.uv_loops.reshape(-1, 3, 2)
    outside_corner = ((uv < 0.0) | (uv > 1.0)).any(axis=-1)  # (F, 3)
    outside = np.zeros(n, bool)
    outside[head.faces[outside_corner]] = True
    weights = np.where(outside[ids], 0.0, 1.0).astype(np.float32)
    return ids.astype(np.int64), weights


@dataclass(frozen=True)
class CameraSettings:
    """A Blender camera that sees what the video's camera saw (sensor fit: horizontal)."""

    lens_mm: float
    sensor_width_mm: float
    shift_x: float
    """Lens shift, in units of the frame's width (Blender's unit for a horizontal fit)."""
    shift_y: float
    width: int
    """The video's frame size, pixels: the scene's render resolution for the match."""
    height: int
    matrix_world: np.ndarray
    """(4, 4) the camera object's world matrix in Blender's frame."""
    square_pixels: bool
    """False when the intrinsics' fx and fy differ (the camera then follows fx)."""


#: The sensor width of the camera the add-on makes (Blender's default, a full-frame 35 mm
#: sensor, as every camera made from a result), so that its focal length reads as a photographer's.
SENSOR_WIDTH_MM = axes.SENSOR_WIDTH_M * 1000.0


def camera_settings(intrinsics: np.ndarray, width: int, height: int, extrinsic: np.ndarray,
                    sensor_width_mm: float = SENSOR_WIDTH_MM) -> CameraSettings:
    """Blender camera settings for pinhole ``intrinsics`` (3, 3) in continuous pixel
    coordinates (the frame spans [0, width] x [0, height], y down) and the world-to-camera
    ``extrinsic`` (4, 4).

    With a horizontal sensor fit Blender's focal length in pixels is ``lens / sensor_width *
    width``, and a lens shift of s moves the view window by s frame widths, so the optical
    axis meets the image ``s * width`` from the centre: left of it for a positive
    ``shift_x`` (the window moved right), below it for a positive ``shift_y`` (the window
    moved up; pixel rows go down).
    """
    k = axes.pinhole(intrinsics)
    if width < 1 or height < 1:
        raise ValueError(f"frame size {width}x{height}")
    fx, fy, cx, cy = k[0, 0], k[1, 1], k[0, 2], k[1, 2]
    blender_world = np.eye(4)
    blender_world[:3, :3] = axes.WORLD_TO_BLENDER
    # Blender camera-local -> world -> Blender world
    matrix = blender_world @ axes.camera_pose(extrinsic)
    return CameraSettings(
        lens_mm=float(fx * sensor_width_mm / width), sensor_width_mm=float(sensor_width_mm),
        shift_x=float((width / 2.0 - cx) / width), shift_y=float((cy - height / 2.0) / width),
        width=int(width), height=int(height), matrix_world=matrix,
        square_pixels=bool(abs(fx - fy) <= 1e-6 * fx))


def project_pixels(points_cam: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """(N, 2) pixel positions of (N, 3) OpenCV camera-frame points through ``intrinsics``."""
    p = np.asarray(points_cam, np.float64) @ np.asarray(intrinsics, np.float64).T
    return p[:, :2] / p[:, 2:3]


def _camera(path: Path, meta: dict, a: dict) -> CameraSettings | None:
    width, height = meta.get("width"), meta.get("height")
    if "intrinsics" not in a or not width or not height:
        return None
    # the contract's camera sits still at the world origin; a moving one is not matched
    extrinsic, moves = axes.still_extrinsic(a["extrinsics"])
    if moves:
        log.warning("%s: the camera moves over the clip; the matched camera takes its first frame", path)
    try:
        cam = camera_settings(a["intrinsics"], int(width), int(height), extrinsic)
    except ValueError as e:
        raise ResultError(f"{path}: its camera cannot be matched: {e}") from e
    if not cam.square_pixels:
        log.warning("%s: the camera's pixels are not square; the matched camera follows fx", path)
    return cam


@dataclass(frozen=True)
class Corrective:
    """A pose-corrective shape key, driven by one entry (R - I)[row, col] of ``joint``'s
    local rotation matrix (from its bone's quaternion)."""

    name: str
    joint: str
    row: int
    col: int
    offsets: np.ndarray
    """(V, 3) per unit of the entry."""

    @property
    def expression(self) -> str:
        """The driver expression in the bone's quaternion components w, x, y, z (a simple
        expression: Blender evaluates it without Python)."""
        return ROTATION_MINUS_IDENTITY[self.row][self.col]


#: (R - I)[r][c] of the rotation of the unit quaternion (w, x, y, z).
ROTATION_MINUS_IDENTITY = (
    ("-2*(y*y + z*z)", "2*(x*y - w*z)", "2*(x*z + w*y)"),
    ("2*(x*y + w*z)", "-2*(x*x + z*z)", "2*(y*z - w*x)"),
    ("2*(x*z - w*y)", "2*(y*z + w*x)", "-2*(x*x + y*y)"),
)


def _joint_pose(name: str, index: int, arrays: dict) -> np.ndarray:
    """(T, 3) axis-angle of one joint, by the model's joint name (default: root, jaw; FLAME:
    global, neck, jaw, left_eye, right_eye)."""
    low = name.lower()
    if index == 0:
        return arrays["global_rot"]
    if "neck" in low:
        return arrays["neck"]
    if "jaw" in low:
        return arrays["jaw"]
    if "eye" in low and "left" in low:
        return arrays["eyes"][:, :3]
    if "eye" in low and "right" in low:
        return arrays["eyes"][:, 3:]
    raise ResultError(f"joint {name!r} has no pose array in the result contract")


def axis_angle_to_quaternion(rotvec: np.ndarray) -> np.ndarray:
    """(..., 3) axis-angle -> (..., 4) unit quaternions (w, x, y, z), float64."""
    rotvec = np.asarray(rotvec, np.float64)
    angle = np.linalg.norm(rotvec, axis=-1, keepdims=True)
    half = 0.5 * angle
    # sin(a/2)/a -> 1/2 as a -> 0
    scale = np.where(angle > 1e-12, np.sin(half) / np.maximum(angle, 1e-300), 0.5)
    return np.concatenate([np.cos(half), rotvec * scale], axis=-1)


def quaternion_matrices(q: np.ndarray) -> np.ndarray:
    """(..., 4) unit quaternions (w, x, y, z) -> (..., 3, 3) rotation matrices, float64."""
    q = np.asarray(q, np.float64)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = [[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def continuous_quaternions(q: np.ndarray) -> np.ndarray:
    """(T, ..., 4) quaternions with signs flipped so that consecutive frames lie in the same
    hemisphere: the same rotations, but interpolating between keys takes the short way."""
    q = np.array(q, np.float64, copy=True)
    for t in range(1, len(q)):
        flip = np.sum(q[t] * q[t - 1], axis=-1) < 0
        q[t][flip] *= -1
    return q


def scene_frames(n_frames: int, *, fps: float, scene_fps: float, first_frame: float,
                 source_frame_start: int = 0) -> np.ndarray:
    """(T,) scene frame of each result frame: source frame ``source_frame_start + t`` of a clip
    whose frame 0 sits at scene frame ``first_frame``, converted from the clip's rate to the
    scene's. For a movie strip, ``first_frame`` is the strip's ``frame_start`` (its offsets
    only trim what is shown, they do not move the content)."""
    if fps <= 0 or scene_fps <= 0:
        raise ValueError(f"frame rates must be positive, got fps={fps} scene_fps={scene_fps}")
    return first_frame + (source_frame_start + np.arange(n_frames, dtype=np.float64)) * (scene_fps / fps)


@dataclass(frozen=True)
class Retime:
    """Which picture of a video or an image sequence to show at each whole scene frame, when
    the scene's frame rate is not the source's.

    Blender shows movie clips and image sequences one picture per scene frame, whatever their
    own rate, while the head's keys are retimed to the scene's rate (:func:`scene_frames`).
    At 24 fps a 30 fps video would play 1.25x too fast behind the head. ``scene`` holds the
    whole scene frames from the first picture's to the last's, ``index`` the 0-based picture
    nearest in time at each: the importer keys the clip's start or the image user's offset
    (constant interpolation) so that Blender shows exactly that picture."""

    scene: np.ndarray  # (S,) int64, consecutive whole scene frames
    index: np.ndarray  # (S,) int64, 0-based source picture shown at each


def retime(zero: float, *, fps: float, scene_fps: float, n_pictures: int,
           span: tuple[int, int] | None = None) -> Retime | None:
    """The pictures to show (see :class:`Retime`) for a source of ``n_pictures`` at ``fps``
    whose picture 0 sits at scene frame ``zero`` (picture i at ``zero + i * scene_fps / fps``),
    over the scene frames of pictures ``span`` (first, last; default all); None when one
    picture per scene frame from a whole ``zero`` already shows the right one (rates that
    differ by less than a hundredth of a frame over the whole source count as the same:
    Blender keeps NTSC's 30/1.001 in float32)."""
    if fps <= 0 or scene_fps <= 0:
        raise ValueError(f"frame rates must be positive, got fps={fps} scene_fps={scene_fps}")
    if n_pictures <= 0:
        raise ValueError(f"a source needs at least one picture, got {n_pictures}")
    ratio = fps / scene_fps
    if abs(ratio - 1.0) * n_pictures < 1e-2 and abs(zero - round(zero)) < 1e-6:
        return None
    lo, hi = (0, n_pictures - 1) if span is None else (max(0, int(span[0])), min(n_pictures - 1, int(span[1])))
    if lo > hi:
        raise ValueError(f"pictures {span} are outside the source's 0-{n_pictures - 1}")
    step = 1.0 / ratio  # scene frames per picture
    first = int(np.floor(zero + lo * step + 1e-9))
    last = int(np.ceil(zero + hi * step - 1e-9))
    scene = np.arange(first, last + 1, dtype=np.int64)
    # nearest in time; halves round up (later picture), the same on every platform
    index = np.floor((scene - zero) * ratio + 0.5 + 1e-9).astype(np.int64)
    return Retime(scene, np.clip(index, 0, n_pictures - 1))


def keyframe_co(frames: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Interleave (T,) frames and (T,) values into the flat (2T,) float32 array that
    ``keyframe_points.foreach_set("co", ...)`` takes."""
    co = np.empty((len(frames), 2), np.float32)
    co[:, 0] = frames
    co[:, 1] = values
    return co.ravel()


def _scaled(basis: np.ndarray, coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale each component so that its coefficients lie in [-1, 1]."""
    peak = np.abs(coeffs).max(axis=0) if len(coeffs) else np.zeros(basis.shape[0])
    scale = np.where(peak > 1e-12, peak, 1.0).astype(np.float64)
    offsets = basis.astype(np.float64) * scale[:, None, None]
    values = coeffs.astype(np.float64) / scale[None, :]
    return offsets.astype(np.float32), values.astype(np.float32), scale


def _detail(path: Path, meta: dict) -> DetailMaps | None:
    """The detail maps the (already validated) result names, in frame order."""
    detail = meta.get("detail") or {}
    if not detail.get("n_maps"):
        return None
    enc = contract.DetailEncoding.from_meta(detail)
    files = tuple(contract.detail_files(path.parent, enc.folder))
    return DetailMaps(path.parent / enc.folder, files, enc.map_size, enc.metres_per_unit, enc.midlevel)


def load_arrays(path: Path) -> tuple[dict, dict]:
    """(meta, arrays) of a result file, validated against the contract by the backend's own
    validator (vendored: ``_vendor/result``), detail maps included; :class:`ResultError` says
    what is wrong."""
    try:
        result = contract.load_result(Path(path))
    except SchemaError as e:
        raise ResultError(str(e)) from e
    return result.meta, result.arrays


def read_result(path: str | Path) -> HeadData:
    """Read and check ``result.npz``; raises :class:`ResultError` saying what is wrong."""
    path = Path(path)
    meta, a = load_arrays(path)
    n = int(meta.get("n_frames", -1))
    fps = float(meta.get("fps") or 0)
    if n < 1 or fps <= 0:
        raise ResultError(f"{path}: meta has n_frames={meta.get('n_frames')!r} and fps={meta.get('fps')!r}")
    v = a["vertices_neutral"].shape[0]

    # one UV per face corner: uv[uv_faces] is (F, 3, 2)
    uv_loops = np.ascontiguousarray(a["uv"][a["uv_faces"]], np.float32).ravel()

    named = "expression_names" in a
    expression = np.asarray(a["expression"])
    if named and (expression.size == 0 or np.abs(expression).max() <= MAX_NAMED_KEY_VALUE):
        # the shapes as they are: a key's value is the result's weight
        exp_offsets = np.asarray(a["expression_basis"], np.float32)
        exp_values = expression.astype(np.float32)
        exp_scale = np.ones(exp_offsets.shape[0])
        lo = np.minimum(0.0, exp_values.min(axis=0)) if len(exp_values) else np.zeros(exp_offsets.shape[0])
        hi = np.maximum(1.0, exp_values.max(axis=0)) if len(exp_values) else np.ones(exp_offsets.shape[0])
        exp_ranges = np.stack([lo, hi], axis=1)
    else:
        exp_offsets, exp_values, exp_scale = _scaled(a["expression_basis"], expression)
        exp_ranges = np.tile([-1.0, 1.0], (exp_offsets.shape[0], 1))
    lip_full = np.zeros((a["lip_basis"].shape[0], v, 3), np.float32)
    lip_full[:, a["lip_vertex_ids"]] = a["lip_basis"]  # lip offsets live on the lip vertices only
    lip_offsets, lip_values, lip_scale = _scaled(lip_full, a["lip_coeffs"])
    n_exp, n_lip = exp_offsets.shape[0], lip_offsets.shape[0]
    exp_names = _expression_names(path, a) if named else tuple(EXPRESSION_KEY.format(i) for i in range(n_exp))
    names = exp_names + tuple(LIP_KEY.format(i) for i in range(n_lip))

    joint_names = tuple(str(s) for s in a["joint_names"])
    rotvecs = np.stack([_joint_pose(name, j, a) for j, name in enumerate(joint_names)], axis=1)  # (T, J, 3)
    quats = continuous_quaternions(axis_angle_to_quaternion(rotvecs))
    locations, located = _bone_locations(a, quats)

    matrix = np.eye(4)
    matrix[:3, :3] = axes.WORLD_TO_BLENDER
    source = meta.get("source") or {}
    return HeadData(
        path=path, meta=meta, model=str(meta.get("model")), fps=fps, n_frames=n,
        source_frame_start=int(source.get("frame_start") or 0),
        vertices_neutral=np.ascontiguousarray(a["vertices_neutral"], np.float32),
        faces=np.ascontiguousarray(a["faces"], np.int32),
        uv_loops=uv_loops,
        shape_key_names=names,
        shape_key_offsets=np.concatenate([exp_offsets, lip_offsets]),
        shape_key_values=np.concatenate([exp_values, lip_values], axis=1),
        shape_key_scales=np.concatenate([exp_scale, lip_scale]),
        n_expression=n_exp, n_lip=n_lip,
        joint_names=joint_names,
        joint_parents=np.asarray(a["joint_parents"], np.int64),
        joints_rest=np.asarray(a["joints_rest"], np.float32),
        skin_weights=np.asarray(a["skin_weights"], np.float32),
        bone_quaternions=quats.astype(np.float32),
        bone_locations=locations.astype(np.float32),
        located_joints=located,
        arkit_names=tuple(str(s) for s in a["arkit_names"]),
        arkit=np.asarray(a["arkit"], np.float32),
        confidence={prop: np.asarray(a[key], np.float32) for key, prop in CONFIDENCE_PROPERTIES.items()},
        detail=_detail(path, meta),
        object_matrix=matrix,
        vertices=a.get("vertices"),
        extrinsics=np.asarray(a["extrinsics"], np.float64),
        correctives=_correctives(path, a, joint_names),
        camera=_camera(path, meta, a),
        video_path=source_video(path, source.get("path")),
        shape_key_ranges=np.concatenate([exp_ranges, np.tile([-1.0, 1.0], (n_lip, 1))]),
        vertices_template=(np.ascontiguousarray(a["vertices_template"], np.float32)
                           if "vertices_template" in a else None),
        face_material=np.ascontiguousarray(a["face_material"], np.int32) if "face_material" in a else None,
        material_names=tuple(str(s) for s in a["material_names"]) if "material_names" in a else (),
    )


def _expression_names(path: Path, a: dict) -> tuple[str, ...]:
    """The named expressions' key names, checked to make distinct keys that no other key takes."""
    names = tuple(str(s) for s in a["expression_names"])
    reserved = {"Basis", IDENTITY_KEY}
    bad = [n for n in names if not n or n in reserved or n.startswith(("lip_", "pose_"))]
    if bad or len(set(names)) != len(names):
        raise ResultError(f"{path}: expression_names must be distinct names other than Basis, {IDENTITY_KEY} "
                          f"and the lip and pose keys' (got {bad or 'repeated names'})")
    return names


def write_source(folder, video) -> Path:
    """Record beside the result in ``folder`` that its video is the user's ``video``."""
    path = Path(folder) / SOURCE_FILE
    path.write_text(json.dumps({"video": str(video)}))
    return path


def source_video(result_path: Path, meta_path: str | None) -> Path | None:
    """The video a result was made from: the user's file recorded beside it when the add-on
    fetched it, else ``meta.source.path``, except the backend's copy of an upload, which must
    never reach the scene (None then: no backdrop rather than the wrong file)."""
    try:
        recorded = json.loads((Path(result_path).parent / SOURCE_FILE).read_text()).get("video")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded:
        return Path(recorded)
    if not meta_path or footage.is_uploaded_copy(meta_path):
        return None
    return Path(meta_path)


def _bone_locations(a: dict, quats: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """((T, J, 3) pose-bone locations, the joints to key) for bones at ``joints_rest`` that
    rotate by ``quats`` (T, J, 4): the per-frame joint transforms of ``_vendor/kinematics``."""
    parents = np.asarray(a["joint_parents"], np.int64)
    joints_rest = np.asarray(a["joints_rest"], np.float64)
    expression_joints = a.get("expression_joints")
    if expression_joints is not None and not np.any(expression_joints):
        expression_joints = None
    joints = kinematics.posed_rest_joints(joints_rest, a["expression"], expression_joints)
    _, _, local_t = kinematics.joint_transforms(quaternion_matrices(quats), joints, joints_rest, parents,
                                                np.asarray(a["transl"], np.float64))
    locations = kinematics.bone_locations(local_t, joints_rest, parents)
    located = tuple(range(len(parents))) if expression_joints is not None else (0,)
    return locations, located


def _correctives(path: Path, a: dict, joint_names: tuple[str, ...]) -> tuple:
    if "pose_correctives" not in a:
        return ()
    pc = np.asarray(a["pose_correctives"], np.float32)
    v = a["vertices_neutral"].shape[0]
    if pc.shape != (9 * (len(joint_names) - 1), v, 3):
        raise ResultError(f"{path}: pose_correctives has shape {pc.shape}, expected "
                          f"({9 * (len(joint_names) - 1)}, {v}, 3) for {len(joint_names)} joints")
    out = []
    for j, joint in enumerate(joint_names[1:]):
        for r in range(3):
            for c in range(3):
                out.append(Corrective(f"pose_{joint}_{r}{c}", joint, r, c, pc[9 * j + 3 * r + c]))
    return tuple(out)


def expected_blender_vertices(head: HeadData, frames: np.ndarray | None = None) -> np.ndarray:
    """(len(frames), V, 3) the result's stored vertices converted into Blender's world frame
    (``axes.camera_to_blender``): what the imported head must show at those frames."""
    if head.vertices is None:
        raise ResultError(f"{head.path} was written with --no-vertices: no per-frame vertices to compare with")
    idx = np.arange(head.n_frames) if frames is None else np.asarray(frames)
    return axes.camera_to_blender(head.vertices[idx].astype(np.float64), head.extrinsics[idx])
