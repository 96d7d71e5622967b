"""The result contract between the backend and the add-on (docs/design.md section 5), schema v1.

One ``result.npz`` per job (+ ``detail/`` with per-frame displacement maps when the fine
stage ran). Arrays only, no pickles: any numpy can read it.

Conventions (also written into ``meta["conventions"]``):
- units are metres, angles radians, rotations axis-angle;
- the model/world frame is right-handed with y up and z towards the viewer (FLAME's and
  MediaPipe's canonical frame). The posed mesh of frame t is the model evaluated with that
  frame's parameters (global_rot about the root joint, then transl);
- the camera sits at the world origin looking down -z; ``extrinsics[t]`` maps world to the
  OpenCV camera frame (x right, y down, z forward) and ``intrinsics`` projects it to pixels;
  ``vertices`` are in that camera frame;
- into Blender (Z up, front view looking along +Y): (x, y, z)_world -> (x, -z, y)_blender
  (``avface.export.axes``);
- lip offsets (``lip_coeffs[t] . lip_basis``) are rest-frame offsets of ``lip_vertex_ids``,
  added with the expression blend shapes before skinning, and do not move the joints;
- FLAME's joints move with the expression: frame t rotates about
  ``joints_rest + expression[t] . expression_joints`` (the optional ``expression_joints``).
"""
from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OutputError, SchemaError
from .detail_maps import DetailEncoding, check_detail_maps

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MODELS = ("flame2020", "flame2023", "mediapipe_canonical", "ict_face_light")
#: At most this many expression components (the ICT model's 53 ARKit shapes; 50 otherwise).
MAX_EXPRESSIONS = {"ict_face_light": 53}
CONVENTIONS = {
    "units": "metres; angles in radians; rotations axis-angle",
    "world": "right-handed, y up, z towards the viewer (the face model's frame)",
    "camera": "OpenCV (x right, y down, z forward); extrinsics map world to camera; vertices are camera-frame",
    "blender": "(x, y, z)_world -> (x, -z, y)_blender",
    "pose": "global_rot rotates about the root joint, then transl is added (smplx convention)",
    "lips": "lip_coeffs[t] . lip_basis are rest-frame offsets of lip_vertex_ids, added with the expression "
            "blend shapes before skinning; they do not move the joints",
    "joints": "frame t's joints are joints_rest + expression[t] . expression_joints (FLAME; without "
              "expression_joints they stay at joints_rest)",
}

# name -> (dtype kind, shape with symbols); symbols: T frames, V vertices, F faces, Vt uv
# vertices, E expressions, S shape, L lip vertices, K lip components, J joints.
SPEC: dict[str, tuple[str, tuple]] = {
    "vertices_neutral": ("f", ("V", 3)),
    "faces": ("i", ("F", 3)),
    "uv": ("f", ("Vt", 2)),
    "uv_faces": ("i", ("F", 3)),
    "shape": ("f", ("S",)),
    "expression_basis": ("f", ("E", "V", 3)),
    "expression": ("f", ("T", "E")),
    "global_rot": ("f", ("T", 3)),
    "transl": ("f", ("T", 3)),
    "neck": ("f", ("T", 3)),
    "jaw": ("f", ("T", 3)),
    "eyes": ("f", ("T", 6)),
    "joint_names": ("U", ("J",)),
    "joint_parents": ("i", ("J",)),
    "joints_rest": ("f", ("J", 3)),
    "skin_weights": ("f", ("V", "J")),
    "intrinsics": ("f", (3, 3)),
    "extrinsics": ("f", ("T", 4, 4)),
    "lip_vertex_ids": ("i", ("L",)),
    "lip_basis": ("f", ("K", "L", 3)),
    "lip_coeffs": ("f", ("T", "K")),
    "arkit_names": ("U", (52,)),
    "arkit": ("f", ("T", 52)),
    "visual_conf": ("f", ("T",)),
    "occluded": ("b", ("T",)),
    "speech_activity": ("f", ("T",)),
}
OPTIONAL = {
    "vertices": ("f", ("T", "V", 3)),
    # FLAME's pose correctives (its posedirs) as offsets per unit of the pose feature: entry
    # 9 * (j - 1) + 3 * r + c is (R_j - I)[r, c] for joint j >= 1 (neck, jaw, eyes), R_j the
    # joint's local rotation matrix. Absent for models without correctives.
    "pose_correctives": ("f", ("P", "V", 3)),
    # How far one unit of each expression coefficient moves each rest joint (FLAME regresses
    # its joints from the shaped mesh: J_regressor . expression_basis), so that the unposed
    # joints of frame t are joints_rest + expression[t] . expression_joints. Absent where the
    # joints do not move with the expression (the default model).
    "expression_joints": ("f", ("E", "J", 3)),
    # The expression components' names, the shape keys' names in Blender (the ICT model: its
    # ARKit shapes in Apple's spelling, the split pairs browInnerUp and cheekPuff as
    # ...Left / ...Right). Absent: the components are numbered.
    "expression_names": ("U", ("E",)),
    # Each triangle's material (an index into material_names): a whole head's parts (skin,
    # mouth, teeth, eyes...). Absent: one material; with it, the detail maps apply to the
    # triangles of the material named "skin" only.
    "face_material": ("i", ("F",)),
    # The model's generic neutral (V, 3) when its identity is a blend of modes (the ICT model):
    # the add-on's basis shape, with vertices_neutral - vertices_template as an "identity"
    # shape key at 1. Absent: vertices_neutral is the basis.
    "vertices_template": ("f", ("V", 3)),
    "material_names": ("U", ("Mt",)),
}
META_KEYS = ("schema_version", "model", "fps", "n_frames", "width", "height", "source", "audio_present",
             "stages_run", "stage_seconds", "backend_version", "lip_pca_residual", "detail")


