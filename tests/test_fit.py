"""The coarse fit on tracking synthesised from known models: it must reproduce the
landmarks, recover the 3D shape, fill occluded and undetected spans from their neighbours,
and do the same for FLAME."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from avface.bench.evaluate import aligned_vertex_error
from avface.core.geometry import WORLD_TO_CAMERA, intrinsics_for, similarity
from avface.core.topology import LIPS, LIPS_LOWER_INNER, LIPS_LOWER_OUTER
from avface.models.base import FaceParams
from avface.models.canonical import CanonicalModel
from avface.models.canonical_mesh import load_canonical_mesh
from avface.stages.fit import FitConfig, fit_default, fit_metrics, fit_model
from avface.stages.tracking import Tracking

W, H = 320, 320
LIPS_IDS = list(LIPS)
FOV = 40.0


def synthetic_tracking(points_world: np.ndarray, k: np.ndarray, detected=None) -> Tracking:
    """A Tracking whose 478 landmarks are the projections of `points_world` (T, 478, 3),
    with MediaPipe-like relative depth: (Z - mean Z) in pixels at the face's distance."""
    cam = points_world @ WORLD_TO_CAMERA.T
    t = len(cam)
    z = cam[..., 2]
    uv = cam[..., :2] / z[..., None] * np.array([k[0, 0], k[1, 1]]) + np.array([k[0, 2], k[1, 2]])
    zc = z[:, :468].mean(1, keepdims=True)
    zpx = (z - zc) * k[0, 0] / zc
    lmk = np.concatenate([uv, zpx[..., None]], -1).astype(np.float32)
    det = np.ones(t, bool) if detected is None else np.asarray(detected, bool)
    lmk[~det] = np.nan
    return Tracking(lmk, np.zeros((t, 52), np.float32), tuple(f"b{i}" for i in range(52)),
                    np.tile(np.eye(4, dtype=np.float32), (t, 1, 1)), det,
                    np.full((t, 2, 21, 2), np.nan, np.float32), np.zeros((t, 3), np.float32),
                    np.zeros((t, 468, 3), np.uint8), 25.0, W, H, 0)


def _with_iris(v468: np.ndarray) -> np.ndarray:
    """Pad (T, 468, 3) to the tracker's 478 points (iris points at the eye corners)."""
    return np.concatenate([v468, v468[:, [33] * 5 + [263] * 5]], axis=1)


def _canonical_truth(t=40):
    mesh = load_canonical_mesh()
    # a clip-specific basis: a few smooth deformations (mouth stretch, pucker, brows)
    y = mesh.vertices[:, 1]
    basis = np.zeros((3, 468, 3), np.float32)
    basis[0, :, 0] = 0.004 * mesh.vertices[:, 0] / 0.07 * np.exp(-((y + 0.045) / 0.02) ** 2)
    basis[1, :, 2] = 0.003 * np.exp(-((y + 0.045) / 0.015) ** 2 - (mesh.vertices[:, 0] / 0.02) ** 2)
    basis[2, :, 1] = 0.003 * np.exp(-((y - 0.045) / 0.015) ** 2)
    model = CanonicalModel(mesh.vertices, basis)
    s = np.linspace(0, 2 * np.pi, t)
    p = model.zero_params(t)
    expr = torch.tensor(np.stack([np.sin(2 * s), np.cos(3 * s), np.sin(s)], 1), dtype=torch.float32)
    jaw = torch.zeros(t, 3)
    jaw[:, 0] = torch.tensor(0.15 * (1 + np.sin(2 * s)) / 2, dtype=torch.float32)
    rot = torch.tensor(np.stack([0.05 * np.sin(s), 0.1 * np.cos(s), 0.02 * np.sin(2 * s)], 1), dtype=torch.float32)
    transl = torch.tensor([[0.0, 0.0, -0.6]]).repeat(t, 1)
    gt = FaceParams(p.betas, expr, rot, p.neck_pose, jaw, p.leye_pose, p.reye_pose, transl)
    with torch.no_grad():
        verts = model.forward(gt).vertices.numpy().astype(np.float64)
    return model, gt, verts


