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
from avface.core.topology import CHIN, LIPS, OUTER_EYE_CORNERS, RIGID, inter_ocular, rigid_weights
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
    # the iris centres are the gaze's alone (_fit_gaze), which no other parameter moves
    lip_w = np.where(np.isin(ids, IRIS_CENTRES), 0.0, lip_w)
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


#: MediaPipe's iris-centre landmarks: a model that embeds them and has eye joints turns its eyes.
IRIS_CENTRES = (468, 473)
#: Pull of the eyes' rotation (degrees squared) towards straight ahead, against the iris
#: centres' squared error in percent of the inter-ocular distance.
EYE_PRIOR = 1e-4
#: Second-difference penalty on the eyes' rotation (degrees per frame^2): light, since the
#: eyes jump (saccades take a frame or two), just enough to steady the tracker's iris jitter.
EYE_SMOOTH = 1e-3


def _fit_gaze(problem: _Problem, params: FaceParams, config: FitConfig) -> FaceParams:
    """The eyes' pitch and yaw per frame, once the head is fitted: only they move the iris
    centres, so they are a problem of their own (well conditioned, where inside the joint
    refinement their few points hardly move the optimiser): the iris centres' reprojection
    error, smooth in time, a weak pull to straight ahead; frames without a face follow
    their neighbours. Both eyes turn together (conjugate gaze: at a camera a metre away they
    converge by under 2 degrees each): fitted apart, a tracked face whose eyes sit a few
    millimetres wider than the model's would squint 20 degrees outwards."""
    ids = np.asarray(problem.model.landmark_ids)
    cols = [int(np.flatnonzero(ids == i)[0]) for i in IRIS_CENTRES]
    det, n, dt = problem.det, len(problem.det), torch.float32
    dev = torch.device(problem.device)
    kt = torch.as_tensor(problem.k, dtype=dt, device=dev)
    target = torch.as_tensor(np.nan_to_num(problem.tracking.landmarks[:, list(IRIS_CENTRES), :2]), dtype=dt, device=dev)
    iod = torch.as_tensor(np.where(det, np.maximum(inter_ocular(np.nan_to_num(problem.tracking.landmarks)), 1.0), 1.0),
                          dtype=dt, device=dev)
    mask = torch.as_tensor(det, dtype=dt, device=dev)
    f_cam = torch.as_tensor(WORLD_TO_CAMERA, dtype=dt, device=dev)
    gaze = torch.zeros(n, 2, dtype=dt, device=dev, requires_grad=True)  # (frame, pitch/yaw)
    zero = torch.zeros(n, 1, dtype=dt, device=dev)
    opt = torch.optim.LBFGS([gaze], lr=1.0, max_iter=config.iterations, history_size=20, line_search_fn="strong_wolfe")

    def posed():
        # params' (left, right) eyes from the variables; the model's iris columns follow them
        both = torch.cat([gaze, zero], dim=1)
        return FaceParams(params.betas, params.expression, params.global_orient, params.neck_pose, params.jaw_pose,
                          both, both, params.transl)

    def closure():
        opt.zero_grad()
        cam = problem.model.forward(posed(), full=False).landmarks[:, cols] @ f_cam.T
        uv = cam[..., :2] / cam[..., 2:3].clamp(min=1e-3) * torch.stack([kt[0, 0], kt[1, 1]]) + torch.stack([kt[0, 2], kt[1, 2]])
        err = (100.0 * (uv - target) / iod[:, None, None]).pow(2).sum((1, 2))
        deg = gaze * DEG
        loss = ((err * mask).sum() + EYE_SMOOTH * _second_diff(deg).pow(2).sum()
                + EYE_PRIOR * deg.pow(2).sum()) / max(float(mask.sum()), 1.0)
        loss.backward()
        return loss

    _step_single_threaded(opt, closure, dev)
    return posed().detach()


@dataclass
class _Start:
    """Where the refinement starts, per frame: rotation, translation, jaw, expression (and
    the clip's identity, zeros when None)."""

    rot: np.ndarray
    transl: np.ndarray
    jaw: np.ndarray
    expr: np.ndarray
    betas: np.ndarray | None = None