def _check_array(name: str, arr: np.ndarray, kind: str, shape: tuple, dims: dict) -> None:
    if kind == "f" and arr.dtype.kind != "f":
        raise SchemaError(f"{name}: expected a float array, got dtype {arr.dtype}")
    if kind == "i" and arr.dtype.kind not in "iu":
        raise SchemaError(f"{name}: expected an integer array, got dtype {arr.dtype}")
    if kind == "b" and arr.dtype.kind != "b":
        raise SchemaError(f"{name}: expected a bool array, got dtype {arr.dtype}")
    if kind == "U" and arr.dtype.kind != "U":
        raise SchemaError(f"{name}: expected a string array, got dtype {arr.dtype}")
    if arr.ndim != len(shape):
        raise SchemaError(f"{name}: expected {len(shape)} dimensions {shape}, got shape {arr.shape}")
    for axis, (want, got) in enumerate(zip(shape, arr.shape)):
        if isinstance(want, int):
            if want != got:
                raise SchemaError(f"{name}: axis {axis} should be {want}, got shape {arr.shape}")
        elif want in dims and dims[want] != got:
            raise SchemaError(f"{name}: axis {axis} ({want}) is {got} but other arrays say {want}={dims[want]}")
        else:
            dims[want] = got
    if kind == "f" and not np.all(np.isfinite(arr)):
        raise SchemaError(f"{name}: contains NaN or infinite values")


def check_arrays(arrays: dict[str, np.ndarray], meta: dict) -> dict[str, int]:
    """Validate arrays and meta against the contract; returns the symbol sizes (T, V, ...)."""
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise SchemaError(f"meta lacks {missing}")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise SchemaError(f"schema_version {meta['schema_version']!r} is not supported (this version reads "
                          f"{SCHEMA_VERSION}); update the add-on or the backend so that they match")
    if meta["model"] not in MODELS:
        raise SchemaError(f"meta.model {meta['model']!r} is not one of {MODELS}")
    dims: dict[str, int] = {"T": int(meta["n_frames"])}
    absent = [k for k in SPEC if k not in arrays]
    if absent:
        raise SchemaError(f"result lacks arrays {absent}")
    for name, (kind, shape) in {**SPEC, **{k: v for k, v in OPTIONAL.items() if k in arrays}}.items():
        _check_array(name, np.asarray(arrays[name]), kind, shape, dims)
    max_e = MAX_EXPRESSIONS.get(meta["model"], 50)
    if dims["E"] > max_e:
        raise SchemaError(f"expression_basis has {dims['E']} components, at most {max_e} allowed for {meta['model']}")
    if ("face_material" in arrays) != ("material_names" in arrays):
        raise SchemaError("face_material and material_names come together")
    if "face_material" in arrays:
        fm = np.asarray(arrays["face_material"])
        if fm.size and (fm.min() < 0 or fm.max() >= dims["Mt"]):
            raise SchemaError("face_material indexes materials that material_names does not name")
    if dims["K"] > 16:
        raise SchemaError(f"lip_basis has {dims['K']} components, at most 16 allowed")
    if "P" in dims and dims["P"] != 9 * (dims["J"] - 1):
        raise SchemaError(f"pose_correctives has {dims['P']} components; {dims['J']} joints need 9 x {dims['J'] - 1}")
    faces = np.asarray(arrays["faces"])
    if faces.size and (faces.min() < 0 or faces.max() >= dims["V"]):
        raise SchemaError("faces index vertices that do not exist")
    uv_faces = np.asarray(arrays["uv_faces"])
    if uv_faces.size and (uv_faces.min() < 0 or uv_faces.max() >= dims["Vt"]):
        raise SchemaError("uv_faces index uv coordinates that do not exist")
    lips = np.asarray(arrays["lip_vertex_ids"])
    if lips.size and (lips.min() < 0 or lips.max() >= dims["V"]):
        raise SchemaError("lip_vertex_ids index vertices that do not exist")
    ark = np.asarray(arrays["arkit"])
    if ark.size and (ark.min() < 0 or ark.max() > 1):
        raise SchemaError("arkit curves must lie in [0, 1]")
    if meta["fps"] <= 0:
        raise SchemaError(f"fps must be positive, got {meta['fps']}")
    return dims


