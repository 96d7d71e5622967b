"""The video's camera in the USD and glTF exports, read back by their own readers.

Looking through the exported camera must put every vertex of the head where the result's
intrinsics and extrinsic put it: the projection is done by Pixar's own camera maths (Gf's
frustum) for USD, and by glTF's specified projection for the .glb, and compared with K (R x + t)
computed here from the result's arrays, independently of the exporter's conversions.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
from export_util import export_cases  # noqa: F401 - the session fixture

from avface.export import export_result
from avface.export.rig import rig_from_result
from avface.result import load_result, write_result

pytest.importorskip("pxr", reason="usd-core is a dependency; reinstall with make setup")
pygltflib = pytest.importorskip("pygltflib", reason="pygltflib is a dependency; reinstall with make setup")
from pxr import Usd, UsdGeom  # noqa: E402

#: the projections agree to this many pixels (float32 in the files, float64 here)
PIXEL_TOL = 1e-3


def _off_centre(case, out_dir):
    """The case's result seen by another camera: a lens 1.3x longer, non-square pixels (fy
    1.1x fx), the principal point 37 px right and 21 px up of the centre, a frame 96 px wider,
    and the camera turned and moved (so the writers' pose, not only the identity, is checked;
    the stored camera-frame ``vertices`` move with it)."""
    from scipy.spatial.transform import Rotation

    res = load_result(case.result_path)
    a = dict(res.arrays)
    motion = np.eye(4)  # camera frame -> the new camera frame
    motion[:3, :3] = Rotation.from_rotvec([0.08, -0.15, 0.05]).as_matrix()
    motion[:3, 3] = [0.02, -0.01, 0.03]
    a["extrinsics"] = (motion @ np.asarray(a["extrinsics"], np.float64)).astype(np.float32)
    v = np.asarray(a["vertices"], np.float64)
    a["vertices"] = (v @ motion[:3, :3].T + motion[:3, 3]).astype(a["vertices"].dtype)
    k = np.asarray(a["intrinsics"], np.float64).copy()
    k[0, 0] *= 1.3
    k[1, 1] *= 1.3 * 1.1
    meta = {key: v for key, v in res.meta.items() if key != "conventions"}
    meta["width"] = int(meta["width"]) + 96
    k[0, 2] = meta["width"] / 2.0 + 37.0
    k[1, 2] = meta["height"] / 2.0 - 21.0
    a["intrinsics"] = k.astype(np.float32)
    return write_result(out_dir / "result.npz", a, meta)


def _want_pixels(result, world: np.ndarray, frame: int) -> np.ndarray:
    """K (R x + t): the result's own projection of world points at ``frame``."""
    k = np.asarray(result["intrinsics"], np.float64)
    ext = np.asarray(result["extrinsics"], np.float64)[frame]
    cam = world @ ext[:3, :3].T + ext[:3, 3]
    q = cam @ k.T
    return q[:, :2] / q[:, 2:3]


def _usd_pixels(path, world: np.ndarray, width: int, height: int) -> np.ndarray:
    stage = Usd.Stage.Open(str(path))
    prim = stage.GetPrimAtPath("/AVFace/Camera")
    assert prim.IsValid() and prim.IsA(UsdGeom.Camera), "no camera in the USD file"
    frustum = UsdGeom.Camera(prim).GetCamera(Usd.TimeCode(0)).frustum
    view = np.array(frustum.ComputeViewMatrix(), np.float64)
    proj = np.array(frustum.ComputeProjectionMatrix(), np.float64)
    clip = np.c_[world, np.ones(len(world))] @ view @ proj  # Gf: row vectors
    ndc = clip[:, :3] / clip[:, 3:4]
    assert (clip[:, 3] > 0).all(), "the head is behind the camera"
    # the frustum's window is mapped onto the whole frame (with non-square pixels its aspect is
    # w fy / (h fx), not the frame's)
    return np.stack([(ndc[:, 0] + 1) / 2 * width, (1 - ndc[:, 1]) / 2 * height], axis=1)


def _gltf_pixels(path, world: np.ndarray, width: int, height: int) -> np.ndarray:
    """glTF 2.0 section 3.10: the node's transform places the camera (looking down -z), and
    the perspective projection maps it to NDC, which a viewer maps onto the whole frame."""
    from scipy.spatial.transform import Rotation

    gltf = pygltflib.GLTF2().load(str(path))
    nodes = [n for n in gltf.nodes if n.camera is not None]
    assert len(nodes) == 1, "expected one camera node"
    node, cam = nodes[0], gltf.cameras[nodes[0].camera]
    assert cam.type == "perspective"
    rot = Rotation.from_quat(node.rotation).as_matrix()
    local = (world - np.asarray(node.translation)) @ rot  # R^T (x - t)
    p = cam.perspective
    tan = np.tan(p.yfov / 2)
    x_ndc = local[:, 0] / (p.aspectRatio * tan * -local[:, 2])
    y_ndc = local[:, 1] / (tan * -local[:, 2])
    assert (local[:, 2] < 0).all(), "the head is behind the camera"
    return np.stack([(x_ndc + 1) / 2 * width, (1 - y_ndc) / 2 * height], axis=1)


