"""FLAME behind the FaceModel interface: the loader on FLAME-format pickles written by the
tests (chumpy and scipy sparse included, without chumpy installed), LBS against
hand-computed cases, the landmark-only evaluation, and the errors a user can meet."""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_close
from flame_fixture import EMBEDDED_LANDMARKS, flame_from_ply, read_ply, write_synthetic_flame
from scipy.spatial.transform import Rotation

from avface.errors import ModelFileError
from avface.models.base import FaceParams
from avface.models.flame import (EMBEDDING_FILE, FLAME2020_FILE, FLAME2023_FILE, FLAME_URL, FlameArrays, FlameModel,
    LandmarkEmbedding, cylindrical_uv, flame_status, load_flame, read_flame_pickle)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_flame(tmp_path_factory.mktemp("flame"), seed=0)


@pytest.fixture(scope="module")
def model64(synthetic):
    return load_flame(synthetic.folder, dtype=torch.float64)


def random_params(model, batch, seed=0, dtype=torch.float64, scale=1.0) -> FaceParams:
    g = torch.Generator().manual_seed(seed)
    r = lambda n, s: (torch.randn(batch, n, generator=g, dtype=dtype) * s * scale)  # noqa: E731
    return FaceParams(r(model.n_shape, 1.0), r(model.n_expression, 1.0), r(3, 0.3), r(3, 0.2), r(3, 0.2),
                      r(3, 0.1), r(3, 0.1), r(3, 0.05))


# --------------------------------------------------------------------------------------
# Loader


def test_loader_reads_the_distributed_layout_without_chumpy(synthetic):
    assert "chumpy" not in sys.modules, "the writer's chumpy stub must not outlive the write"
    with open(synthetic.model_path, "rb") as f:
        raw = f.read()
    # the fixture really wrote them, as Python 2 with numpy 1 did
    for name in (b"chumpy.ch", b"scipy.sparse.csc", b"numpy.core.multiarray", b"__builtin__"):
        assert name in raw, name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy 2's numpy.core shim would warn
        a = read_flame_pickle(synthetic.model_path)
    d = synthetic.arrays
    assert_close(a.v_template, d["v_template"], what="v_template")
    assert_close(a.shapedirs, d["shapedirs"], what="shapedirs")
    assert_close(a.posedirs, d["posedirs"], what="posedirs")
    assert_close(a.j_regressor, d["J_regressor"].toarray(), what="J_regressor")
    assert_close(a.weights, d["weights"], what="weights")
    np.testing.assert_array_equal(a.faces, d["f"].astype(np.int64))
    np.testing.assert_array_equal(a.parents, [-1, 0, 1, 1, 1])
    assert a.n_shape_total == 300 and a.n_expression_total == 100
    assert "chumpy" not in sys.modules


def test_loader_reads_chumpy_free_pickles(tmp_path):
    s = write_synthetic_flame(tmp_path, seed=3, with_chumpy=False, legacy_sparse=False, legacy_numpy=False)
    raw = s.model_path.read_bytes()
    assert b"chumpy" not in raw and b"scipy.sparse._csc" in raw
    a = read_flame_pickle(s.model_path)
    assert_close(a.shapedirs, s.arrays["shapedirs"], what="shapedirs")
    assert_close(a.j_regressor, s.arrays["J_regressor"].toarray(), what="J_regressor")


