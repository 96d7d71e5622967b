"""The ICT Face Model Light behind the :class:`~avface.models.base.FaceModel` interface
(docs/design.md section 4): a whole head whose expression shapes are Apple's ARKit blendshapes.

USC ICT's model (MIT licence; ``models/data/ict_face_light/``, with its notice and sources) has
26,719 vertices in 17 parts (face, head and neck, mouth socket, eye sockets, gums and tongue,
teeth, eyeballs, the eyes' wet and occlusion meshes, eyelashes) and one UV layout. A head is

    neutral + identity_deltas . betas + expression_deltas . expression

with 100 identity modes (weights of about unit spread) and 53 expression shapes named after
ARKit's blendshapes (left and right split as ``_L``/``_R``, ``browInnerUp`` and ``cheekPuff``
each split in two), expression weights in [0, 1]. The file's four further shapes
(``PupilDilate_L/R``, ``cheekRaiser_L/R``) are not ARKit's and are not used.

Units here are metres (the file's centimetres times 0.01); the frame is the file's, which is
the convention of every model here (x to the model's left, y up, z towards the viewer).

The jaw, the teeth and the tongue move with the ``jaw*`` and ``mouth*`` shapes: the shapes
move the lower teeth and gums with the chin, so the model needs no jaw joint. Three joints
carry what shapes cannot: ``root`` (the head pose, a pivot at the top of the neck) and one
joint per eyeball at its centre (gaze; no expression shape moves the eyeballs).

Where each tracker landmark lies on the surface is ``mediapipe_embedding.npz`` beside the
model, made once from the two meshes by ``scripts/build_ict_embedding.py``
(:mod:`avface.models.ict_embedding`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from avface.errors import ModelFileError
from avface.models.base import FaceModel, FaceOutput, FaceParams
from avface.models.lbs import blend_shapes, lbs, vertices2landmarks
from avface.models.surface import triangulate

MODEL_NAME = "ict_face_light"
DATA_DIR = Path(__file__).resolve().parent / "data" / "ict_face_light"
MODEL_FILE = "ict_face_model_light.npz"
EMBEDDING_FILE = "mediapipe_embedding.npz"
INDICES_FILE = "vertex_indices.json"
#: (bytes, sha256) of the model file as it ships (the upstream OBJs stored as arrays, unchanged)
MODEL_FILE_SIZE = 22_412_506
MODEL_FILE_SHA256 = "34fbbcf325c0340b0005716af3e036a6c7c133bd399886116d7a145afd7e3fe7"
CM_TO_M = 0.01
#: The 53 ARKit expression shapes come first in the file, in this count.
N_ARKIT_SHAPES = 53
N_IDENTITY = 100

#: The model's parts: (name, first vertex, last vertex + 1, first polygon, last polygon + 1),
#: from the upstream README's tables. Parts share the vertices where they meet (the face with
#: the head, the mouth socket and the eye sockets), so a polygon's part is read from its index.
#: Each eye is two meshes, which the README calls sclera and iris: the first is the eye's
#: clear outer shell (with the cornea's bulge), the second the eyeball itself, iris and pupil
#: recessed at its front; they are named here for what they are.
PARTS = (
    ("face", 0, 9409, 0, 9230),
    ("head_neck", 9409, 11248, 9230, 11144),
    ("mouth_socket", 11248, 13294, 11144, 13226),
    ("eye_socket_left", 13294, 13678, 13226, 13630),
    ("eye_socket_right", 13678, 14062, 13630, 14034),
    ("gums_tongue", 14062, 17039, 14034, 17006),
    ("teeth", 17039, 21451, 17006, 21496),
    ("eye_shell_left", 21451, 22221, 21496, 22296),
    ("eyeball_left", 22221, 23021, 22296, 23094),
    ("eye_shell_right", 23021, 23791, 23094, 23894),
    ("eyeball_right", 23791, 24591, 23894, 24692),
    ("lacrimal_left", 24591, 24795, 24692, 24855),
    ("lacrimal_right", 24795, 24999, 24855, 25018),
    ("eye_blend_left", 24999, 25023, 25018, 25033),
    ("eye_blend_right", 25023, 25047, 25033, 25048),
    ("eye_occlusion_left", 25047, 25199, 25048, 25176),
    ("eye_occlusion_right", 25199, 25351, 25176, 25304),
    ("eyelashes_left", 25351, 26035, 25304, 25844),
    ("eyelashes_right", 26035, 26719, 25844, 26384),
)
#: Materials the add-on makes, in this order (the result's ``material_names``).
MATERIALS = ("skin", "mouth", "teeth", "sclera", "iris", "eye_wet", "lashes")
PART_MATERIAL = {
    "face": "skin", "head_neck": "skin", "mouth_socket": "mouth", "eye_socket_left": "mouth",
    "eye_socket_right": "mouth", "gums_tongue": "mouth", "teeth": "teeth", "eye_shell_left": "eye_wet",
    "eyeball_left": "sclera", "eye_shell_right": "eye_wet", "eyeball_right": "sclera", "lacrimal_left": "eye_wet",
    "lacrimal_right": "eye_wet", "eye_blend_left": "eye_wet", "eye_blend_right": "eye_wet",
    "eye_occlusion_left": "eye_wet", "eye_occlusion_right": "eye_wet", "eyelashes_left": "lashes",
    "eyelashes_right": "lashes",
}
#: Half the angle the iris subtends at the eyeball's centre (an iris of about 11.5 mm on an
#: eyeball of about 12.5 mm radius).
IRIS_HALF_ANGLE_DEG = 27.0
#: The skin: where the detail maps apply and the landmarks lie (face, head and neck).
SKIN_VERTICES = (0, 11248)
#: The soft tissue the clip's identity correction reshapes: the skin and the mouth and eye
#: sockets joined to it (the teeth, gums and eyes keep their shape).
SOFT_VERTICES = (0, 14062)
#: The narrow face area of the upstream README (no ears, no forehead top, no neck).
NARROW_FACE = (0, 6706)

#: Shapes that move the lips apart or together, or the chin forward, without the jaw's opening
#: (name prefixes): in speech the jaw does most of that.
JAWLESS_MOUTH_SHAPES = ("mouthLowerDown", "mouthUpperUp", "mouthClose", "mouthShrugLower", "mouthFunnel",
                        "mouthStretch", "jawForward")

JOINT_NAMES = ("root", "eye_left", "eye_right")
JOINT_PARENTS = np.array([-1, 0, 0])


def _part_range(name: str) -> tuple[int, int]:
    for n, a, b, _, _ in PARTS:
        if n == name:
            return a, b
    raise KeyError(name)


def vertex_parts(n_vertices: int) -> np.ndarray:
    """(V,) int: the index into :data:`PARTS` of each vertex (a shared vertex: the later part)."""
    out = np.full(n_vertices, -1, np.int64)
    for i, (_, a, b, _, _) in enumerate(PARTS):
        out[a:b] = i
    return out


def polygon_parts(n_polygons: int) -> np.ndarray:
    """(P,) int: the index into :data:`PARTS` of each polygon."""
    out = np.full(n_polygons, -1, np.int64)
    for i, (_, _, _, a, b) in enumerate(PARTS):
        out[a:b] = i
    return out


def how_to_repair(path: Path) -> str:
    return (f"The ICT face model file {path} ships with the repository; restore it with "
            f"`git checkout -- models/data/ict_face_light` (or reinstall avface), or pick the embedded mask "
            f"with --model default.")


def check_model_file(path: str | Path) -> Path:
    """The model file, checked against its shipped size and SHA-256; ModelFileError naming it
    when it is missing or damaged."""
    from avface.core.assets import file_hash

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"the ICT face model file is missing: {path}. " + how_to_repair(path))
    size = path.stat().st_size
    if size != MODEL_FILE_SIZE:
        raise ModelFileError(f"the ICT face model file {path} is damaged: {size} bytes, expected "
                             f"{MODEL_FILE_SIZE}. " + how_to_repair(path))
    digest = file_hash(path).hexdigest()
    if digest != MODEL_FILE_SHA256:
        raise ModelFileError(f"the ICT face model file {path} is damaged: SHA-256 {digest}, expected "
                             f"{MODEL_FILE_SHA256}. " + how_to_repair(path))
    return path


@dataclass(frozen=True)
class ICTArrays:
    """The model file's arrays, in metres, triangulated."""

    neutral: np.ndarray  #: (V, 3) float32
    polygons: np.ndarray  #: (P, 4) int64, -1 as a triangle's fourth index
    faces: np.ndarray  #: (F, 3) int64, the polygons split into triangles
    face_polygon: np.ndarray  #: (F,) the polygon each triangle came from
    uv: np.ndarray  #: (Vt, 2) float32
    uv_faces: np.ndarray  #: (F, 3) int64
    expression_names: tuple  #: the 53 ARKit shapes' names, ICT's spelling
    expression_deltas: np.ndarray  #: (53, V, 3) float32
    identity_deltas: np.ndarray  #: (100, V, 3) float32
    landmark68: np.ndarray  #: (68,) the Multi-PIE landmarks' vertices (vertex_indices.json)


