"""The ICT Face Model Light: the shipped file and its check, the landmark embedding, the
model's maths, the fit's bounded weights and the ARKit curves that are those weights."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from avface.errors import ModelFileError
from avface.models import ict
from avface.models.base import FaceParams


@pytest.fixture(scope="module")
def model():
    return ict.load_ict()


def test_a_damaged_or_missing_model_file_is_named(tmp_path):
    folder = tmp_path / "ict"
    shutil.copytree(ict.DATA_DIR, folder)
    path = folder / ict.MODEL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="damaged: SHA-256") as e:
        ict.read_ict_arrays(folder)
    assert str(path) in str(e.value) and "git checkout" in str(e.value)
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(ModelFileError, match="damaged: .* bytes"):
        ict.read_ict_arrays(folder)
    path.unlink()
    with pytest.raises(ModelFileError, match="missing"):
        ict.read_ict_arrays(folder)


def test_the_shipped_file_is_the_upstream_one_with_its_notice():
    assert ict.check_model_file(ict.DATA_DIR / ict.MODEL_FILE)
    notice = (ict.DATA_DIR / "LICENSE").read_text()
    assert "USC Institute for Creative Technologies" in notice and "MIT" in (ict.DATA_DIR / "SOURCES.md").read_text()


def test_the_embedding_script_rebuilds_the_shipped_embedding(tmp_path, model):
    import subprocess
    import sys

    out = tmp_path / "emb.npz"
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "scripts" / "build_ict_embedding.py"), "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert '"distance_to_skin_mm"' in run.stdout
    built, shipped = np.load(out), np.load(ict.DATA_DIR / ict.EMBEDDING_FILE)
    v, f = model.arrays.neutral.astype(np.float64), model.faces

    def points(z):
        return np.einsum("mk,mkc->mc", z["bary"], v[f[z["face_idx"]]])

    assert np.abs(points(built) - points(shipped)).max() < 1e-6  # metres
    assert np.array_equal(built["landmark_ids"], np.arange(468))


def test_the_embedding_puts_the_anatomical_anchors_on_icts_own(model):
    """The lip and eye corners, the lips' midline, the nose tip and the chin land within 2 mm
    of the vertices ICT marks for the same Multi-PIE landmarks."""
    from avface.models.ict_embedding import FIRM_ANCHORS, MULTIPIE_TO_MEDIAPIPE

    with torch.no_grad():
        lmk = model.forward(model.zero_params(1), full=False).landmarks[0].numpy()
    for pie in FIRM_ANCHORS:
        mp = MULTIPIE_TO_MEDIAPIPE[pie]
        err = np.linalg.norm(lmk[list(model.landmark_ids).index(mp)] - model.arrays.neutral[model.arrays.landmark68[pie]])
        assert err < 0.002, (pie, mp, err)


def test_units_parts_and_materials(model):
    v = model.arrays.neutral
    assert model.n_vertices == 26719 and model.n_expression == 53 and model.n_shape == 100
    assert 0.08 < np.linalg.norm(v[1507] - v[3721]) < 0.1  # outer eye corners: an adult's 9 cm, in metres
    material, names = model.face_materials
    assert names == ict.MATERIALS and len(material) == len(model.faces)
    counts = {n: int((material == i).sum()) for i, n in enumerate(names)}
    assert all(c > 0 for c in counts.values()), counts
    # the teeth's triangles are the teeth's material, the face's the skin's
    assert (material[model.vertex_parts[model.faces].max(1) == 6] == names.index("teeth")).all()
    assert counts["lashes"] == 2 * 540 * 2  # 2 x 540 quads, 2 triangles each
    # each eye: a clear shell over an eyeball whose front is the iris
    eyeball = model.vertex_parts[model.faces].max(1) == [p[0] for p in ict.PARTS].index("eyeball_left")
    iris = material == names.index("iris")
    assert iris[eyeball].any() and (iris & eyeball).sum() < 0.5 * eyeball.sum()  # 498 of 1596: the front is dense
    front = model.arrays.neutral[model.faces[iris & eyeball]].mean(1)[:, 2]
    assert front.min() > model.rest_joints()[1, 2] + 0.008  # the iris faces forward


def test_landmarks_only_match_the_full_mesh_and_the_joints_do_their_parts(model):
    g = torch.Generator().manual_seed(0)
    p = model.zero_params(3)
    p = FaceParams(torch.randn(3, 100, generator=g), torch.rand(3, 53, generator=g), 0.2 * torch.randn(3, 3, generator=g),
                   p.neck_pose, p.jaw_pose, 0.3 * torch.randn(3, 3, generator=g), 0.3 * torch.randn(3, 3, generator=g),
                   torch.randn(3, 3, generator=g))
    with torch.no_grad():
        full = model.forward(p)
        sub = model.forward(p, full=False)
    assert torch.allclose(full.landmarks, sub.landmarks, atol=1e-6)
    # the eyes turn about their centres and move nothing else
    base = model.zero_params(1)
    turned = FaceParams(base.betas, base.expression, base.global_orient, base.neck_pose, base.jaw_pose,
                        torch.tensor([[0.0, 0.4, 0.0]]), base.reye_pose, base.transl)
    with torch.no_grad():
        d = (model.forward(turned).vertices - model.forward(base).vertices)[0].norm(dim=1).numpy()
    left = np.zeros(model.n_vertices, bool)
    left[slice(*ict._part_range("eye_shell_left"))] = True
    left[slice(*ict._part_range("eyeball_left"))] = True
    assert d[left].max() > 0.003 and d[~left].max() == 0.0
    centre = model.rest_joints()[1]
    r0 = np.linalg.norm(model.arrays.neutral[left] - centre, axis=1)
    with torch.no_grad():
        r1 = np.linalg.norm(model.forward(turned).vertices[0].numpy()[left] - centre, axis=1)
    assert np.abs(r1 - r0).max() < 1e-6
    # jawOpen moves the lower teeth and the chin, not the upper teeth
    jaw = model.expression_names.index("jawOpen")
    e = torch.zeros(1, 53)
    e[0, jaw] = 1.0
    opened = FaceParams(base.betas, e, *(getattr(base, f) for f in ("global_orient", "neck_pose", "jaw_pose",
                                                                      "leye_pose", "reye_pose", "transl")))
    with torch.no_grad():
        d = (model.forward(opened).vertices - model.forward(base).vertices)[0].norm(dim=1).numpy()
    lower_incisor, upper_incisor = 20263, 18067
    assert d[lower_incisor] > 0.01 and d[upper_incisor] < 1e-4


def test_the_neutral_correction_moves_the_landmarks_by_the_offsets(model):
    rng = np.random.default_rng(0)
    # a smooth offset: a small shear of the face, as an identity the modes miss would be
    k = model.n_mesh_landmarks  # the face mesh's; the irises, beyond, stay on the eyes
    with torch.no_grad():
        rest = model.forward(model.zero_params(1), full=False).landmarks[0].numpy()
    offsets = 0.003 * np.stack([rest[:k, 1] / 0.1, np.zeros(k), rest[:k, 0] / 0.1], 1)
    corrected = model.with_landmark_offsets(offsets)
    with torch.no_grad():
        moved = corrected.forward(corrected.zero_params(1), full=False).landmarks[0].numpy()
    # each iris moves with its eye's lids, as a whole eye
    from avface.core.topology import RIGHT_EYE

    lids = [list(model.landmark_ids).index(i) for i in RIGHT_EYE]
    np.testing.assert_allclose(moved[k] - rest[k], offsets[lids].mean(0), atol=1e-6)  # 468: the right iris
    err = np.linalg.norm(moved[:k] - rest[:k] - offsets, axis=1)
    assert np.median(err) < 2e-4 and err.max() < 1e-3, (np.median(err), err.max())
    # the gums and teeth stay; the eyes move without changing shape
    off = corrected.neutral_offset
    assert np.abs(off[14062:21451]).max() == 0.0
    eyeball = off[slice(*ict._part_range("eyeball_left"))]
    assert np.abs(eyeball - eyeball[0]).max() < 1e-7 and np.abs(eyeball[0]).max() > 1e-4
    assert rng is not None


def test_arkit_curves_are_the_weights_under_apples_names():
    from avface.result.arkit_names import ARKIT_NAMES, apple_spelling
    from avface.stages.assemble.arkit import arkit_from_weights

    names = [apple_spelling(n) for n in ict.read_ict_arrays().expression_names]
    assert "eyeBlinkLeft" in names and "browInnerUpLeft" in names and "cheekPuffRight" in names
    w = np.random.default_rng(1).random((4, 53))
    curves = arkit_from_weights(w, names)
    assert curves.shape == (4, 52)
    for k, name in enumerate(ARKIT_NAMES):
        if name in ("browInnerUp", "cheekPuff"):
            want = 0.5 * (w[:, names.index(name + "Left")] + w[:, names.index(name + "Right")])
        elif name == "tongueOut":
            want = np.zeros(4)
        else:
            want = w[:, names.index(name)]
        np.testing.assert_allclose(curves[:, k], want, atol=1e-6, err_msg=name)


def test_the_linear_start_recovers_known_weights_within_bounds(model):
    """Landmarks of the model itself, posed with a known identity, weights and head pose, as
    a talking face moves (the mouth busy, closed now and then; blinks and frowns now and
    then): the fit's start finds the weights within their bounds, and the pose."""
    from scipy.spatial.transform import Rotation

    from avface.config import FitConfig
    from avface.core.topology import RIGID
    from avface.stages.fit import _linear_start

    rng = np.random.default_rng(2)
    n = 40
    names = model.expression_names
    true = np.zeros((n, 53))
    for name in ("jawOpen", "mouthSmile_L", "mouthSmile_R", "mouthPucker"):
        true[:, names.index(name)] = np.clip(rng.random(n) - 0.3, 0, 1)
    for name in ("eyeBlink_L", "browDown_R"):
        true[rng.random(n) < 0.2, names.index(name)] = 0.8
    true[:4] = 0.0  # a few frames at rest, closed mouth
    betas = 0.5 * rng.standard_normal(100)
    rot = Rotation.from_rotvec(0.2 * rng.standard_normal((n, 3)))
    p = model.zero_params(n)
    p = FaceParams(torch.as_tensor(np.tile(betas, (n, 1)), dtype=torch.float32), torch.as_tensor(true, dtype=torch.float32),
                   p.global_orient, p.neck_pose, p.jaw_pose, p.leye_pose, p.reye_pose, p.transl)
    with torch.no_grad():
        local = model.forward(p, full=False).landmarks.numpy().astype(np.float64)
    mesh = model.landmark_ids < 468
    points = np.einsum("tij,tmj->tmi", rot.as_matrix(), local[:, mesh]) + np.array([0.0, 0.0, -0.5])
    w = np.where(np.isin(model.landmark_ids[mesh], RIGID), 1.0, 0.1)
    fitted, r, t, b, e, net_expr = _linear_start(model, points, w, np.ones(n), FitConfig(shape_adaptation=0.0))
    assert net_expr is None
    assert e.min() >= 0.0 and e.max() <= 1.0
    err = np.abs(e - true)
    # measured 0.12 at most (mouthPucker against mouthFunnel), 0.01 on average
    assert err.max() < 0.15 and err.mean() < 0.02, (err.max(), err.mean())
    assert err[:, names.index("jawOpen")].max() < 0.05
    # the head pose, up to the half-degree by which a rest shape and every pose can turn
    # together (the clip's identity correction absorbs it)
    angle = np.linalg.norm((rot * Rotation.from_matrix(r).inv()).as_rotvec(), axis=1)
    assert np.degrees(angle).max() < 1.0


