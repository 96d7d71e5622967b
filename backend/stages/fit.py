"""Coarse fit: one identity per clip, per-frame head pose, camera, expression and jaw, fitted
to the tracker's landmarks with temporal smoothness. This is the initialisation that the
AVFace networks build on.

Frames and axes. The face model lives in its own frame (y up, z towards the viewer). The
camera sits at the origin of that frame looking down -z, so the world-to-camera rotation is
F = diag(1, -1, -1) for every frame and camera-frame vertices (OpenCV: x right, y down,
z forward) are ``v_cam = F @ v_world``. Intrinsics come from a vertical field of view: the
user's, or one estimated from the clip (:func:`avface.stages.camera.estimate_fov`: the field of view whose fit
reprojects the tracker's landmarks best). Focal length and depth trade off in one view, but
not completely: a wrong field of view bends the face's depth, and the fit pays for it in the
lips (on the synthetic clips, 63 degrees for a 40-degree camera put 3.4 mm of static error
on them). ``FitConfig.fov_deg`` (MediaPipe's own 63 degrees) is the fallback with too few
frames to estimate from.

Steps (default model):
1. per frame, a weighted similarity (Procrustes) of the canonical mesh onto the tracker's
   weak-perspective 3D landmarks, on skull-rigid points only, gives pose and depth;
2. the clip's neutral identity is the per-vertex median of the rigidly aligned shapes;
3. jaw rotation per frame by linearised least squares on the jaw-skinned vertices;
4. an expression basis (at most 50 components) is the PCA of what remains;
5. a joint refinement of all frames at once minimises perspective reprojection error plus a
   weak depth term and second-difference smoothness; undetected frames get no data term and
   are filled from their neighbours (and flagged).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from avface.config import FitConfig
from avface.core.geometry import WORLD_TO_CAMERA, backproject, intrinsics_for, project, rigid, similarity
from avface.core.threads import single_thread
from avface.core.timeseries import fill_missing
from avface.core.topology import LIPS, OUTER_EYE_CORNERS, RIGID, inter_ocular, rigid_weights
from avface.errors import CancelledError, NoFaceError
from avface.models.base import FaceModel, FaceParams
from avface.models.canonical import CanonicalModel
from avface.models.canonical_mesh import N_VERTICES, load_canonical_mesh, lower_face_ids
from avface.stages.confidence import mouth_visible
from avface.stages.tracking import Tracking

log = logging.getLogger(__name__)

DEG = 180.0 / math.pi


@dataclass
class CoarseFit:
    model: FaceModel
    params: FaceParams  #: (T, ...) detached, float32, CPU
    intrinsics: np.ndarray  #: (3, 3)
    filled: np.ndarray  #: (T,) bool: no detection, filled by interpolation
    explained_variance: float
    seconds: float

    def world_vertices(self, batch: int = 256) -> np.ndarray:
        """(T, V, 3) float32 posed vertices in the model/world frame."""
        out = []
        T = self.params.batch
        for s in range(0, T, batch):
            p = _slice_params(self.params, slice(s, s + batch))
            with torch.no_grad():
                out.append(self.model.forward(p).vertices.numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.n_vertices, 3), np.float32)

    def camera_vertices(self) -> np.ndarray:
        """(T, V, 3) float32 vertices in the OpenCV camera frame, metres."""
        return self.world_vertices() @ WORLD_TO_CAMERA.T

    def projected_landmarks(self) -> np.ndarray:
        """(T, M, 2) model landmarks projected into the frame, pixels."""
        with torch.no_grad():
            lmk = self.model.forward(self.params, full=False).landmarks.numpy()
        return project(lmk @ WORLD_TO_CAMERA.T, self.intrinsics)


def _slice_params(p: FaceParams, s) -> FaceParams:
    return FaceParams(*(getattr(p, f)[s] for f in p.__dataclass_fields__))


def _initial_alignment(points: np.ndarray, template: np.ndarray, rigid_w: np.ndarray, iterations: int = 3):
    """Per-frame rigid pose onto an identity re-estimated as the per-vertex median of the
    aligned shapes. points: (T, V, 3) metric. Returns (neutral (V,3), rotations (T,3,3),
    translations (T,3), aligned shapes (T,V,3)) with points[t] = R_t aligned[t] + t_t."""
    neutral = template.astype(np.float64)
    for _ in range(iterations):
        r, t = rigid(neutral, points, rigid_w)
        # aligned[i] = R_i^T (points_i - t_i)
        aligned = np.einsum("tji,tvj->tvi", r, points - t[:, None])
        neutral = np.median(aligned, axis=0)
    return neutral, r, t, aligned


def _mouth_confidence(mouth_conf, det: np.ndarray, config: FitConfig) -> np.ndarray:
    """(T,) confidence in the mouth's landmarks, 0 where nothing was detected."""
    if mouth_conf is None or not config.use_visual_confidence:
        return det.astype(np.float64)
    mouth_conf = np.asarray(mouth_conf, np.float64)
    if mouth_conf.shape != det.shape:
        raise ValueError(f"expected ({len(det)},) mouth confidences, got {mouth_conf.shape}")
    return np.where(det, np.clip(mouth_conf, 0.0, 1.0), 0.0)


