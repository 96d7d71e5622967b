"""The result contract: a round trip through write/load, and the errors a bad file gets."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_close

from avface.errors import SchemaError
from avface.result import SCHEMA_VERSION, load_result, validate, write_result


def _arrays(t=5, v=7, e=3, k=2, l=4, j=2):  # noqa: E741 (L, the contract's symbol)
    rng = np.random.default_rng(0)
    return {
        "vertices_neutral": rng.normal(size=(v, 3)).astype(np.float32),
        "faces": np.array([[0, 1, 2], [2, 3, 4], [4, 5, 6]], np.int32),
        "uv": rng.uniform(size=(v, 2)).astype(np.float32),
        "uv_faces": np.array([[0, 1, 2], [2, 3, 4], [4, 5, 6]], np.int32),
        "shape": np.zeros(0, np.float32),
        "expression_basis": rng.normal(size=(e, v, 3)).astype(np.float32),
        "expression": rng.normal(size=(t, e)).astype(np.float32),
        "global_rot": rng.normal(size=(t, 3)).astype(np.float32),
        "transl": rng.normal(size=(t, 3)).astype(np.float32),
        "neck": np.zeros((t, 3), np.float32),
        "jaw": rng.normal(size=(t, 3)).astype(np.float32),
        "eyes": np.zeros((t, 6), np.float32),
        "joint_names": np.array(["root", "jaw"][:j]),
        "joint_parents": np.array([-1, 0][:j], np.int32),
        "joints_rest": np.zeros((j, 3), np.float32),
        "skin_weights": np.full((v, j), 1.0 / j, np.float32),
        "intrinsics": np.eye(3, dtype=np.float32),
        "extrinsics": np.tile(np.eye(4, dtype=np.float32), (t, 1, 1)),
        "lip_vertex_ids": np.arange(l, dtype=np.int32),
        "lip_basis": rng.normal(size=(k, l, 3)).astype(np.float32),
        "lip_coeffs": rng.normal(size=(t, k)).astype(np.float32),
        "arkit_names": np.array([f"n{i}" for i in range(52)]),
        "arkit": rng.uniform(size=(t, 52)).astype(np.float32),
        "visual_conf": np.ones(t, np.float32),
        "occluded": np.zeros(t, bool),
        "speech_activity": np.zeros(t, np.float32),
        "vertices": rng.normal(size=(t, v, 3)).astype(np.float16),
    }


def _meta(t=5):
    return {"schema_version": SCHEMA_VERSION, "model": "mediapipe_canonical", "fps": 25.0, "n_frames": t,
            "width": 64, "height": 48, "source": {"path": "x.mp4", "frame_start": 0, "frame_end": t},
            "audio_present": False, "stages_run": ["tracking"], "stage_seconds": {"tracking": 1.0},
            "backend_version": "0", "lip_pca_residual": 0.0, "detail": {"n_maps": 0}}


def test_round_trip(tmp_path):
    arrays, meta = _arrays(), _meta()
    path = write_result(tmp_path / "r" / "result.npz", arrays, meta)
    res = load_result(path)
    assert res.meta["n_frames"] == 5 and res.meta["conventions"]["units"].startswith("metres")
    for k, v in arrays.items():
        assert res[k].dtype == v.dtype, k
        if v.dtype.kind in "fiu":
            assert_close(res[k], v, what=k)
        else:
            assert (res[k] == v).all(), k
    # any numpy reads it without pickles
    with np.load(path, allow_pickle=False) as z:
        assert json.loads(str(z["meta"]))["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("mutate, message", [
    (lambda a, m: a.pop("expression"), "lacks arrays"),
    (lambda a, m: a.__setitem__("expression", np.zeros((4, 3), np.float32)), "axis 0"),
    (lambda a, m: a.__setitem__("arkit", np.full((5, 52), 1.5, np.float32)), "[0, 1]"),
    (lambda a, m: a.__setitem__("faces", np.array([[0, 1, 2], [2, 3, 4], [4, 5, 99]], np.int32)), "faces index"),
    (lambda a, m: a.__setitem__("transl", np.full((5, 3), np.nan, np.float32)), "NaN"),
    (lambda a, m: m.__setitem__("schema_version", 99), "schema_version 99"),
    (lambda a, m: m.__setitem__("model", "bfm"), "meta.model"),
    (lambda a, m: m.pop("fps"), "meta lacks"),
    (lambda a, m: a.update(lip_basis=np.zeros((17, 4, 3), np.float32), lip_coeffs=np.zeros((5, 17), np.float32)),
     "at most 16"),
    (lambda a, m: a.update(pose_correctives=np.zeros((36, 7, 3), np.float32)), "2 joints need 9 x 1"),
])
def test_bad_results_are_refused(tmp_path, mutate, message):
    arrays, meta = _arrays(), _meta()
    mutate(arrays, meta)
    with pytest.raises(SchemaError, match=message.replace("[", r"\[").replace("]", r"\]")):
        write_result(tmp_path / "result.npz", arrays, meta)


def test_unreadable_files(tmp_path):
    bad = tmp_path / "result.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(SchemaError, match="not a readable AVFace result"):
        validate(bad)
    with pytest.raises(SchemaError, match="does not exist"):
        validate(tmp_path / "missing.npz")
