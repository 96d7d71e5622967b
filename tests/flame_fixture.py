"""FLAME-format model files for tests, written in the layout of the real downloads.

FLAME itself cannot ship with the project, so tests write their own:

- :func:`write_synthetic_flame`: a small head (an ellipsoid with a nose, two eyeballs) with
  synthetic bases, pickled like ``generic_model.pkl`` as distributed: protocol 2, chumpy
  ``Ch`` objects for some arrays (emulated by a stub ``chumpy.ch`` module that exists only
  while the file is written), a scipy sparse ``J_regressor`` (pickled under scipy's old
  module path ``scipy.sparse.csc``), ``kintree_table`` with 2**32 - 1 as the root's parent;
  plus a matching ``mediapipe_landmark_embedding.npz`` with the 105 landmarks of the real one.
- :func:`flame_from_ply`: the same, on the real FLAME topology read from a PLY file (VOCA's
  ``FLAME_sample.ply``: 5,023 vertices, 9,976 triangles).

The bases are random but smooth (random Fourier features of the rest position), the joint
regressor averages vertex neighbourhoods, and the skinning weights give the jaw the lower
face, the neck the bottom of the head and each eye its eyeball.
"""
from __future__ import annotations

import contextlib
import pickle
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from avface.core.topology import (LEFT_EYE, LEFT_EYEBROW, LIPS_LOWER_INNER, LIPS_LOWER_OUTER, LIPS_UPPER_INNER,
    LIPS_UPPER_OUTER, RIGHT_EYE, RIGHT_EYEBROW)
from avface.models.flame import EMBEDDING_FILE, FLAME2020_FILE, TEXTURE_NPZ_FILE

#: The nose landmarks of the distributed embedding, in its order.
NOSE_LANDMARKS = (168, 6, 197, 195, 5, 4, 129, 98, 97, 2, 326, 327, 358)
#: The 105 MediaPipe landmarks of FLAME's mediapipe_landmark_embedding.npz, in its order:
#: brows, eyes, nose, lips (each group sorted, as in the distributed file).
EMBEDDED_LANDMARKS = tuple(
    sorted(LEFT_EYEBROW) + sorted(RIGHT_EYEBROW) + sorted(LEFT_EYE) + sorted(RIGHT_EYE) + list(NOSE_LANDMARKS)
    + sorted(LIPS_UPPER_OUTER + LIPS_LOWER_OUTER + LIPS_UPPER_INNER + LIPS_LOWER_INNER))
assert len(EMBEDDED_LANDMARKS) == 105 == len(set(EMBEDDED_LANDMARKS))

N_SHAPE_FILE, N_EXPR_FILE = 300, 100
ROOT_PARENT = 2**32 - 1  # how FLAME's kintree_table marks the root
#: Where the mouth centre and the eye centres lie relative to the nose tip, metres (about
#: where they are on FLAME_sample.ply).
MOUTH_DY, EYE_DY, EYE_DX = -0.045, 0.03, 0.031


# --------------------------------------------------------------------------------------
# Where the landmarks go: (x, y) offsets in metres from the nose tip, subject facing +z,
# the subject's right at -x (as in MediaPipe's canonical face).


def _ellipse(ids, centre, rx, ry, a0, a1, endpoints=True):
    n = len(ids)
    t = np.linspace(a0, a1, n) if endpoints else np.linspace(a0, a1, n + 2)[1:-1]
    return {i: (centre[0] + rx * np.cos(a), centre[1] + ry * np.sin(a)) for i, a in zip(ids, t)}