def test_canonical_fit_recovers_known_motion():
    k = intrinsics_for(W, H, FOV)
    _, gt, verts = _canonical_truth()
    tr = synthetic_tracking(_with_iris(verts), k)
    # exact data: no prior pulling the identity towards the mean face
    fit = fit_default(tr, FitConfig(fov_deg=FOV, identity_prior=0.0))
    m = fit_metrics(fit, tr)
    assert m["nme"] < 0.3 and m["nme_lips"] < 0.3, m
    err_mm = aligned_vertex_error(fit.world_vertices(), verts).mean() * 1000
    assert err_mm < 0.5, err_mm
    # the jaw parameter follows the true jaw (same hinge, so the same sign and timing)
    assert np.corrcoef(fit.params.jaw_pose[:, 0].numpy(), gt.jaw_pose[:, 0].numpy())[0, 1] > 0.9
    # head pose: the per-clip identity fixes the gauge only up to a small constant rotation, so
    # compare the motion relative to the first frame (and the absolute pose more loosely)
    from scipy.spatial.transform import Rotation as R
    fr, gr = R.from_rotvec(fit.params.global_orient.numpy()), R.from_rotvec(gt.global_orient.numpy())
    rel_err = ((fr * fr[0].inv()) * (gr * gr[0].inv()).inv()).magnitude()
    assert rel_err.max() < 0.02, rel_err.max()  # about 1 degree: the brow motion touches the forehead
    assert (fr * gr.inv()).magnitude().max() < 0.03


def test_occluded_and_undetected_spans_are_filled_from_neighbours():
    k = intrinsics_for(W, H, FOV)
    _, gt, verts = _canonical_truth(t=50)
    occluded = np.zeros(50, bool)
    occluded[20:24] = True
    missing = np.zeros(50, bool)
    missing[35:38] = True
    corrupted = verts.copy()
    # a tracker guessing under a hand: the lower lip drops 1 cm (a wide-open mouth that is not there)
    lower_lip = list(LIPS_LOWER_OUTER + LIPS_LOWER_INNER)
    corrupted[np.ix_(occluded, lower_lip)] += np.array([0.0, -0.01, 0.0])
    tr = synthetic_tracking(_with_iris(corrupted), k, detected=~missing)
    conf = np.where(occluded, 0.0, 1.0)
    blind = fit_default(tr, FitConfig(fov_deg=FOV, use_visual_confidence=False), mouth_conf=conf)
    aware = fit_default(tr, FitConfig(fov_deg=FOV), mouth_conf=conf)
    def lip_error_mm(fit):  # align on the whole face, measure the lips
        out = []
        for t in np.nonzero(occluded)[0]:
            v = fit.world_vertices()[t].astype(np.float64)
            sc, r, tr_ = similarity(v, verts[t])
            out.append(np.linalg.norm((sc * v @ r.T + tr_ - verts[t])[LIPS_IDS], axis=-1).mean() * 1000)
        return float(np.mean(out))

    err_blind, err_aware = lip_error_mm(blind), lip_error_mm(aware)
    print(f"lip error on occluded frames: {err_blind:.2f} mm blind, {err_aware:.2f} mm aware")
    assert err_blind > 2.0, err_blind  # fitting the guess puts the lips millimetres off
    assert err_aware < 0.5 * err_blind, (err_aware, err_blind)
    assert aware.filled[35:38].all() and not aware.filled[:35].any()
    err_missing = aligned_vertex_error(aware.world_vertices(), verts, missing).mean() * 1000
    assert err_missing < 2.0, err_missing


