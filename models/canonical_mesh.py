"""MediaPipe's canonical face mesh, read from the geometry-pipeline metadata inside
``face_landmarker.task`` (468 vertices, 898 triangles, UVs), and the harmonic skinning
weights built on it. Torch-free: the face model in :mod:`avface.models.canonical` builds on it,
and the confidence stage reads the lower-face region from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from avface.core.assets import FACE_LANDMARKER, read_bundle_member
from avface.core.topology import (CHIN, LEFT_EYE, LIPS, LIPS_LOWER_INNER, LIPS_LOWER_OUTER, LIPS_UPPER_INNER,
    LIPS_UPPER_OUTER, NOSE_BRIDGE, RIGHT_EYE, RIGID)
from avface.errors import ModelFileError

GEOMETRY_MEMBER = "geometry_pipeline_metadata_landmarks.binarypb"
N_VERTICES = 468
N_FACES = 898
CM_TO_M = 0.01


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


def joint_locations(mesh: CanonicalMesh) -> np.ndarray:
    """(2, 3) rest locations of the root joint (between the ears, at eye height) and the jaw
    joint (the temporomandibular axis, just in front of the ears, below eye level)."""
    v = mesh.vertices
    ears = v[[234, 454]]
    root = np.array([0.0, v[[33, 263], 1].mean(), ears[:, 2].mean()], np.float32)
    jaw = np.array([0.0, ears[:, 1].mean() - 0.01, ears[:, 2].mean() - 0.01], np.float32)
    return np.stack([root, jaw])


@lru_cache(maxsize=1)
def lower_face_ids(threshold: float = 0.05) -> tuple[int, ...]:
    """Vertices that move with the jaw or are lips: what a hand over the mouth hides."""
    w = jaw_weights(load_canonical_mesh())
    return tuple(sorted(set(np.nonzero(w > threshold)[0].tolist()) | set(LIPS)))