@pytest.mark.parametrize("case", ["default", "flame"])
def test_usd_camera_puts_the_head_on_the_video_pixels(export_cases, case, tmp_path):
    c = export_cases[case]
    for result_path in (c.result_path, _off_centre(c, tmp_path)):
        res = load_result(result_path)
        rig = rig_from_result(res, result_path, flame_dir=c.flame_dir)
        out = export_result(result_path, ["usd"], tmp_path / f"{result_path.parent.name}.usda",
                            flame_dir=c.flame_dir)["usd"]
        w, h = int(res.meta["width"]), int(res.meta["height"])
        for t in c.frames():
            world = rig.evaluate([t])[0]
            got = _usd_pixels(out, world, w, h)
            want = _want_pixels(res, world, t)
            err = np.abs(got - want).max()
            assert err < PIXEL_TOL, f"{result_path}: frame {t}: {err:.3g} px off through the USD camera"
            assert (want[:, 0] > 0).all() and (want[:, 0] < w).all(), "the head should be in the frame"


def test_usd_camera_units_are_tenths_of_the_stage_unit(export_cases, tmp_path):
    """The stage is in metres, so a 36 mm filmback is 0.36 and the lens follows: f / aperture
    is fx / width, whatever the unit, but readers that honour the unit need the right one."""
    c = export_cases["default"]
    res = load_result(c.result_path)
    out = export_result(c.result_path, ["usd"], tmp_path / "head.usd")["usd"]
    stage = Usd.Stage.Open(str(out))
    cam = UsdGeom.Camera(stage.GetPrimAtPath("/AVFace/Camera"))
    assert UsdGeom.GetStageMetersPerUnit(stage) == 1.0
    aperture = cam.GetHorizontalApertureAttr().Get()
    assert aperture == pytest.approx(0.36)
    focal_mm = cam.GetFocalLengthAttr().Get() * 100.0
    k = np.asarray(res["intrinsics"], np.float64)
    assert focal_mm == pytest.approx(k[0, 0] * 36.0 / res.meta["width"], rel=1e-6)
    assert list(stage.GetPrimAtPath("/AVFace/Camera").GetCustomDataByKey("avface:image_size")) == [640, 480]


@pytest.mark.parametrize("case", ["default", "flame"])
def test_gltf_camera_puts_the_head_on_the_video_pixels(export_cases, case, tmp_path):
    c = export_cases[case]
    res = load_result(c.result_path)
    rig = rig_from_result(res, c.result_path, flame_dir=c.flame_dir)
    out = export_result(c.result_path, ["gltf"], tmp_path / "head.glb", flame_dir=c.flame_dir)["gltf"]
    w, h = int(res.meta["width"]), int(res.meta["height"])
    for t in c.frames():
        world = rig.evaluate([t])[0]
        err = np.abs(_gltf_pixels(out, world, w, h) - _want_pixels(res, world, t)).max()
        assert err < PIXEL_TOL, f"frame {t}: {err:.3g} px off through the glTF camera"
    extras = pygltflib.GLTF2().load(str(out)).asset.extras["avface"]["camera"]
    assert np.allclose(extras["intrinsics"], res["intrinsics"]) and (extras["width"], extras["height"]) == (w, h)


def test_gltf_camera_says_what_it_cannot_hold(export_cases, tmp_path, caplog):
    """glTF has no lens shift: an off-centre principal point is reported and the rest is kept,
    so the error is exactly the principal point's offset (37 px right, 21 px up)."""
    c = export_cases["default"]
    path = _off_centre(c, tmp_path)
    res = load_result(path)
    rig = rig_from_result(res, path)
    with caplog.at_level(logging.WARNING, logger="avface.export.gltf"):
        out = export_result(path, ["gltf"], tmp_path / "head.glb")["gltf"]
    assert any("no lens shift" in r.getMessage() for r in caplog.records), caplog.text
    w, h = int(res.meta["width"]), int(res.meta["height"])
    world = rig.evaluate([0])[0]
    diff = _want_pixels(res, world, 0) - _gltf_pixels(out, world, w, h)
    assert np.allclose(diff, [37.0, -21.0], atol=PIXEL_TOL), diff.mean(axis=0)
