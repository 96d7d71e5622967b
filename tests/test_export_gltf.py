"""glTF binary export read back by pygltflib, then evaluated by hand in numpy from what was
read (morph targets, then skinning through the node hierarchy and the inverse bind matrices,
at the animation's keyframes): the mesh matches the result's vertices at three frames."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close
from export_util import export_cases  # noqa: F401 - the session fixture

from avface.export import export_result
from avface.export.rig import float16_tolerance
from avface.result import load_result

pygltflib = pytest.importorskip("pygltflib", reason="pygltflib is a dependency; reinstall with make setup")

COMPONENTS = {5126: np.float32, 5125: np.uint32, 5123: np.uint16, 5121: np.uint8}
WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}


def read_accessor(gltf, blob: bytes, index: int) -> np.ndarray:
    acc = gltf.accessors[index]
    view = gltf.bufferViews[acc.bufferView]
    dtype = np.dtype(COMPONENTS[acc.componentType])
    n = WIDTH[acc.type]
    assert view.byteStride in (None, 0, n * dtype.itemsize), "interleaved buffers are not expected here"
    start = (view.byteOffset or 0) + (acc.byteOffset or 0)
    data = np.frombuffer(blob, dtype, acc.count * n, start)
    return data.reshape(acc.count, n) if n > 1 else data


def quat_matrix(q) -> np.ndarray:
    x, y, z, w = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def evaluate(gltf, blob: bytes, frame: int) -> tuple[np.ndarray, np.ndarray]:
    """(glTF vertex positions (N, 3) at the animation's key `frame`, the face-model vertex id
    of each glTF vertex (N,)), from the file alone."""
    mesh_node = next(i for i, n in enumerate(gltf.nodes) if n.mesh is not None)
    prim = gltf.meshes[gltf.nodes[mesh_node].mesh].primitives[0]
    pos = read_accessor(gltf, blob, prim.attributes.POSITION).astype(np.float64)
    ids = read_accessor(gltf, blob, getattr(prim.attributes, "_AVFACE_VERTEX_ID")).astype(np.int64)
    # animated values at the key frame
    trs = {i: {"translation": np.array(n.translation or [0, 0, 0], float),
               "rotation": np.array(n.rotation or [0, 0, 0, 1], float)} for i, n in enumerate(gltf.nodes)}
    weights = np.zeros(len(prim.targets or []))
    anim = gltf.animations[0]
    for ch in anim.channels:
        s = anim.samplers[ch.sampler]
        times = read_accessor(gltf, blob, s.input)
        out = read_accessor(gltf, blob, s.output)
        assert s.interpolation == "LINEAR" and len(times) > frame
        if ch.target.path == "weights":
            weights = out.reshape(len(times), -1)[frame].astype(np.float64)
        else:
            trs[ch.target.node][ch.target.path] = out[frame].astype(np.float64)
    for b, target in enumerate(prim.targets or []):
        pos = pos + weights[b] * read_accessor(gltf, blob, target["POSITION"])
    # global node matrices through the hierarchy
    parent = {c: i for i, n in enumerate(gltf.nodes) for c in (n.children or [])}
    glob: dict[int, np.ndarray] = {}

    def world(i: int) -> np.ndarray:
        if i not in glob:
            m = np.eye(4)
            m[:3, :3] = quat_matrix(trs[i]["rotation"])
            m[:3, 3] = trs[i]["translation"]
            glob[i] = world(parent[i]) @ m if i in parent else m
        return glob[i]

    skin = gltf.skins[gltf.nodes[mesh_node].skin]
    ibm = read_accessor(gltf, blob, skin.inverseBindMatrices).reshape(-1, 4, 4).transpose(0, 2, 1)  # column-major
    joint_mats = np.stack([world(node) @ ibm[k] for k, node in enumerate(skin.joints)])  # (J, 4, 4)
    out = np.zeros_like(pos)
    s = 0
    while getattr(prim.attributes, f"JOINTS_{s}", None) is not None:
        jo = read_accessor(gltf, blob, getattr(prim.attributes, f"JOINTS_{s}")).astype(np.int64)
        wt = read_accessor(gltf, blob, getattr(prim.attributes, f"WEIGHTS_{s}")).astype(np.float64)
        for c in range(4):
            m = joint_mats[jo[:, c]]  # (N, 4, 4)
            out += wt[:, c, None] * (np.einsum("nab,nb->na", m[:, :3, :3], pos) + m[:, :3, 3])
        s += 1
    return out, ids


@pytest.mark.parametrize("case", ["default", "default_lips", "flame", "flame_lips"])
def test_gltf_morphs_and_skin_reproduce_vertices(export_cases, case, tmp_path):
    c = export_cases[case]
    res = load_result(c.result_path)
    path = export_result(c.result_path, ["gltf"], tmp_path / "head.glb", flame_dir=c.flame_dir)["gltf"]
    gltf = pygltflib.GLTF2().load(str(path))
    blob = gltf.binary_blob()
    fps = res.meta["fps"]
    mesh = gltf.meshes[0]
    names = mesh.extras["targetNames"]
    assert len(names) == len(mesh.primitives[0].targets)
    assert names[:res["expression_basis"].shape[0]][-1] == f"expression_{res['expression_basis'].shape[0] - 1:02d}"
    assert sum(n.startswith("lip_") for n in names) == c.n_lip
    times = read_accessor(gltf, blob, gltf.animations[0].samplers[0].input)
    assert len(times) == res.meta["n_frames"]
    assert_close(times, np.arange(len(times)) / fps, atol=1e-6, what="key times at the clip's rate")
    assert gltf.asset.extras["avface"]["fps"] == fps
    # every face-model vertex is present; UV seams may split some
    prim = mesh.primitives[0]
    ids = read_accessor(gltf, blob, getattr(prim.attributes, "_AVFACE_VERTEX_ID")).astype(np.int64)
    assert set(ids.tolist()) == set(range(res["vertices_neutral"].shape[0]))
    uv = read_accessor(gltf, blob, prim.attributes.TEXCOORD_0)
    assert uv.min() >= 0 and uv.max() <= 1

    for t in c.frames():
        got, ids = evaluate(gltf, blob, int(t))
        assert_close(got, c.world_f32[t][ids], atol=1e-5, rtol=0, what=f"{case} glTF frame {t} vs float32 model")
        stored = res["vertices"][t].astype(np.float64)[ids] @ np.diag([1.0, -1.0, -1.0])  # camera -> world
        err = np.abs(got - stored)
        assert (err <= float16_tolerance(stored)).all(), f"{case} frame {t}: {err.max():.2e} m off the stored vertices"


def test_gltf_references_detail_maps(export_cases, tmp_path):
    c = export_cases["default_lips"]
    path = export_result(c.result_path, ["gltf"], tmp_path)["gltf"]
    assert path.name == "default_lips.glb"  # named after the result's folder
    gltf = pygltflib.GLTF2().load(str(path))
    maps = gltf.asset.extras["avface"]["detail_maps"]
    assert len(maps) == 12 and not gltf.images  # referenced, not inlined
    assert (path.parent / maps[5]).resolve() == (c.result_path.parent / "detail" / "000005.png").resolve()