class _Variables:
    """The refinement's free variables and the model posed by them."""

    def __init__(self, problem: _Problem, start: _Start, dt, dev):
        n, jaw_dof = len(problem.det), problem.jaw_dof
        self.model, self.n, self.jaw_dof, self.dt, self.dev = problem.model, n, jaw_dof, dt, dev
        self.rot = torch.tensor(start.rot, dtype=dt, device=dev, requires_grad=True)
        self.transl = torch.tensor(start.transl, dtype=dt, device=dev, requires_grad=True)
        self.jaw = torch.tensor(start.jaw[:, :jaw_dof], dtype=dt, device=dev, requires_grad=True)
        self.bounds = getattr(problem.model, "expression_bounds", None)
        self.expr = torch.tensor(self._free(start.expr), dtype=dt, device=dev, requires_grad=True)
        betas = np.zeros((1, problem.n_betas)) if start.betas is None else np.reshape(start.betas, (1, -1))
        self.betas = torch.tensor(betas, dtype=dt, device=dev, requires_grad=True)
        self.zeros3 = torch.zeros(n, 3, dtype=dt, device=dev)
        self.all = ([self.rot, self.transl] + ([self.jaw] if jaw_dof else []) + [self.expr]
                    + ([self.betas] if problem.n_betas else []))

    #: A bounded weight starts at least this far inside its bounds (as a share of the range):
    #: on a bound its free variable's gradient is zero. Small, so that a shape the start left
    #: at rest stays there to 1e-4 (the curves' zero), yet the refinement can still raise it.
    BOUND_MARGIN = 1e-4

    def _free(self, expr: np.ndarray) -> np.ndarray:
        """The free variables whose :meth:`expression` is ``expr``: the weights themselves, or
        for a bounded model x with weight = low + (high - low) sin^2 x, which keeps every weight
        within its bounds for any x, so an unconstrained optimiser can solve for it."""
        if self.bounds is None:
            return expr
        lo, hi = self.bounds
        u = np.clip((np.asarray(expr, np.float64) - lo) / (hi - lo), self.BOUND_MARGIN, 1 - self.BOUND_MARGIN)
        return np.arcsin(np.sqrt(u))

    def expression(self) -> torch.Tensor:
        if self.bounds is None:
            return self.expr
        lo, hi = self.bounds
        return lo + (hi - lo) * torch.sin(self.expr).pow(2)

    def params(self) -> FaceParams:
        jaw3 = torch.cat([self.jaw, torch.zeros(self.n, 3 - self.jaw_dof, dtype=self.dt, device=self.dev)], dim=1)
        z = self.zeros3
        return FaceParams(self.betas.expand(self.n, -1), self.expression(), self.rot, z, jaw3, z, z, self.transl)

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
    sparse = None
    if v.bounds is not None and config.w_expression_l1 > 0:
        # sparse where the evidence is weak: the weight grows as the mouth is less seen
        conf = np.ones(n) if problem.mouth_conf is None else np.clip(problem.mouth_conf, 0.0, 1.0)
        sparse = torch.as_tensor(config.w_expression_l1 * (1.0 + config.l1_unseen_boost * (1.0 - conf) * det
                                                           + config.l1_unseen_boost * ~det),
                                 dtype=dt, device=dev)

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
        expr = v.expression()
        loss = loss + config.w_smooth_expression * (_second_diff(expr).pow(2).sum()
                                                    + _second_diff(v.jaw * DEG).pow(2).sum()) / n
        loss = loss + config.w_expression * expr.pow(2).sum() / n
        if sparse is not None:  # bounded weights are >= 0: their sum is their L1 norm
            loss = loss + (expr.sum(1) * sparse).sum() / n
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
    # the face mesh's landmarks (the irises, beyond them, are the eyes' alone)
    ids = np.asarray(model.landmark_ids)
    mesh = ids < N_VERTICES
    ids = ids[mesh]
    with torch.no_grad():
        rest = model.forward(model.zero_params(1), full=False).landmarks[0].numpy().astype(np.float64)[mesh]
    w = np.where(np.isin(ids, RIGID), 1.0, 0.1)
    n_all = len(det)
    conf = _mouth_confidence(mouth_conf, det, config)
    betas = expr = None
    if getattr(model, "expression_bounds", None) is not None:
        net = None if net_points is None or config.w_networks <= 0 else np.asarray(net_points, np.float64)
        model, r, t, betas, expr_det, net_expr = _linear_start(model, pts[det][:, ids], w, conf[det], config, net, det)
        expr = _spread(expr_det, det, mouth_visible(conf))
        if net_expr is not None:  # where the mouth is not seen: the networks' lower face
            given = ~mouth_visible(conf) & np.isfinite(net).all(axis=(1, 2))
            expr[given] = net_expr[given]
    else:
        r, t = rigid(rest, pts[det][:, ids], w)
    rot = np.zeros((n_all, 3))
    transl = np.zeros((n_all, 3))
    j0 = model.rest_joints(None if betas is None else torch.as_tensor(betas[None]))[0].astype(np.float64)
    rot[det] = Rotation.from_matrix(r).as_rotvec()
    transl[det] = t + r @ j0 - j0
    rot, transl = fill_missing(rot, det), fill_missing(transl, det)
    if progress:
        progress(0.1, "joint refinement")
    problem = _Problem(model, tracking, k, det, conf, net_points,
                       jaw_dof=model.jaw_dof, n_betas=model.n_shape, device=device, p0=0.1, progress=progress,
                       should_cancel=should_cancel)
    start = _Start(rot, transl, np.zeros((n_all, 3)),
                   np.zeros((n_all, model.n_expression)) if expr is None else expr, betas)
    params = _refine(problem, start, config)
    if "eye_left" in tuple(model.joint_names) and np.isin(IRIS_CENTRES, model.landmark_ids).all():
        params = _fit_gaze(problem, params, config)
    return CoarseFit(model, params, k, ~det, float("nan"), time.perf_counter() - t_start)


