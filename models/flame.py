"""FLAME 2020 / FLAME 2023 behind the :class:`~avface.models.base.FaceModel` interface
(docs/design.md section 4).

FLAME cannot ship with the project (it is downloaded after registration), so it is read from
a folder the user configures. The folder holds:

- ``flame2023.pkl`` (FLAME 2023, model name ``flame2023``) and/or ``generic_model.pkl``
  (FLAME 2020, ``flame2020``). When both are present FLAME 2023 is used: it is the newer
  release of the same topology, fitted to more data, and the choice is logged. A path to a
  ``.pkl`` file instead of a folder picks that file; its name says which release it is
  (``2023`` in the file name means FLAME 2023, anything else FLAME 2020).
- ``mediapipe_landmark_embedding.npz`` (``lmk_face_idx`` (M,), ``lmk_b_coords`` (M, 3),
  ``landmark_indices`` (M,), M = 105 in the distributed file): where each MediaPipe landmark
  lies on the FLAME surface.
- optionally a UV layout, ``FLAME_texture.npz`` (``vt``, ``ft``) or ``head_template_mesh.obj``;
  without one the mesh gets a cylindrical projection of the template (logged), so it always
  has UVs.
- optionally ``FLAME_masks.pkl``; its ``lips`` region is then the lip vertex set.

The pickles as distributed were written by Python 2 with chumpy arrays and a scipy sparse
``J_regressor``. They are read without chumpy (and without trusting the pickle: a pickle can
run code) by an unpickler that resolves only numpy, builtin containers and the two foreign
classes, for which it substitutes stand-ins that keep the pickled state: a chumpy ``Ch``
pickles its ``__dict__``, whose ``x`` is the plain array; a scipy sparse matrix pickles
``data``, ``indices``, ``indptr`` and ``_shape``.

Maths: smplx's FLAME. ``v_shaped = v_template + shapedirs . [betas, expression]``; rest joints
are regressed from ``v_shaped``; pose correctives ``posedirs`` are driven by the rotation
matrices (minus identity) of the four non-root joints; linear blend skinning over the
kinematic chain global -> neck -> {jaw, left eye, right eye}; ``transl`` is added last.
"""
from __future__ import annotations

import io
import logging
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from avface.core.topology import LIPS
from avface.errors import ModelFileError
from avface.models.base import FaceModel, FaceOutput, FaceParams
from avface.models.lbs import blend_shapes, lbs, vertices2landmarks

log = logging.getLogger(__name__)

FLAME_URL = "https://flame.is.tue.mpg.de"
FLAME2020_FILE = "generic_model.pkl"
FLAME2023_FILE = "flame2023.pkl"
EMBEDDING_FILE = "mediapipe_landmark_embedding.npz"
TEXTURE_NPZ_FILE = "FLAME_texture.npz"
TEMPLATE_OBJ_FILE = "head_template_mesh.obj"
MASKS_FILE = "FLAME_masks.pkl"

#: FLAME's joints, in the order of :meth:`FaceParams.pose`.
JOINT_NAMES = ("global", "neck", "jaw", "left_eye", "right_eye")
N_JOINTS = len(JOINT_NAMES)
N_POSE_CORRECTIVES = (N_JOINTS - 1) * 9
#: In FLAME's ``shapedirs`` the first 300 columns are identity, the rest (100) expression.
FILE_SHAPE_DIMS = 300
#: The paper's sizes (docs/design.md section 2): 100 identity, 50 expression coefficients.
DEFAULT_N_SHAPE = 100
DEFAULT_N_EXPRESSION = 50
#: Rings of mesh neighbours added around the triangles under the lip landmarks.
DEFAULT_LIP_RINGS = 1

PICKLE_KEYS = {
    "v_template": "(V, 3)",
    "f": "(F, 3)",
    "shapedirs": f"(V, 3, K) with K > {FILE_SHAPE_DIMS}: {FILE_SHAPE_DIMS} shape then expression",
    "posedirs": f"(V, 3, {N_POSE_CORRECTIVES})",
    "J_regressor": f"({N_JOINTS}, V), dense or scipy sparse",
    "kintree_table": f"(2, {N_JOINTS})",
    "weights": f"(V, {N_JOINTS})",
}
EMBEDDING_KEYS = {"lmk_face_idx": "(M,)", "lmk_b_coords": "(M, 3)", "landmark_indices": "(M,)"}


def how_to_get_flame() -> str:
    """Where the FLAME files come from, for error messages and the service's hello."""
    return (
        f"FLAME is downloaded after registration at {FLAME_URL}: get FLAME 2020 "
        f"({FLAME2020_FILE}) or FLAME 2023 ({FLAME2023_FILE}), and the MediaPipe landmark "
        f"embedding ({EMBEDDING_FILE}) from the FLAME website's MediaPipe embedding download "
        f"(also in the official FLAME repositories), and put them in one folder"
    )


