"""What `avface export` writes, read by Blender's own importers (bpy 5.0.1 and 4.2 LTS): the
glTF importer and the USD importer each give a mesh with shape-key animation whose evaluated
vertices at three frames match the result's `vertices` after the documented axis conversion."""
from __future__ import annotations

import numpy as np
import pytest
from blender_harness import blender, staged_addon  # noqa: F401 (fixtures)
from export_util import export_cases  # noqa: F401 (the session fixture)

from avface.export import axes, export_result
from avface.export.rig import EXACT_ATOL_M
from avface.result import load_result

pytestmark = [pytest.mark.blender, pytest.mark.slow]

CASES = ("default_lips", "flame")
#: pixels: float32 in the files and in Blender
CAMERA_PX_TOL = 0.01


@pytest.fixture(scope="module")
def exported(export_cases, tmp_path_factory):
    """{case: (glb path, usd path, expected Blender-frame vertices .npy, frames, fps, tolerance m)}."""
    out = {}
    for name in CASES:
        case = export_cases[name]
        folder = tmp_path_factory.mktemp(f"export-{name}")
        paths = export_result(case.result_path, ["gltf", "usd"], folder, flame_dir=case.flame_dir)
        r = load_result(case.result_path)
        stored = r.arrays["vertices"].astype(np.float64)
        expected = axes.camera_to_blender(stored, r.arrays["extrinsics"])
        np.save(folder / "expected.npy", expected)
        # float16 storage: its spacing at the largest coordinate, plus the exporters' exactness
        tol = float(np.spacing(np.float16(np.abs(stored).max()))) + EXACT_ATOL_M
        camera = {"intrinsics": np.asarray(r.arrays["intrinsics"], np.float64).tolist(),
                  "extrinsic": np.asarray(r.arrays["extrinsics"][0], np.float64).tolist(),
                  "width": int(r.meta["width"]), "height": int(r.meta["height"])}
        out[name] = (paths["gltf"], paths["usd"], folder / "expected.npy", case.frames().tolist(),
                     float(r.meta["fps"]), tol, r.arrays["expression"].shape[1], camera)
    return out


@pytest.mark.parametrize("fmt", ["gltf", "usd"])
@pytest.mark.parametrize("case", CASES)
def test_blenders_importer_reads_the_animated_head(blender, exported, case, fmt):
    glb, usd, expected, frames, fps, tol, n_expr, camera = exported[case]
    path = glb if fmt == "gltf" else usd
    report = blender.run("bl_export.py", f"import_{fmt}", path=str(path), expected=str(expected), frames=frames,
                         fps=fps, camera=camera)
    assert sum(k.startswith("expression_") for k in report["shape_keys"]) == n_expr, report["shape_keys"]
    for t, err in zip(frames, report["errors"]):
        assert err <= tol, f"{fmt}, frame {t}: Blender's mesh is {err:.3g} m off the result (tolerance {tol:.3g} m)"
    # the video's camera comes along: through it, the head sits where the result's camera saw it
    for t, px in zip(frames, report["camera_px"]):
        assert px < CAMERA_PX_TOL, f"{fmt}, frame {t}: through Blender's imported camera the head is {px:.3g} px off"
