"""USD export read back by pxr (usd-core): the skinned, blend-shaped mesh that UsdSkel itself
evaluates (UsdSkel.BakeSkinning) matches the result's vertices at three frames."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close
from export_util import export_cases  # noqa: F401 - the session fixture

from avface.export import export_result
from avface.export.rig import float16_tolerance
from avface.result import load_result

pxr = pytest.importorskip("pxr", reason="usd-core is a dependency; reinstall with make setup")
from pxr import Usd, UsdGeom, UsdSkel  # noqa: E402


@pytest.mark.parametrize("case", ["default", "default_lips", "flame", "flame_lips"])
def test_usd_skinning_reproduces_vertices(export_cases, case, tmp_path):
    c = export_cases[case]
    res = load_result(c.result_path)
    path = export_result(c.result_path, ["usd"], tmp_path / "head.usda", flame_dir=c.flame_dir)["usd"]

    stage = Usd.Stage.Open(str(path))
    assert UsdGeom.GetStageUpAxis(stage) == UsdGeom.Tokens.y
    assert UsdGeom.GetStageMetersPerUnit(stage) == 1.0
    assert stage.GetTimeCodesPerSecond() == res.meta["fps"] == stage.GetFramesPerSecond()
    assert stage.GetEndTimeCode() == res.meta["n_frames"] - 1
    mesh_prim = stage.GetPrimAtPath("/AVFace/Face")
    binding = UsdSkel.BindingAPI(mesh_prim)
    shapes = list(binding.GetBlendShapesAttr().Get())
    n_expr, n_lip = res["expression_basis"].shape[0], res["lip_basis"].shape[0]
    assert shapes[:n_expr] == [f"expression_{k:02d}" for k in range(n_expr)]
    assert shapes[n_expr:n_expr + n_lip] == [f"lip_{k:02d}" for k in range(n_lip)]
    assert n_lip == c.n_lip
    if case.startswith("flame"):
        assert any(s.startswith("pose_jaw_") for s in shapes)  # pose correctives as blend shapes
        skel = UsdSkel.Skeleton(stage.GetPrimAtPath("/AVFace/Skeleton"))
        assert list(skel.GetJointsAttr().Get()) == ["global", "global/neck", "global/neck/jaw",
                                                    "global/neck/left_eye", "global/neck/right_eye"]
    uv = UsdGeom.PrimvarsAPI(mesh_prim).GetPrimvar("st")
    assert uv.GetInterpolation() == UsdGeom.Tokens.faceVarying
    assert_close(np.array(uv.ComputeFlattened()), res["uv"][res["uv_faces"].reshape(-1)], atol=1e-7, what="uv")

    # UsdSkel's own evaluation: blend shapes then skinning, baked into the points
    assert UsdSkel.BakeSkinning(stage.Traverse())
    points = UsdGeom.Mesh(mesh_prim).GetPointsAttr()
    for t in c.frames():
        got = np.array(points.Get(Usd.TimeCode(int(t))), np.float64)
        assert_close(got, c.world_f32[t], atol=1e-5, rtol=0, what=f"{case} USD frame {t} vs float32 model")
        stored = res["vertices"][t].astype(np.float64) @ np.diag([1.0, -1.0, -1.0])  # camera -> world
        err = np.abs(got - stored)
        assert (err <= float16_tolerance(stored)).all(), f"{case} frame {t}: {err.max():.2e} m off the stored vertices"


@pytest.mark.parametrize("case", ["default_lips", "flame"])
def test_usd_passes_usd_validators(export_cases, case, tmp_path):
    """USD's own validation framework (schema types, skel bindings, shading) finds no error."""
    validation = pytest.importorskip("pxr.UsdValidation", reason="this usd-core predates UsdValidation")
    c = export_cases[case]
    path = export_result(c.result_path, ["usd"], tmp_path / "head.usd", flame_dir=c.flame_dir)["usd"]
    validators = validation.ValidationRegistry().GetOrLoadAllValidators()
    errors = validation.ValidationContext(validators).Validate(Usd.Stage.Open(str(path)))
    assert not errors, [f"{e.GetName()}: {e.GetMessage()}" for e in errors]


def test_usd_carries_arkit_curves_and_detail_maps(export_cases, tmp_path):
    c = export_cases["default_lips"]
    res = load_result(c.result_path)
    path = export_result(c.result_path, ["usd"], tmp_path / "sub" / "head.usd")["usd"]
    stage = Usd.Stage.Open(str(path))
    arkit = stage.GetPrimAtPath("/AVFace/ARKit")
    for k, name in enumerate(res["arkit_names"]):
        attr = arkit.GetAttribute(str(name))
        assert attr.IsValid(), name
        for t in (0, 7):
            assert attr.Get(Usd.TimeCode(t)) == pytest.approx(float(res["arkit"][t, k]), abs=1e-7)
    tex = stage.GetPrimAtPath("/AVFace/Looks/Detail/DisplacementMap").GetAttribute("inputs:file")
    assert tex.GetNumTimeSamples() == 12
    for t in (0, 11):
        asset = tex.Get(Usd.TimeCode(t))
        # a relative reference to the map beside the result, never the image itself
        assert not asset.path.startswith("/")
        assert (path.parent / asset.path).resolve() == (c.result_path.parent / "detail" / f"{t:06d}.png").resolve()