def test_flame_fit_reproduces_landmarks(tmp_path):
    from flame_fixture import write_synthetic_flame

    from avface.models.flame import load_flame

    write_synthetic_flame(tmp_path)
    model = load_flame(tmp_path, n_shape=10, n_expression=10)
    t = 12
    rng = np.random.default_rng(1)
    p = model.zero_params(t)
    s = np.linspace(0, np.pi, t)
    gt = FaceParams(torch.tensor(rng.normal(size=(1, 10)) * 0.5, dtype=torch.float32).repeat(t, 1),
                    torch.tensor(np.outer(np.sin(s), rng.normal(size=10)) * 0.5, dtype=torch.float32),
                    torch.tensor(np.stack([0.05 * s, 0.1 * np.sin(s), 0 * s], 1), dtype=torch.float32),
                    p.neck_pose, torch.tensor(np.stack([0.1 * np.sin(s), 0 * s, 0 * s], 1), dtype=torch.float32),
                    p.leye_pose, p.reye_pose, torch.tensor([[0.0, 0.0, -0.7]]).repeat(t, 1))
    with torch.no_grad():
        lmk = model.forward(gt, full=False).landmarks.numpy().astype(np.float64)  # (T, 105, 3)
    # the tracker's other landmarks: the canonical face placed on FLAME's by a similarity
    canon = load_canonical_mesh().vertices.astype(np.float64)
    ids = model.landmark_ids
    pts = np.zeros((t, 468, 3))
    for i in range(t):
        sc, r, tr_ = similarity(canon[ids], lmk[i])
        pts[i] = sc * canon @ r.T + tr_
        pts[i, ids] = lmk[i]
    k = intrinsics_for(W, H, FOV)
    tracking = synthetic_tracking(_with_iris(pts), k)
    fit = fit_model(model, tracking, FitConfig(fov_deg=FOV, iterations=80))
    m = fit_metrics(fit, tracking)
    assert m["nme"] < 1.0 and m["nme_lips"] < 1.0, m
    assert fit.params.betas.shape == (t, 10) and torch.allclose(fit.params.betas[0], fit.params.betas[-1])


def test_network_points_fill_a_long_occlusion_in_any_frame():
    """The networks' lower-face points (head frame, any similarity away from the model's)
    pull an occluded mouth where interpolation cannot follow it: a span longer than the
    motion's half period."""
    from scipy.spatial.transform import Rotation

    from avface.models.avnets import LOWER_FACE_LANDMARKS

    k = intrinsics_for(W, H, FOV)
    model, gt, verts = _canonical_truth(t=60)
    occluded = np.zeros(60, bool)
    occluded[18:42] = True
    corrupted = verts.copy()
    lower_lip = list(LIPS_LOWER_OUTER + LIPS_LOWER_INNER)
    corrupted[np.ix_(occluded, lower_lip)] += np.array([0.0, -0.01, 0.0])
    tr = synthetic_tracking(_with_iris(corrupted), k)
    conf = np.where(occluded, 0.0, 1.0)
    zero = torch.zeros(60, 3)
    local = FaceParams(gt.betas, gt.expression, zero, zero, gt.jaw_pose, zero, zero, zero)
    with torch.no_grad():
        points = model.forward(local).vertices.numpy().astype(np.float64)[:, list(LOWER_FACE_LANDMARKS)]
    # the networks' head frame: another scale, orientation and origin than the model's
    r = Rotation.from_rotvec([0.1, -0.2, 0.05]).as_matrix()
    points = 1.3 * points @ r.T + np.array([0.01, -0.02, 0.5])

    def lip_error_mm(fit):
        v = fit.world_vertices().astype(np.float64)
        out = []
        for t in np.nonzero(occluded)[0]:
            sc, rr, tt = similarity(v[t], verts[t])
            out.append(np.linalg.norm((sc * v[t] @ rr.T + tt - verts[t])[LIPS_IDS], axis=-1).mean() * 1000)
        return float(np.mean(out))

    interp = fit_default(tr, FitConfig(fov_deg=FOV), mouth_conf=conf)
    with_net = fit_default(tr, FitConfig(fov_deg=FOV), mouth_conf=conf, net_points=points)
    off = fit_default(tr, FitConfig(fov_deg=FOV, w_networks=0.0), mouth_conf=conf, net_points=points)
    e_interp, e_net, e_off = lip_error_mm(interp), lip_error_mm(with_net), lip_error_mm(off)
    print(f"lip error on a 24-frame occlusion: {e_interp:.2f} mm interpolated, {e_net:.2f} mm with the points")
    # 1.93 -> 1.24 mm here; the floor is the clip's own expression basis (0.57 mm fitting
    # the true landmarks on every frame)
    assert e_net < 0.65 * e_interp, (e_net, e_interp)
    assert abs(e_off - e_interp) < 1e-3  # weight 0: exactly the interpolating fit
    # frames whose mouth is seen keep their shape (the head's depth may shift a little)
    seen = ~occluded
    moved_mm = aligned_vertex_error(with_net.world_vertices(), interp.world_vertices(), seen) * 1000
    assert moved_mm.max() < 0.1, moved_mm.max()