def test_load_flame_exposes_the_interface(synthetic, model64):
    m = model64
    assert m.name == "flame2020"
    assert (m.n_shape, m.n_expression) == (100, 50)
    assert m.n_vertices == len(synthetic.arrays["v_template"])
    np.testing.assert_array_equal(m.landmark_ids, EMBEDDED_LANDMARKS)
    np.testing.assert_array_equal(m.landmark_faces, synthetic.lmk_face_idx)
    assert_close(m.landmark_bary, synthetic.lmk_b_coords, atol=1e-6, what="landmark_bary")
    assert m.faces.dtype == np.int64 and m.faces.shape[1] == 3
    assert m.uv_faces.shape == m.faces.shape and m.uv_faces.max() < len(m.uv)
    assert m.uv.min() >= 0 and m.uv.max() <= 1
    assert m.expression_basis().shape == (50, m.n_vertices, 3)
    assert m.rest_joints().shape == (5, 3)
    # the skeleton the add-on builds bones from
    assert len(m.joint_names) == 5 and m.parents.tolist() == [-1, 0, 1, 1, 1]
    assert m.skin_weights.shape == (m.n_vertices, 5)
    assert_close(m.skin_weights.sum(1), np.ones(m.n_vertices), atol=1e-6, what="skin weight sums")
    # lip vertices: the triangles under the lip landmarks and one ring around them, all on the head
    assert 0 < len(m.lip_vertex_ids) < m.n_vertices / 4
    assert (synthetic.part[m.lip_vertex_ids] == 0).all()


def test_sizes_are_configurable(synthetic):
    m = load_flame(synthetic.folder, n_shape=300, n_expression=100)
    assert (m.n_shape, m.n_expression) == (300, 100)
    m = load_flame(synthetic.folder, n_shape=0, n_expression=10)
    out = m.forward(m.zero_params(2))
    assert out.vertices.shape == (2, m.n_vertices, 3)
    with pytest.raises(ValueError, match="n_shape"):
        load_flame(synthetic.folder, n_shape=301)
    with pytest.raises(ValueError, match="n_expression"):
        load_flame(synthetic.folder, n_expression=101)


def test_flame2023_is_preferred_and_a_file_path_picks_the_file(tmp_path):
    s23 = write_synthetic_flame(tmp_path, seed=1, file_name=FLAME2023_FILE)
    s20 = write_synthetic_flame(tmp_path, seed=2, file_name=FLAME2020_FILE)
    m = load_flame(tmp_path)
    assert m.name == "flame2023"
    assert_close(m.arrays.shapedirs, s23.arrays["shapedirs"], what="shapedirs of flame2023.pkl")
    m = load_flame(tmp_path / FLAME2020_FILE)
    assert m.name == "flame2020"
    assert_close(m.arrays.shapedirs, s20.arrays["shapedirs"], what="shapedirs of generic_model.pkl")


def test_uv_layout_from_the_texture_file(tmp_path, caplog):
    s = write_synthetic_flame(tmp_path, with_uv=True)
    with caplog.at_level(logging.WARNING, logger="avface.models.flame"):
        m = load_flame(tmp_path)
    assert "cylindrical" not in caplog.text
    with np.load(tmp_path / "FLAME_texture.npz") as z:
        assert_close(m.uv, z["vt"], atol=1e-6, what="uv")
        np.testing.assert_array_equal(m.uv_faces, z["ft"])
    assert len(s.arrays["v_template"]) == m.n_vertices


def test_cylindrical_uv_fallback_is_logged_and_has_no_seam_triangles(synthetic, caplog):
    with caplog.at_level(logging.WARNING, logger="avface.models.flame"):
        m = load_flame(synthetic.folder)
    assert "cylindrical projection" in caplog.text
    uv, uvf = cylindrical_uv(synthetic.arrays["v_template"], synthetic.arrays["f"].astype(np.int64))
    assert_close(m.uv, uv, what="uv")
    assert uv.min() >= 0 and uv.max() <= 1
    # away from the cylinder's axis (where the angle is undefined) no triangle spans the map
    v = synthetic.arrays["v_template"]
    centre = (v.min(0) + v.max(0)) / 2
    off_axis = np.hypot(v[:, 0] - centre[0], v[:, 2] - centre[2]) > 0.02
    f = synthetic.arrays["f"].astype(np.int64)
    span = uv[uvf][:, :, 0].max(1) - uv[uvf][:, :, 0].min(1)
    assert span[off_axis[f].all(1)].max() < 0.2, "a triangle spans the whole map: the seam was not cut"
    # the front of the face (+z) is the middle of the map, v grows upwards
    def uv_of(vertex):  # every UV copy of a vertex
        return uv[uvf[f == vertex]]

    front, top = np.argmax(v[:, 2]), np.argmax(v[:, 1])
    assert_close(uv_of(front)[:, 0], np.full(len(uv_of(front)), 0.5), atol=0.05, what="u of the front")
    assert (uv_of(top)[:, 1] > 0.99).all()