def _jaw_direction(model: CanonicalModel, neutral: np.ndarray) -> np.ndarray:
    """(V, 3) d(vertices)/d(jaw angle about x) at zero, for the given identity."""
    j = model.joints_rest[1]
    axis = np.array([1.0, 0.0, 0.0])
    return model.weights_jaw[:, None] * np.cross(axis, neutral - j)


def fit_default(
    tracking: Tracking,
    config: FitConfig = FitConfig(),
    *,
    mouth_conf: np.ndarray | None = None,
    net_points: np.ndarray | None = None,
    progress: Callable[[float, str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> CoarseFit:
    """Fit the embedded default model to a clip's tracking. ``net_points`` (T, 97, 3), the
    networks' lower-face points in the head frame
    (avface.stages.networks.evidence.offsets_to_points), join the data term on the lower face
    of frames whose mouth is not seen (see :func:`_refine`); without them the fit is exactly
    the video-only one."""
    t_start = time.perf_counter()
    det = np.asarray(tracking.detected, bool)
    if not det.any():
        raise NoFaceError()
    template = load_canonical_mesh().vertices.astype(np.float64)
    k = intrinsics_for(tracking.width, tracking.height, config.fov_deg)
    rigid_w = rigid_weights()
    if progress:
        progress(0.05, "rigid alignment")
    pts = backproject(tracking, k, template, rigid_w)[det]
    neutral, r, t, aligned = _initial_alignment(pts, template, rigid_w)
    conf = _mouth_confidence(mouth_conf, det, config)
    # frames whose mouth is seen: they alone shape the expression basis
    seen = mouth_visible(conf)[det]
    if seen.sum() < 2:
        seen = np.ones(len(pts), bool)
    if should_cancel is not None and should_cancel():
        raise CancelledError("cancelled during the fit")
    neutral0 = neutral
    jaw_angle, resid = _solve_jaw(neutral, aligned)  # resid: what the expression basis must explain

    if progress:
        progress(0.2, "expression basis")
    flat = resid.reshape(len(resid), -1)
    mean = flat.mean(0)
    neutral = neutral + mean.reshape(N_VERTICES, 3)  # fold the mean expression into the identity
    if config.identity_prior > 0:
        neutral = _identity_prior(neutral, template, rigid_w, config.identity_prior)
    basis, coeffs, explained = _expression_basis(flat - mean, seen, config)
    model = CanonicalModel(neutral.astype(np.float32), basis.astype(np.float32))

    # Pose: points = R x + t, while LBS rotates about the root joint j0 and then adds transl:
    # R (x - j0) + j0 + transl, so transl = t + R j0 - j0.
    j0 = model.joints_rest[0].astype(np.float64)
    rot0 = _spread(Rotation.from_matrix(r).as_rotvec(), det, det)
    transl0 = _spread(t + r @ j0 - j0, det, det)
    # the mouth of an occluded frame starts from its visible neighbours, not from the guess
    jaw0 = _spread(np.stack([jaw_angle, np.zeros_like(jaw_angle), np.zeros_like(jaw_angle)], 1), det, mouth_visible(conf))
    expr0 = _spread(coeffs, det, mouth_visible(conf))
    unseen = ~mouth_visible(conf)
    if net_points is not None:
        unseen &= np.isfinite(net_points).all(axis=(1, 2))
    if net_points is not None and config.w_networks > 0 and unseen.any():
        # ... or from the networks' lower face, where it is not seen
        jaw0[unseen, 0], expr0[unseen] = _network_start(neutral0, mean, basis, aligned, net_points, conf, det, unseen)

    if progress:
        progress(0.3, "joint refinement")
    problem = _Problem(model, tracking, k, det, conf, net_points, progress=progress, should_cancel=should_cancel)
    params = _refine(problem, _Start(rot0, transl0, jaw0, expr0), config)
    return CoarseFit(model, params, k, ~det, explained, time.perf_counter() - t_start)


#: Noise of the networks' lower-face points, metres per coordinate, when the fit starts from them.
NETWORK_POINT_NOISE_M = 5e-4


def _network_start(neutral: np.ndarray, mean: np.ndarray, basis: np.ndarray, aligned: np.ndarray,
                   net_points: np.ndarray, conf: np.ndarray, det: np.ndarray, frames: np.ndarray):
    """(jaw angle (F,), expression coefficients (F, E)) of the default model on ``frames``
    (T,) bool (frames whose mouth is not seen), solved as the tracker's are but with the
    networks' lower-face points (T, 97, 3) in place of the tracker's. The refinement
    alone moves a long occluded span too slowly from its straight-line start (its
    expression coefficients are badly scaled for L-BFGS)."""
    from avface.models.avnets import LOWER_FACE_LANDMARKS

    lower = list(LOWER_FACE_LANDMARKS)
    net_points = np.asarray(net_points, np.float64)
    if net_points.shape != (len(det), len(lower), 3):
        raise ValueError(f"expected ({len(det)}, {len(lower)}, 3) network points, got {net_points.shape}")
    median_face = np.median(aligned, axis=0)
    full = np.repeat(median_face[None], len(det), axis=0)
    full[det] = aligned
    given = np.isfinite(net_points).all(axis=(1, 2))
    mapped = _to_frame(np.nan_to_num(net_points), full[:, lower], det & mouth_visible(conf) & given)
    # the clip's median face with the networks' lower face: what the tracker saw of a frame
    # whose mouth is hidden is not to be trusted, above the mouth either (a hand or a bar
    # drags the whole mesh), and the refinement fits the upper face from it anyway
    face = np.repeat(median_face[None], int(frames.sum()), axis=0)
    face[:, lower] = mapped[frames]
    jaw, resid = _solve_jaw(neutral, face)
    flat = basis.reshape(len(basis), -1)
    # the posterior mean under the basis' own prior (unit variance per coefficient) and
    # noise of NETWORK_POINT_NOISE_M per coordinate: components the points barely move are
    # not blown up by their noise
    coeffs = (resid.reshape(len(resid), -1) - mean) @ flat.T / ((flat ** 2).sum(1) + NETWORK_POINT_NOISE_M ** 2)
    return jaw, coeffs


def _to_frame(points: np.ndarray, reference: np.ndarray, trusted: np.ndarray) -> np.ndarray:
    """``points`` (T, S, 3) in another frame mapped onto ``reference`` (T, S, 3): by the
    similarity that takes the points' median over ``trusted`` frames onto the reference's,
    with each point's median replaced by the reference's, so that only their motion is
    kept (the two 3D shapes differ by a millimetre or two that a model cannot take)."""
    from avface.core.geometry import similarity

    if not trusted.any():
        trusted = np.isfinite(reference).all(axis=(1, 2))
    src = np.median(points[trusted], axis=0)
    dst = np.median(reference[trusted], axis=0)
    s, r, _ = similarity(src, dst)
    return dst + s * (points - src) @ r.T


def _solve_jaw(neutral: np.ndarray, aligned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Jaw angle per frame (Td,) by linearised least squares of the aligned residual on the
    jaw direction, and the residual (Td, V, 3) the jaw leaves."""
    base_model = CanonicalModel(neutral.astype(np.float32))
    jdir = _jaw_direction(base_model, neutral)
    resid = aligned - neutral  # (Td, V, 3)
    jaw_angle = np.einsum("tvk,vk->t", resid, jdir) / max((jdir ** 2).sum(), 1e-12)
    with torch.no_grad():
        p = base_model.zero_params(len(aligned))
        p.jaw_pose[:, 0] = torch.as_tensor(jaw_angle, dtype=torch.float32)
        jaw_verts = base_model.forward(p).vertices.numpy().astype(np.float64)
    return jaw_angle, aligned - jaw_verts


def _identity_prior(neutral: np.ndarray, template: np.ndarray, rigid_w: np.ndarray, prior: float) -> np.ndarray:
    """MAP identity under a prior centred on the canonical (mean) face: shrink the tracker's
    deviation from it by ``prior``. The expression basis describes only motion, so the
    refinement cannot put the removed part back."""
    s0, r0, t0 = similarity(template, neutral, rigid_w)
    mean_face = s0 * template @ r0.T + t0
    # the lip contours are the best-defined features and what speech is read from: they
    # keep the tracker's shape
    pull = np.full((N_VERTICES, 1), prior)
    pull[list(LIPS)] = 0.0
    return mean_face + (1.0 - pull) * (neutral - mean_face)


def _expression_basis(centred: np.ndarray, seen: np.ndarray, config: FitConfig):
    """(basis (E, V, 3), coefficients (Td, E), explained variance) of the centred residuals
    (Td, V*3): the PCA of the frames whose mouth is seen, every frame's coefficients by
    projection, scaled to unit variance over the clip."""
    n_comp = 0
    explained = 1.0
    basis = np.zeros((0, N_VERTICES, 3))
    coeffs = np.zeros((len(centred), 0))
    if len(centred) >= 2:
        _, sig, vt = np.linalg.svd(centred[seen], full_matrices=False)
        u = centred @ vt.T / np.maximum(sig, 1e-12)
        var = sig ** 2
        total = var.sum()
        if total > 0:
            cum = np.cumsum(var) / total
            n_comp = int(min(config.max_expression, np.searchsorted(cum, config.explained_variance) + 1, len(sig)))
            explained = float(cum[n_comp - 1])
            dof = math.sqrt(max(int(seen.sum()) - 1, 1))
            scale = sig[:n_comp] / dof
            basis = (vt[:n_comp] * scale[:, None]).reshape(n_comp, N_VERTICES, 3)
            coeffs = u[:, :n_comp] * dof
    log.info("expression basis: %d components explain %.4f of the variance", n_comp, explained)
    return basis, coeffs, explained


def _spread(x: np.ndarray, det: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(Td, ...) values of the detected frames to (T, ...), every frame not ``valid``
    interpolated from its neighbours."""
    full = np.zeros((len(det),) + x.shape[1:])
    full[det] = x
    return fill_missing(full, valid)


def _second_diff(x: torch.Tensor) -> torch.Tensor:
    return x[2:] - 2 * x[1:-1] + x[:-2] if len(x) > 2 else x[:0]


def _landmark_targets(model, tracking: Tracking, det: np.ndarray, mouth_conf: np.ndarray | None):
    """The refinement's data: tracker landmarks under the model's landmarks (T, M, 3) pixels,
    the inter-ocular distance (T,) that normalises errors, and per-landmark weights (T, M):
    lips count double, and the lower face of a frame counts as much as its mouth is seen."""
    ids = np.asarray(model.landmark_ids)
    target = np.nan_to_num(tracking.landmarks[:, ids])
    iod = np.where(det, np.maximum(inter_ocular(np.nan_to_num(tracking.landmarks)), 1.0), 1.0)
    lip_w = np.where(np.isin(ids, LIPS), 2.0, 1.0)  # lips matter most for a talking face
    conf = np.ones(len(det)) if mouth_conf is None else np.asarray(mouth_conf, np.float64)
    lower = np.isin(ids, lower_face_ids())
    weights = np.where(lower[None, :], conf[:, None], 1.0) * lip_w[None, :]
    return target, iod, weights


def _network_points(model, net_points: np.ndarray, start: np.ndarray, det: np.ndarray,
                    mouth_conf: np.ndarray | None, weight: float):
    """(model landmark columns (S,), targets (T, S, 3) metres in the model's frame, the
    model's inter-ocular distance, weights (T, S)) of the networks' lower-face points.

    The head frame the networks work in and the model's own frame agree only up to a
    similarity (a different neutral, FLAME's axes), so the points are mapped by the
    similarity that best takes their median over trusted frames onto the model's starting
    landmarks' median over the same frames, and each point's median is replaced by the
    model's: only their motion is a target, not the clip's neutral."""
    from avface.models.avnets import LOWER_FACE_LANDMARKS

    net_points = np.asarray(net_points, np.float64)
    lower = list(LOWER_FACE_LANDMARKS)
    if net_points.shape != (len(det), len(lower), 3):
        raise ValueError(f"expected ({len(det)}, {len(lower)}, 3) network points, got {net_points.shape}")
    ids = np.asarray(model.landmark_ids)
    sel = np.flatnonzero(np.isin(ids, lower))
    cols = [lower.index(i) for i in ids[sel]]
    conf = det.astype(np.float64) if mouth_conf is None else np.clip(np.asarray(mouth_conf, np.float64), 0.0, 1.0)
    trusted = det & (conf >= 0.5)
    if not trusted.any():
        trusted = det
    given = np.isfinite(net_points).all(axis=(1, 2))  # a NaN frame: no target there
    target = np.nan_to_num(_to_frame(np.where(given[:, None, None], net_points, 0.0)[:, cols], start[:, sel],
                                     trusted & given))
    eyes = [int(np.flatnonzero(ids == i)[0]) for i in OUTER_EYE_CORNERS if (ids == i).any()]
    # errors in percent of the model's inter-ocular distance (an adult's 9 cm if it has no eye corners)
    iod = 0.09 if len(eyes) < 2 else float(np.linalg.norm(np.median(start[trusted][:, eyes[0]] - start[trusted][:, eyes[1]], axis=0)))
    weights = weight * (given * (1.0 - conf))[:, None] * np.where(np.isin(ids[sel], LIPS), 2.0, 1.0)[None, :]
    return sel, target, iod, weights


@dataclass
class _Problem:
    """One joint refinement: the model, the clip's evidence, and how the run reports.

    jaw_dof: 1 rotates the jaw about x only (the default model's hinge), 3 is a full ball
    joint (FLAME). n_betas > 0 fits one identity shared by all frames. p0: the progress
    fraction the refinement starts at.

    net_points (T, 97, 3): the networks' lower-face points in the head frame (metres), a
    pose-free target for the model's own lower-face landmarks with no head pose applied,
    weighted by ``config.w_networks`` times how little the mouth is seen (1 - mouth
    confidence, so 1 on occluded and undetected frames and 0 where the tracker is fully
    trusted), lips double (NaN on a frame: no target there); see :func:`_network_points`.
    None leaves the fit as it is without networks.
    """

    model: FaceModel
    tracking: Tracking
    k: np.ndarray
    det: np.ndarray
    mouth_conf: np.ndarray | None = None
    net_points: np.ndarray | None = None
    jaw_dof: int = 1
    n_betas: int = 0
    device: str = "cpu"
    p0: float = 0.3
    progress: Callable[[float, str], None] | None = None
    should_cancel: Callable[[], bool] | None = None


@dataclass
class _Start:
    """Where the refinement starts, per frame: rotation, translation, jaw, expression."""

    rot: np.ndarray
    transl: np.ndarray
    jaw: np.ndarray
    expr: np.ndarray


class _Variables:
    """The refinement's free variables and the model posed by them."""

    def __init__(self, problem: _Problem, start: _Start, dt, dev):
        n, jaw_dof = len(problem.det), problem.jaw_dof
        self.model, self.n, self.jaw_dof, self.dt, self.dev = problem.model, n, jaw_dof, dt, dev
        self.rot = torch.tensor(start.rot, dtype=dt, device=dev, requires_grad=True)
        self.transl = torch.tensor(start.transl, dtype=dt, device=dev, requires_grad=True)
        self.jaw = torch.tensor(start.jaw[:, :jaw_dof], dtype=dt, device=dev, requires_grad=True)
        self.expr = torch.tensor(start.expr, dtype=dt, device=dev, requires_grad=True)
        self.betas = torch.zeros(1, problem.n_betas, dtype=dt, device=dev, requires_grad=True)
        self.zeros3 = torch.zeros(n, 3, dtype=dt, device=dev)
        self.all = [self.rot, self.transl, self.jaw, self.expr] + ([self.betas] if problem.n_betas else [])

    def params(self) -> FaceParams:
        jaw3 = torch.cat([self.jaw, torch.zeros(self.n, 3 - self.jaw_dof, dtype=self.dt, device=self.dev)], dim=1)
        z = self.zeros3
        return FaceParams(self.betas.expand(self.n, -1), self.expr, self.rot, z, jaw3, z, z, self.transl)

    def local_landmarks(self) -> torch.Tensor:
        """The model's landmarks with no head pose: (T, M, 3) metres."""
        p, z = self.params(), self.zeros3
        return self.model.forward(FaceParams(p.betas, p.expression, z, z, p.jaw_pose, z, z, z), full=False).landmarks


def _points_term(problem: _Problem, v: _Variables, config: FitConfig, dt, dev):
    """The networks' points as the refinement's pose-free target (None without them):
    (landmark columns, targets, IOD, weights, axis weights)."""
    if problem.net_points is None:
        return None
    with torch.no_grad():
        start = v.local_landmarks().cpu().numpy()
    sel, target, iod, w = _network_points(problem.model, problem.net_points, start, problem.det, problem.mouth_conf,
                                          config.w_networks)
    # across and up the face as the landmarks' image position; depth (MediaPipe's own guess,
    # which the tracker term weighs by w_depth) as little
    axes = torch.tensor([1.0, 1.0, config.w_depth], dtype=dt, device=dev)
    return (torch.as_tensor(sel, device=dev), torch.as_tensor(target, dtype=dt, device=dev), iod,
            torch.as_tensor(w, dtype=dt, device=dev), axes)


def _refine(problem: _Problem, start: _Start, config: FitConfig) -> FaceParams:
    """Joint refinement of all frames at once: perspective reprojection of the model's
    landmarks onto the tracker's, a weak relative-depth term, second-difference smoothness
    and priors (and the networks' points, :class:`_Problem`). Undetected frames have no data
    term, so smoothness fills them."""
    det, n, progress = problem.det, len(problem.det), problem.progress
    dt = torch.float32
    dev = torch.device(problem.device)
    f_cam = torch.as_tensor(WORLD_TO_CAMERA, dtype=dt, device=dev)
    kt = torch.as_tensor(problem.k, dtype=dt, device=dev)
    target, iod, lmk_w = (torch.as_tensor(a, dtype=dt, device=dev)
                          for a in _landmark_targets(problem.model, problem.tracking, det, problem.mouth_conf))
    mask = torch.as_tensor(det, dtype=dt, device=dev)
    v = _Variables(problem, start, dt, dev)
    opt = torch.optim.LBFGS(v.all, lr=1.0, max_iter=config.iterations, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)
    n_det = float(mask.sum().clamp(min=1.0))
    state = {"it": 0}
    pts = _points_term(problem, v, config, dt, dev)

    def closure():
        if problem.should_cancel is not None and problem.should_cancel():
            raise CancelledError("cancelled during the fit")
        opt.zero_grad()
        cam = problem.model.forward(v.params(), full=False).landmarks @ f_cam.T  # (T, M, 3)
        loss = _data_loss(cam, kt, target, iod, lmk_w, mask, n_det, config.w_depth)
        if pts is not None:
            sel, pts_target, pts_iod, pts_w, axes = pts
            err = (100.0 * (v.local_landmarks()[:, sel] - pts_target) / pts_iod).pow(2) @ axes  # (T, S)
            loss = loss + (err * pts_w).mean(1).sum() / n_det
        # smoothness in degrees and millimetres per frame^2
        loss = loss + config.w_smooth_pose * (_second_diff(v.rot * DEG).pow(2).sum()
                                              + _second_diff(v.transl * 1000).pow(2).sum()) / n
        loss = loss + config.w_smooth_expression * (_second_diff(v.expr).pow(2).sum()
                                                    + _second_diff(v.jaw * DEG).pow(2).sum()) / n
        loss = loss + config.w_expression * v.expr.pow(2).sum() / n
        if problem.n_betas:
            loss = loss + config.w_shape * v.betas.pow(2).sum()
        loss.backward()
        state["it"] += 1
        if progress and state["it"] % 5 == 0:
            p0 = problem.p0
            progress(p0 + (1 - p0) * min(state["it"] / max(config.iterations, 1), 1.0), f"refine {state['it']}")
        return loss

    _step_single_threaded(opt, closure, dev)
    return v.params().detach().to("cpu")


def _data_loss(cam, kt, target, iod, lmk_w, mask, n_det: float, w_depth: float) -> torch.Tensor:
    """The refinement's data term over detected frames: 2D reprojection of the model's
    landmarks cam (T, M, 3) onto the tracker's and a relative-depth term."""
    z = cam[..., 2:3].clamp(min=1e-3)
    uv = cam[..., :2] / z * torch.stack([kt[0, 0], kt[1, 1]]) + torch.stack([kt[0, 2], kt[1, 2]])
    # errors in percent of the inter-ocular distance, so that weights read as NME
    err2d = (100.0 * (uv - target[..., :2]) / iod[:, None, None]).pow(2).sum(-1)  # (T, M)
    data = (err2d * lmk_w).mean(1)
    # relative depth: the tracker's z (pixels) against the model's, both centred per frame
    zc = cam[..., 2] * kt[0, 0] / z[..., 0].mean(1, keepdim=True)
    zc = zc - zc.mean(1, keepdim=True)
    tz = target[..., 2] - target[..., 2].mean(1, keepdim=True)
    depth = (100.0 * (zc - tz) / iod[:, None]).pow(2).mean(1)
    return ((data + w_depth * depth) * mask).sum() / n_det


def _step_single_threaded(opt, closure, dev) -> None:
    # The problem is many tiny tensors: on a CPU, one thread beats several (no hand-offs),
    # and it stays fast when other processes load the cores.
    with single_thread(dev.type):
        opt.step(closure)


def fit_model(
    model: FaceModel,
    tracking: Tracking,
    config: FitConfig = FitConfig(),
    *,
    device: str = "cpu",
    mouth_conf: np.ndarray | None = None,
    net_points: np.ndarray | None = None,
    progress: Callable[[float, str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> CoarseFit:
    """Fit a fixed-basis model (FLAME) to a clip: identity (betas) shared by the clip,
    per-frame expression, jaw, head pose and translation."""
    t_start = time.perf_counter()
    det = np.asarray(tracking.detected, bool)
    if not det.any():
        raise NoFaceError()
    mesh = load_canonical_mesh()
    k = intrinsics_for(tracking.width, tracking.height, config.fov_deg)
    rigid_w = rigid_weights()
    if progress:
        progress(0.05, "rigid alignment")
    pts = backproject(tracking, k, mesh.vertices.astype(np.float64), rigid_w)
    ids = np.asarray(model.landmark_ids)
    with torch.no_grad():
        rest = model.forward(model.zero_params(1), full=False).landmarks[0].numpy().astype(np.float64)
    w = np.where(np.isin(ids, RIGID), 1.0, 0.1)
    n_all = len(det)
    rot = np.zeros((n_all, 3))
    transl = np.zeros((n_all, 3))
    j0 = model.rest_joints()[0].astype(np.float64)
    r, t = rigid(rest, pts[det][:, ids], w)
    rot[det] = Rotation.from_matrix(r).as_rotvec()
    transl[det] = t + r @ j0 - j0
    rot, transl = fill_missing(rot, det), fill_missing(transl, det)
    if progress:
        progress(0.1, "joint refinement")
    problem = _Problem(model, tracking, k, det, _mouth_confidence(mouth_conf, det, config), net_points,
                       jaw_dof=3, n_betas=model.n_shape, device=device, p0=0.1, progress=progress,
                       should_cancel=should_cancel)
    start = _Start(rot, transl, np.zeros((n_all, 3)), np.zeros((n_all, model.n_expression)))
    params = _refine(problem, start, config)
    return CoarseFit(model, params, k, ~det, float("nan"), time.perf_counter() - t_start)


def fit_metrics(fit: CoarseFit, tracking: Tracking) -> dict[str, float]:
    """NME of all and of the lip landmarks (percent of the inter-ocular distance), on frames
    the tracker detected."""
    det = np.asarray(tracking.detected, bool)
    if not det.any():
        return {"nme": float("nan"), "nme_lips": float("nan")}
    pred = fit.projected_landmarks()[det]
    ids = fit.model.landmark_ids
    gt = tracking.landmarks[det][:, ids, :2]
    iod = inter_ocular(tracking.landmarks[det])
    err = np.linalg.norm(pred - gt, axis=-1) / iod[:, None] * 100.0
    lips = np.isin(ids, LIPS)
    return {"nme": float(err.mean()), "nme_lips": float(err[:, lips].mean())}