def landmark_targets() -> dict[int, tuple[float, float]]:
    """Rough positions of the 105 embedded landmarks relative to the nose tip."""
    out: dict[int, tuple[float, float]] = {}
    mouth = (0.0, MOUTH_DY)
    # lips: contours from the right corner (-x) to the left corner (+x)
    out.update(_ellipse(LIPS_UPPER_OUTER, mouth, 0.026, 0.011, np.pi, 0.0))
    out.update(_ellipse(LIPS_LOWER_OUTER, mouth, 0.026, 0.012, np.pi, 2 * np.pi, endpoints=False))
    out.update(_ellipse(LIPS_UPPER_INNER, mouth, 0.020, 0.003, np.pi, 0.0))
    out.update(_ellipse(LIPS_LOWER_INNER, mouth, 0.020, 0.003, np.pi, 2 * np.pi, endpoints=False))
    out.update(_ellipse(RIGHT_EYE, (-EYE_DX, EYE_DY), 0.012, 0.005, 0.0, 2 * np.pi * 15 / 16))
    out.update(_ellipse(LEFT_EYE, (EYE_DX, EYE_DY), 0.012, 0.005, 0.0, 2 * np.pi * 15 / 16))
    for ids, sign in ((RIGHT_EYEBROW, -1), (LEFT_EYEBROW, 1)):
        for k, i in enumerate(ids):
            x = 0.012 + 0.045 * k / (len(ids) - 1)
            out[i] = (sign * x, 0.052 + 0.006 * np.sin(np.pi * k / (len(ids) - 1)))
    nose = [(0, 0.035), (0, 0.025), (0, 0.015), (0, 0.008), (0, 0.003), (0, 0.0), (-0.012, -0.008),
            (-0.010, -0.012), (-0.005, -0.015), (0, -0.016), (0.005, -0.015), (0.010, -0.012), (0.012, -0.008)]
    out.update({i: p for i, p in zip(NOSE_LANDMARKS, nose)})
    return out


def embed_points(vertices: np.ndarray, faces: np.ndarray, xy: np.ndarray, face_ok: np.ndarray | None = None):
    """Cast rays along -z through the points `xy` (M, 2); return the front-most hit triangle
    (M,) and its barycentric coordinates (M, 3). Only triangles facing +z (and `face_ok`)
    count; a ray that misses takes the front-facing triangle with the nearest centroid."""
    tri = vertices[faces]  # (F, 3, 3)
    normal_z = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])[:, 2]
    ok = normal_z > 0 if face_ok is None else (normal_z > 0) & face_ok
    a, b, c = tri[:, 0, :2], tri[:, 1, :2], tri[:, 2, :2]
    v0, v1 = b - a, c - a  # (F, 2)
    den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
    den = np.where(np.abs(den) < 1e-18, np.inf, den)
    v2 = xy[:, None, :] - a[None]  # (M, F, 2)
    l1 = (v2[..., 0] * v1[:, 1] - v1[:, 0] * v2[..., 1]) / den
    l2 = (v0[:, 0] * v2[..., 1] - v2[..., 0] * v0[:, 1]) / den
    l0 = 1.0 - l1 - l2
    bary = np.stack([l0, l1, l2], axis=-1)  # (M, F, 3)
    inside = (bary >= 0).all(-1) & ok[None]
    z = np.einsum("mfc,fc->mf", bary, tri[:, :, 2])
    z = np.where(inside, z, -np.inf)
    face = z.argmax(1)
    out_bary = bary[np.arange(len(xy)), face]
    miss = ~inside.any(1)
    if miss.any():
        centroids = tri.mean(1)[:, :2]
        d = np.linalg.norm(xy[miss, None] - centroids[None], axis=-1)
        d[:, ~ok] = np.inf
        face[miss] = d.argmin(1)
        out_bary[miss] = 1.0 / 3.0
    return face.astype(np.int64), out_bary


# --------------------------------------------------------------------------------------
# Meshes