def ensure_writable(folder: Path, what: str = "the output folder") -> None:
    """Create ``folder`` and prove it takes a file, or raise OutputError before any work is done."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe_file = folder / ".avface-write-test"
        probe_file.write_bytes(b"")
        probe_file.unlink()
    except OSError as e:
        raise OutputError(f"cannot write to {what} {folder}: {e.strerror or e}; choose another with -o") from e


def write_result(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Validate, then write atomically (a crash never leaves a half-written result)."""
    path = Path(path)
    check_arrays(arrays, meta)
    meta = {**meta, "conventions": CONVENTIONS}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez_compressed(tmp, meta=np.asarray(json.dumps(meta, allow_nan=False)), **arrays)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
    return path


@dataclass
class Result:
    meta: dict
    arrays: dict[str, np.ndarray]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]


def load_result(path: Path) -> Result:
    """Read and validate a result file."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise SchemaError(f"{path} is not a readable AVFace result (damaged or not an .npz): {e}") from e
    if "meta" not in arrays:
        raise SchemaError(f"{path} has no meta record: not an AVFace result")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path}: meta is not valid JSON: {e}") from e
    check_arrays(arrays, meta)
    detail = meta.get("detail") or {}
    if detail.get("n_maps"):
        # count, size, bit depth and integrity of every map (the fine stage writes them)
        check_detail_maps(path.parent, DetailEncoding.from_meta(detail), int(meta["n_frames"]))
    return Result(meta, arrays)


DETAIL_STATES = {
    "off": "not asked for (--no-detail)",
    "pending": "still being made: the head is complete, its maps are on their way",
    "complete": "complete",
    "skipped": "skipped: no frame had a trusted face texel to learn from",
    "cancelled": "cancelled: the head is complete, without maps",
    "failed": "failed: the head is complete, without maps",
}
"""``meta.detail.state``: where the fine stage's maps stand. The head (``result.npz``) is
written before the fine stage runs, with ``pending``; the fine stage ends in one of the others."""


def detail_state(meta: dict) -> str:
    """``meta.detail.state``, or for a result written before the head came first: ``complete``
    with maps, ``skipped`` when the stage said so, else ``off``."""
    detail = meta.get("detail") or {}
    state = detail.get("state")
    if state in DETAIL_STATES:
        return state
    if detail.get("n_maps"):
        return "complete"
    return "skipped" if detail.get("skipped") else "off"


def validate(path: Path) -> dict:
    """Validate a result file; returns its meta or raises SchemaError saying what is wrong."""
    return load_result(path).meta


def _detail_line(meta: dict) -> str:
    state = detail_state(meta)
    if state == "complete":
        d = meta["detail"]
        return f"complete: {d.get('n_maps', 0)} displacement maps of {d.get('map_size', 0)}^2 in {d.get('folder', 'detail')}/"
    return DETAIL_STATES[state]


def summary(result: Result) -> str:
    """A few lines a person can read."""
    m, a = result.meta, result.arrays
    t = m["n_frames"]
    occ = a["occluded"]
    lines = [
        f"AVFace result, schema v{m['schema_version']}, backend {m['backend_version']}",
        f"  source      {m['source'].get('path')} frames {m['source'].get('frame_start')}..{m['source'].get('frame_end')}"
        f" ({t} frames at {m['fps']:.3f} fps, {t / m['fps']:.2f} s, {m['width']}x{m['height']})",
        f"  model       {m['model']}: {a['vertices_neutral'].shape[0]} vertices, {a['faces'].shape[0]} triangles, "
        f"{a['expression_basis'].shape[0]} expressions, {a['shape'].shape[0]} shape parameters",
        f"  audio       {'yes' if m['audio_present'] else 'no (video only)'}; speech in "
        f"{100 * float((a['speech_activity'] > 0.5).mean()) if t else 0:.0f}% of frames",
        f"  visibility  mean confidence {float(a['visual_conf'].mean()) if t else 0:.2f}; "
        f"{int(occ.sum())} occluded or undetected frames",
        f"  lips        {a['lip_vertex_ids'].shape[0]} vertices, {a['lip_basis'].shape[0]} components "
        f"(PCA residual {m['lip_pca_residual']:.2e} m)",
        f"  detail      {_detail_line(m)}",
        "  stages      " + ", ".join(f"{s} {m['stage_seconds'].get(s, 0):.1f}s" for s in m["stages_run"]),
        f"  vertices    {'stored' if 'vertices' in a else 'not stored (--no-vertices)'}",
    ]
    if "fit_metrics" in m:
        lines.append("  fit         " + ", ".join(f"{k} {v:.2f}" for k, v in m["fit_metrics"].items()))
    return "\n".join(lines)