def read_ict_arrays(folder: str | Path = DATA_DIR) -> ICTArrays:
    folder = Path(folder)
    path = check_model_file(folder / MODEL_FILE)
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ModelFileError(f"cannot read the ICT face model file {path}: {e}. " + how_to_repair(path)) from e
    names = tuple(str(n) for n in d["expression_names"][:N_ARKIT_SHAPES])
    tris, source = triangulate(d["faces"])
    uv_tris, uv_source = triangulate(d["uv_faces"])
    if not np.array_equal(source, uv_source):
        raise ModelFileError(f"the ICT face model file {path}: its UV polygons do not match its polygons")
    try:
        lmk68 = np.asarray(json.loads((folder / INDICES_FILE).read_text())["idx_to_landmark_verts"], np.int64)
    except (OSError, ValueError, KeyError) as e:
        raise ModelFileError(f"cannot read {folder / INDICES_FILE}: {e}. " + how_to_repair(path)) from e
    return ICTArrays(
        neutral=(d["neutral"] * CM_TO_M).astype(np.float32),
        polygons=d["faces"].astype(np.int64),
        faces=tris,
        face_polygon=source,
        uv=d["uv"].astype(np.float32),
        uv_faces=uv_tris,
        expression_names=names,
        expression_deltas=(d["expression_deltas"][:N_ARKIT_SHAPES] * CM_TO_M).astype(np.float32),
        identity_deltas=(d["identity_deltas"] * CM_TO_M).astype(np.float32),
        landmark68=lmk68,
    )


