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
    """result.npz of `avface reconstruct` on the demo clip (default model, no lip basis, no
    detail maps: what the pipeline writes today)."""
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