# --------------------------------------------------------------------------------------
# Hand-computed skinning


def tiny_model(dtype=torch.float64, posedirs=None) -> tuple[FlameModel, dict]:
    """Five vertices: v0 root, v1 neck, v2 jaw hinge, v3 chin (0.3 neck + 0.7 jaw), v4 on the
    left eye. The regressor puts joints on vertices (the left eye halfway between v0 and v4),
    so shape blend shapes move joints too. One shape and one expression component."""
    v = np.array([[0.0, 0.0, -0.05], [0.0, -0.08, -0.06], [0.0, -0.03, -0.02], [0.0, -0.09, 0.08],
                  [0.03, 0.03, 0.05]])
    shapedirs = np.zeros((5, 3, 2))
    shapedirs[2, 1, 0] = shapedirs[3, 1, 0] = 0.01  # identity: the jaw area up 1 cm per unit
    shapedirs[3, :, 1] = [0.0, -0.005, 0.002]  # expression: the chin down and forward
    jreg = np.zeros((5, 5))
    jreg[0, 0] = jreg[1, 1] = jreg[2, 2] = jreg[4, 0] = 1.0
    jreg[3, [0, 4]] = 0.5
    weights = np.zeros((5, 5))
    weights[0, 0] = weights[1, 1] = weights[2, 2] = weights[4, 3] = 1.0
    weights[3, [1, 2]] = [0.3, 0.7]
    arrays = FlameArrays(v, np.array([[0, 2, 3], [0, 3, 4]]), shapedirs,
                         np.zeros((5, 3, 36)) if posedirs is None else posedirs, jreg,
                         np.array([-1, 0, 1, 1, 1]), weights, n_shape_total=1)
    emb = LandmarkEmbedding(np.array([0, 1]), np.array([[0.2, 0.3, 0.5], [0.1, 0.6, 0.3]]), np.array([13, 33]))
    return FlameModel(arrays, emb, dtype=dtype), dict(v=v, shapedirs=shapedirs, jreg=jreg, weights=weights)


def hand_lbs(v, shapedirs, jreg, weights, posedirs, betas, expr, pose, transl):
    """FLAME's forward pass for one parameter set, written out with scipy's rotations."""
    shaped = v + shapedirs @ np.array([betas, expr])  # (V, 3)
    joints = jreg @ shaped  # rest joints, from the shaped mesh
    rots = [Rotation.from_rotvec(p).as_matrix() for p in pose]
    feature = np.concatenate([(r - np.eye(3)).ravel() for r in rots[1:]])  # (36,)
    shaped = shaped + np.einsum("vkp,p->vk", posedirs, feature)

    def about(j, r):  # rotate about joint j's rest location
        return lambda x: r @ (x - joints[j]) + joints[j]

    g_root = about(0, rots[0])
    g_neck = lambda x: g_root(about(1, rots[1])(x))  # noqa: E731
    g_jaw = lambda x: g_neck(about(2, rots[2])(x))  # noqa: E731
    g_leye = lambda x: g_neck(about(3, rots[3])(x))  # noqa: E731
    g_reye = lambda x: g_neck(about(4, rots[4])(x))  # noqa: E731
    chain = [g_root, g_neck, g_jaw, g_leye, g_reye]
    verts = np.array([sum(weights[i, k] * chain[k](x) for k in range(5)) for i, x in enumerate(shaped)])
    posed_joints = np.array([chain[k](joints[k]) for k in range(5)])
    return verts + transl, posed_joints + transl


def params_for(pose, betas=0.0, expr=0.0, transl=(0, 0, 0)):
    t = lambda a: torch.tensor([a], dtype=torch.float64)  # noqa: E731
    return FaceParams(t([betas]), t([expr]), *(t(list(p)) for p in pose), t(list(transl)))