@pytest.mark.slow
def test_reconstruct_with_the_ict_model_writes_a_whole_head_whose_curves_are_its_weights(tmp_path):
    """End to end on a synthetic clip: the result validates, its ARKit curves are its weights,
    and posing the stored identity with the stored weights reproduces the stored mesh."""
    from avface.config import ReconstructOptions
    from avface.core.geometry import WORLD_TO_CAMERA
    from avface.pipeline import reconstruct
    from avface.result import load_result
    from avface.result.arkit_names import ARKIT_NAMES
    from avface.synth import make_demo_clip

    clip = make_demo_clip(tmp_path / "clip", seed=3, duration_s=1.5, size=256)
    out = reconstruct(clip.video_path, tmp_path / "out", ReconstructOptions(model="ict", detail=False, cache_dir=str(tmp_path)))
    res = load_result(out)
    a, meta = res.arrays, res.meta
    assert meta["model"] == "ict_face_light" and "fitted weights" in meta["arkit_source"]
    assert a["vertices"].shape[1] == 26719 and a["expression"].shape[1] == 53
    assert a["expression"].min() >= 0 and a["expression"].max() <= 1
    names = list(a["expression_names"])
    jaw = ARKIT_NAMES.index("jawOpen")
    np.testing.assert_allclose(a["arkit"][:, jaw], a["expression"][:, names.index("jawOpen")], atol=1e-6)
    assert set(a["material_names"]) >= {"skin", "teeth", "iris"}
    # the geometry: neutral + weights . shapes, rotated about the root, translated; checked
    # on every vertex the root carries but the lips (their offsets come on top, as the
    # contract says) and the eyeballs (the eye joints turn them)
    from scipy.spatial.transform import Rotation

    rest = a["vertices_neutral"][None] + np.einsum("te,evc->tvc", a["expression"], a["expression_basis"])
    rot = Rotation.from_rotvec(a["global_rot"]).as_matrix()
    j0 = a["joints_rest"][0]
    skull = np.setdiff1d(np.flatnonzero(a["skin_weights"][:, 0] == 1.0), a["lip_vertex_ids"])
    world = np.einsum("tij,tvj->tvi", rot, rest[:, skull] - j0) + j0 + a["transl"][:, None]
    cam = world @ WORLD_TO_CAMERA.T
    err = np.linalg.norm(cam - a["vertices"][:, skull].astype(np.float64), axis=2)
    assert err.max() < 5e-4, err.max()