def _expected(keys: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in keys.items())


# --------------------------------------------------------------------------------------
# Reading the pickle without chumpy and without running code from it


class _PickledChumpy:
    """Stand-in for any ``chumpy`` class: keeps the pickled ``__dict__``."""

    chumpy_class = "chumpy.ch.Ch"

    def __setstate__(self, state):
        if isinstance(state, tuple):  # (dict state, slots state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = state


class _PickledSparse:
    """Stand-in for a scipy sparse matrix or array: keeps the pickled ``__dict__``."""

    sparse_format = "csc"

    def __setstate__(self, state):
        if isinstance(state, tuple):
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = state


_SPARSE_FORMATS = {f"{fmt}_{kind}": fmt for fmt in ("csc", "csr", "coo") for kind in ("matrix", "array")}
_BUILTINS = {"object", "set", "frozenset", "dict", "list", "tuple", "bytearray", "bytes", "complex",
             "int", "float", "str", "bool", "slice", "range"}
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _FlameUnpickler(pickle.Unpickler):
    """Resolves only what a FLAME pickle needs; chumpy and scipy sparse become stand-ins."""

    def find_class(self, module: str, name: str):
        if module == "chumpy" or module.startswith("chumpy."):
            return type(name, (_PickledChumpy,), {"chumpy_class": f"{module}.{name}"})
        if module.startswith("scipy.sparse") and name in _SPARSE_FORMATS:
            return type(name, (_PickledSparse,), {"sparse_format": _SPARSE_FORMATS[name]})
        if module.startswith("numpy.core."):
            # Python 2 / numpy 1 pickles name numpy.core, which numpy 2 only keeps as a shim.
            alias = "numpy._core." + module[len("numpy.core."):]
            if np.lib.NumpyVersion(np.__version__) >= "2.0.0" and (alias, name) in _NUMPY_GLOBALS:
                module = alias
        allowed = (
            (module, name) in _NUMPY_GLOBALS
            or (module == "numpy.dtypes" and name.endswith("DType"))
            or (module in ("__builtin__", "builtins") and name in _BUILTINS)
            or (module in ("copy_reg", "copyreg") and name == "_reconstructor")
            or (module == "_codecs" and name == "encode")
            or (module == "collections" and name == "OrderedDict")
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a FLAME file holds only arrays")
        return super().find_class(module, name)


def _plain(value, key: str, path: Path):
    """A stand-in (or anything else) as a numpy array or a plain value."""
    if isinstance(value, _PickledChumpy):
        x = value.state.get("x") if isinstance(value.state, dict) else None
        if x is None:
            raise ModelFileError(
                f"{path}: '{key}' is a chumpy expression ({value.chumpy_class}), not a stored array; "
                f"it cannot be read without chumpy. {how_to_get_flame()}")
        return np.asarray(_plain(x, key, path))
    if isinstance(value, _PickledSparse):
        s = value.state if isinstance(value.state, dict) else {}
        shape = tuple(s.get("_shape", s.get("shape", ())))
        try:
            if value.sparse_format == "coo":
                if "coords" in s:
                    row, col = s["coords"]
                else:
                    row, col = s["row"], s["col"]
                mat = sp.coo_matrix((s["data"], (row, col)), shape=shape)
            else:
                cls = sp.csc_matrix if value.sparse_format == "csc" else sp.csr_matrix
                mat = cls((s["data"], s["indices"], s["indptr"]), shape=shape)
        except (KeyError, ValueError, TypeError) as e:
            raise ModelFileError(f"{path}: '{key}' is a malformed sparse matrix ({e}). {how_to_get_flame()}") from e
        return mat.toarray()
    if sp.issparse(value):
        return value.toarray()
    return value


def read_flame_pickle_dict(path: Path) -> dict:
    """The pickled dict of a FLAME-format file, with chumpy and sparse values as arrays."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e}. {how_to_get_flame()}") from e
    try:
        obj = _FlameUnpickler(io.BytesIO(data), encoding="latin1").load()
    except ModelFileError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a malformed file
        raise ModelFileError(
            f"{path} is not a readable FLAME pickle ({type(e).__name__}: {e}); expected a dict with "
            f"{_expected(PICKLE_KEYS)}. {how_to_get_flame()}") from e
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path} holds a {type(obj).__name__}, expected a dict with {_expected(PICKLE_KEYS)}. "
                             f"{how_to_get_flame()}")
    return {str(k): _plain(v, str(k), path) for k, v in obj.items()}


# --------------------------------------------------------------------------------------
# Model arrays


@dataclass(frozen=True)
class FlameArrays:
    """The model as stored in the file, in the file's layout (float64 numpy)."""

    v_template: np.ndarray  #: (V, 3) metres
    faces: np.ndarray  #: (F, 3) int64
    shapedirs: np.ndarray  #: (V, 3, K) identity columns first, then expression
    posedirs: np.ndarray  #: (V, 3, 36) pose correctives, file layout
    j_regressor: np.ndarray  #: (5, V) dense
    parents: np.ndarray  #: (5,) int64, parents[0] == -1, parents[j] < j
    weights: np.ndarray  #: (V, 5) skinning weights
    #: how many of the K shapedirs columns are identity (the rest are expression)
    n_shape_total: int = FILE_SHAPE_DIMS

    @property
    def n_expression_total(self) -> int:
        return int(self.shapedirs.shape[2]) - self.n_shape_total

    def problems(self) -> list[str]:
        """What is inconsistent, as readable sentences (empty when all is well)."""
        out = []
        v = self.v_template.shape[0] if self.v_template.ndim == 2 else -1
        if self.v_template.ndim != 2 or self.v_template.shape[1] != 3:
            out.append(f"v_template has shape {self.v_template.shape}, expected (V, 3)")
        if self.faces.ndim != 2 or self.faces.shape[1] != 3:
            out.append(f"f has shape {self.faces.shape}, expected (F, 3)")
        elif self.faces.size and (self.faces.min() < 0 or self.faces.max() >= v):
            out.append(f"f indexes vertices {self.faces.min()}..{self.faces.max()}, the template has {v}")
        if self.shapedirs.ndim != 3 or self.shapedirs.shape[:2] != (v, 3):
            out.append(f"shapedirs has shape {self.shapedirs.shape}, expected ({v}, 3, K)")
        elif self.shapedirs.shape[2] <= self.n_shape_total:
            out.append(f"shapedirs has {self.shapedirs.shape[2]} components, expected {self.n_shape_total} shape "
                       f"plus at least one expression component")
        if self.posedirs.shape != (v, 3, N_POSE_CORRECTIVES):
            out.append(f"posedirs has shape {self.posedirs.shape}, expected ({v}, 3, {N_POSE_CORRECTIVES})")
        if self.j_regressor.shape != (N_JOINTS, v):
            out.append(f"J_regressor has shape {self.j_regressor.shape}, expected ({N_JOINTS}, {v})")
        if self.weights.shape != (v, N_JOINTS):
            out.append(f"weights has shape {self.weights.shape}, expected ({v}, {N_JOINTS})")
        if self.parents.shape != (N_JOINTS,):
            out.append(f"the kinematic tree has {self.parents.shape} parents, expected {N_JOINTS}")
        elif self.parents[0] != -1 or any(not 0 <= self.parents[j] < j for j in range(1, N_JOINTS)):
            out.append(f"the kinematic tree's parents {self.parents.tolist()} are not a chain rooted at joint 0")
        for name in ("v_template", "shapedirs", "posedirs", "j_regressor", "weights"):
            a = getattr(self, name)
            if a.size and not np.isfinite(a).all():
                out.append(f"{name} holds NaN or infinite values")
        return out


def _parents_from_kintree(kintree: np.ndarray) -> np.ndarray:
    """smpl's convention: row 1 lists joint ids, row 0 their parents' ids (root: 2**32 - 1)."""
    ids = [int(i) for i in kintree[1]]
    col = {j: i for i, j in enumerate(ids)}
    parents = np.full(len(ids), -1, np.int64)
    for i in range(1, len(ids)):
        parents[i] = col.get(int(kintree[0, i]), -2)  # -2: an unknown parent, reported as malformed
    return parents


def read_flame_pickle(path: str | Path) -> FlameArrays:
    """A FLAME-format pickle as :class:`FlameArrays`; ModelFileError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"FLAME model file not found: {path}. {how_to_get_flame()}")
    d = read_flame_pickle_dict(path)
    missing = [k for k in PICKLE_KEYS if k not in d]
    if missing:
        raise ModelFileError(
            f"{path} lacks {', '.join(missing)}; a FLAME model holds {_expected(PICKLE_KEYS)}. {how_to_get_flame()}")
    try:
        kintree = np.asarray(d["kintree_table"]).astype(np.int64)
        if kintree.ndim != 2 or kintree.shape[0] != 2:
            raise ValueError(f"kintree_table has shape {kintree.shape}, expected (2, {N_JOINTS})")
        arrays = FlameArrays(
            v_template=np.asarray(d["v_template"], np.float64),
            faces=np.asarray(d["f"]).astype(np.int64),
            shapedirs=np.asarray(d["shapedirs"], np.float64),
            posedirs=np.asarray(d["posedirs"], np.float64),
            j_regressor=np.asarray(d["J_regressor"], np.float64),
            parents=_parents_from_kintree(kintree),
            weights=np.asarray(d["weights"], np.float64),
        )
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{path} is malformed ({e}); expected {_expected(PICKLE_KEYS)}. "
                             f"{how_to_get_flame()}") from e
    problems = arrays.problems()
    if problems:
        raise ModelFileError(f"{path} is malformed: {'; '.join(problems)}; expected {_expected(PICKLE_KEYS)}. "
                             f"{how_to_get_flame()}")
    return arrays


@dataclass(frozen=True)
class LandmarkEmbedding:
    """Where each tracker landmark lies on the surface."""

    face_idx: np.ndarray  #: (M,) int64 triangle index
    bary: np.ndarray  #: (M, 3) barycentric coordinates
    landmark_ids: np.ndarray  #: (M,) int64 MediaPipe landmark index


def read_landmark_embedding(path: str | Path, n_faces: int) -> LandmarkEmbedding:
    """``mediapipe_landmark_embedding.npz``, checked against a mesh of ``n_faces`` triangles."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"MediaPipe landmark embedding not found: {path} (keys {_expected(EMBEDDING_KEYS)}). "
                             f"{how_to_get_flame()}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in EMBEDDING_KEYS if k not in z.files]
            if missing:
                raise ModelFileError(f"{path} lacks {', '.join(missing)}; expected {_expected(EMBEDDING_KEYS)}. "
                                     f"{how_to_get_flame()}")
            face_idx = np.asarray(z["lmk_face_idx"]).reshape(-1).astype(np.int64)
            bary = np.asarray(z["lmk_b_coords"], np.float64)
            ids = np.asarray(z["landmark_indices"]).reshape(-1).astype(np.int64)
    except ModelFileError:
        raise
    except Exception as e:  # noqa: BLE001 - not a zip, a pickled member, a truncated file...
        raise ModelFileError(f"{path} is not a readable .npz ({type(e).__name__}: {e}); expected "
                             f"{_expected(EMBEDDING_KEYS)}. {how_to_get_flame()}") from e
    m = face_idx.shape[0]
    problems = []
    if m == 0:
        problems.append("it embeds no landmarks")
    if bary.shape != (m, 3):
        problems.append(f"lmk_b_coords has shape {bary.shape}, expected ({m}, 3)")
    elif not np.isfinite(bary).all():
        problems.append("lmk_b_coords holds NaN or infinite values")
    if ids.shape != (m,):
        problems.append(f"landmark_indices has shape {ids.shape}, expected ({m},)")
    if m and (face_idx.min() < 0 or face_idx.max() >= n_faces):
        problems.append(f"lmk_face_idx refers to triangles {face_idx.min()}..{face_idx.max()}, the mesh has {n_faces}")
    if problems:
        raise ModelFileError(f"{path} is malformed: {'; '.join(problems)}; expected {_expected(EMBEDDING_KEYS)}. "
                             f"{how_to_get_flame()}")
    return LandmarkEmbedding(face_idx, bary, ids)


# --------------------------------------------------------------------------------------
# UVs and lip vertices


def _read_obj_uv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    vt, ft = [], []
    for line in path.read_text(encoding="latin1").splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "vt":
            vt.append((float(parts[1]), float(parts[2])))
        elif parts[0] == "f":
            corners = [p.split("/") for p in parts[1:]]
            if len(corners) != 3 or any(len(c) < 2 or not c[1] for c in corners):
                raise ValueError("faces must be triangles with texture indices (f v/vt ...)")
            ft.append([int(c[1]) - 1 for c in corners])
    return np.asarray(vt, np.float64), np.asarray(ft, np.int64)


def read_uv_layout(folder: Path, n_faces: int) -> tuple[np.ndarray, np.ndarray, Path] | None:
    """FLAME's own UV layout from ``FLAME_texture.npz`` or ``head_template_mesh.obj`` in
    `folder`: (uv (Vt, 2) float32, uv_faces (F, 3) int64, the file), or None when absent or
    unusable (logged)."""
    for name in (TEXTURE_NPZ_FILE, TEMPLATE_OBJ_FILE):
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".npz"):
                with np.load(path, allow_pickle=False) as z:
                    vt, ft = np.asarray(z["vt"], np.float64), np.asarray(z["ft"]).astype(np.int64)
            else:
                vt, ft = _read_obj_uv(path)
            if vt.ndim != 2 or vt.shape[1] != 2 or ft.shape != (n_faces, 3):
                raise ValueError(f"vt {vt.shape} / ft {ft.shape}, expected (Vt, 2) / ({n_faces}, 3)")
            if ft.min() < 0 or ft.max() >= len(vt):
                raise ValueError("ft refers to missing vt entries")
        except Exception as e:  # noqa: BLE001 - an optional file: fall back, but say why
            log.warning("ignoring the UV layout in %s (%s)", path, e)
            continue
        return np.clip(vt, 0.0, 1.0).astype(np.float32), ft, path
    return None


