"""The embedded default model: MediaPipe's canonical face mesh read from face_landmarker.task,
its topology, UVs, landmark embedding, jaw skinning, and the error when the task file is bad."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import assert_close

from avface.core import assets
from avface.core.topology import (CHIN, LEFT_EYE, LIPS_LOWER_INNER, LIPS_LOWER_OUTER, LIPS_UPPER_INNER,
    LIPS_UPPER_OUTER, NOSE_BRIDGE, RIGHT_EYE)
from avface.errors import ModelFileError
from avface.models import canonical
from avface.models.base import FaceParams
from avface.models.canonical import CanonicalModel

#: MediaPipe's FACEMESH_FACE_OVAL, the outline of the face mask.
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
             148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
FOREHEAD, CHIN_TIP, UPPER_LIP_INNER, LOWER_LIP_INNER = 10, 152, 13, 14


@pytest.fixture(scope="module")
def model():
    return CanonicalModel()


def with_jaw(params: FaceParams, angle: float) -> FaceParams:
    jaw = torch.zeros_like(params.jaw_pose)
    jaw[:, 0] = angle
    return dataclasses.replace(params, jaw_pose=jaw)


def test_topology(model):
    assert model.name == "mediapipe_canonical"
    assert model.n_vertices == 468 and model.faces.shape == (898, 3)
    assert model.faces.min() == 0 and model.faces.max() == 467
    assert len(np.unique(model.faces)) == 468, "every vertex is used"
    assert (model.n_shape, model.n_expression) == (0, 0)


def test_uvs(model):
    assert model.uv.shape == (468, 2) and model.uv_faces.shape == (898, 3)
    assert model.uv.min() >= 0 and model.uv.max() <= 1
    assert model.uv[FOREHEAD, 1] > model.uv[CHIN_TIP, 1], "v runs up: forehead above chin"
    # the UV layout is a frontal projection: u grows with x, v with y
    v = model.mesh.vertices
    assert np.corrcoef(model.uv[:, 0], v[:, 0])[0, 1] > 0.95
    assert np.corrcoef(model.uv[:, 1], v[:, 1])[0, 1] > 0.95


def test_faces_are_counter_clockwise_from_the_front(model):
    v = model.mesh.vertices
    tri = v[model.faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert (normals[:, 2] > 0).mean() > 0.9


def test_the_mesh_is_a_manifold_face_mask(model):
    f = model.faces
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    unique, count = np.unique(edges, axis=0, return_counts=True)
    assert count.max() <= 2, "an edge is shared by more than two triangles"
    boundary = set(np.unique(unique[count == 1]).tolist())
    # the open border is the face outline, and at most the eye and inner-lip contours
    assert set(FACE_OVAL) <= boundary
    assert boundary <= set(FACE_OVAL) | set(LEFT_EYE) | set(RIGHT_EYE) | set(LIPS_UPPER_INNER) | set(LIPS_LOWER_INNER)


def test_landmark_embedding_is_the_identity(model):
    np.testing.assert_array_equal(model.landmark_ids, np.arange(468))
    corners = model.faces[model.landmark_faces]  # (468, 3)
    picked = corners[np.arange(468), np.argmax(model.landmark_bary, axis=1)]
    np.testing.assert_array_equal(picked, np.arange(468))
    assert_close(model.landmark_bary.sum(1), np.ones(468), what="barycentric sums")
    out = model.forward(model.zero_params(2))
    assert_close(out.landmarks, out.vertices, atol=1e-7, what="landmarks vs vertices")
    assert_close(out.vertices[0], model.mesh.vertices, atol=1e-7, what="rest pose vs the mesh")


def test_jaw_weights(model):
    w = model.weights_jaw
    assert w.shape == (468,) and w.min() >= 0 and w.max() <= 1
    assert_close(w[list(CHIN + LIPS_LOWER_OUTER + LIPS_LOWER_INNER)], np.ones(len(CHIN) + 18), what="jaw weight below")
    above = list(set(LIPS_UPPER_OUTER + LIPS_UPPER_INNER + NOSE_BRIDGE) - set(LIPS_LOWER_OUTER + LIPS_LOWER_INNER))
    assert_close(w[above], np.zeros(len(above)), what="jaw weight above")


def test_skeleton(model):
    assert len(model.joint_names) == len(model.parents) == 2 and model.parents[0] == -1
    assert model.skin_weights.shape == (468, 2)
    assert_close(model.skin_weights.sum(1), np.ones(468), atol=1e-6, what="skin weight sums")
    assert_close(model.skin_weights[:, 1], model.weights_jaw, what="jaw column")
    joints = model.rest_joints()
    assert joints.shape == (2, 3)
    # the jaw hinge is behind and below the eyes, above the chin
    v = model.mesh.vertices
    assert v[CHIN_TIP, 1] < joints[1, 1] < v[33, 1] and joints[1, 2] < v[CHIN_TIP, 2]


def test_opening_the_jaw_opens_the_mouth_and_keeps_the_forehead(model):
    p = model.zero_params(1)
    rest = model.forward(p).vertices[0]
    gaps = []
    for angle in (0.0, 0.1, 0.2, 0.3):
        v = model.forward(with_jaw(p, angle)).vertices[0]
        gaps.append(float(torch.linalg.norm(v[UPPER_LIP_INNER] - v[LOWER_LIP_INNER])))
        assert_close(v[[FOREHEAD, 168, 33, 263]], rest[[FOREHEAD, 168, 33, 263]], atol=1e-7, what="upper face")
    assert all(b > a + 1e-3 for a, b in zip(gaps, gaps[1:])), gaps
    assert float(model.forward(with_jaw(p, 0.3)).vertices[0, CHIN_TIP, 1]) < float(rest[CHIN_TIP, 1])


def test_pose_and_expression_basis(model):
    rng = np.random.default_rng(0)
    basis = rng.normal(0, 0.001, (4, 468, 3)).astype(np.float32)
    m = CanonicalModel(basis=basis)
    assert m.n_expression == 4
    assert_close(m.expression_basis(), basis, what="expression basis")
    p = m.zero_params(3)
    e = torch.tensor(rng.normal(0, 1, (3, 4)), dtype=torch.float32)
    t = torch.tensor([[0.0, 0.0, 0.5]] * 3)
    out = m.forward(dataclasses.replace(p, expression=e, transl=t))
    expected = m.neutral_vertices()[None] + np.einsum("be,evk->bvk", e.numpy(), basis) + t.numpy()[:, None]
    assert_close(out.vertices, expected, atol=1e-6, what="vertices")
    sub = m.forward(dataclasses.replace(p, expression=e, transl=t), full=False)
    assert_close(sub.landmarks, out.landmarks, atol=1e-7, what="landmarks, full=False")
    with pytest.raises(ValueError):
        CanonicalModel(basis=np.zeros((2, 100, 3)))


@pytest.fixture()
def fresh_caches():
    """The asset path and the mesh are cached; clear them around a test that changes the
    environment so that neither the bad file nor a stale good one leaks between tests."""
    assets.locate.cache_clear()
    canonical.load_canonical_mesh.cache_clear()
    yield
    assets.locate.cache_clear()
    canonical.load_canonical_mesh.cache_clear()


def test_a_corrupt_task_file_raises_model_file_error(tmp_path, monkeypatch, fresh_caches):
    bad = tmp_path / "face_landmarker.task"
    bad.write_bytes(b"not a zip at all")
    monkeypatch.setenv(assets.FACE_LANDMARKER.env_var, str(bad))
    with pytest.raises(ModelFileError) as e:
        CanonicalModel()
    assert "face_landmarker.task" in str(e.value) and assets.FACE_LANDMARKER.env_var in str(e.value)


def test_an_absent_task_file_raises_model_file_error(tmp_path, monkeypatch, fresh_caches):
    monkeypatch.setenv(assets.FACE_LANDMARKER.env_var, str(tmp_path / "missing.task"))
    with pytest.raises(ModelFileError) as e:
        CanonicalModel()
    assert "missing.task" in str(e.value)
