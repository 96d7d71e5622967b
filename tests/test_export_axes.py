"""The shared axis conversion: world -> Blender and camera -> world."""
import numpy as np

from avface.export import axes


def test_world_to_blender_maps_up_and_towards_viewer():
    # world y (up) becomes Blender z (up); world +z (towards the viewer) becomes Blender -y.
    np.testing.assert_allclose(axes.world_to_blender([0.0, 1.0, 0.0]), [0.0, 0.0, 1.0])
    np.testing.assert_allclose(axes.world_to_blender([0.0, 0.0, 1.0]), [0.0, -1.0, 0.0])
    np.testing.assert_allclose(axes.world_to_blender([1.0, 0.0, 0.0]), [1.0, 0.0, 0.0])


def test_world_to_blender_is_a_proper_rotation():
    m = axes.WORLD_TO_BLENDER
    np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(m), 1.0)


def test_rotvec_conjugates_rotation():
    from scipy.spatial.transform import Rotation
    rng = np.random.default_rng(0)
    rv = rng.normal(size=(5, 3)) * 0.5
    m = axes.WORLD_TO_BLENDER
    expected = m @ Rotation.from_rotvec(rv).as_matrix() @ m.T
    got = Rotation.from_rotvec(axes.rotvec_world_to_blender(rv)).as_matrix()
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_camera_to_world_inverts_extrinsics():
    from scipy.spatial.transform import Rotation
    rng = np.random.default_rng(1)
    world = rng.normal(size=(3, 7, 3))
    ext = np.tile(np.eye(4), (3, 1, 1))
    ext[:, :3, :3] = Rotation.from_rotvec(rng.normal(size=(3, 3))).as_matrix()
    ext[:, :3, 3] = rng.normal(size=(3, 3))
    cam = np.einsum("tij,tnj->tni", ext[:, :3, :3], world) + ext[:, None, :3, 3]
    np.testing.assert_allclose(axes.camera_to_world(cam, ext), world, atol=1e-12)
    np.testing.assert_allclose(axes.camera_to_blender(cam, ext), axes.world_to_blender(world), atol=1e-12)


def test_shape_errors_name_the_shape():
    import pytest
    with pytest.raises(ValueError, match=r"\(T, N, 3\)"):
        axes.camera_to_world(np.zeros((4, 3)), np.zeros((4, 4, 4)))


def test_camera_pose_is_the_gl_camera_that_sees_what_the_extrinsic_sees():
    from scipy.spatial.transform import Rotation
    # the contract's camera: at the origin, looking down world -z, y up
    np.testing.assert_allclose(axes.camera_pose(np.diag([1.0, -1.0, -1.0, 1.0])), np.eye(4), atol=1e-15)
    rng = np.random.default_rng(2)
    ext = np.eye(4)
    ext[:3, :3] = Rotation.from_rotvec(rng.normal(size=3)).as_matrix()
    ext[:3, 3] = rng.normal(size=3)
    pose = axes.camera_pose(ext)
    world = rng.normal(size=(5, 3))
    cv = world @ ext[:3, :3].T + ext[:3, 3]  # OpenCV camera frame
    local = (world - pose[:3, 3]) @ pose[:3, :3]  # the GL camera's own frame
    np.testing.assert_allclose(local, cv * [1.0, -1.0, -1.0], atol=1e-12)  # same point, -z forward, y up
    assert abs(np.linalg.det(pose[:3, :3]) - 1.0) < 1e-12  # a proper rotation: readers need one