def _landmark_bases(model: FaceModel, cols: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rest landmarks (M, 3), identity basis (S, M, 3), expression basis (E, M, 3)) of a
    model whose landmarks are linear in its coefficients at rest pose (the landmarks ``cols``
    selects, (M,) bool, or all)."""
    s, e = model.n_shape, model.n_expression
    p = model.zero_params(1 + s + e)
    p = FaceParams(torch.cat([torch.zeros(1, s), torch.eye(s), torch.zeros(e, s)]),
                   torch.cat([torch.zeros(1 + s, e), torch.eye(e)]), *(getattr(p, f) for f in
                                                                       ("global_orient", "neck_pose", "jaw_pose",
                                                                        "leye_pose", "reye_pose", "transl")))
    with torch.no_grad():
        lmk = model.forward(p, full=False).landmarks.double().numpy()
    if cols is not None:
        lmk = lmk[:, cols]
    rest = lmk[0]
    return rest, lmk[1:1 + s] - rest, lmk[1 + s:] - rest


#: Weight of a landmark's depth against its image-plane coordinates in the linear start
#: (MediaPipe's depth is its own estimate, not a measurement).
START_DEPTH_WEIGHT = 0.5
#: Ridge on the start's expression weights and identity, per unit coefficient, against the
#: landmarks' squared error in metres.
START_RIDGE_EXPRESSION = 1e-6
START_RIDGE_IDENTITY = 1e-5
#: Fewest frames whose mouth is seen for the clip's own shapes (FitConfig.shape_adaptation).
MIN_ADAPT_FRAMES = 10
#: Rounds of per-frame pose and expression weights in the start.
START_POSE_ROUNDS = 3
#: Rounds of rest shape (identity) and expressions in the start.
START_ROUNDS = 4


def _box_least_squares(a: np.ndarray, b: np.ndarray, lo: float, hi: float, ridge: float, l1: float = 0.0,
                       iterations: int = 300) -> np.ndarray:
    """min 1/2 |a x_t - b_t|^2 + ridge/2 |x_t|^2 + l1 sum(x_t) with lo <= x <= hi (lo >= 0
    for the L1 term to be a norm), for every row b_t of b (T, R) at once (a (R, K) is
    shared): accelerated projected gradient (FISTA)."""
    h = a.T @ a + ridge * np.eye(a.shape[1])
    g = b @ a - l1  # (T, K)
    step = 1.0 / np.linalg.eigvalsh(h)[-1]
    x = np.clip(np.zeros_like(g), lo, hi)
    y, tk = x.copy(), 1.0
    for _ in range(iterations):
        x_new = np.clip(y - step * (y @ h - g), lo, hi)
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * tk * tk))
        y = x_new + ((tk - 1.0) / t_new) * (x_new - x)
        x, tk = x_new, t_new
    return x


def _rest_shape(aligned: np.ndarray, ids: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """(M, 3) the clip's rest shape from its aligned landmarks (Td, M, 3): the median over the
    frames whose mouth is seen, the lower face's from the frames whose lips are closest
    (the lowest tenth of the inner-lip gap): bounded expression weights move only away from
    rest, so the rest must be the closed mouth, not the average one."""
    from avface.models.canonical_mesh import lower_face_ids

    use = aligned[seen] if seen.sum() >= 3 else aligned
    rest = np.median(use, axis=0)
    pos = {int(i): k for k, i in enumerate(ids)}
    if 13 in pos and 14 in pos:
        gap = np.linalg.norm(use[:, pos[13]] - use[:, pos[14]], axis=1)
        closed = gap <= np.quantile(gap, 0.1)
        lower = np.isin(ids, lower_face_ids())
        rest[lower] = np.median(use[closed][:, lower], axis=0)
    return rest


def _linear_start(model: FaceModel, points: np.ndarray, rigid_w: np.ndarray, conf: np.ndarray, config: FitConfig,
                  net_points: np.ndarray | None = None, det: np.ndarray | None = None):
    """Where the refinement of a model with bounded expression weights starts, all linear
    least squares on the back-projected landmarks ``points`` (Td, M, 3) metres:

    1. the clip's rest shape (:func:`_rest_shape`) on per-frame rigid poses (skull points);
    2. the clip's identity: the modes that best give that shape, and, where the model can take
       one (``with_landmark_offsets``), a smooth correction for what the modes leave;
    3. each frame's expression weights within their bounds, sparse (L1), a frame's lower face
       counting only when its mouth is seen;
    4. where the model can take them (``with_shape_offsets``) and FitConfig.shape_adaptation
       is on, the clip's own version of the shapes (:func:`_clip_shape_offsets`), and step 3
       again;
    5. with the networks' lower-face points ``net_points`` (T, 97, 3) of every frame (``det``
       (T,) says which frames ``points`` holds), the weights of every frame that give the
       clip's median face with the networks' lower face (as :func:`_network_start` does for
       the default model), for the frames whose mouth is not seen.

    Returns (the model, corrected; rotations (Td, 3, 3), translations (Td, 3), betas (S,),
    expression (Td, E), the networks' expression (T, E) or None)."""
    from avface.models.canonical_mesh import lower_face_ids

    ids = np.asarray(model.landmark_ids)
    mesh = ids < N_VERTICES  # the face mesh's landmarks, which points holds
    ids = ids[mesh]
    seen = conf >= 0.5
    base, b_id, b_ex = _landmark_bases(model, mesh)
    n = len(points)
    lo, hi = model.expression_bounds
    betas = np.zeros(b_id.shape[0])
    expr = np.zeros((n, b_ex.shape[0]))
    axis_w, l1 = _start_weights(model, ids, config)
    rows = np.repeat(~np.isin(ids, lower_face_ids()), 3)
    shaped = base
    for _ in range(START_ROUNDS):
        # the rest: what the frames leave once their expressions are taken out
        r, t = rigid(shaped + np.tensordot(expr, b_ex, 1), points, rigid_w)
        aligned = np.einsum("tji,tmj->tmi", r, points - t[:, None])
        target = _rest_shape(aligned - np.tensordot(expr, b_ex, 1), ids, seen)
        if b_id.shape[0]:
            a_id = (b_id * axis_w).reshape(len(b_id), -1).T  # (M*3, S)
            betas = betas + np.linalg.solve(a_id.T @ a_id + START_RIDGE_IDENTITY * np.eye(a_id.shape[1]),
                                            a_id.T @ ((target - shaped) * axis_w).reshape(-1))
        shaped = base + np.tensordot(betas, b_id, 1)
        if hasattr(model, "with_landmark_offsets"):
            model = model.with_landmark_offsets(target - shaped)
            base, b_id, b_ex = _landmark_bases(model, mesh)
            shaped = base + np.tensordot(betas, b_id, 1)
        a_ex = (b_ex * axis_w).reshape(len(b_ex), -1).T  # (M*3, E)
        for _ in range(START_POSE_ROUNDS):
            # each frame's pose on its own expression (the skull's points move a little with it)
            r, t = rigid(shaped + np.tensordot(expr, b_ex, 1), points, rigid_w)
            aligned = np.einsum("tji,tmj->tmi", r, points - t[:, None])
            resid = ((aligned - shaped) * axis_w).reshape(n, -1)
            if seen.any():
                expr[seen] = _box_least_squares(a_ex, resid[seen], lo, hi, START_RIDGE_EXPRESSION, l1)
            if (~seen).any():  # sparser where the evidence is weak
                expr[~seen] = _box_least_squares(a_ex[rows], resid[~seen][:, rows], lo, hi, START_RIDGE_EXPRESSION,
                                                 l1 * (1.0 + config.l1_unseen_boost))
    lam = config.shape_adaptation
    if lam > 0 and hasattr(model, "with_shape_offsets") and seen.sum() >= MIN_ADAPT_FRAMES:
        for _ in range(2):
            e_s = expr[seen]
            r_s = (aligned[seen] - shaped).reshape(int(seen.sum()), -1) - e_s @ b_ex.reshape(len(b_ex), -1)
            d = _clip_shape_offsets(e_s, r_s, lam, getattr(model, "jaw_shapes", None), np.repeat(np.isin(ids, CHIN), 3))
            model = model.with_shape_offsets(d.reshape(b_ex.shape))
            _, _, b_ex = _landmark_bases(model, mesh)
            a_ex = (b_ex * axis_w).reshape(len(b_ex), -1).T
            expr[seen] = _box_least_squares(a_ex, resid[seen], lo, hi, START_RIDGE_EXPRESSION, l1)
    net_expr = None
    if net_points is not None:
        face = _networks_face(aligned, ids, net_points, seen, np.ones(len(points), bool) if det is None else det)
        net_expr = _box_least_squares(a_ex, ((face - shaped) * axis_w).reshape(len(face), -1), lo, hi,
                                      START_RIDGE_EXPRESSION, l1 * (1.0 + config.l1_unseen_boost))
    return model, r, t, betas, expr, net_expr


def _start_weights(model: FaceModel, ids: np.ndarray, config: FitConfig) -> tuple[np.ndarray, np.ndarray]:
    """(each landmark coordinate's square-root weight (M, 3), each shape's L1 weight (E,)) in
    the start: lips count double, as in the refinement, depth less; the jaw's shapes open the
    mouth unless the landmarks say otherwise (``jawless_mouth_shapes`` cost more)."""
    lmk_w = np.where(np.isin(ids, LIPS), config.start_lip_weight, 1.0)
    axis_w = np.sqrt(lmk_w[:, None] * np.array([1.0, 1.0, START_DEPTH_WEIGHT]))
    l1 = np.full(model.n_expression, config.start_l1)
    jawless = getattr(model, "jawless_mouth_shapes", None)
    if jawless is not None:
        l1[np.asarray(jawless, bool)] *= config.jawless_l1_scale
    return axis_w, l1


def _clip_shape_offsets(weights: np.ndarray, resid: np.ndarray, lam: float, jaw: np.ndarray | None,
                        chin_cols: np.ndarray) -> np.ndarray:
    """(E, M*3) the clip's own shapes' landmark offsets: per landmark coordinate, the ridge
    regression min |W d - r|^2 + lam n |d|^2 of what the generic shapes leave (``resid`` (n,
    M*3)) on the seen frames' weights W (n, E). The chin is the jaw's: on ``chin_cols`` only
    the ``jaw`` shapes ((E,) bool, or None for all) learn how this chin moves."""
    n = len(weights)
    d = np.linalg.solve(weights.T @ weights + lam * n * np.eye(weights.shape[1]), weights.T @ resid)
    if jaw is not None:
        jaw = np.asarray(jaw, bool)
        wj = weights[:, jaw]
        d[:, chin_cols] = 0.0
        d[np.ix_(jaw, chin_cols)] = np.linalg.solve(wj.T @ wj + lam * n * np.eye(int(jaw.sum())), wj.T @ resid[:, chin_cols])
    return d


def _networks_face(aligned: np.ndarray, ids: np.ndarray, net_points: np.ndarray, seen: np.ndarray,
                   det: np.ndarray) -> np.ndarray:
    """(T, M, 3) the clip's median face on every frame, its lower face the networks' points
    (T, 97, 3) mapped into the model's frame: the similarity that takes their median over the
    seen frames onto the aligned landmarks' (Td, M, 3; ``det`` (T,) says which frames), and
    their motion about it added to the latter. What the tracker saw of a frame whose mouth is
    hidden is not to be trusted above the mouth either (a hand drags the whole mesh)."""
    from avface.core.geometry import similarity
    from avface.models.avnets import LOWER_FACE_LANDMARKS

    pos = {int(i): k for k, i in enumerate(ids)}
    lower = [pos[i] for i in LOWER_FACE_LANDMARKS if i in pos]
    cols = [k for k, i in enumerate(LOWER_FACE_LANDMARKS) if i in pos]
    pts = np.nan_to_num(np.asarray(net_points, np.float64)[:, cols])
    trusted = seen & np.isfinite(net_points[det]).all(axis=(1, 2))
    if not trusted.any():
        trusted = np.ones(len(aligned), bool)
    src = np.median(pts[det][trusted], axis=0)
    dst = np.median(aligned[trusted][:, lower], axis=0)
    s, r, _ = similarity(src, dst)
    face = np.repeat(np.median(aligned[trusted], axis=0)[None], len(pts), axis=0)
    face[:, lower] = dst + s * (pts - src) @ r.T
    return face


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