@pytest.fixture(scope="module")
def gaze_clip(model):
    """Tracking made from the model itself, posed with a known gaze that sweeps left, right,
    up and down, the jaw moving and the head turning; and its fit."""
    from scipy.spatial.transform import Rotation

    from avface.core.geometry import intrinsics_for
    from avface.stages.fit import FitConfig, fit_model
    from test_fit import FOV, H, W, synthetic_tracking

    n = 30
    s = np.linspace(0, 2 * np.pi, n)
    gaze = np.stack([0.15 * np.sin(s), 0.25 * np.cos(2 * s)], 1)  # pitch, yaw (radians)
    names = model.expression_names
    expr = np.zeros((n, 53))
    expr[:, names.index("jawOpen")] = 0.15 * (1 + np.sin(3 * s))
    expr[:4] = 0.0
    p = model.zero_params(n)
    eye = torch.as_tensor(np.c_[gaze, np.zeros(n)], dtype=torch.float32)
    rot = torch.as_tensor(Rotation.from_euler("y", 0.2 * np.sin(s)[:, None]).as_rotvec(), dtype=torch.float32)
    p = FaceParams(p.betas, torch.as_tensor(expr, dtype=torch.float32), rot, p.neck_pose, p.jaw_pose, eye, eye,
                   torch.tensor([[0.0, 0.0, -0.45]]).expand(n, 3))
    with torch.no_grad():
        lmk = model.forward(p, full=False).landmarks.numpy().astype(np.float64)
    ids = list(model.landmark_ids)
    world = np.zeros((n, 478, 3))
    world[:, :468] = lmk[:, :468]
    for i in (468, 473):  # the iris centres, and their rings at the centre (unused)
        world[:, i:i + 5] = lmk[:, [ids.index(i)]]
    k = intrinsics_for(W, H, FOV)
    tr = synthetic_tracking(world, k)
    return gaze, tr, fit_model(model, tr, FitConfig(fov_deg=FOV, iterations=60))


