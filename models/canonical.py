"""The embedded default face model: MediaPipe's canonical face mesh with a per-clip linear
model (DESIGN.md section 4).

The mesh (468 vertices, 898 triangles, UVs) is read from the geometry-pipeline metadata
inside ``face_landmarker.task``; it needs no download beyond the registry package. Vertex i
of the mesh is MediaPipe landmark i, so the landmark embedding is the identity.

Identity and expressions are per clip: :class:`CanonicalModel` holds a neutral shape and an
expression basis that the fit learns from the clip, plus two joints (root and jaw) skinned
with weights that are harmonic over the mesh, so the jaw bone drives the lower face smoothly.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from avface.assets import FACE_LANDMARKER, read_bundle_member
from avface.errors import ModelFileError

from .base import FaceModel, FaceOutput, FaceParams
from .lbs import lbs

GEOMETRY_MEMBER = "geometry_pipeline_metadata_landmarks.binarypb"
N_VERTICES = 468
N_FACES = 898
CM_TO_M = 0.01

# MediaPipe landmark groups (from MediaPipe's face mesh annotations).
LIPS_UPPER_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LIPS_LOWER_OUTER = (146, 91, 181, 84, 17, 314, 405, 321, 375)
LIPS_UPPER_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIPS_LOWER_INNER = (95, 88, 178, 87, 14, 317, 402, 318, 324)
LIPS = tuple(sorted(set(LIPS_UPPER_OUTER + LIPS_LOWER_OUTER + LIPS_UPPER_INNER + LIPS_LOWER_INNER)))
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173)
LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398)
RIGHT_EYEBROW = (46, 53, 52, 65, 55, 70, 63, 105, 66, 107)
LEFT_EYEBROW = (276, 283, 282, 295, 285, 300, 293, 334, 296, 336)
NOSE_BRIDGE = (168, 6, 197, 195, 5, 4)
#: Points that move with the skull, not with expressions: pose is estimated on these.
RIGID = (10, 109, 338, 67, 297, 151, 9, 8, 168, 6, 197, 195, 5, 4, 1, 33, 133, 263, 362, 234, 454, 127, 356, 93, 323)
#: Outer eye corners: the inter-ocular distance that normalises NME.
OUTER_EYE_CORNERS = (33, 263)
CHIN = (152, 148, 176, 149, 150, 377, 400, 378, 379, 136, 365, 172, 397)
MOUTH_CORNERS = (61, 291, 78, 308)


def inter_ocular(points) -> np.ndarray:
    """(...,) distance between the outer eye corners of (..., >=468, >=2) MediaPipe-indexed
    points, using x and y only: the length NME is normalised by."""
    p = np.asarray(points, np.float64)
    return np.linalg.norm(p[..., OUTER_EYE_CORNERS[0], :2] - p[..., OUTER_EYE_CORNERS[1], :2], axis=-1)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of a protobuf message; value is bytes for
    length-delimited fields, an int for varints and raw 4/8 bytes for fixed fields."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


@dataclass(frozen=True)
class CanonicalMesh:
    vertices: np.ndarray  #: (468, 3) float32 metres, y up, z towards the viewer
    uv: np.ndarray  #: (468, 2) float32, v up
    faces: np.ndarray  #: (898, 3) int64, counter-clockwise seen from the front
    procrustes_weights: dict[int, float]  #: landmark id -> weight MediaPipe uses for pose


def parse_geometry_metadata(data: bytes) -> CanonicalMesh:
    """Decode MediaPipe's GeometryPipelineMetadata: field 1 is the mesh (field 3 its
    (x, y, z, u, v) vertex buffer, field 4 its triangle indices), field 2 the Procrustes
    landmark weights (landmark id, weight)."""
    floats: list[float] = []
    indices: list[int] = []
    weights: dict[int, float] = {}
    for field, wire, value in _fields(data):
        if field == 1 and wire == 2:
            for f2, w2, v2 in _fields(value):
                if f2 == 3:
                    floats.extend(np.frombuffer(v2, "<f4").tolist())
                elif f2 == 4:
                    if w2 == 0:
                        indices.append(v2)
                    else:  # packed
                        p = 0
                        while p < len(v2):
                            idx, p = _read_varint(v2, p)
                            indices.append(idx)
        elif field == 2 and wire == 2:
            lid, w = 0, 0.0
            for f2, w2, v2 in _fields(value):
                if f2 == 1:
                    lid = v2
                elif f2 == 2:
                    w = float(np.frombuffer(v2, "<f4")[0])
            weights[int(lid)] = w
    vb = np.asarray(floats, np.float32)
    if vb.size != N_VERTICES * 5 or len(indices) != N_FACES * 3:
        raise ModelFileError(
            f"unexpected canonical mesh in {GEOMETRY_MEMBER}: {vb.size // 5} vertices and {len(indices) // 3} "
            f"triangles, expected {N_VERTICES} and {N_FACES}"
        )
    vb = vb.reshape(N_VERTICES, 5)
    faces = np.asarray(indices, np.int64).reshape(N_FACES, 3)
    # The bundle's v runs down the image (forehead near 0); the contract and Blender want v up.
    uv = np.stack([vb[:, 3], 1.0 - vb[:, 4]], axis=1)
    return CanonicalMesh(vb[:, :3] * CM_TO_M, uv.astype(np.float32), faces, weights)


@lru_cache(maxsize=1)
def load_canonical_mesh() -> CanonicalMesh:
    """The canonical face mesh from the installed ``face_landmarker.task``."""
    return parse_geometry_metadata(read_bundle_member(FACE_LANDMARKER, GEOMETRY_MEMBER))


def mesh_laplacian(faces: np.ndarray, n_vertices: int) -> sp.csr_matrix:
    """Graph Laplacian L = D - A of the mesh edges, (V, V)."""
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = np.concatenate([e, e[:, ::-1]])
    a = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n_vertices, n_vertices)).tocsr()
    a.data[:] = 1.0
    return (sp.diags(np.asarray(a.sum(1)).ravel()) - a).tocsr()


def harmonic_weights(faces: np.ndarray, n_vertices: int, ones, zeros) -> np.ndarray:
    """(V,) values in [0, 1], 1 on `ones`, 0 on `zeros`, harmonic (smooth) elsewhere."""
    lap = mesh_laplacian(faces, n_vertices)
    fixed = np.zeros(n_vertices, bool)
    value = np.zeros(n_vertices)
    fixed[list(ones)] = True
    value[list(ones)] = 1.0
    fixed[list(zeros)] = True
    free = ~fixed
    rhs = -lap[free][:, fixed] @ value[fixed]
    value[free] = spla.spsolve(lap[free][:, free].tocsc(), rhs)
    return np.clip(value, 0.0, 1.0)


def jaw_weights(mesh: CanonicalMesh) -> np.ndarray:
    """(V,) skinning weight of the jaw joint: 1 on the lower lip and chin, 0 on the upper lip,
    nose, eyes and upper face, harmonic between."""
    ones = set(LIPS_LOWER_OUTER + LIPS_LOWER_INNER + CHIN)
    y = mesh.vertices[:, 1]
    y_upper_lip = mesh.vertices[list(LIPS_UPPER_OUTER), 1].min()
    zeros = set(LIPS_UPPER_OUTER + LIPS_UPPER_INNER + NOSE_BRIDGE + RIGID + LEFT_EYE + RIGHT_EYE)
    zeros |= set(np.nonzero(y > y_upper_lip + 0.01)[0].tolist())  # everything 1 cm above the lips
    zeros -= ones
    return harmonic_weights(mesh.faces, len(y), ones, zeros).astype(np.float32)


@lru_cache(maxsize=1)
def lower_face_ids(threshold: float = 0.05) -> tuple[int, ...]:
    """Vertices that move with the jaw or are lips: what a hand over the mouth hides."""
    w = jaw_weights(load_canonical_mesh())
    return tuple(sorted(set(np.nonzero(w > threshold)[0].tolist()) | set(LIPS)))


def joint_locations(mesh: CanonicalMesh) -> np.ndarray:
    """(2, 3) rest locations of the root joint (between the ears, at eye height) and the jaw
    joint (the temporomandibular axis, just in front of the ears, below eye level)."""
    v = mesh.vertices
    ears = v[[234, 454]]
    root = np.array([0.0, v[[33, 263], 1].mean(), ears[:, 2].mean()], np.float32)
    jaw = np.array([0.0, ears[:, 1].mean() - 0.01, ears[:, 2].mean() - 0.01], np.float32)
    return np.stack([root, jaw])


class CanonicalModel(FaceModel):
    """Canonical mesh + per-clip neutral identity + per-clip expression basis + jaw.

    Joints: 0 root (global_orient), 1 jaw (jaw_pose). neck and eyes are not modelled by the
    default model and are ignored.
    """

    name = "mediapipe_canonical"
    joint_names = ("root", "jaw")
    parents = np.array([-1, 0])

    def __init__(self, neutral: np.ndarray | None = None, basis: np.ndarray | None = None,
                 *, device="cpu", dtype=torch.float32):
        mesh = load_canonical_mesh()
        self.mesh = mesh
        self.faces = mesh.faces
        self.uv = mesh.uv
        self.uv_faces = mesh.faces.copy()
        self.lip_vertex_ids = np.asarray(LIPS, np.int64)
        self.landmark_ids = np.arange(N_VERTICES, dtype=np.int64)
        # one triangle per vertex with a one-hot barycentric coordinate
        corner_face = np.full((N_VERTICES, 2), -1, np.int64)
        for f, tri in enumerate(mesh.faces):
            for c, v in enumerate(tri):
                if corner_face[v, 0] < 0:
                    corner_face[v] = (f, c)
        self.landmark_faces = corner_face[:, 0].copy()
        self.landmark_bary = np.eye(3, dtype=np.float32)[corner_face[:, 1]]
        neutral = mesh.vertices if neutral is None else np.asarray(neutral, np.float32)
        if neutral.shape != (N_VERTICES, 3):
            raise ValueError(f"expected a (468, 3) neutral shape, got {neutral.shape}")
        basis = np.zeros((0, N_VERTICES, 3), np.float32) if basis is None else np.asarray(basis, np.float32)
        if basis.ndim != 3 or basis.shape[1:] != (N_VERTICES, 3):
            raise ValueError(f"expected an (E, 468, 3) expression basis, got {basis.shape}")
        self._neutral = neutral.astype(np.float32)
        self._basis = basis
        self.device, self.dtype = device, dtype
        self.weights_jaw = jaw_weights(mesh)
        self.joints_rest = joint_locations(mesh)
        w = np.stack([1.0 - self.weights_jaw, self.weights_jaw], axis=1)
        self.skin_weights = w.astype(np.float32)  #: (V, 2), for the add-on's bones
        t = lambda a: torch.as_tensor(a, device=device, dtype=dtype)  # noqa: E731
        self._t_neutral = t(self._neutral)
        self._t_basis = t(basis.reshape(len(basis), N_VERTICES * 3))  # (E, V*3); -1 fails for E = 0
        self._t_weights = t(w)
        self._t_joints = t(self.joints_rest)
        self._parents = torch.tensor([-1, 0])
        self._t_faces = torch.as_tensor(self.faces, device=device)

    @property
    def n_vertices(self) -> int:
        return N_VERTICES

    @property
    def n_shape(self) -> int:
        return 0

    @property
    def n_expression(self) -> int:
        return int(self._basis.shape[0])

    def neutral_vertices(self, betas=None) -> np.ndarray:
        return self._neutral.copy()

    def expression_basis(self) -> np.ndarray:
        return self._basis.copy()

    def rest_joints(self, betas=None) -> np.ndarray:
        return self.joints_rest.copy()

    def forward(self, params: FaceParams, *, full: bool = True) -> FaceOutput:
        # Every vertex is a landmark here, so `full` changes nothing: the subset is the mesh.
        b = params.batch
        shaped = self._t_neutral.expand(b, -1, -1)
        if self.n_expression:
            shaped = shaped + (params.expression @ self._t_basis).view(b, N_VERTICES, 3)
        pose = torch.stack([params.global_orient, params.jaw_pose], dim=1)
        verts, joints = lbs(shaped, pose, None, self._parents, self._t_weights,
                            joints=self._t_joints.expand(b, -1, -1))
        verts = verts + params.transl[:, None]
        joints = joints + params.transl[:, None]
        # landmark i is vertex i (one-hot barycentric coordinates), so no gather is needed
        return FaceOutput(verts, verts, joints)