def test_jaw_rotation_about_the_jaw_joint_matches_hand_computation():
    m, h = tiny_model()
    angle = 0.25
    pose = np.zeros((5, 3))
    pose[2] = [angle, 0, 0]  # open the jaw about x
    out = m.forward(params_for(pose))
    rx = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    hinge = h["v"][2]
    chin = h["v"][3]
    expected_chin = 0.3 * chin + 0.7 * (rx @ (chin - hinge) + hinge)
    assert_close(out.vertices[0, 3], expected_chin, atol=1e-9, what="chin")
    assert_close(out.vertices[0, [0, 1, 2, 4]], h["v"][[0, 1, 2, 4]], atol=1e-9, what="vertices off the jaw")
    assert expected_chin[1] < chin[1]  # a positive x rotation opens the mouth: the chin goes down
    # landmarks are the barycentric combinations of the posed corners
    corners = out.vertices[0, m.faces[m.landmark_faces]]  # (M, 3, 3)
    assert_close(out.landmarks[0], np.einsum("mcx,mc->mx", corners.numpy(), m.landmark_bary), atol=1e-6,
                 what="landmarks")


def test_full_chain_with_shape_expression_and_transl_matches_hand_computation():
    m, h = tiny_model()
    pose = np.array([[0.1, -0.2, 0.05], [0.15, 0.1, -0.1], [0.3, 0.02, 0.0], [0.05, 0.2, 0.0], [0.0, -0.1, 0.0]])
    betas, expr, transl = 1.5, -0.7, (0.01, -0.02, 0.5)
    out = m.forward(params_for(pose, betas, expr, transl))
    verts, joints = hand_lbs(h["v"], h["shapedirs"], h["jreg"], h["weights"], np.zeros((5, 3, 36)),
                             betas, expr, pose, np.array(transl))
    assert_close(out.vertices[0], verts, atol=1e-8, what="vertices")
    assert_close(out.joints[0], joints, atol=1e-8, what="joints")
    sub = m.forward(params_for(pose, betas, expr, transl), full=False)
    assert sub.vertices is None
    assert_close(sub.landmarks, out.landmarks, atol=1e-12, what="landmarks, full=False")


def test_pose_correctives_follow_the_file_layout():
    # (V, 3, 36) as in the file: vertex 3's z grows with element (2, 1) of the jaw's R - I
    # (feature 9 + 7) and vertex 4's x with element (1, 1) of the neck's (feature 4).
    posedirs = np.zeros((5, 3, 36))
    posedirs[3, 2, 9 + 7] = 0.02
    posedirs[4, 0, 4] = 0.01
    m, h = tiny_model(posedirs=posedirs)
    pose = np.zeros((5, 3))
    pose[1] = [0.2, 0, 0]
    pose[2] = [0.3, 0, 0]
    out = m.forward(params_for(pose, transl=(0.0, 0.1, 0.0)))
    verts, joints = hand_lbs(h["v"], h["shapedirs"], h["jreg"], h["weights"], posedirs, 0.0, 0.0, pose,
                             np.array([0.0, 0.1, 0.0]))
    assert_close(out.vertices[0], verts, atol=1e-8, what="vertices with pose correctives")
    without, _ = hand_lbs(h["v"], h["shapedirs"], h["jreg"], h["weights"], np.zeros((5, 3, 36)), 0.0, 0.0,
                          pose, np.array([0.0, 0.1, 0.0]))
    assert np.abs(verts - without)[3].max() > 1e-3, "the corrective case must move the chin"


def test_eye_rotation_moves_only_the_eye():
    m, h = tiny_model()
    pose = np.zeros((5, 3))
    pose[3] = [0.0, 0.4, 0.0]
    out = m.forward(params_for(pose))
    j = 0.5 * (h["v"][0] + h["v"][4])
    expected = Rotation.from_rotvec([0, 0.4, 0]).as_matrix() @ (h["v"][4] - j) + j
    assert_close(out.vertices[0, 4], expected, atol=1e-9, what="eye vertex")
    assert_close(out.vertices[0, :4], h["v"][:4], atol=1e-12, what="the rest")