def test_the_fit_turns_the_eyes_to_the_irises(gaze_clip):
    """The fit's eye rotations follow the gaze (to 2 degrees), the weights stay within their
    bounds, and the landmarks are reproduced."""
    from avface.stages.fit import fit_metrics

    gaze, tr, fit = gaze_clip
    got = np.stack([fit.params.leye_pose.numpy()[:, :2], fit.params.reye_pose.numpy()[:, :2]], 1)
    err = np.degrees(np.abs(got - gaze[:, None])).max()
    assert err < 2.0, err
    e = fit.params.expression.numpy()
    assert e.min() >= 0.0 and e.max() <= 1.0
    assert fit_metrics(fit, tr)["nme"] < 0.5


def test_the_lips_stage_adds_what_the_shapes_leave_of_the_trackers_lips(gaze_clip):
    """Tracked lips moved 1.5 px from where the model can put them: on the frames whose mouth
    is seen, the lip offsets take the mesh's lip landmarks most of the way there; on the others
    they add nothing."""
    import dataclasses

    from avface.core.geometry import project
    from avface.core.topology import LIPS
    from avface.stages.lips import lip_pca, rest_frame_offsets, tracker_lip_offsets, vertices_with_lips

    _, tr, fit = gaze_clip
    lips = list(LIPS)
    moved = tr.landmarks.copy()
    moved[:, lips, 0] += 1.5 * np.sign(moved[:, lips, 0] - moved[:, lips, 0].mean(1, keepdims=True))  # wider
    tr = dataclasses.replace(tr, landmarks=moved)
    seen = np.ones(tr.n_frames)
    seen[10:20] = 0.0
    head = tracker_lip_offsets(fit, tr, seen)
    assert np.abs(head[10:20]).max() == 0.0
    pca = lip_pca(rest_frame_offsets(fit.model, fit.params, head))
    model = fit.model
    ids = list(model.landmark_ids)
    cols = [ids.index(i) for i in lips]
    tri = np.asarray(model.faces)[np.asarray(model.landmark_faces)[cols]]
    bary = np.asarray(model.landmark_bary)[cols]

    def lip_px(vertices):
        pts = np.einsum("mc,tmcx->tmx", bary, vertices[:, tri].astype(np.float64))
        return project(pts, fit.intrinsics)

    before = np.linalg.norm(lip_px(vertices_with_lips(fit, None)) - moved[:, lips, :2], axis=-1)
    after = np.linalg.norm(lip_px(vertices_with_lips(fit, pca)) - moved[:, lips, :2], axis=-1)
    on = seen > 0
    assert after[on].mean() < 0.4 * before[on].mean(), (before[on].mean(), after[on].mean())
    assert abs(after[~on].mean() - before[~on].mean()) < 0.05