def cylindrical_uv(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A cylindrical projection about the vertical (y) axis through the template's centre:
    u is the angle around the head (0.5 at the front, +z), v the height (up).

    Triangles that straddle the seam at the back get copies of their far-side UV vertices
    (u +- 1) so that no triangle spans the whole map; vertices on the axis itself (the top
    of the head), where the angle is undefined, get one copy per triangle at the angle of
    the triangle's other corners. The map is then rescaled into [0, 1] (the few wide triangles
    that wind round the axis are clipped).
    Returns (uv (Vt, 2) float32 in [0, 1], uv_faces (F, 3) int64)."""
    v = np.asarray(vertices, np.float64)
    faces = np.asarray(faces, np.int64)
    lo, hi = v.min(0), v.max(0)
    centre = (lo + hi) / 2
    u = 0.5 + np.arctan2(v[:, 0] - centre[0], v[:, 2] - centre[2]) / (2 * np.pi)
    h = (v[:, 1] - lo[1]) / max(hi[1] - lo[1], 1e-12)
    radius = np.hypot(v[:, 0] - centre[0], v[:, 2] - centre[2])
    on_axis = radius < 1e-3 * max(radius.max(), 1e-12)
    fu = u[faces]  # (F, 3) per-corner u
    # unwrap each triangle around its corner farthest from the axis
    ref = fu[np.arange(len(faces)), np.argmax(radius[faces], axis=1)][:, None]
    fu = fu + np.round(ref - fu)
    axis_corner = on_axis[faces]
    others = (~axis_corner).sum(1)
    mean_other = np.where(others > 0, (fu * ~axis_corner).sum(1) / np.maximum(others, 1), ref[:, 0])
    fu = np.where(axis_corner, mean_other[:, None], fu)
    # one UV vertex per distinct (vertex, u); per-triangle copies for axis corners
    corner_key = np.stack([faces.reshape(-1).astype(np.float64), fu.reshape(-1)], axis=1)
    corner_key[axis_corner.reshape(-1), 0] += 0.5 + np.arange(int(axis_corner.sum())) / (2.0 * axis_corner.size)
    keys, inverse = np.unique(corner_key, axis=0, return_inverse=True)
    vid = np.floor(keys[:, 0]).astype(np.int64)
    uv = np.stack([keys[:, 1], h[vid]], axis=1)
    # Rescale so that ordinary triangles fit; the few wide ones that wind round the axis
    # (where the angle changes fast) are clipped rather than squeezing the whole map.
    regular = (fu.max(1) - fu.min(1)) < 0.25
    ru = fu[regular] if regular.any() else fu
    u_lo, u_hi = min(ru.min(), 0.0), max(ru.max(), 1.0)
    uv[:, 0] = (uv[:, 0] - u_lo) / (u_hi - u_lo)
    return np.clip(uv, 0.0, 1.0).astype(np.float32), inverse.reshape(faces.shape).astype(np.int64)


def vertex_rings(faces: np.ndarray, n_vertices: int, seeds: np.ndarray, rings: int) -> np.ndarray:
    """Sorted ids of `seeds` grown by `rings` rings of edge neighbours."""
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    adj = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n_vertices, n_vertices)).tocsr()
    adj = adj + adj.T
    mask = np.zeros(n_vertices, bool)
    mask[seeds] = True
    for _ in range(rings):
        mask |= (adj @ mask.astype(np.float64)) > 0
    return np.nonzero(mask)[0].astype(np.int64)


def lip_vertices_from_embedding(faces: np.ndarray, n_vertices: int, embedding: LandmarkEmbedding,
                                rings: int = DEFAULT_LIP_RINGS) -> np.ndarray:
    """The vertices of the triangles under MediaPipe's lip landmarks (canonical.LIPS: outer
    and inner contours of both lips) plus `rings` rings of neighbours, so the lip offsets
    can move the whole lip surface, the lip corners and the inner lip included."""
    is_lip = np.isin(embedding.landmark_ids, np.asarray(LIPS))
    if not is_lip.any():
        raise ValueError("the landmark embedding contains none of MediaPipe's lip landmarks")
    seeds = np.unique(faces[embedding.face_idx[is_lip]].reshape(-1))
    return vertex_rings(faces, n_vertices, seeds, rings)


def _read_lip_mask(folder: Path, n_vertices: int) -> np.ndarray | None:
    path = Path(folder) / MASKS_FILE
    if not path.is_file():
        return None
    try:
        masks = read_flame_pickle_dict(path)
        ids = np.unique(np.asarray(masks["lips"]).reshape(-1).astype(np.int64))
        if ids.size == 0 or ids.min() < 0 or ids.max() >= n_vertices:
            raise ValueError(f"'lips' refers to vertices outside 0..{n_vertices - 1}")
    except Exception as e:  # noqa: BLE001 - an optional file: fall back, but say why
        log.warning("ignoring the lip region of %s (%s)", path, e)
        return None
    return ids


# --------------------------------------------------------------------------------------
# The model


class FlameModel(FaceModel):
    """FLAME with ``n_shape`` identity and ``n_expression`` expression coefficients.

    Joints (see :data:`JOINT_NAMES`): 0 global, 1 neck, 2 jaw, 3 left eye, 4 right eye.
    Tensors live on `device` in `dtype`; the arrays the interface exposes are numpy.
    """

    def __init__(self, arrays: FlameArrays, embedding: LandmarkEmbedding, *, name: str = "flame2020",
                 uv: np.ndarray | None = None, uv_faces: np.ndarray | None = None,
                 lip_vertex_ids: np.ndarray | None = None, n_shape: int | None = None,
                 n_expression: int | None = None, lip_rings: int = DEFAULT_LIP_RINGS,
                 device="cpu", dtype=torch.float32):
        problems = arrays.problems()
        if problems:
            raise ValueError("inconsistent FLAME arrays: " + "; ".join(problems))
        n_verts = int(arrays.v_template.shape[0])
        n_shape = min(DEFAULT_N_SHAPE, arrays.n_shape_total) if n_shape is None else int(n_shape)
        n_expression = (min(DEFAULT_N_EXPRESSION, arrays.n_expression_total) if n_expression is None
                        else int(n_expression))
        if not 0 <= n_shape <= arrays.n_shape_total:
            raise ValueError(f"n_shape must be in 0..{arrays.n_shape_total}, got {n_shape}")
        if not 0 <= n_expression <= arrays.n_expression_total:
            raise ValueError(f"n_expression must be in 0..{arrays.n_expression_total}, got {n_expression}")
        m = embedding.face_idx.shape[0]
        if embedding.bary.shape != (m, 3) or embedding.landmark_ids.shape != (m,):
            raise ValueError("inconsistent landmark embedding shapes")
        if m and (embedding.face_idx.min() < 0 or embedding.face_idx.max() >= len(arrays.faces)):
            raise ValueError("the landmark embedding refers to triangles the mesh does not have")

        self.name = name
        self.arrays = arrays
        self.faces = arrays.faces
        if uv is None:
            uv, uv_faces = cylindrical_uv(arrays.v_template, arrays.faces)
        self.uv = np.asarray(uv, np.float32)
        self.uv_faces = np.asarray(uv_faces, np.int64)
        if self.uv_faces.shape != self.faces.shape:
            raise ValueError(f"uv_faces has shape {self.uv_faces.shape}, expected {self.faces.shape}")
        self.landmark_ids = embedding.landmark_ids
        self.landmark_faces = embedding.face_idx
        self.landmark_bary = embedding.bary.astype(np.float32)
        self._bary64 = np.asarray(embedding.bary, np.float64)  # full precision for float64 models
        if lip_vertex_ids is None:
            lip_vertex_ids = lip_vertices_from_embedding(arrays.faces, n_verts, embedding, lip_rings)
        self.lip_vertex_ids = np.asarray(lip_vertex_ids, np.int64)
        self.parents = arrays.parents.copy()
        self.joint_names = JOINT_NAMES
        self.skin_weights = arrays.weights.astype(np.float32)  #: (V, 5), for the add-on's bones
        self._n_shape, self._n_expression = n_shape, n_expression
        self.device, self.dtype = device, dtype

        # identity columns [0, n_shape) and expression columns [S_file, S_file + n_expression)
        cols = np.r_[np.arange(n_shape), arrays.n_shape_total + np.arange(n_expression)]
        dirs = arrays.shapedirs[:, :, cols]  # (V, 3, S+E)
        self._dirs = dirs
        # Joints are linear in the coefficients, so they are regressed once from the bases:
        # no forward pass needs the whole mesh to place them.
        # j_dirs[j, k, l] = sum_v j_regressor[j, v] * dirs[v, k, l]
        j_template = arrays.j_regressor @ arrays.v_template  # (J, 3)
        j_dirs = np.einsum("jv,vkl->jkl", arrays.j_regressor, dirs)  # (J, 3, S+E)

        t = lambda a: torch.as_tensor(np.ascontiguousarray(a), device=device, dtype=dtype)  # noqa: E731
        self._t_j_template, self._t_j_dirs = t(j_template), t(j_dirs)
        self._t_parents = torch.as_tensor(self.parents, dtype=torch.long)
        self._full = self._evaluation_set(np.arange(n_verts), t)
        self._subset_ids = self.landmark_vertex_ids()
        self._subset = self._evaluation_set(self._subset_ids, t)

    def _evaluation_set(self, ids: np.ndarray, t) -> dict:
        """Everything forward() needs to evaluate the vertices `ids` (sorted) and the landmarks."""
        a = self.arrays
        pos = np.searchsorted(ids, self.faces[self.landmark_faces])  # (M, 3) corners, as positions in ids
        n = len(ids)
        return {
            "template": t(a.v_template[ids]),  # (n, 3)
            "dirs": t(self._dirs[ids]),  # (n, 3, S+E)
            # smplx layout: posedirs[p, v*3 + k], so pose_feature (B, 36) @ posedirs -> (B, n*3)
            "posedirs": t(a.posedirs[ids].reshape(n * 3, N_POSE_CORRECTIVES).T),  # (36, n*3)
            "weights": t(a.weights[ids]),  # (n, 5)
            "lmk_tri": torch.as_tensor(pos, device=self.device, dtype=torch.long),  # (M, 3)
            "lmk_idx": torch.arange(len(pos), device=self.device),
            "lmk_bary": t(self._bary64),  # (M, 3)
        }

    # -- interface --------------------------------------------------------------------

    @property
    def n_vertices(self) -> int:
        return int(self.arrays.v_template.shape[0])

    @property
    def n_shape(self) -> int:
        return self._n_shape

    @property
    def n_expression(self) -> int:
        return self._n_expression

    def _check(self, params: FaceParams) -> None:
        b = params.batch
        want = {"betas": self._n_shape, "expression": self._n_expression, "global_orient": 3, "neck_pose": 3,
                "jaw_pose": 3, "leye_pose": 3, "reye_pose": 3, "transl": 3}
        for field, n in want.items():
            x = getattr(params, field)
            if tuple(x.shape) != (b, n):
                raise ValueError(f"expected {field} of shape ({b}, {n}), got {tuple(x.shape)}")

    def forward(self, params: FaceParams, *, full: bool = True) -> FaceOutput:
        """Vertices (B, V, 3) (None with ``full=False``), landmarks (B, M, 3), joints (B, 5, 3).

        With ``full=False`` blend shapes and skinning run only on the vertices of the triangles
        under the landmarks; the landmarks and joints are the same as with ``full=True``."""
        self._check(params)
        s = self._full if full else self._subset
        coeffs = torch.cat([params.betas, params.expression], dim=1)  # (B, S+E)
        joints_rest = self._t_j_template + blend_shapes(coeffs, self._t_j_dirs)  # (B, 5, 3)
        shaped = s["template"] + blend_shapes(coeffs, s["dirs"])  # (B, n, 3)
        verts, joints = lbs(shaped, params.pose(), None, self._t_parents, s["weights"],
                            posedirs=s["posedirs"], joints=joints_rest)
        verts = verts + params.transl[:, None]
        joints = joints + params.transl[:, None]
        lmk = vertices2landmarks(verts, s["lmk_tri"], s["lmk_idx"], s["lmk_bary"])
        return FaceOutput(verts if full else None, lmk, joints)

    def neutral_vertices(self, betas: torch.Tensor | None = None) -> np.ndarray:
        """(V, 3) template + identity blend shapes for `betas` ((S,) or (1, S); None: template)."""
        v = self.arrays.v_template.copy()
        if betas is not None:
            b = np.asarray(torch.as_tensor(betas).detach().cpu(), np.float64).reshape(-1)
            if b.shape != (self._n_shape,):
                raise ValueError(f"expected {self._n_shape} betas, got {b.shape[0]}")
            v += np.einsum("vkl,l->vk", self._dirs[:, :, :self._n_shape], b)
        return v.astype(np.float32)

    def expression_basis(self) -> np.ndarray:
        """(E, V, 3) expression blend shapes (offsets per unit coefficient)."""
        return np.ascontiguousarray(self._dirs[:, :, self._n_shape:].transpose(2, 0, 1)).astype(np.float32)

    def rest_joints(self, betas: torch.Tensor | None = None) -> np.ndarray:
        """(5, 3) rest joint locations of the identity `betas` (for the add-on's bones)."""
        return (self.arrays.j_regressor @ self.neutral_vertices(betas).astype(np.float64)).astype(np.float32)

    def expression_joints(self) -> np.ndarray:
        """(E, 5, 3) joint motion per unit expression: the joints are regressed from the shaped
        mesh, so the expression moves them (the add-on's bones must follow)."""
        # j_expr[e, j, k] = sum_v j_regressor[j, v] * dirs[v, k, n_shape + e]
        j_expr = np.einsum("jv,vke->ejk", self.arrays.j_regressor, self._dirs[:, :, self._n_shape:])
        return np.ascontiguousarray(j_expr, np.float32)


# --------------------------------------------------------------------------------------
# Finding and loading the files


def resolve_flame_file(flame_path: str | Path | None) -> tuple[Path, str]:
    """(the model pickle, its model name) for a folder or an explicit ``.pkl`` path."""
    if flame_path is None or str(flame_path) == "":
        raise ModelFileError(f"no FLAME folder is configured. {how_to_get_flame()}")
    p = Path(flame_path).expanduser()
    if p.is_file():
        return p, ("flame2023" if "2023" in p.name else "flame2020")
    if not p.is_dir():
        raise ModelFileError(f"FLAME folder not found: {p} (expected {FLAME2023_FILE} or {FLAME2020_FILE} and "
                             f"{EMBEDDING_FILE} in it). {how_to_get_flame()}")
    f2023, f2020 = p / FLAME2023_FILE, p / FLAME2020_FILE
    if f2023.is_file():
        if f2020.is_file():
            log.info("both FLAME 2023 and FLAME 2020 are in %s; using FLAME 2023 (%s)", p, FLAME2023_FILE)
        return f2023, "flame2023"
    if f2020.is_file():
        return f2020, "flame2020"
    raise ModelFileError(f"no FLAME model in {p}: expected {FLAME2023_FILE} (FLAME 2023) or {FLAME2020_FILE} "
                         f"(FLAME 2020). {how_to_get_flame()}")


def load_flame(flame_dir: str | Path | None, *, n_shape: int | None = None, n_expression: int | None = None,
               lip_rings: int = DEFAULT_LIP_RINGS, device="cpu", dtype=torch.float32) -> FlameModel:
    """FLAME from a folder (or a ``.pkl`` path; the embedding, UVs and masks are looked up
    beside it). ModelFileError names the missing or malformed file and where to get it."""
    pkl, name = resolve_flame_file(flame_dir)
    folder = pkl.parent
    arrays = read_flame_pickle(pkl)
    embedding = read_landmark_embedding(folder / EMBEDDING_FILE, len(arrays.faces))
    layout = read_uv_layout(folder, len(arrays.faces))
    if layout is None:
        log.warning("no FLAME UV layout (%s or %s) in %s; using a cylindrical projection of the template, "
                    "which textures made for FLAME's own layout will not match", TEXTURE_NPZ_FILE,
                    TEMPLATE_OBJ_FILE, folder)
        uv, uv_faces = cylindrical_uv(arrays.v_template, arrays.faces)
    else:
        uv, uv_faces, _ = layout
    lips = _read_lip_mask(folder, len(arrays.v_template))
    if lips is None and not np.isin(embedding.landmark_ids, np.asarray(LIPS)).any():
        raise ModelFileError(f"{folder / EMBEDDING_FILE} embeds none of MediaPipe's lip landmarks, so the lip "
                             f"vertices cannot be found (and {MASKS_FILE} is absent). {how_to_get_flame()}")
    # Everything FlameModel checks has been checked above with the file's name, except the
    # caller's n_shape / n_expression, which stay a ValueError.
    model = FlameModel(arrays, embedding, name=name, uv=uv, uv_faces=uv_faces, lip_vertex_ids=lips,
                       n_shape=n_shape, n_expression=n_expression, lip_rings=lip_rings,
                       device=device, dtype=dtype)
    log.info("loaded %s from %s: %d vertices, %d shape and %d expression coefficients, %d landmarks",
             name, pkl, model.n_vertices, model.n_shape, model.n_expression, len(model.landmark_ids))
    return model


@lru_cache(maxsize=8)
def _status_cached(pkl: str, emb: str, stamp: tuple) -> tuple[bool, str]:
    try:
        model = load_flame(Path(pkl))
    except ModelFileError as e:
        return False, e.message
    return True, f"{model.name} from {pkl} ({model.n_vertices} vertices, {len(model.landmark_ids)} landmarks)"


def flame_status(flame_dir: str | Path | None) -> tuple[bool, str]:
    """(available, reason) for the service's hello: whether FLAME loads from `flame_dir`,
    and what it is or what is missing and where to get it. Files are validated by loading
    them once; the answer is cached until a file changes."""
    try:
        pkl, _ = resolve_flame_file(flame_dir)
    except ModelFileError as e:
        return False, e.message
    emb = pkl.parent / EMBEDDING_FILE
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None
                  for p in (pkl, emb, pkl.parent / TEXTURE_NPZ_FILE, pkl.parent / MASKS_FILE))
    return _status_cached(str(pkl), str(emb), stamp)
