"""Small results for the add-on tests, made once per session with the real pipeline on a
short synthetic clip (about 7 s on this CPU), and an import of the staged add-on's pure
modules (``build/addon/avface_blender``, vendored as the build does)."""
from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from blender_harness import load_build_addon

CLIP_SECONDS = 1.2
CLIP_SIZE_PX = 192
LIP_COMPONENTS = 3
DETAIL_SIZE_PX = 32
DETAIL_METRES_PER_UNIT = 0.002


def addon_module(name: str):
    """``avface_blender.<name>`` from the staged add-on (staging it first)."""
    build_addon = load_build_addon()
    build_addon.stage()
    parent = str(build_addon.STAGE_PARENT)
    if parent not in sys.path:
        sys.path.insert(0, parent)
    return importlib.import_module(f"avface_blender.{name}")


@pytest.fixture(scope="session")
def demo_clip(tmp_path_factory):
    from avface.synth import make_demo_clip

    return make_demo_clip(tmp_path_factory.mktemp("addon-clip"), seed=0, duration_s=CLIP_SECONDS, size=CLIP_SIZE_PX)


@pytest.fixture(scope="session")
def real_result(tmp_path_factory, demo_clip) -> Path:
    """result.npz of `avface reconstruct` on the demo clip with the default options (default
    model and networks, detail maps): what the pipeline writes today."""
    from avface.pipeline import ReconstructOptions, reconstruct

    return reconstruct(demo_clip.video_path, tmp_path_factory.mktemp("addon-result"), ReconstructOptions())


@pytest.fixture(scope="session")
def rich_result(tmp_path_factory, real_result) -> Path:
    """The real result plus a lip basis and one 16-bit displacement map per frame, so the
    optional parts of the contract are exercised. The added lip offsets are small and the
    stored ``vertices`` are left as they were: checks on this result do not compare vertices."""
    import cv2

    from avface.result import load_result, write_result

    res = load_result(real_result)
    a = dict(res.arrays)
    n = res.meta["n_frames"]
    rng = np.random.default_rng(0)
    n_lip = len(a["lip_vertex_ids"])
    a["lip_basis"] = (rng.standard_normal((LIP_COMPONENTS, n_lip, 3)) * 1e-3).astype(np.float32)
    a["lip_coeffs"] = np.sin(np.arange(n)[:, None] * 0.3 + np.arange(LIP_COMPONENTS)).astype(np.float32)
    out = tmp_path_factory.mktemp("addon-rich")
    (out / "detail").mkdir()
    yy, xx = np.mgrid[0:DETAIL_SIZE_PX, 0:DETAIL_SIZE_PX]
    for t in range(n):
        img = 0.5 + 0.25 * np.sin(xx * 0.4 + t * 0.2) * np.cos(yy * 0.3)
        cv2.imwrite(str(out / "detail" / f"{t:05d}.png"), np.round(img * 65535).astype(np.uint16))
    meta = {k: v for k, v in res.meta.items() if k != "conventions"}
    meta["detail"] = {"n_maps": n, "folder": "detail", "map_size": DETAIL_SIZE_PX,
                      "metres_per_unit": DETAIL_METRES_PER_UNIT, "format": "png16"}
    return write_result(out / "result.npz", a, meta)


@pytest.fixture(scope="session")
def offcentre_result(tmp_path_factory, real_result) -> Path:
    """The real result seen by another camera: a longer lens, the principal point off the
    centre both ways, a frame wider than high, and a source video that is no longer where
    the result says (the camera is still matched, without the video behind it)."""
    from avface.result import load_result, write_result

    res = load_result(real_result)
    a = dict(res.arrays)
    k = np.asarray(a["intrinsics"], np.float64).copy()
    k[0, 0] *= 1.3
    k[1, 1] *= 1.3
    k[0, 2] += 37.0
    k[1, 2] -= 21.0
    a["intrinsics"] = k.astype(np.float32)
    meta = {key: v for key, v in res.meta.items() if key != "conventions"}
    meta["width"] = int(meta["width"]) + 96
    meta["source"] = dict(meta["source"], path=str(tmp_path_factory.mktemp("moved") / "gone.mp4"))
    meta["detail"] = None  # the camera's check needs no displacement maps
    out = tmp_path_factory.mktemp("addon-offcentre")
    return write_result(out / "result.npz", a, meta)