def test_network_points_on_a_clip_whose_mouth_is_always_seen_change_nothing():
    k = intrinsics_for(W, H, FOV)
    _, _, verts = _canonical_truth(t=20)
    tr = synthetic_tracking(_with_iris(verts), k)
    from avface.models.avnets import LOWER_FACE_LANDMARKS

    points = verts[:, list(LOWER_FACE_LANDMARKS)] + 0.01  # wrong, but nowhere needed
    plain = fit_default(tr, FitConfig(fov_deg=FOV), mouth_conf=np.ones(20))
    with_net = fit_default(tr, FitConfig(fov_deg=FOV), mouth_conf=np.ones(20), net_points=points)
    np.testing.assert_allclose(with_net.world_vertices(), plain.world_vertices(), atol=1e-6)


def _truth_at_fov(fov_deg: float, t: int = 40):
    """The known clip of _canonical_truth, moved back or forth so that the face fills the
    frame as at 40 degrees and 0.6 m, seen by a camera of ``fov_deg``."""
    model, gt, _ = _canonical_truth(t)
    depth = 0.6 * np.tan(np.radians(FOV) / 2) / np.tan(np.radians(fov_deg) / 2)
    gt = dataclasses.replace(gt, transl=torch.tensor([[0.0, 0.0, -depth]]).repeat(t, 1))
    with torch.no_grad():
        verts = model.forward(gt).vertices.numpy().astype(np.float64)
    return synthetic_tracking(_with_iris(verts), intrinsics_for(W, H, fov_deg))


def test_camera_estimate_finds_the_field_of_view():
    """The face's own perspective gives the camera away: a telephoto and a webcam-like
    field of view are each found within 15 %, and both far from the 63-degree fallback."""
    from avface.stages.camera import FOV_FRAMES, estimate_fov

    for true_fov in (22.0, 50.0):
        est = estimate_fov(_truth_at_fov(true_fov))
        assert est.estimated and est.frames == FOV_FRAMES
        assert abs(est.fov_deg - true_fov) < 0.15 * true_fov, (true_fov, est)
        # what it chose by: the quick fit's residual is clearly worse at the far candidates
        res = dict(zip(est.candidates_deg, est.residual_px))
        far = 65.0 if true_fov < 40 else 15.0
        assert res[far] > 1.3 * min(res.values()), (true_fov, res)


def test_camera_estimate_falls_back_with_too_few_trusted_frames():
    from avface.stages.camera import FOV_MIN_FRAMES, estimate_fov

    tr = _truth_at_fov(30.0, t=12)
    conf = np.zeros(12)
    conf[: FOV_MIN_FRAMES - 1] = 1.0
    # too few trusted frames: the detected ones stand in for them
    assert estimate_fov(tr, conf).estimated
    det = np.zeros(12, bool)
    det[: FOV_MIN_FRAMES - 1] = True
    tr.landmarks[~det] = np.nan
    tr.detected[:] = det
    est = estimate_fov(tr, config=FitConfig(fov_deg=57.0))
    assert not est.estimated and est.fov_deg == 57.0 and est.frames == FOV_MIN_FRAMES - 1
