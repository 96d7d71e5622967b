"""The ICT Face Model Light's whole head through the add-on, in real Blenders (bpy 5.0.1 and
4.2 LTS): a real `avface reconstruct --model ict` of the synthetic demo clip, imported,
retargeted and sent through an FBX round trip, in one Blender session per version
(tests/blender/bl_ict.py); the tests below each judge one part of that session's report."""
from __future__ import annotations

import time

import numpy as np
import pytest
from addon_util import demo_clip  # noqa: F401 (fixture)
from blender_harness import BPY_VENVS, BPY_VERSIONS, Blender, staged_addon  # noqa: F401 (fixture)

pytestmark = [pytest.mark.blender, pytest.mark.slow]

N_VERTICES = 26_719
MATERIALS = ("skin", "mouth", "teeth", "sclera", "iris", "eye_wet", "lashes")
FRAMES = [0, 14, 29]
VERTEX_TOLERANCE_M = 1e-4
KEY_TOLERANCE = 1e-4
LIP_COMPONENTS = 3


def _rotation(rotvec: np.ndarray) -> np.ndarray:
    """(..., 3) axis-angle -> (..., 3, 3) rotation matrices (Rodrigues)."""
    rotvec = np.asarray(rotvec, np.float64)
    angle = np.linalg.norm(rotvec, axis=-1)[..., None, None]
    k = rotvec / np.maximum(angle[..., 0], 1e-12)
    kx = np.zeros(rotvec.shape[:-1] + (3, 3))
    kx[..., 0, 1], kx[..., 0, 2], kx[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    kx = kx - np.swapaxes(kx, -1, -2)
    return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx


def _camera_vertices(a: dict) -> np.ndarray:
    """(T, V, 3) float64 the result's posed vertices in the camera frame, made from its arrays by
    the backend's own skinning (``avface.models.lbs``): expression and lip offsets, then the
    head's and the eyes' rotations, then ``transl``."""
    import torch

    from avface.models.lbs import lbs

    t = len(a["expression"])
    shaped = a["vertices_neutral"][None] + np.einsum("te,evk->tvk", a["expression"], a["expression_basis"])
    shaped[:, a["lip_vertex_ids"]] += np.einsum("tk,klc->tlc", a["lip_coeffs"], a["lip_basis"])
    pose = np.stack([a["global_rot"], a["eyes"][:, :3], a["eyes"][:, 3:]], 1)
    world, _ = lbs(torch.as_tensor(shaped.astype(np.float32)), torch.as_tensor(pose), None,
                   torch.as_tensor(a["joint_parents"].astype(np.int64)), torch.as_tensor(a["skin_weights"]),
                   joints=torch.as_tensor(a["joints_rest"]).expand(t, -1, -1))
    world = world.numpy().astype(np.float64) + a["transl"][:, None]
    ext = a["extrinsics"].astype(np.float64)
    return np.einsum("tij,tvj->tvi", ext[:, :3, :3], world) + ext[:, None, :3, 3]


@pytest.fixture(scope="module")
def ict_results(tmp_path_factory, demo_clip):  # noqa: F811 (the imported fixture)
    """Results of the ICT model on the demo clip, the eyes given a gaze (the fit leaves them at
    zero) and ``vertices`` made again for it by the backend's own skinning, in float32: with
    its detail maps (``full``), the same head without them (``head_only``: what a job imports
    first), and without maps but with a small lip basis (``lips``); and the vertices to follow."""
    import shutil

    from avface.pipeline import ReconstructOptions, reconstruct
    from avface.result import load_result, write_result

    source = reconstruct(demo_clip.video_path, tmp_path_factory.mktemp("ict-source"), ReconstructOptions(model="ict"))
    res = load_result(source)
    a = dict(res.arrays)
    meta = {k: v for k, v in res.meta.items() if k != "conventions"}
    assert meta["model"] == "ict_face_light" and meta["detail"]["n_maps"] == meta["n_frames"], meta["detail"]
    t = int(meta["n_frames"])
    assert t > max(FRAMES), t
    s = np.arange(t, dtype=np.float32)
    # left and right look differently, so that a swapped side shows
    # the backend's own vertices are this skinning's, to float16's rounding
    stored = a["vertices"].astype(np.float64)
    f16 = 0.5 * float(np.spacing(np.abs(stored).max().astype(np.float16)))
    assert np.abs(_camera_vertices(a) - stored).max() <= f16 + 1e-6
    a["eyes"] = np.stack([0.12 * np.sin(0.2 * s), 0.2 * np.sin(0.13 * s + 0.5), 0 * s,
                          -0.08 * np.sin(0.17 * s), 0.15 * np.cos(0.11 * s), 0 * s], 1).astype(np.float32)
    a["vertices"] = _camera_vertices(a).astype(np.float32)

    full_dir = tmp_path_factory.mktemp("ict-full")
    shutil.copytree(source.parent / meta["detail"]["folder"], full_dir / meta["detail"]["folder"])
    full = write_result(full_dir / "result.npz", a, meta)
    head_only = write_result(tmp_path_factory.mktemp("ict-head") / "result.npz", a, {**meta, "detail": None})
    rng = np.random.default_rng(0)
    lips = dict(a)
    lips["lip_basis"] = (rng.standard_normal((LIP_COMPONENTS, len(a["lip_vertex_ids"]), 3)) * 1e-3).astype(np.float32)
    lips["lip_coeffs"] = np.sin(s[:, None] * 0.3 + np.arange(LIP_COMPONENTS)).astype(np.float32)
    lips["vertices"] = _camera_vertices(lips).astype(np.float32)
    with_lips = write_result(tmp_path_factory.mktemp("ict-lips") / "result.npz", lips, {**meta, "detail": None})

    names = list(a["material_names"])
    fm = a["face_material"]
    teeth = np.unique(a["faces"][fm == names.index("teeth")])
    # an upper tooth: the teeth vertex that the expression shapes move least
    tooth = int(teeth[np.argmin(np.abs(a["expression_basis"][:, teeth]).max(axis=(0, 2)))])
    template = a["vertices_template"]
    eyes = []
    for j in (1, 2):  # the front-most vertex of each eyeball
        ids = np.flatnonzero(a["skin_weights"][:, j] == 1.0)
        eyes.append(int(ids[np.argmax(template[ids, 2])]))
    return {"full": full, "head_only": head_only, "lips": with_lips, "arrays": a, "vertex_ids": [tooth, *eyes]}


@pytest.fixture(scope="module", params=BPY_VERSIONS, ids=lambda v: f"bpy-{v}")
def ict_run(request, staged_addon, tmp_path_factory):  # noqa: F811 (the imported fixture)
    """The report of one Blender session (tests/blender/bl_ict.py::ict_head) on the ICT result."""
    version = request.param
    python = BPY_VENVS / version / "bin" / "python"
    if not python.exists():
        pytest.skip(f"Blender {version} (bpy=={version}) is not installed in {python.parent.parent}: "
                    f"run `make blender-venvs`")
    ict_results = request.getfixturevalue("ict_results")  # (not reconstructed for a missing Blender)
    work = tmp_path_factory.mktemp(f"ict-bpy-{version}")
    blender = Blender(version, python, staged_addon, work)
    t0 = time.perf_counter()
    report = blender.run("bl_ict.py", "ict_head", result=str(ict_results["full"]),
                         head_only=str(ict_results["head_only"]), lips=str(ict_results["lips"]), frames=FRAMES,
                         fbx_path=str(work / "ict.fbx"),
                         vertex_ids=ict_results["vertex_ids"])
    report["session_s"] = time.perf_counter() - t0
    print(f"Blender {version}: import {report['import_s']:.2f} s, FBX export {report['export_s']:.1f} s, "
          f"FBX import {report['fbx_import_s']:.1f} s, the whole session {report['session_s']:.1f} s")
    return report


def test_the_whole_head_with_a_material_per_part(ict_run, ict_results):
    a = ict_results["arrays"]
    assert ict_run["n_vertices"] == N_VERTICES == len(a["vertices_neutral"])
    assert tuple(a["material_names"]) == MATERIALS
    assert ict_run["material_names"] == [f"AVFace {m}" for m in MATERIALS]
    assert ict_run["material_counts"] == np.bincount(a["face_material"], minlength=len(MATERIALS)).tolist()
    mats = {m["part"]: m for m in ict_run["materials"].values()}
    assert set(mats) == set(MATERIALS)
    # the see-through wet layer over the eye is transparent, dithered in EEVEE; everything else opaque
    assert mats["eye_wet"]["alpha"] == 0.0
    assert mats["eye_wet"]["render_method"] == "DITHERED" and mats["eye_wet"]["transparent_shadow"]
    assert all(m["alpha"] == 1.0 for part, m in mats.items() if part != "eye_wet")
    luminance = {part: float(np.dot(m["color"], [0.2126, 0.7152, 0.0722])) for part, m in mats.items()}
    assert luminance["sclera"] > luminance["skin"] > luminance["iris"] > luminance["lashes"]
    assert luminance["teeth"] > luminance["mouth"] and mats["mouth"]["color"][0] > 2 * mats["mouth"]["color"][1]
    # the import is bulk calls: well under a few seconds for 26,719 vertices x 54 keys
    assert ict_run["import_s"] < 20, ict_run["import_s"]


def test_skin_group_limits_the_detail_maps(ict_run, ict_results):
    a = ict_results["arrays"]
    skin = np.unique(a["faces"][a["face_material"] == 0])
    assert ict_run["groups"] == ["root", "eye_left", "eye_right", "skin"]
    assert ict_run["skin_members"] == skin.tolist()
    # weight 1 where the maps (the UV square) cover the skin; the UV tiles beyond read nothing
    uv = a["uv"][a["uv_faces"]]
    outside = np.zeros(len(a["vertices_neutral"]), bool)
    outside[a["faces"][((uv < 0) | (uv > 1)).any(-1)]] = True
    full = skin[~outside[skin]]
    assert ict_run["skin_full"] == full.tolist() and len(full) > 5000
    assert ict_run["detail_vertex_group"] == "skin"
    displaced = np.asarray(ict_run["displaced"])
    assert len(displaced) > 1000 and ict_run["max_displacement_m"] > 0
    assert np.isin(displaced, full).all(), "the detail maps moved vertices off the skin (eyes, teeth, lashes...)"


def test_arkit_named_keys_on_the_template_with_the_identity(ict_run, ict_results):
    a = ict_results["arrays"]
    names = [str(n) for n in a["expression_names"]]
    assert len(names) == 53 and "eyeBlinkLeft" in names and "browInnerUpLeft" in names and "cheekPuffRight" in names
    # then the lip offsets' keys (the lips stage adds what the shapes leave of the tracker's lips)
    lips = [f"lip_{k:02d}" for k in range(a["lip_basis"].shape[0])]
    assert ict_run["keys"] == ["Basis", "identity", *names, *lips]
    assert ict_run["identity"] == {"value": 1.0, "animated": False}
    assert ict_run["basis_is_template"] == 0.0
    for t, err in zip(FRAMES, ict_run["key_error"]):
        assert err < KEY_TOLERANCE, f"frame {t}: a key's value is {err:.3g} off the result's weight"
    # the posed head is the result's (float32 vertices made by the backend's skinning)
    for t, err in zip(FRAMES, ict_run["vertex_error_m"]):
        assert err < VERTEX_TOLERANCE_M, f"frame {t}: vertices {err:.3g} m off the result's"
    assert ict_run["animated_properties"] == 52 + 3


def test_lip_offsets_are_keys_after_the_arkit_shapes(ict_run, ict_results):
    names = [str(n) for n in ict_results["arrays"]["expression_names"]]
    lips = ict_run["lips"]
    assert lips["keys"] == ["Basis", "identity", *names, *(f"lip_{k:02d}" for k in range(LIP_COMPONENTS))]
    for t, err in zip(FRAMES, lips["vertex_error_m"]):
        assert err < VERTEX_TOLERANCE_M, f"frame {t}: with lip offsets, vertices {err:.3g} m off the result's"
    assert lips["lip_motion_m"] > 1e-4, "the lip keys move nothing"


def test_root_and_eye_bones(ict_run):
    assert ict_run["bones"] == {"root": None, "eye_left": "root", "eye_right": "root"}
    assert ict_run["bone_key_error"] < 1e-6


def test_retarget_to_an_arkit_rig_is_one_to_one(ict_run):
    assert ict_run["retarget"] == {"matched": 52, "unmatched": [], "identity": True}
    assert ict_run["retarget_error"] < 1e-6  # each curve is its key (a split pair's mean)
    assert ict_run["tongue_out_max"] == 0.0


def test_head_first_then_its_maps_on_the_skin(ict_run):
    first = ict_run["head_first"]
    assert first["before"] == {"modifiers": ["ARMATURE"], "materials": 7}
    assert first["added"] is True
    assert first["modifiers"] == ["ARMATURE", "DISPLACE"] and first["materials"] == 7
    assert first["vertex_group"] == "skin"
    assert first["skin_nodes"] == ["AVFace detail", "AVFace detail UV", "AVFace detail displacement"]
    assert first["same_displacement_m"] < 1e-7, "the maps attached later displace otherwise than a one-step import"


def _head_pose_positions(a: dict, vertex_ids, frames) -> np.ndarray:
    """(frames, vertices, 3) Blender-world positions of a tooth and the eyeballs' vertices from
    the result's head pose: the shaped rest vertex turned by the eye (eyeballs) about its
    joint, by global_rot about the root joint, moved by transl."""
    from avface.export import axes

    out = np.zeros((len(frames), len(vertex_ids), 3))
    rest = a["joints_rest"].astype(np.float64)
    for i, t in enumerate(frames):
        r_root = _rotation(a["global_rot"][t])
        for k, v in enumerate(vertex_ids):
            p = a["vertices_neutral"][v].astype(np.float64) + a["expression"][t] @ a["expression_basis"][:, v]
            j = int(np.argmax(a["skin_weights"][v]))
            if j > 0:  # an eyeball: its eye's rotation about the eye's centre, carried by the root
                p = _rotation(a["eyes"][t, 3 * (j - 1): 3 * j]) @ (p - rest[j]) + rest[j]
            out[i, k] = r_root @ (p - rest[0]) + rest[0] + a["transl"][t]
    return axes.world_to_blender(out)


def test_fbx_round_trip_keeps_arkit_morph_targets_and_the_rig(ict_run, ict_results):
    a = ict_results["arrays"]
    names = [str(n) for n in a["expression_names"]]
    fbx = ict_run["fbx"]
    assert fbx["n_vertices"] == N_VERTICES
    lips = [f"lip_{k:02d}" for k in range(a["lip_basis"].shape[0])]
    assert fbx["keys"][1:] == ["identity", *names, *lips], fbx["keys"]
    assert fbx["identity_values"] == pytest.approx([1.0] * len(FRAMES), abs=KEY_TOLERANCE)
    for t, err in zip(FRAMES, fbx["key_error"]):
        assert err < KEY_TOLERANCE, f"frame {t}: an FBX morph target is {err:.3g} off the result's weight"
    assert fbx["bones"] == ["eye_left", "eye_right", "root"]
    assert sorted(fbx["materials"]) == sorted(f"AVFace {m}" for m in MATERIALS)
    # a tooth and both eyeballs follow the head (and the eyes their gaze), in the import and the FBX
    want = _head_pose_positions(a, ict_results["vertex_ids"], FRAMES)
    motion = np.linalg.norm(want[-1] - want[0], axis=-1)
    assert (motion > 2e-3).all(), f"the head barely moves between the frames checked: {motion}"
    for what, got in (("the import", ict_run["head_positions"]), ("the FBX", fbx["positions"])):
        err = np.linalg.norm(np.asarray(got) - want, axis=-1)
        assert err.max() < VERTEX_TOLERANCE_M, f"{what}: tooth/eyeball vertices off the head pose by {err.max():.3g} m"
