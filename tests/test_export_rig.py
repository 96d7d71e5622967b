"""The rig every exporter writes: blend shapes + skeleton reproduce the model's own mesh (far
below float16 rounding), for the default model and FLAME, with and without a lip basis."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close
from export_util import export_cases  # noqa: F401 - the session fixture

from avface.export.rig import float16_tolerance, rig_from_result, stored_world_vertices
from avface.result import load_result


@pytest.mark.parametrize("case", ["default", "default_lips", "flame", "flame_lips"])
def test_rig_reproduces_every_frame(export_cases, case):
    c = export_cases[case]
    res = load_result(c.result_path)
    rig = rig_from_result(res, c.result_path, flame_dir=c.flame_dir)
    frames = np.arange(res.meta["n_frames"])
    got = rig.evaluate(frames)
    assert_close(got, c.world_f32, atol=1e-6, rtol=0, what=f"{case} rig vs float32 model")
    stored = stored_world_vertices(res, frames)
    assert (np.abs(got - stored) <= float16_tolerance(stored)).all()
    # weights rows of the skin sum to one, so the root's translation moves the whole head
    assert_close(rig.skin_weights.sum(1), np.ones(rig.n_vertices), atol=1e-5, what="skin weight sums")


def test_flame_pose_correctives_are_shapes_driven_by_rotation_entries(export_cases):
    c = export_cases["flame"]
    res = load_result(c.result_path)
    rig = rig_from_result(res, c.result_path, flame_dir=c.flame_dir)
    pose = [n for n in rig.shape_names if n.startswith("pose_")]
    assert len(pose) == 36  # neck, jaw and both eyes all move in this clip: 4 joints x 9 entries
    from scipy.spatial.transform import Rotation

    k = rig.shape_names.index("pose_jaw_01")
    jaw = Rotation.from_rotvec(res["jaw"].astype(np.float64)).as_matrix()
    assert_close(rig.weights[:, k], jaw[:, 0, 1], atol=1e-6, what="pose_jaw_01 weight = R_jaw[0, 1]")


def test_default_model_has_no_correctives(export_cases):
    c = export_cases["default"]
    rig = rig_from_result(load_result(c.result_path), c.result_path)
    assert rig.joint_names == ("root", "jaw") and not any(n.startswith("pose_") for n in rig.shape_names)


def test_float16_tolerance_covers_rounding():
    x = np.linspace(-1.5, 1.5, 10001)
    err = np.abs(x.astype(np.float16).astype(np.float64) - x)
    assert (err <= float16_tolerance(x.astype(np.float16)) - 1e-4).all()


def test_a_flame_result_stores_its_identity_as_the_neutral_mesh(export_cases):
    """vertices_neutral is the fitted identity at rest (template + shape blend shapes), the
    mesh the joints of joints_rest belong to, not the bare template."""
    from avface.models.flame import load_flame

    case = export_cases["flame"]
    a = load_result(case.result_path).arrays
    model = load_flame(case.flame_dir, n_shape=len(a["shape"]), n_expression=a["expression"].shape[1])
    with_identity = model.neutral_vertices(a["shape"])
    assert np.abs(with_identity - model.arrays.v_template).max() > 1e-4  # the identity is not the template
    assert_close(a["vertices_neutral"], with_identity, atol=1e-6, what="vertices_neutral")
    # joints_rest are regressed from that same mesh
    assert_close(a["joints_rest"], model.arrays.j_regressor @ with_identity.astype(np.float64), atol=1e-5,
                 what="joints_rest")


@pytest.mark.parametrize("case", ["default_lips", "flame"])
def test_unit_weights_keep_every_frame_and_stay_in_zero_one(export_cases, case):
    """Importers clamp shape weights to [0, 1] (Blender's glTF and USD importers do): the
    remapped rig has every weight there and the same mesh at every frame, and its ranges give
    back the original weights."""
    c = export_cases[case]
    rig = rig_from_result(load_result(c.result_path), c.result_path, flame_dir=c.flame_dir)
    assert rig.weights.min() < 0 or rig.weights.max() > 1  # the case needs remapping
    unit = rig.unit_weights()
    assert unit.weights.min() >= 0 and unit.weights.max() <= 1
    frames = np.arange(rig.n_frames)
    assert_close(unit.evaluate(frames), rig.evaluate(frames), atol=1e-6, what="remapped mesh")
    lo, hi = unit.weight_ranges[:, 0], unit.weight_ranges[:, 1]
    assert_close(lo + unit.weights * (hi - lo), rig.weights, atol=1e-5, what="recovered weights")
