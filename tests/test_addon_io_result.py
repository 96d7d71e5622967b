"""The add-on's pure layer (no bpy): reading a result into arrays for Blender's bulk calls,
and ARKit name matching for retargeting."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from addon_util import addon_module, damaged_copy, demo_clip, flame_like_result, flame_result, real_result, rich_result  # noqa: F401 (fixtures)
from conftest import assert_close

io_result = addon_module("io_result")
arkit_match = addon_module("arkit_match")


def test_vendored_axes_is_the_backend_file():
    from avface.export import axes

    vendored = addon_module("_vendor.axes")
    assert np.array_equal(vendored.WORLD_TO_BLENDER, axes.WORLD_TO_BLENDER)
    assert open(vendored.__file__).read() == open(axes.__file__).read()


def test_vendored_kinematics_is_the_backend_file():
    from avface.export import kinematics

    vendored = addon_module("_vendor.kinematics")
    assert open(vendored.__file__).read() == open(kinematics.__file__).read()


@pytest.mark.slow  # reconstructs a clip first
def test_real_result_arrays(real_result):
    head = io_result.read_result(real_result)
    z = np.load(real_result)
    t, v = z["expression"].shape[0], z["vertices_neutral"].shape[0]
    f = len(z["faces"])
    assert head.n_frames == t and head.vertices_neutral.shape == (v, 3)
    assert head.uv_loops.shape == (f * 3 * 2,)
    # corner c of face i has uv[uv_faces[i, c]]
    assert_close(head.uv_loops.reshape(f, 3, 2)[5, 1], z["uv"][z["uv_faces"][5, 1]], what="uv of a corner")
    e = z["expression_basis"].shape[0]
    assert head.n_expression == e and head.n_lip == 0
    assert head.shape_key_names[:2] == ("expression_00", "expression_01")
    assert np.abs(head.shape_key_values).max() <= 1.0 + 1e-6
    # key offset x key value == basis x coefficient, so the scaling changes nothing
    assert_close(head.shape_key_offsets[:, 10] * head.shape_key_values[7][:, None],
                 z["expression_basis"][:, 10] * z["expression"][7][:, None], atol=1e-7, what="scaled keys")
    assert head.joint_names == ("root", "jaw")
    assert head.bone_quaternions.shape == (t, 2, 4)
    assert_close(np.linalg.norm(head.bone_quaternions, axis=-1), np.ones((t, 2)), atol=1e-6, what="unit quaternions")
    assert head.arkit.shape == (t, 52) and head.arkit_names == arkit_match.ARKIT_NAMES
    assert set(head.confidence) == {"avface_visual_conf", "avface_occluded", "avface_speech_activity"}
    # the fine stage is on by default: one map per frame, read as the Displace modifier will
    assert head.detail is not None and len(head.detail.files) == t and head.detail.metres_per_unit > 0
    # the model frame goes into Blender by the one conversion in avface.export.axes
    from avface.export import axes

    assert_close(head.object_matrix[:3, :3], axes.WORLD_TO_BLENDER, what="object matrix")
    expected = io_result.expected_blender_vertices(head, [0])
    assert_close(expected[0], axes.camera_to_blender(z["vertices"][:1].astype(np.float64), z["extrinsics"][:1])[0],
                 what="expected vertices")


def test_quaternions_match_axis_angle():
    rotvec = np.array([[0.0, 0.0, 0.0], [0.3, -0.2, 0.1], [np.pi, 0.0, 0.0]])
    q = io_result.axis_angle_to_quaternion(rotvec)
    assert_close(q[0], [1, 0, 0, 0], what="identity")
    angle = np.linalg.norm(rotvec[1])
    assert_close(q[1], [np.cos(angle / 2), *(np.sin(angle / 2) * rotvec[1] / angle)], atol=1e-12, what="rotation")
    flipped = io_result.continuous_quaternions(np.array([[1.0, 0, 0, 0], [-0.99, -0.1, 0, 0]]))
    assert flipped[1, 0] > 0


@pytest.mark.slow  # reconstructs a clip first
def test_lip_basis_and_detail(rich_result):
    head = io_result.read_result(rich_result)
    z = np.load(rich_result)
    k = z["lip_basis"].shape[0]
    assert head.n_lip == k and head.shape_key_names[-k:] == tuple(f"lip_{i:02d}" for i in range(k))
    lips = z["lip_vertex_ids"]
    off = head.shape_key_offsets[head.n_expression:]
    others = np.setdiff1d(np.arange(len(z["vertices_neutral"])), lips)
    assert np.all(off[:, others] == 0)
    assert_close(off[:, lips] * head.shape_key_values[4, head.n_expression:, None, None],
                 z["lip_basis"] * z["lip_coeffs"][4][:, None, None], atol=1e-8, what="lip keys")
    assert head.detail is not None and len(head.detail.files) == head.n_frames
    assert head.detail.metres_per_unit > 0


def test_scene_frames_and_keyframe_co():
    frames = io_result.scene_frames(4, fps=25.0, scene_fps=50.0, first_frame=10, source_frame_start=2)
    assert_close(frames, [14, 16, 18, 20], what="frames")
    co = io_result.keyframe_co(frames, np.array([0.1, 0.2, 0.3, 0.4]))
    assert co.dtype == np.float32 and list(co[:4]) == pytest.approx([14, 0.1, 16, 0.2])


def test_retime_picks_the_picture_nearest_in_time():
    # the video's own rate from a whole frame: Blender's one picture per frame is already right
    assert io_result.retime(10.0, fps=25.0, scene_fps=25.0, n_pictures=30) is None
    # 25 fps shown at 30 fps: 30 pictures span 35 scene frames, some shown twice
    r = io_result.retime(10.0, fps=25.0, scene_fps=30.0, n_pictures=30)
    assert r.scene[0] == 10 and r.scene[-1] == 10 + 35 and np.all(np.diff(r.scene) == 1)
    time = (r.scene - 10.0) * 25.0 / 30.0
    assert np.abs(r.index - time).max() <= 0.5 + 1e-9
    assert set(r.index.tolist()) == set(range(30)) and np.all(np.diff(r.index) >= 0)
    # 30 fps shown at 24 fps from a fractional start: every picture nearest in time, some skipped
    r = io_result.retime(3.4, fps=30.0, scene_fps=24.0, n_pictures=60)
    time = (r.scene - 3.4) * 30.0 / 24.0
    assert r.scene[0] == 3 and r.index[0] == 0  # before picture 0's time: held at 0
    inside = (time >= 0) & (time <= 59)
    assert np.abs(r.index[inside] - time[inside]).max() <= 0.5 + 1e-9
    assert r.index.max() == 59 and len(set(r.index.tolist())) < 60
    # the same rate from half a frame off: shifted by one, not left half a frame late
    r = io_result.retime(4.5, fps=25.0, scene_fps=25.0, n_pictures=5)
    assert r.scene.tolist() == [4, 5, 6, 7, 8, 9] and r.index.tolist() == [0, 1, 2, 3, 4, 4]
    # NTSC as Blender holds it (30 / float32(1.001)) against the video's 30000 / 1001: the same
    assert io_result.retime(1.0, fps=30000 / 1001, scene_fps=30 / float(np.float32(1.001)), n_pictures=10 ** 5) is None
    # only the pictures of a span: the scene frames around them, the same pictures as the whole
    whole = io_result.retime(0.0, fps=30.0, scene_fps=24.0, n_pictures=1000)
    part = io_result.retime(0.0, fps=30.0, scene_fps=24.0, n_pictures=1000, span=(100, 160))
    assert part.scene[0] == 80 and part.scene[-1] == 128
    assert np.array_equal(part.index, whole.index[np.isin(whole.scene, part.scene)])
    with pytest.raises(ValueError, match="positive"):
        io_result.retime(0.0, fps=0.0, scene_fps=24.0, n_pictures=3)


@pytest.mark.slow  # reconstructs a clip first
def test_unreadable_results_are_refused_with_a_reason(real_result, tmp_path):
    with pytest.raises(io_result.ResultError, match="does not exist"):
        io_result.read_result(tmp_path / "missing.npz")
    with pytest.raises(io_result.ResultError, match="not a readable AVFace result"):
        io_result.read_result(damaged_copy(real_result, tmp_path / "cut"))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(io_result.ResultError, match="no meta record"):
        io_result.read_result(tmp_path / "other.npz")


@pytest.mark.parametrize("name, expected", [
    ("eyeBlinkLeft", "eyeBlinkLeft"), ("eyeBlink_L", "eyeBlinkLeft"), ("EyeBlinkLeft", "eyeBlinkLeft"),
    ("eye_blink_left", "eyeBlinkLeft"), ("eyeBlink.R", "eyeBlinkRight"), ("EyeClosedLeft", "eyeBlinkLeft"),
    ("JAWOPEN", "jawOpen"), ("mouthSmile_R", "mouthSmileRight"), ("MouthCornerPullLeft", "mouthSmileLeft"),
    ("Basis", None), ("myCustomKey", None),
])
def test_arkit_names_match_ignoring_case_separators_and_aliases(name, expected):
    assert arkit_match.arkit_name(name) == expected


def test_match_names_reports_unmatched():
    matched, unmatched = arkit_match.match_names(["Basis", "eyeBlink_L", "EyeClosedRight", "jawOpen", "smirk"])
    assert matched == {"eyeBlink_L": "eyeBlinkLeft", "EyeClosedRight": "eyeBlinkRight", "jawOpen": "jawOpen"}
    assert unmatched == ["Basis", "smirk"]


def test_arkit_names_are_the_backends():
    from avface.result import arkit_names
    from avface.stages.assemble.arkit import ARKIT_NAMES

    assert arkit_match.ARKIT_NAMES == tuple(ARKIT_NAMES)
    vendored = addon_module("_vendor.result.arkit_names")
    assert open(vendored.__file__).read() == open(arkit_names.__file__).read()


def test_the_addon_vendors_the_result_package_byte_for_byte():
    import avface.errors
    import avface.result

    source = Path(avface.result.__file__).parent
    vendored = Path(addon_module("_vendor.result").__file__).parent
    names = sorted(p.name for p in source.glob("*.py"))
    assert {"__init__.py", "contract.py", "detail_maps.py", "arkit_names.py"} <= set(names)
    assert sorted(p.name for p in vendored.glob("*.py")) == names
    for name in names:
        assert (vendored / name).read_bytes() == (source / name).read_bytes(), name
    errors = Path(addon_module("_vendor.errors").__file__)
    assert errors.read_bytes() == Path(avface.errors.__file__).read_bytes()


def test_corrective_driver_expressions_are_rotation_minus_identity():
    from scipy.spatial.transform import Rotation

    rotvec = np.array([0.3, -0.5, 0.2])
    w, x, y, z = io_result.axis_angle_to_quaternion(rotvec)
    got = np.array([[eval(e, {}, {"w": w, "x": x, "y": y, "z": z}) for e in row]  # noqa: S307 (our own constants)
                    for row in io_result.ROTATION_MINUS_IDENTITY])
    assert_close(got, Rotation.from_rotvec(rotvec).as_matrix() - np.eye(3), atol=1e-12, what="(R - I) from w, x, y, z")


def test_flame_correctives_are_read_per_joint_entry(flame_like_result):
    head = io_result.read_result(flame_like_result)
    z = np.load(flame_like_result)
    assert len(head.correctives) == 36
    jaw_12 = next(c for c in head.correctives if c.name == "pose_jaw_12")
    # jaw is joint 2, so its entries start at 9 * (2 - 1)
    assert_close(jaw_12.offsets, z["pose_correctives"][9 + 3 * 1 + 2], what="jaw (1, 2) corrective")


def _blender_pose(head, frames) -> np.ndarray:
    """(n, V, 3) the head as Blender poses it, in numpy: shape keys and correctives on the
    neutral mesh, then bones with heads at ``joints_rest`` and the model's axes as rest axes,
    whose pose matrix is parent pose x rest offset x location x rotation, skinned by the
    vertex groups, then the armature object's matrix. Written from Blender's bone convention,
    not from ``kinematics``, so that it checks the location keys that module computes."""
    rest = head.joints_rest.astype(np.float64)
    parents = head.joint_parents
    out = []
    for t in frames:
        # mesh[v] = neutral[v] + sum_k value[t, k] * offset[k, v]
        mesh = head.vertices_neutral + np.einsum("k,kvc->vc", head.shape_key_values[t].astype(np.float64),
                                                 head.shape_key_offsets.astype(np.float64))
        rot = io_result.quaternion_matrices(head.bone_quaternions[t].astype(np.float64))  # (J, 3, 3)
        for corr in head.correctives:
            j = head.joint_names.index(corr.joint)
            mesh = mesh + (rot[j] - np.eye(3))[corr.row, corr.col] * corr.offsets
        pose = []
        for j in range(len(rest)):
            basis = np.eye(4)
            basis[:3, :3] = rot[j]
            basis[:3, 3] = head.bone_locations[t, j]
            offset = np.eye(4)
            offset[:3, 3] = rest[j] - (rest[parents[j]] if parents[j] >= 0 else 0.0)
            pose.append((pose[parents[j]] if parents[j] >= 0 else np.eye(4)) @ offset @ basis)
        # skin[v] = sum_j w[v, j] * pose_j (mesh[v] - rest_j)
        skin = sum(head.skin_weights[:, j, None] * ((mesh - rest[j]) @ pose[j][:3, :3].T + pose[j][:3, 3])
                   for j in range(len(rest)))
        out.append(skin @ head.object_matrix[:3, :3].T)
    return np.stack(out)


def test_flame_bones_follow_the_expression_and_reproduce_the_vertices(flame_result):
    """FLAME regresses its joints from the shaped mesh: the bones' location keys carry that
    motion, so the posed head matches the result's vertices (float16) and the model's own
    float32 mesh, at three frames."""
    from export_util import WORLD_F32

    from avface.export import axes

    head = io_result.read_result(flame_result)
    assert head.located_joints == tuple(range(5)), "every FLAME bone needs location keys"
    assert head.bone_locations.shape == (head.n_frames, 5, 3)
    # the joints do move: a few tenths of a millimetre or more, which skinning turns into more
    assert np.abs(head.bone_locations[:, 1:]).max() > 1e-4
    frames = [0, 5, 9]
    got = _blender_pose(head, frames)
    want = io_result.expected_blender_vertices(head, frames)
    stored = np.abs(head.vertices[frames]).astype(np.float16)
    assert_close(got, want, atol=float(np.spacing(stored).max()) + 1e-4, rtol=0, what="posed head vs vertices")
    world_f32 = axes.world_to_blender(np.load(flame_result.parent / WORLD_F32)[frames].astype(np.float64))
    assert_close(got, world_f32, atol=1e-6, rtol=0, what="posed head vs the model's float32 mesh")


@pytest.mark.slow  # reconstructs a clip first
def test_fixed_joints_key_only_the_root_location(real_result, flame_like_result):
    """The default model (and a FLAME-like result without ``expression_joints``) keeps its
    joints at rest: only the root bone is located, at ``transl``."""
    for path in (real_result, flame_like_result):
        head = io_result.read_result(path)
        z = np.load(path)
        assert "expression_joints" not in z.files
        assert head.located_joints == (0,)
        assert_close(head.bone_locations[:, 0], z["transl"], atol=1e-7, rtol=0, what="root location")
        assert_close(head.bone_locations[:, 1:], np.zeros_like(head.bone_locations[:, 1:]), atol=1e-7, rtol=0,
                     what="other bones' locations")
    assert_close(_blender_pose(head, [3]), io_result.expected_blender_vertices(head, [3]), atol=1e-5, rtol=0,
                 what="FLAME-like head")


def test_expression_joints_of_the_wrong_shape_are_refused(flame_result, tmp_path):
    z = dict(np.load(flame_result))
    z["expression_joints"] = z["expression_joints"][:, :4]
    np.savez(tmp_path / "result.npz", **z)
    with pytest.raises(io_result.ResultError, match="expression_joints"):
        io_result.read_result(tmp_path / "result.npz")


def test_camera_settings_of_the_pipelines_camera():
    """A centred 40-degree camera of the pipeline: a 49.46 mm lens on a 36 mm sensor, no shift,
    and a Blender camera at the origin that looks along +y (the world's -z) with z up."""
    from avface.core.geometry import intrinsics_for
    from avface.stages.assemble.run import _extrinsic

    cam = io_result.camera_settings(intrinsics_for(256, 256, 40.0), 256, 256, _extrinsic())
    assert cam.lens_mm == pytest.approx(18.0 / np.tan(np.radians(20.0)), rel=1e-6)
    assert cam.shift_x == pytest.approx(0.0) and cam.shift_y == pytest.approx(0.0) and cam.square_pixels
    m = cam.matrix_world
    assert_close(m[:3, 3], np.zeros(3), what="camera position")
    assert_close(m[:3, :3] @ [0, 0, -1], [0, 1, 0], what="viewing direction")  # Blender cameras look down local -z
    assert_close(m[:3, :3] @ [0, 1, 0], [0, 0, 1], what="camera up")
    # a wide frame: the focal length in pixels sets the lens against the frame's width
    wide = io_result.camera_settings(intrinsics_for(320, 180, 40.0), 320, 180, _extrinsic())
    assert wide.lens_mm == pytest.approx(90.0 / np.tan(np.radians(20.0)) * 36.0 / 320.0, rel=1e-6)


def test_camera_shift_follows_the_principal_point():
    """Blender shifts the view window in frame widths: the optical axis 32 px left of the
    centre of a 320 px frame is a window shifted right by 0.1, and the axis 16 px below the
    centre (rows go down) a window shifted up by 0.05. Real Blender checks the signs
    (tests/blender/bl_addon.py::camera_match)."""
    k = np.array([[400.0, 0, 160 - 32], [0, 400.0, 90 + 16], [0, 0, 1]])
    cam = io_result.camera_settings(k, 320, 180, np.eye(4))
    assert cam.shift_x == pytest.approx(0.1) and cam.shift_y == pytest.approx(0.05)
    assert not io_result.camera_settings(np.diag([400.0, 380.0, 1.0]), 320, 180, np.eye(4)).square_pixels
    with pytest.raises(ValueError, match="pinhole"):
        io_result.camera_settings(np.zeros((3, 3)), 320, 180, np.eye(4))


@pytest.mark.slow  # reconstructs a clip first
def test_real_result_has_its_camera(real_result):
    """The camera read from a reconstruction is the one its meta records."""
    head = io_result.read_result(real_result)
    fov = np.radians(head.meta["camera"]["fov_deg"])
    width, height = head.meta["width"], head.meta["height"]
    assert head.camera is not None and (head.camera.width, head.camera.height) == (width, height)
    # vertical fov -> horizontal focal length in mm on the 36 mm sensor
    f_px = height / 2.0 / np.tan(fov / 2.0)
    assert head.camera.lens_mm == pytest.approx(f_px * 36.0 / width, rel=1e-3)
    assert head.video_path is not None and head.video_path.is_file()