@lru_cache(maxsize=1)
def _cached_arrays() -> ICTArrays:
    return read_ict_arrays(DATA_DIR)


@dataclass(frozen=True)
class ICTEmbedding:
    """Where the tracker's landmarks lie on the model's surface."""

    landmark_ids: np.ndarray  #: (M,) MediaPipe landmark index
    face_idx: np.ndarray  #: (M,) triangle of :attr:`ICTArrays.faces`
    bary: np.ndarray  #: (M, 3)


def read_embedding(folder: str | Path = DATA_DIR) -> ICTEmbedding:
    path = Path(folder) / EMBEDDING_FILE
    if not path.is_file():
        raise ModelFileError(f"the ICT model's landmark embedding is missing: {path}. Rebuild it with "
                             f"`python scripts/build_ict_embedding.py`, or restore it with "
                             f"`git checkout -- models/data/ict_face_light`.")
    with np.load(path, allow_pickle=False) as z:
        return ICTEmbedding(z["landmark_ids"].astype(np.int64), z["face_idx"].astype(np.int64),
                            z["bary"].astype(np.float64))


#: MediaPipe's iris-centre landmarks and the eye each is on (468 beside landmark 33, the
#: person's right eye; the model's x runs to its left, so that eye has x < 0).
IRIS_LANDMARKS = {468: "right", 473: "left"}


