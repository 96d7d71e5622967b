"""Import speed of the Blender add-on: a synthetic 1,500-frame result with 50 expression keys
and 16 lip keys (the issue's benchmark size) on the FLAME-sized mesh, imported with
``bpy.ops.import_scene.avface_result``. Run it with a bpy venv's Python:

    python build_addon.py --stage-only
    .venv-bpy/5.0.1/bin/python scripts/bench_addon_import.py [--frames 1500] [--vertices 5023]

It writes the result with numpy only (no avface, no torch), so it runs in Blender's Python.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def synthetic_result(folder: Path, n_frames: int, n_vertices: int, n_expression: int, n_lip: int) -> Path:
    """A result that follows the contract (schema v1), with a grid mesh standing in for the head."""
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(n_vertices)))
    u, v = np.meshgrid(np.linspace(0, 1, side), np.linspace(0, 1, side))
    uv = np.stack([u.ravel(), v.ravel()], 1)[:n_vertices].astype(np.float32)
    verts = np.stack([uv[:, 0] * 0.15 - 0.075, uv[:, 1] * 0.2 - 0.1, np.zeros(n_vertices)], 1).astype(np.float32)
    faces = []
    for r in range(side - 1):
        for c in range(side - 1):
            a, b, d, e = r * side + c, r * side + c + 1, (r + 1) * side + c, (r + 1) * side + c + 1
            if e < n_vertices:
                faces += [(a, b, e), (a, e, d)]
    faces = np.asarray(faces, np.int32)
    n_joints = 5
    lips = np.arange(0, n_vertices, max(1, n_vertices // 400), dtype=np.int32)[:400]
    weights = rng.random((n_vertices, n_joints)).astype(np.float32)
    weights /= weights.sum(1, keepdims=True)
    t = n_frames
    arrays = {
        "vertices_neutral": verts, "faces": faces, "uv": uv, "uv_faces": faces.copy(),
        "shape": np.zeros(100, np.float32),
        "expression_basis": (rng.standard_normal((n_expression, n_vertices, 3)) * 1e-3).astype(np.float32),
        "expression": rng.standard_normal((t, n_expression)).astype(np.float32),
        "global_rot": (rng.standard_normal((t, 3)) * 0.1).astype(np.float32),
        "transl": np.tile(np.array([0, 0, -0.5], np.float32), (t, 1)),
        "neck": (rng.standard_normal((t, 3)) * 0.05).astype(np.float32),
        "jaw": (rng.standard_normal((t, 3)) * 0.05).astype(np.float32),
        "eyes": (rng.standard_normal((t, 6)) * 0.05).astype(np.float32),
        "joint_names": np.asarray(["global", "neck", "jaw", "left_eye", "right_eye"]),
        "joint_parents": np.asarray([-1, 0, 1, 1, 1], np.int32),
        "joints_rest": (rng.standard_normal((n_joints, 3)) * 0.02).astype(np.float32),
        "skin_weights": weights,
        "intrinsics": np.eye(3, dtype=np.float32),
        "extrinsics": np.tile(np.diag([1, -1, -1, 1]).astype(np.float32), (t, 1, 1)),
        "lip_vertex_ids": lips,
        "lip_basis": (rng.standard_normal((n_lip, len(lips), 3)) * 1e-3).astype(np.float32),
        "lip_coeffs": rng.standard_normal((t, n_lip)).astype(np.float32),
        "arkit_names": np.asarray([f"curve{i}" for i in range(52)]),
        "arkit": rng.random((t, 52)).astype(np.float32),
        "visual_conf": rng.random(t).astype(np.float32),
        "occluded": rng.random(t) > 0.9,
        "speech_activity": rng.random(t).astype(np.float32),
    }
    meta = {"schema_version": 1, "model": "flame2020", "fps": 25.0, "n_frames": t, "width": 512, "height": 512,
            "source": {"path": "synthetic", "frame_start": 0, "frame_end": t}, "audio_present": True,
            "stages_run": ["export"], "stage_seconds": {}, "backend_version": "bench", "lip_pca_residual": 0.0,
            "detail": {"n_maps": 0, "folder": "detail", "map_size": 0, "metres_per_unit": 0.0, "format": "png16"}}
    path = folder / "result.npz"
    np.savez(path, meta=np.asarray(json.dumps(meta)), **arrays)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1500)
    parser.add_argument("--vertices", type=int, default=5023, help="5023: FLAME's mesh")
    parser.add_argument("--expressions", type=int, default=50)
    parser.add_argument("--lips", type=int, default=16)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "build" / "addon"))
    import addon_utils
    import bpy  # first: addon_utils is on the path only once bpy is loaded

    bpy.ops.wm.read_factory_settings(use_empty=True)
    addon_utils.enable("avface_blender", default_set=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_result(Path(tmp), args.frames, args.vertices, args.expressions, args.lips)
        t0 = time.perf_counter()
        assert bpy.ops.import_scene.avface_result(filepath=str(path)) == {"FINISHED"}
        seconds = time.perf_counter() - t0
    mesh = next(o for o in bpy.data.objects if o.get("avface_role") == "mesh")
    keys = len(mesh.data.shape_keys.key_blocks) - 1
    print(f"Blender {bpy.app.version_string}: imported {args.frames} frames, {args.vertices} vertices, "
          f"{keys} shape keys ({args.expressions} expression + {args.lips} lip), 5 bones, 55 curves "
          f"in {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