def uv_sphere(n_rings: int, n_segments: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit sphere, y up, poles at +-y, faces counter-clockwise seen from outside."""
    theta = np.pi * (np.arange(n_rings) + 1) / (n_rings + 1)
    phi = 2 * np.pi * np.arange(n_segments) / n_segments
    th, ph = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(th) * np.sin(ph), np.cos(th), np.sin(th) * np.cos(ph)], -1).reshape(-1, 3)
    top, bottom = n_rings * n_segments, n_rings * n_segments + 1
    verts = np.concatenate([ring, [[0, 1, 0], [0, -1, 0]]])
    idx = lambda i, j: i * n_segments + j % n_segments  # noqa: E731
    faces = []
    for j in range(n_segments):
        faces.append((top, idx(0, j), idx(0, j + 1)))
        faces.append((idx(n_rings - 1, j), bottom, idx(n_rings - 1, j + 1)))
        for i in range(n_rings - 1):
            a, b, c, d = idx(i, j), idx(i, j + 1), idx(i + 1, j + 1), idx(i + 1, j)
            faces += [(a, d, c), (a, c, b)]
    return verts, np.asarray(faces, np.int64)


def ellipsoid_head(n_vertices: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A head-sized ellipsoid (metres, y up, facing +z) with a nose and two eyeballs inside
    the eye sockets. About `n_vertices` vertices. Returns (vertices, faces, part) where part
    is 0 for the head, 1 for the left eyeball (+x) and 2 for the right eyeball."""
    eye_v, eye_f = uv_sphere(3, 6)
    n_head = max(n_vertices - 2 * len(eye_v), 60)
    n_seg = max(8, int(round(np.sqrt(2 * n_head))))
    n_rings = max(3, (n_head - 2) // n_seg)
    v, f = uv_sphere(n_rings, n_seg)
    v = v * [0.075, 0.105, 0.09]
    v[:, 2] += 0.02 * np.exp(-(v[:, 0] ** 2 + v[:, 1] ** 2) / (2 * 0.012**2)) * (v[:, 2] > 0)
    nose_y = 0.0
    verts, faces, part = [v], [f], [np.zeros(len(v), np.int64)]
    for k, sign in ((1, 1.0), (2, -1.0)):
        cx, cy = sign * EYE_DX, nose_y + EYE_DY
        surface_z = 0.09 * np.sqrt(max(1 - (cx / 0.075) ** 2 - (cy / 0.105) ** 2, 0.0))
        centre = np.array([cx, cy, surface_z - 0.014])
        faces.append(eye_f + sum(len(x) for x in verts))
        verts.append(eye_v * 0.012 + centre)
        part.append(np.full(len(eye_v), k, np.int64))
    return np.concatenate(verts), np.concatenate(faces), np.concatenate(part)


def read_ply(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) float64 and triangles (F, 3) int64 of an ascii or binary PLY file whose
    vertex element starts with x, y, z and whose face element is one index list."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header") + len(b"end_header")
    end = data.index(b"\n", end) + 1
    header = data[:end].decode("ascii").splitlines()
    fmt = next(line.split()[1] for line in header if line.startswith("format"))
    types_ = {"char": "i1", "uchar": "u1", "int8": "i1", "uint8": "u1", "short": "i2", "ushort": "u2",
              "int16": "i2", "uint16": "u2", "int": "i4", "uint": "u4", "int32": "i4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
    elements: list[list] = []  # [name, count, [(prop name, type or (count type, index type))]]
    for line in header:
        p = line.split()
        if p[0] == "element":
            elements.append([p[1], int(p[2]), []])
        elif p[0] == "property":
            elements[-1][2].append((p[-1], (p[2], p[3]) if p[1] == "list" else p[1]))
    names = [e[0] for e in elements]
    if names[:2] != ["vertex", "face"] or [n for n, _ in elements[0][2][:3]] != ["x", "y", "z"]:
        raise ValueError(f"{path}: expected vertex (x, y, z, ...) then face elements, got {names}")
    n_v, vprops = elements[0][1], elements[0][2]
    n_f, fprops = elements[1][1], elements[1][2]
    if len(fprops) != 1 or not isinstance(fprops[0][1], tuple):
        raise ValueError(f"{path}: expected one index list per face")
    if fmt == "ascii":
        tokens = data[end:].split()
        vals = np.asarray(tokens[: n_v * len(vprops)], np.float64).reshape(n_v, len(vprops))
        verts = vals[:, :3]
        rest = tokens[n_v * len(vprops):]
        faces, pos = [], 0
        for _ in range(n_f):
            k = int(rest[pos])
            faces.append([int(t) for t in rest[pos + 1: pos + 1 + k]])
            pos += 1 + k
        faces = np.asarray(faces, np.int64)
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        vdt = np.dtype([(n, order + types_[t]) for n, t in vprops])
        vert_rec = np.frombuffer(data, vdt, n_v, end)
        verts = np.stack([vert_rec["x"], vert_rec["y"], vert_rec["z"]], 1).astype(np.float64)
        count_t, index_t = fprops[0][1]
        off = end + n_v * vdt.itemsize
        fdt = np.dtype([("n", order + types_[count_t]), ("i", order + types_[index_t], 3)])
        rec = np.frombuffer(data, fdt, n_f, off)
        if (rec["n"] != 3).any():
            raise ValueError(f"{path}: only triangle meshes are supported")
        faces = rec["i"].astype(np.int64)
    if faces.shape[1:] != (3,):
        raise ValueError(f"{path}: only triangle meshes are supported")
    return verts, faces


# --------------------------------------------------------------------------------------
# Synthetic bases


def _smooth_field(points: np.ndarray, n_out: int, rng, length_m: float, rms_m: float) -> np.ndarray:
    """(V, n_out) random smooth functions of position (random Fourier features)."""
    n_feat = 32
    w = rng.normal(0, 1 / length_m, (3, n_feat))
    phase = rng.uniform(0, 2 * np.pi, n_feat)
    feat = np.cos(points @ w + phase) * np.sqrt(2 / n_feat)  # (V, n_feat)
    return feat @ rng.normal(0, rms_m, (n_feat, n_out))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def synthetic_bases(vertices: np.ndarray, faces: np.ndarray, part: np.ndarray, seed: int) -> dict:
    """A FLAME-format dict (plain numpy, J_regressor as scipy csc) for a head mesh whose
    `part` is 0 head, 1 left eyeball, 2 right eyeball."""
    rng = np.random.default_rng(seed)
    v = np.asarray(vertices, np.float64)
    n = len(v)
    head = part == 0
    nose = np.nonzero(head)[0][np.argmax(v[head, 2])]
    nx, ny, nz = v[nose]
    x, y, z = v.T

    # skinning: jaw = below the mouth and in front of the hinge; neck = the bottom of the head
    mouth_y = ny + MOUTH_DY
    w_jaw = _sigmoid((mouth_y - 0.004 - y) / 0.003) * _sigmoid((z - (nz - 0.085)) / 0.01) * _sigmoid((y - (ny - 0.11)) / 0.008)
    w_neck = _sigmoid(((ny - 0.09) - y) / 0.01)
    weights = np.zeros((n, 5))
    weights[:, 2] = w_jaw
    weights[:, 1] = (1 - w_jaw) * w_neck
    weights[:, 0] = (1 - w_jaw) * (1 - w_neck)
    weights[part == 1] = [0, 0, 0, 1, 0]
    weights[part == 2] = [0, 0, 0, 0, 1]

    # joints: averages of vertex neighbourhoods (the lateral-most vertices at a height and
    # depth on both sides, so the joint lies inside the head; eyes: the eyeball)
    def both_sides(yy, zz, k=6):
        ids = []
        for side in (1.0, -1.0):
            d = np.linalg.norm(v - [side * 0.3, yy, zz], axis=1)
            d[~head] = np.inf
            ids.extend(np.argsort(d)[:k])
        return ids

    groups = [both_sides(ny - 0.03, nz - 0.095), both_sides(ny - 0.09, nz - 0.10),
              both_sides(ny - 0.02, nz - 0.075)]
    for k in (1, 2):
        eye = np.nonzero(part == k)[0]
        if len(eye) == 0:  # no eyeballs: a point behind the eye on the surface
            d = np.linalg.norm(v - [(1 if k == 1 else -1) * EYE_DX + nx, ny + EYE_DY, nz], axis=1)
            eye = np.argsort(d)[:4]
        groups.append(list(eye))
    rows = np.concatenate([np.full(len(g), j) for j, g in enumerate(groups)])
    cols = np.concatenate([np.asarray(g) for g in groups])
    vals = np.concatenate([np.full(len(g), 1.0 / len(g)) for g in groups])
    j_reg = sp.csc_matrix((vals, (rows, cols)), shape=(5, n))

    # bases: identity broad (8 cm length scale, ~2 mm rms), expression more local to the
    # face front (~1 mm rms), pose correctives ~0.3 mm per unit of (R - I)
    rel = v - v[nose]
    shape = _smooth_field(rel, 3 * N_SHAPE_FILE, rng, 0.08, 0.002).reshape(n, 3, N_SHAPE_FILE)
    front = _sigmoid((z - (nz - 0.06)) / 0.01)[:, None, None]
    expr = _smooth_field(rel, 3 * N_EXPR_FILE, rng, 0.03, 0.001).reshape(n, 3, N_EXPR_FILE) * front
    posedirs = _smooth_field(rel, 3 * 36, rng, 0.05, 0.0003).reshape(n, 3, 36)
    return {
        "v_template": v,
        "f": np.asarray(faces, np.uint32),
        "shapedirs": np.concatenate([shape, expr], axis=2),
        "posedirs": posedirs,
        "J_regressor": j_reg,
        "kintree_table": np.array([[ROOT_PARENT, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64),
        "weights": weights,
        "J": np.asarray(j_reg @ v),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }


# --------------------------------------------------------------------------------------
# Writing the files


class _Ch:
    """Pickles as chumpy.ch.Ch does: the instance __dict__ (less its caches), value in 'x'."""

    __module__ = "chumpy.ch"
    __qualname__ = "Ch"

    def __init__(self, x):
        self.x = x

    def __getstate__(self):
        return {"x": self.x, "_dirty_vars": set(), "_itr": None, "_depends_on_deps": {},
                "_make_dense": False, "_make_sparse": False}


class _LegacyCsc:
    """Pickles as an old scipy csc_matrix did: module scipy.sparse.csc, state its __dict__."""

    __module__ = "scipy.sparse.csc"
    __qualname__ = "csc_matrix"

    def __init__(self, m: sp.csc_matrix):
        self.m = m

    def __getstate__(self):
        m = self.m
        return {"_shape": m.shape, "maxprint": 50, "indices": m.indices, "indptr": m.indptr, "data": m.data}


@contextlib.contextmanager
def _stub_modules(names_to_modules: dict[str, types.ModuleType]):
    """Make stub modules importable only while a file is written."""
    saved = {name: sys.modules.get(name) for name in names_to_modules}
    sys.modules.update(names_to_modules)
    try:
        yield
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


def write_flame_pickle(path: Path, d: dict, *, with_chumpy: bool = True, legacy_sparse: bool = True,
                       legacy_numpy: bool = True) -> None:
    """Pickle a FLAME-format dict as the distributed files are: protocol 2 (builtins under
    their Python 2 names), `shapedirs` and `v_template` as chumpy Ch objects (with_chumpy),
    J_regressor as a scipy csc matrix under scipy's old module path (legacy_sparse) or the
    current one, numpy arrays under numpy 1's module path numpy.core (legacy_numpy)."""
    d = dict(d)
    stubs: dict[str, types.ModuleType] = {}
    if with_chumpy:
        chumpy, ch = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")
        ch.Ch = _Ch
        chumpy.ch = ch
        stubs.update({"chumpy": chumpy, "chumpy.ch": ch})
        for key in ("shapedirs", "v_template"):
            d[key] = _Ch(d[key])
    if legacy_sparse and sp.issparse(d.get("J_regressor")):
        csc = types.ModuleType("scipy.sparse.csc")
        csc.csc_matrix = _LegacyCsc
        stubs["scipy.sparse.csc"] = csc
        d["J_regressor"] = _LegacyCsc(sp.csc_matrix(d["J_regressor"]))
    with _stub_modules(stubs):
        data = pickle.dumps(d, protocol=2)
    if legacy_numpy:  # protocol 2 names globals as text lines: "c<module>\n<name>\n"
        data = data.replace(b"cnumpy._core.", b"cnumpy.core.")
    Path(path).write_bytes(data)


@dataclass(frozen=True)
class SyntheticFlame:
    folder: Path
    model_path: Path
    embedding_path: Path
    arrays: dict  #: what was pickled, as plain numpy (J_regressor a scipy csc matrix)
    part: np.ndarray  #: (V,) 0 head, 1 left eyeball, 2 right eyeball
    landmark_ids: np.ndarray  #: (105,)
    lmk_face_idx: np.ndarray  #: (105,)
    lmk_b_coords: np.ndarray  #: (105, 3)


def _write(folder: Path, vertices, faces, part, *, seed, with_chumpy, legacy_sparse, file_name, with_uv,
           legacy_numpy=True):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d = synthetic_bases(vertices, faces, part, seed)
    model_path = folder / file_name
    write_flame_pickle(model_path, d, with_chumpy=with_chumpy, legacy_sparse=legacy_sparse,
                       legacy_numpy=legacy_numpy)
    v = d["v_template"]
    head = part == 0
    nose = np.nonzero(head)[0][np.argmax(v[head, 2])]
    targets = landmark_targets()
    ids = np.asarray(EMBEDDED_LANDMARKS, np.int64)
    xy = v[nose, :2] + np.asarray([targets[int(i)] for i in ids])
    face_ok = (part[faces] == 0).all(1)
    face_idx, bary = embed_points(v, np.asarray(faces), xy, face_ok)
    emb_path = folder / EMBEDDING_FILE
    np.savez(emb_path, lmk_face_idx=face_idx, lmk_b_coords=bary, landmark_indices=ids)
    if with_uv:
        lo, hi = v.min(0), v.max(0)
        vt = (v[:, :2] - lo[:2]) / (hi[:2] - lo[:2])  # a planar projection, one vt per vertex
        np.savez(folder / TEXTURE_NPZ_FILE, vt=vt, ft=np.asarray(faces, np.int64))
    return SyntheticFlame(folder, model_path, emb_path, d, part, ids, face_idx, bary)


def write_synthetic_flame(folder: str | Path, *, n_vertices: int = 400, seed: int = 0, with_chumpy: bool = True,
                          legacy_sparse: bool = True, legacy_numpy: bool = True,
                          file_name: str = FLAME2020_FILE, with_uv: bool = False) -> SyntheticFlame:
    """A small synthetic FLAME (about `n_vertices` vertices) and its landmark embedding in
    `folder`, in the layout of the distributed files (see :func:`write_flame_pickle` for the
    legacy options). `with_uv` adds FLAME_texture.npz."""
    v, f, part = ellipsoid_head(n_vertices)
    return _write(Path(folder), v, f, part, seed=seed, with_chumpy=with_chumpy, legacy_sparse=legacy_sparse,
                  file_name=file_name, with_uv=with_uv, legacy_numpy=legacy_numpy)


def eyeball_parts(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V,) 0 for the head, 1 / 2 for the left (+x) / right eyeball: the two largest
    connected components after the head (all 0 when the mesh is one piece)."""
    n = len(vertices)
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
    adj = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    _, label = connected_components(adj, directed=False)
    order = np.argsort(-np.bincount(label))
    part = np.zeros(n, np.int64)
    if len(order) >= 3:
        left, right = sorted(order[1:3], key=lambda c: -vertices[label == c, 0].mean())
        part[label == left] = 1
        part[label == right] = 2
    return part


def flame_from_ply(folder: str | Path, ply_path: str | Path, *, seed: int = 0, with_chumpy: bool = True,
                   file_name: str = FLAME2020_FILE) -> SyntheticFlame:
    """A FLAME-format model on the real FLAME topology of `ply_path` (its vertices become
    the template) with synthetic bases, and a landmark embedding on it."""
    v, f = read_ply(ply_path)
    part = eyeball_parts(v, f)
    return _write(Path(folder), v, f, part, seed=seed, with_chumpy=with_chumpy, legacy_sparse=True,
                  file_name=file_name, with_uv=False)