def pupil_embedding(arrays: ICTArrays) -> tuple[np.ndarray, np.ndarray]:
    """(triangles (2,), barycentric coordinates (2, 3)) of the pupils' centres, in
    :data:`IRIS_LANDMARKS` order: the eyeball's surface point straight ahead of its centre."""
    from avface.models.surface import closest_points

    part = polygon_parts(len(arrays.polygons))[arrays.face_polygon]
    names = [p[0] for p in PARTS]
    faces, bary = [], []
    for side in IRIS_LANDMARKS.values():
        tris = np.flatnonzero(part == names.index(f"eyeball_{side}"))
        ids = np.arange(*_part_range(f"eyeball_{side}"))
        centre = arrays.neutral[ids].astype(np.float64).mean(0)
        front = centre + np.array([0.0, 0.0, np.abs(arrays.neutral[ids, 2] - centre[2]).max() + 0.01])
        f, b, _ = closest_points(front[None], arrays.neutral, arrays.faces[tris])
        faces.append(tris[f[0]])
        bary.append(b[0])
    return np.asarray(faces), np.asarray(bary)


def joint_regressor(neutral: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(3, V) rows that average vertices into the three joints, so that the joints follow the
    identity linearly: root, the mean of the head-and-neck vertices within 1 cm of the mouth
    corners' height (the top of the neck, on the mid-plane by symmetry), and each eyeball's
    vertex mean (its centre)."""
    n = len(neutral)
    reg = np.zeros((3, n), np.float64)
    a, b = _part_range("head_neck")
    corners_y = neutral[[5708, 6213], 1].mean()  # the Multi-PIE mouth corners (48, 54)
    ring = a + np.flatnonzero(np.abs(neutral[a:b, 1] - corners_y) < 0.01)
    reg[0, ring] = 1.0 / len(ring)
    for j, (s, i) in enumerate((("eye_shell_left", "eyeball_left"), ("eye_shell_right", "eyeball_right")), start=1):
        ids = np.r_[np.arange(*_part_range(s)), np.arange(*_part_range(i))]
        reg[j, ids] = 1.0 / len(ids)
    return reg


def skinning_weights(n_vertices: int) -> np.ndarray:
    """(V, 3): the eyes (shell and eyeball) follow their eye joint, all else the root."""
    w = np.zeros((n_vertices, 3), np.float32)
    w[:, 0] = 1.0
    for j, side in ((1, "left"), (2, "right")):
        for part in (f"eye_shell_{side}", f"eyeball_{side}"):
            a, b = _part_range(part)
            w[a:b] = 0.0
            w[a:b, j] = 1.0
    return w


def lip_vertices(faces: np.ndarray, n_vertices: int, embedding: ICTEmbedding, rings: int = 2) -> np.ndarray:
    """The lip region's vertices: those of the lip landmarks' triangles and ``rings`` rings of
    neighbours around them, on the face part only (the mouth socket stays rigid with the
    shapes)."""
    from avface.core.topology import LIPS
    from avface.models.flame import vertex_rings

    sel = np.isin(embedding.landmark_ids, LIPS)
    seeds = np.unique(faces[embedding.face_idx[sel]].reshape(-1))
    ids = vertex_rings(faces, n_vertices, seeds, rings)
    a, b = _part_range("face")
    return np.sort(ids[(ids >= a) & (ids < b)]).astype(np.int64)


class ICTModel(FaceModel):
    """The ICT Face Model Light: ``n_shape`` identity modes, the 53 ARKit expression shapes,
    joints root and the two eyes (:data:`JOINT_NAMES`). Expression weights are meant to stay
    in [0, 1] (:attr:`expression_bounds`); the fit keeps them there."""

    name = MODEL_NAME
    joint_names = JOINT_NAMES
    parents = JOINT_PARENTS
    expression_bounds = (0.0, 1.0)
    jaw_dof = 0  # the jaw is in the shapes
    #: its 53 shapes, even the clip's own, cannot take every lip shape the tracker sees: the
    #: lips stage adds the rest where the mouth is seen (avface.stages.lips.tracker_lip_offsets)
    lip_residual = True

    def __init__(self, arrays: ICTArrays | None = None, embedding: ICTEmbedding | None = None, *,
                 n_shape: int = N_IDENTITY, neutral_offset: np.ndarray | None = None, device="cpu",
                 dtype=torch.float32):
        arrays = _cached_arrays() if arrays is None else arrays
        embedding = read_embedding() if embedding is None else embedding
        if not 0 <= n_shape <= arrays.identity_deltas.shape[0]:
            raise ValueError(f"n_shape must be in 0..{arrays.identity_deltas.shape[0]}, got {n_shape}")
        if neutral_offset is not None:
            neutral_offset = np.asarray(neutral_offset, np.float32)
            if neutral_offset.shape != arrays.neutral.shape:
                raise ValueError(f"expected a {arrays.neutral.shape} neutral offset, got {neutral_offset.shape}")
            arrays = replace(arrays, neutral=arrays.neutral + neutral_offset)
        self._embedding = embedding
        self.neutral_offset = neutral_offset
        self.arrays = arrays
        self.faces = arrays.faces
        self.uv = arrays.uv
        self.uv_faces = arrays.uv_faces
        self.expression_names = arrays.expression_names
        # the face mesh's landmarks, then the two iris centres on the eyeballs' pupils
        self.n_mesh_landmarks = len(embedding.landmark_ids)
        iris_faces, iris_bary = pupil_embedding(arrays)
        self.landmark_ids = np.r_[embedding.landmark_ids, list(IRIS_LANDMARKS)].astype(np.int64)
        self.landmark_faces = np.r_[embedding.face_idx, iris_faces].astype(np.int64)
        self._bary64 = np.concatenate([embedding.bary, iris_bary])
        self.landmark_bary = self._bary64.astype(np.float32)
        n = len(arrays.neutral)
        self.lip_vertex_ids = lip_vertices(arrays.faces, n, embedding)
        self.skin_weights = skinning_weights(n)
        self.vertex_parts = vertex_parts(n)
        self._n_shape = n_shape
        self.device, self.dtype = device, dtype
        # bases as (V, 3, S + E), the layout blend_shapes takes
        dirs = np.concatenate([arrays.identity_deltas[:n_shape], arrays.expression_deltas]).transpose(1, 2, 0)
        self._dirs = np.ascontiguousarray(dirs)
        self._reg = joint_regressor(arrays.neutral.astype(np.float64), arrays.faces)
        j_template = self._reg @ arrays.neutral.astype(np.float64)
        # the joints follow the identity; no expression moves the eyeballs or the neck ring
        j_dirs = np.einsum("jv,vkl->jkl", self._reg, self._dirs[:, :, :n_shape])
        t = lambda a: torch.as_tensor(np.ascontiguousarray(a), device=device, dtype=dtype)  # noqa: E731
        self._t_j_template, self._t_j_dirs = t(j_template), t(j_dirs)
        self._t_parents = torch.as_tensor(self.parents, dtype=torch.long)
        self._t = t
        self._full: dict | None = None  # built on first use: 26,719 vertices x 153 shapes
        self._subset = self._landmark_set()

    def _evaluation_set(self, ids: np.ndarray) -> dict:
        t = self._t
        pos = np.searchsorted(ids, self.faces[self.landmark_faces])
        return {
            "template": t(self.arrays.neutral[ids]),
            "dirs": t(self._dirs[ids]),
            "weights": t(self.skin_weights[ids]),
            "lmk_tri": torch.as_tensor(pos, device=self.device, dtype=torch.long),
            "lmk_idx": torch.arange(len(pos), device=self.device),
            "lmk_bary": t(self._bary64),
        }

    def _landmark_set(self) -> dict:
        """The landmarks as points of their own: each the barycentric blend of its corners'
        template and shapes. Skinning is linear in the points and every landmark's corners
        follow the root alone, so posing the blended points is posing the corners and
        blending after; the fit's forward passes then touch 468 points instead of 1,400
        vertices."""
        t = self._t
        tri = self.faces[self.landmark_faces]  # (M, 3)
        w = self.skin_weights[tri]  # (M, 3 corners, J)
        if not np.allclose(w, w[:, :1]):
            raise ValueError("a landmark's corners follow different joints")
        bary = self._bary64
        return {
            "template": t(np.einsum("mc,mck->mk", bary, self.arrays.neutral[tri].astype(np.float64))),
            "dirs": t(np.einsum("mc,mckl->mkl", bary, self._dirs[tri].astype(np.float64))),
            "weights": t(w[:, 0]),
        }

    @property
    def n_vertices(self) -> int:
        return int(self.arrays.neutral.shape[0])

    @property
    def n_shape(self) -> int:
        return self._n_shape

    @property
    def n_expression(self) -> int:
        return N_ARKIT_SHAPES

    def template_vertices(self) -> np.ndarray:
        """(V, 3) the model's generic neutral, before the clip's identity (modes and correction)."""
        off = 0 if self.neutral_offset is None else self.neutral_offset
        return (self.arrays.neutral - off).astype(np.float32)

    @property
    def face_materials(self) -> tuple[np.ndarray, tuple]:
        """((F,) each triangle's index into :data:`MATERIALS`, :data:`MATERIALS`): by part, and
        on each eyeball the iris where the triangle lies within :data:`IRIS_HALF_ANGLE_DEG` of
        the eye's forward axis."""
        part = polygon_parts(len(self.arrays.polygons))[self.arrays.face_polygon]
        lookup = np.array([MATERIALS.index(PART_MATERIAL[p[0]]) for p in PARTS])
        material = lookup[part]
        names = [p[0] for p in PARTS]
        centres = self.rest_joints()
        v = self.arrays.neutral
        for j, side in ((1, "left"), (2, "right")):
            tris = np.flatnonzero(part == names.index(f"eyeball_{side}"))
            d = v[self.faces[tris]].mean(1) - centres[j]
            cos = d[:, 2] / np.maximum(np.linalg.norm(d, axis=1), 1e-12)
            material[tris[cos > np.cos(np.radians(IRIS_HALF_ANGLE_DEG))]] = MATERIALS.index("iris")
        return material, MATERIALS

    @property
    def jaw_shapes(self) -> np.ndarray:
        """(E,) bool: the jaw's shapes (``jaw*``): they alone move the chin as the clip's own
        shapes are learned."""
        return np.array([n.startswith("jaw") for n in self.expression_names])

    @property
    def jawless_mouth_shapes(self) -> np.ndarray:
        """(E,) bool: the shapes that part, close or push the lips without opening the jaw
        (:data:`JAWLESS_MOUTH_SHAPES`), which the fit makes costlier than ``jawOpen``."""
        return np.array([n.startswith(JAWLESS_MOUTH_SHAPES) for n in self.expression_names])

    @property
    def detail_faces(self) -> np.ndarray:
        """(F,) bool: the triangles the detail maps cover: the skin's inside the unit UV square
        (the face; the head and neck lie in the next tile, the eyes and teeth in their own)."""
        material, names = self.face_materials
        uv = self.uv[self.uv_faces]  # (F, 3, 2)
        inside = ((uv >= 0.0) & (uv <= 1.0)).all((1, 2))
        return (material == names.index("skin")) & inside

    def joint_pose(self, params: FaceParams) -> torch.Tensor:
        """(B, 3, 3) axis-angle per joint: the head (global_orient) and the two eyes."""
        return torch.stack([params.global_orient, params.leye_pose, params.reye_pose], dim=1)

    def forward(self, params: FaceParams, *, full: bool = True) -> FaceOutput:
        if full and self._full is None:
            self._full = self._evaluation_set(np.arange(self.n_vertices))
        s = self._full if full else self._subset
        coeffs = torch.cat([params.betas, params.expression], dim=1)
        joints_rest = self._t_j_template + blend_shapes(params.betas, self._t_j_dirs)
        shaped = s["template"] + blend_shapes(coeffs, s["dirs"])
        verts, joints = lbs(shaped, self.joint_pose(params), None, self._t_parents, s["weights"], joints=joints_rest)
        verts = verts + params.transl[:, None]
        joints = joints + params.transl[:, None]
        if not full:  # the points are the landmarks (_landmark_set)
            return FaceOutput(None, verts, joints)
        lmk = vertices2landmarks(verts, s["lmk_tri"], s["lmk_idx"], s["lmk_bary"])
        return FaceOutput(verts, lmk, joints)

    def neutral_vertices(self, betas: torch.Tensor | None = None) -> np.ndarray:
        v = self.arrays.neutral.astype(np.float64)
        if betas is not None:
            b = np.asarray(torch.as_tensor(betas).detach().cpu(), np.float64).reshape(-1)
            if b.shape != (self._n_shape,):
                raise ValueError(f"expected {self._n_shape} betas, got {b.shape[0]}")
            v = v + np.einsum("vkl,l->vk", self._dirs[:, :, :self._n_shape], b)
        return v.astype(np.float32)

    def expression_basis(self) -> np.ndarray:
        return np.ascontiguousarray(self.arrays.expression_deltas)

    def rest_joints(self, betas: torch.Tensor | None = None) -> np.ndarray:
        return (self._reg @ self.neutral_vertices(betas).astype(np.float64)).astype(np.float32)


    def with_shape_offsets(self, offsets: np.ndarray) -> "ICTModel":
        """This model with each expression shape's face-mesh landmarks (the first
        :attr:`n_mesh_landmarks`) moved by ``offsets`` (E, M, 3)
        metres per unit weight: the clip's own version of the shapes (each offset spread
        smoothly over the skin, :func:`spread_landmark_offsets`)."""
        offsets = np.asarray(offsets, np.float64)
        k = self.n_mesh_landmarks
        fields = spread_landmark_offsets(self.faces, self.n_vertices, self.landmark_faces[:k], self._bary64[:k],
                                         offsets.transpose(1, 0, 2).reshape(k, -1))
        deltas = self.arrays.expression_deltas + fields.reshape(self.n_vertices, -1, 3).transpose(1, 0, 2)
        base = self.arrays.neutral - (0 if self.neutral_offset is None else self.neutral_offset)
        return ICTModel(replace(self.arrays, neutral=base, expression_deltas=deltas.astype(np.float32)),
                        self._embedding, n_shape=self._n_shape, neutral_offset=self.neutral_offset,
                        device=self.device, dtype=self.dtype)

    def with_landmark_offsets(self, offsets: np.ndarray) -> "ICTModel":
        """This model with its neutral moved so that its face-mesh landmarks move by ``offsets`` (M, 3)
        metres: a per-clip correction of the identity beyond what the identity modes express
        (the offsets spread smoothly over the skin; the eyes, teeth and mouth interior keep
        their shape)."""
        base = self.arrays.neutral - (0 if self.neutral_offset is None else self.neutral_offset)
        k = self.n_mesh_landmarks
        offset = spread_landmark_offsets(self.faces, len(base), self.landmark_faces[:k], self._bary64[:k], offsets)
        offset = offset + eye_offsets(self.landmark_ids[:k], offsets, len(base))
        if self.neutral_offset is not None:
            offset = offset + self.neutral_offset
        return ICTModel(replace(self.arrays, neutral=base), self._embedding, n_shape=self._n_shape,
                        neutral_offset=offset, device=self.device, dtype=self.dtype)


#: Each eye's meshes, which move as one with the eye's lids (:func:`eye_offsets`).
EYE_PARTS = ("eye_shell_{}", "eyeball_{}", "lacrimal_{}", "eye_blend_{}", "eye_occlusion_{}", "eyelashes_{}")


def eye_offsets(landmark_ids: np.ndarray, offsets: np.ndarray, n_vertices: int) -> np.ndarray:
    """(V, 3): each eye's meshes (eyeball, shell, wet and occlusion meshes, lashes) moved by
    the mean offset of that eye's lid landmarks, so that a correction that moves the lids
    carries the eye with them (the eye sits in its lids; its centre sets the gaze)."""
    from avface.core.topology import LEFT_EYE, RIGHT_EYE

    out = np.zeros((n_vertices, 3), np.float32)
    ids = list(np.asarray(landmark_ids))
    # MediaPipe's RIGHT_EYE is the person's right eye: the model's x < 0, its "right" parts
    for side, lids in (("right", RIGHT_EYE), ("left", LEFT_EYE)):
        rows = [ids.index(i) for i in lids if i in ids]
        shift = np.asarray(offsets, np.float64)[rows].mean(0)
        for part in EYE_PARTS:
            a, b = _part_range(part.format(side))
            out[a:b] = shift
    return out


#: Pull of the spread offsets towards zero against their smoothness: offsets fade over a few
#: centimetres away from the landmarks instead of moving the back of the head.
SPREAD_DECAY = 1e-3


def spread_landmark_offsets(faces: np.ndarray, n_vertices: int, landmark_faces: np.ndarray, bary: np.ndarray,
                            offsets: np.ndarray) -> np.ndarray:
    """(V, C) a smooth field over the soft tissue (:data:`SOFT_VERTICES`) whose value at each
    landmark's surface point is ``offsets`` (M, C) (C = 3: one offset), in the least-squares
    sense: landmark terms plus the graph Laplacian's smoothness plus a small decay; zero on
    the other parts."""
    interp, solve = _spread_system(np.asarray(faces, np.int64), np.asarray(landmark_faces, np.int64),
                                   np.asarray(bary, np.float64))
    a, b = SOFT_VERTICES
    rhs = interp.T @ np.asarray(offsets, np.float64)
    out = np.zeros((n_vertices, rhs.shape[1]))
    out[a:b] = np.stack([solve(rhs[:, c]) for c in range(rhs.shape[1])], 1)
    return out.astype(np.float32)


_SPREAD_CACHE: dict = {}


def _spread_system(faces: np.ndarray, landmark_faces: np.ndarray, bary: np.ndarray):
    """(interpolation (M, n), the factorised normal matrix's solve) of
    :func:`spread_landmark_offsets`: the same for every clip, so factorised once per process."""
    import hashlib

    import scipy.sparse as sp
    import scipy.sparse.linalg as spla

    from avface.models.canonical_mesh import mesh_laplacian

    key = hashlib.sha1(faces.tobytes() + landmark_faces.tobytes() + bary.tobytes()).hexdigest()
    if key in _SPREAD_CACHE:
        return _SPREAD_CACHE[key]
    a, b = SOFT_VERTICES
    f = faces[(faces >= a).all(1) & (faces < b).all(1)] - a
    n = b - a
    lap = mesh_laplacian(f, n)
    tri = faces[landmark_faces] - a  # (M, 3)
    m = len(tri)
    rows = np.repeat(np.arange(m), 3)
    interp = sp.coo_matrix((bary.reshape(-1), (rows, tri.reshape(-1))), shape=(m, n)).tocsr()
    system = (interp.T @ interp + lap.T @ lap + SPREAD_DECAY * sp.identity(n)).tocsc()
    _SPREAD_CACHE.clear()  # one model's system at a time
    _SPREAD_CACHE[key] = (interp, spla.factorized(system))
    return _SPREAD_CACHE[key]


def load_ict(*, device="cpu", dtype=torch.float32) -> ICTModel:
    """The shipped model (its file checked); ModelFileError naming the file when it is missing
    or damaged."""
    return ICTModel(device=device, dtype=dtype)