# --------------------------------------------------------------------------------------
# Landmark-only evaluation, batches, bases


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_landmarks_only_match_the_full_mesh(synthetic, dtype, atol):
    m = load_flame(synthetic.folder, dtype=dtype)
    p = random_params(m, 6, seed=1, dtype=dtype)
    full = m.forward(p)
    sub = m.forward(p, full=False)
    assert sub.vertices is None
    assert len(m.landmark_vertex_ids()) < m.n_vertices / 2
    assert_close(sub.landmarks, full.landmarks, atol=atol, what="landmarks, full=False vs full=True")
    assert_close(sub.joints, full.joints, atol=atol, what="joints")
    assert full.vertices.dtype == dtype and full.landmarks.shape == (6, 105, 3)


def test_a_batch_equals_one_at_a_time(model64):
    p = random_params(model64, 4, seed=2)
    batch = model64.forward(p)
    for i in range(4):
        one = model64.forward(FaceParams(*(getattr(p, f.name)[i:i + 1] for f in dataclasses.fields(p))))
        assert_close(one.vertices[0], batch.vertices[i], atol=1e-12, what=f"vertices of item {i}")
        assert_close(one.landmarks[0], batch.landmarks[i], atol=1e-12, what=f"landmarks of item {i}")


def test_neutral_and_expression_basis_agree_with_forward(model64):
    m = model64
    p = m.zero_params(1, dtype=torch.float64)
    betas = torch.randn(1, m.n_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    p = dataclasses.replace(p, betas=betas)
    neutral = m.forward(p).vertices[0].numpy()
    assert_close(m.neutral_vertices(betas), neutral, atol=1e-6, what="neutral_vertices")
    basis = m.expression_basis()
    for k in (0, 7, m.n_expression - 1):
        e = torch.zeros(1, m.n_expression, dtype=torch.float64)
        e[0, k] = 1.0
        moved = m.forward(dataclasses.replace(p, expression=e)).vertices[0].numpy()
        assert_close(moved - neutral, basis[k], atol=1e-7, what=f"expression basis {k}")


def test_parameter_shapes_are_checked(model64):
    p = model64.zero_params(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="betas"):
        model64.forward(dataclasses.replace(p, betas=torch.zeros(2, 7, dtype=torch.float64)))


def test_gradients_reach_every_parameter_at_the_rest_pose(model64):
    p = model64.zero_params(1, dtype=torch.float64)
    p = FaceParams(*(getattr(p, f.name).clone().requires_grad_(True) for f in dataclasses.fields(p)))
    lmk = model64.forward(p, full=False).landmarks
    target = torch.randn_like(lmk, generator=torch.Generator().manual_seed(0)) * 0.01
    ((lmk - lmk.detach() - target) ** 2).sum().backward()
    for name in ("betas", "expression", "global_orient", "jaw_pose", "transl"):
        g = getattr(p, name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


# --------------------------------------------------------------------------------------
# The real FLAME topology (VOCA's FLAME_sample.ply)


@pytest.fixture(scope="module")
def real_topology(shared_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flame_real")
    built = flame_from_ply(folder, shared_data / "voca" / "FLAME_sample.ply")
    return built, load_flame(folder, dtype=torch.float64)


def test_ply_reader(shared_data):
    v, f = read_ply(shared_data / "voca" / "FLAME_sample.ply")
    assert v.shape == (5023, 3) and f.shape == (9976, 3)
    assert f.min() == 0 and f.max() == 5022


def test_real_topology_model(real_topology):
    built, m = real_topology
    assert (m.n_vertices, len(m.faces)) == (5023, 9976)
    assert np.bincount(built.part).tolist() == [3931, 546, 546]  # head and two eyeballs
    out = m.forward(m.zero_params(1, dtype=torch.float64))
    verts, lmk = out.vertices[0].numpy(), out.landmarks[0].numpy()
    # each landmark lies on its triangle: in its plane and inside it
    tri = verts[m.faces[m.landmark_faces]]  # (M, 3, 3)
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    dist = np.einsum("mx,mx->m", lmk - tri[:, 0], n)
    assert_close(dist, np.zeros(len(dist)), atol=1e-9, what="landmark distance to its triangle's plane")
    assert (m.landmark_bary >= -1e-6).all()
    assert_close(m.landmark_bary.sum(1), np.ones(len(lmk)), atol=1e-6, what="barycentric sums")
    # on the skin of the face (not on the eyeballs), on the front of the head
    assert (built.part[m.faces[m.landmark_faces]] == 0).all()
    assert (lmk[:, 2] > verts[:, 2].mean()).all()
    # lips: a compact region around the lip landmarks
    lip_lmk = lmk[np.isin(m.landmark_ids, [0, 13, 14, 17, 61, 291])]
    lips = verts[m.lip_vertex_ids]
    assert 30 < len(lips) < 600
    assert np.linalg.norm(lips - lip_lmk.mean(0), axis=1).max() < 0.05


def test_real_topology_landmarks_only_and_jaw(real_topology):
    _, m = real_topology
    p = random_params(m, 3, seed=5, scale=0.5)
    full, sub = m.forward(p), m.forward(p, full=False)
    assert_close(sub.landmarks, full.landmarks, atol=1e-12, what="landmarks, full=False vs full=True")
    assert len(m.landmark_vertex_ids()) < 400
    rest = m.zero_params(1, dtype=torch.float64)
    opened = dataclasses.replace(rest, jaw_pose=torch.tensor([[0.3, 0.0, 0.0]], dtype=torch.float64))
    a, b = m.forward(rest).landmarks[0], m.forward(opened).landmarks[0]
    ids = list(m.landmark_ids)
    gap = lambda lmk: float(torch.linalg.norm(lmk[ids.index(13)] - lmk[ids.index(14)]))  # noqa: E731
    assert gap(b) > gap(a) + 0.005, "opening the jaw opens the mouth"
    bridge = float(torch.linalg.norm(b[ids.index(168)] - a[ids.index(168)]))
    assert bridge < 1e-3, "the nose bridge stays (up to the small pose correctives)"


# --------------------------------------------------------------------------------------
# Errors the user can meet


def check_error(excinfo, file_name: str):
    msg = str(excinfo.value)
    assert file_name in msg, msg
    assert FLAME_URL in msg, msg


def test_missing_folder(tmp_path):
    with pytest.raises(ModelFileError) as e:
        load_flame(tmp_path / "nowhere")
    check_error(e, "nowhere")
    assert FLAME2020_FILE in str(e.value) and FLAME2023_FILE in str(e.value)


def test_folder_without_a_model(tmp_path):
    with pytest.raises(ModelFileError) as e:
        load_flame(tmp_path)
    check_error(e, FLAME2020_FILE)
    check_error(e, FLAME2023_FILE)


def test_no_folder_configured():
    with pytest.raises(ModelFileError) as e:
        load_flame(None)
    assert FLAME_URL in str(e.value)


def test_missing_embedding(tmp_path):
    s = write_synthetic_flame(tmp_path)
    s.embedding_path.unlink()
    with pytest.raises(ModelFileError) as e:
        load_flame(tmp_path)
    check_error(e, EMBEDDING_FILE)


def test_garbage_pickle(tmp_path):
    (tmp_path / FLAME2020_FILE).write_bytes(b"this is not a pickle")
    with pytest.raises(ModelFileError) as e:
        load_flame(tmp_path)
    check_error(e, FLAME2020_FILE)
    assert "shapedirs" in str(e.value)  # says what a FLAME file holds


def test_truncated_pickle(tmp_path):
    s = write_synthetic_flame(tmp_path)
    data = s.model_path.read_bytes()
    s.model_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError) as e:
        load_flame(tmp_path)
    check_error(e, FLAME2020_FILE)


@pytest.mark.parametrize("key", ["shapedirs", "J_regressor", "kintree_table", "weights"])
def test_missing_key(tmp_path, key):
    s = write_synthetic_flame(tmp_path)
    d = {k: v for k, v in s.arrays.items() if k != key}
    s.model_path.write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(ModelFileError) as e:
        load_flame(tmp_path)
    check_error(e, FLAME2020_FILE)
    assert key in str(e.value)
    for k in ("v_template", "posedirs", "weights"):  # the expected keys are listed
        assert k in str(e.value)


@pytest.mark.parametrize("key,bad", [("v_template", lambda a: a[:, :2]), ("posedirs", lambda a: a[:, :, :30]),
                                     ("shapedirs", lambda a: a[:, :, :300]), ("weights", lambda a: a[:-1])])
def test_wrong_shapes(tmp_path, key, bad):
    s = write_synthetic_flame(tmp_path)
    d = dict(s.arrays)
    d[key] = bad(d[key])
    s.model_path.write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(ModelFileError) as e:
        load_flame(tmp_path)
    check_error(e, FLAME2020_FILE)
    assert key in str(e.value)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / FLAME2020_FILE).write_bytes(pickle.dumps({"v_template": Evil()}, protocol=2))
    with pytest.raises(ModelFileError) as e:
        load_flame(tmp_path)
    check_error(e, FLAME2020_FILE)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("case", ["missing_key", "garbage", "bad_face_index"])
def test_malformed_embedding(tmp_path, case):
    s = write_synthetic_flame(tmp_path)
    if case == "missing_key":
        np.savez(s.embedding_path, lmk_face_idx=s.lmk_face_idx, lmk_b_coords=s.lmk_b_coords)
    elif case == "garbage":
        s.embedding_path.write_bytes(b"not a zip")
    else:
        np.savez(s.embedding_path, lmk_face_idx=s.lmk_face_idx + 10**6, lmk_b_coords=s.lmk_b_coords,
                 landmark_indices=s.landmark_ids)
    with pytest.raises(ModelFileError) as e:
        load_flame(tmp_path)
    check_error(e, EMBEDDING_FILE)
    if case == "missing_key":
        assert "landmark_indices" in str(e.value)


def test_flame_status(tmp_path, synthetic):
    ok, reason = flame_status(synthetic.folder)
    assert ok and "flame2020" in reason
    ok, reason = flame_status(tmp_path / "nowhere")
    assert not ok and FLAME_URL in reason
    ok, reason = flame_status(None)
    assert not ok and FLAME_URL in reason
    # a file that changes is looked at again
    s = write_synthetic_flame(tmp_path / "changing")
    assert flame_status(s.folder)[0]
    s.embedding_path.write_bytes(b"broken")
    ok, reason = flame_status(s.folder)
    assert not ok and EMBEDDING_FILE in reason


def test_expression_joints_are_how_the_expression_moves_the_rest_joints(model64):
    """The result stores them (``expression_joints``) so that the add-on's bones can follow
    joints that FLAME regresses from the shaped mesh."""
    params = random_params(model64, 3, seed=4)
    params = dataclasses.replace(params, betas=params.betas[:1].expand(3, -1),
                                 global_orient=torch.zeros(3, 3, dtype=torch.float64),
                                 neck_pose=torch.zeros(3, 3, dtype=torch.float64),
                                 transl=torch.zeros(3, 3, dtype=torch.float64))
    joints = model64.forward(params).joints.numpy()  # unposed root and neck: the rest joints of each frame
    rest = model64.rest_joints(params.betas[:1])
    e = model64.expression_joints()
    assert e.shape == (model64.n_expression, 5, 3) and np.abs(e).max() > 0
    want = rest[None] + np.einsum("te,ejk->tjk", params.expression.numpy(), e)
    # with no global or neck rotation and no transl, the root and the neck sit where they rest
    assert_close(joints[:, :2], want[:, :2], atol=1e-6, what="rest joints of each frame")