def damaged_copy(src: Path, dest_dir: Path) -> Path:
    """A result whose bytes are cut in half: what a crash mid-copy leaves."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    data = src.read_bytes()
    dest = dest_dir / "result.npz"
    dest.write_bytes(data[: len(data) // 2])
    return dest


def copy_result(src: Path, dest_dir: Path) -> Path:
    shutil.copytree(src.parent, dest_dir, dirs_exist_ok=True)
    return dest_dir / src.name


def result_meta(path: Path) -> dict:
    with np.load(path) as z:
        return json.loads(str(z["meta"]))


FLAME_JOINTS = ("global", "neck", "jaw", "left_eye", "right_eye")
FLAME_PARENTS = (-1, 0, 1, 1, 1)


@pytest.fixture(scope="session")
def flame_like_result(tmp_path_factory) -> Path:
    """A result with FLAME's five joints (global, neck, jaw, eyes), whose ``vertices`` are made
    by the backend's own linear blend skinning (``avface.models.lbs``) from random poses,
    expressions and weights: the armature chain of the importer is checked against the
    model's maths, pose correctives (random, a few mm per unit) included."""
    import torch

    from avface.core.geometry import WORLD_TO_CAMERA
    from avface.models.lbs import lbs
    from avface.result import write_result
    from avface.stages.assemble.arkit import ARKIT_NAMES

    rng = np.random.default_rng(5)
    t, side, e = 10, 12, 4
    u, v = np.meshgrid(np.linspace(-1, 1, side), np.linspace(-1, 1, side))
    verts = np.stack([u.ravel() * 0.08, v.ravel() * 0.1, 0.05 * np.cos(u.ravel() * 1.5)], 1).astype(np.float32)
    faces = np.array([(r * side + c, r * side + c + 1, (r + 1) * side + c + 1) for r in range(side - 1)
                      for c in range(side - 1)] + [(r * side + c, (r + 1) * side + c + 1, (r + 1) * side + c)
                                                  for r in range(side - 1) for c in range(side - 1)], np.int32)
    n = len(verts)
    joints = np.array([[0, 0, -0.02], [0, -0.06, -0.03], [0, -0.03, 0.0], [0.03, 0.03, 0.03], [-0.03, 0.03, 0.03]],
                      np.float32)
    weights = rng.random((n, 5)) ** 3
    weights /= weights.sum(1, keepdims=True)
    basis = (rng.standard_normal((e, n, 3)) * 2e-3).astype(np.float32)
    expr = rng.standard_normal((t, e)).astype(np.float32)
    pose = (rng.standard_normal((t, 5, 3)) * 0.2).astype(np.float32)
    transl = np.array([0.01, -0.02, -0.5], np.float32) + (rng.standard_normal((t, 3)) * 0.01).astype(np.float32)
    correctives = (rng.standard_normal((36, n, 3)) * 5e-3).astype(np.float32)
    shaped = torch.as_tensor(verts + np.einsum("te,evk->tvk", expr, basis))
    world, _ = lbs(shaped, torch.as_tensor(pose), None, torch.as_tensor(FLAME_PARENTS), torch.as_tensor(weights,
                   dtype=torch.float32), posedirs=torch.as_tensor(correctives.reshape(36, n * 3)),
                   joints=torch.as_tensor(joints).expand(t, -1, -1))
    world = world.numpy() + transl[:, None]
    ext = np.eye(4, dtype=np.float32)
    ext[:3, :3] = WORLD_TO_CAMERA
    cam = world @ ext[:3, :3].T
    lips = np.arange(5, dtype=np.int32)
    arrays = {
        "vertices_neutral": verts, "faces": faces, "uv": (verts[:, :2] * 5 + 0.5).astype(np.float32),
        "uv_faces": faces.copy(), "shape": np.zeros(10, np.float32), "expression_basis": basis, "expression": expr,
        "global_rot": pose[:, 0], "transl": transl, "neck": pose[:, 1], "jaw": pose[:, 2],
        "eyes": np.concatenate([pose[:, 3], pose[:, 4]], 1),
        "joint_names": np.asarray(FLAME_JOINTS), "joint_parents": np.asarray(FLAME_PARENTS, np.int32),
        "joints_rest": joints, "skin_weights": weights.astype(np.float32), "intrinsics": np.eye(3, dtype=np.float32),
        "extrinsics": np.tile(ext, (t, 1, 1)), "lip_vertex_ids": lips,
        "lip_basis": np.zeros((0, 5, 3), np.float32), "lip_coeffs": np.zeros((t, 0), np.float32),
        "arkit_names": np.asarray(ARKIT_NAMES), "arkit": rng.random((t, 52)).astype(np.float32),
        "visual_conf": np.ones(t, np.float32), "occluded": np.zeros(t, bool), "speech_activity": np.zeros(t, np.float32),
        "vertices": cam.astype(np.float32),
        "pose_correctives": correctives,
    }
    meta = {"schema_version": 1, "model": "flame2020", "fps": 25.0, "n_frames": t, "width": 256, "height": 256,
            "source": {"path": "synthetic", "frame_start": 0, "frame_end": t}, "audio_present": False,
            "stages_run": ["export"], "stage_seconds": {}, "backend_version": "test", "lip_pca_residual": 0.0,
            "detail": {"n_maps": 0, "folder": "detail", "map_size": 0, "metres_per_unit": 0.0, "format": "png16"}}
    return write_result(tmp_path_factory.mktemp("addon-flame") / "result.npz", arrays, meta)


@pytest.fixture(scope="session")
def flame_result(tmp_path_factory) -> Path:
    """A real FLAME result (``tests/export_util.flame_result``: the synthetic FLAME model of
    ``tests/flame_fixture.py`` run by the model code and written by ``assemble.result_arrays``)
    with identity, expression and all five joints posed. Unlike ``flame_like_result``, its
    joints are regressed from the shaped mesh, so they move with the expression, as FLAME's do.
    25 fps, so that one result frame is one scene frame at the scene rate the checks set."""
    from export_util import flame_result as make_flame_result
    from flame_fixture import write_synthetic_flame

    root = tmp_path_factory.mktemp("addon-flame-real")
    write_synthetic_flame(root / "flame")
    return make_flame_result(root / "result", root / "flame", fps=25.0)
