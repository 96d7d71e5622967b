"""The networks stage (issue 8, docs/networks.md) as plain functions, shared by the pipeline
and the benchmark's audio-visual methods: the clip's evidence, per-clip adaptation (seeded),
the networks' prediction for the fit, and after the fit the lip refinement as the result
contract wants it (rest-frame offsets, a PCA of K <= 16 components)."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .config import NetworksStageConfig
from .lips import LipPCA, lip_pca, posed_displacement, rest_frame_offsets

log = logging.getLogger(__name__)


#: Speech activity above which a filled mouth counts as carried by the audio.
AUDIO_CARRIES_ABOVE = 0.5


@dataclass
class NetworkRun:
    """What the networks stage hands on to the fit and the export."""

    networks: object
    """The (adapted) :class:`~avface.models.checkpoint.AVFaceNetworks`."""
    evidence: object
    """The clip's :class:`~avface.evidence.Evidence`."""
    prediction: object
    """Their :class:`~avface.predict.Prediction` (``landmarks`` go to the fit)."""
    meta: dict
    """Checkpoint path and hash, the seed, and the adaptation's record (None: not asked for;
    ``{"skipped": reason}``: the clip was too short)."""
    audio_frames: np.ndarray | None = None
    """(T,) bool: frames whose mouth the speech carried (not seen, speech active, and filled
    by the networks or the clip's audio readout rather than the straight line)."""
    f_a: np.ndarray | None = None
    """(T, 64) the (adapted) audio encoder's embedding per frame (:func:`audio_embedding`),
    None without speech: the readout learned from it, and the fine stage takes it as its
    audio channel."""

    @property
    def points(self) -> np.ndarray:
        """(T, 97, 3) the predicted lower face as head-frame points, metres: the fit's
        pose-free target where the mouth is not seen (``fit_default(net_points=...)``);
        NaN on frames without a face when the clip's adaptation chose the straight line."""
        from .evidence import offsets_to_points

        frame = self.evidence.frame
        points = offsets_to_points(self.prediction.offsets, frame.neutral, frame.iod)
        readout = self.meta.get("readout")
        if readout is not None and readout["choice"] == "interp":
            # a frame without a face, filled by the straight line, is what the fit's own
            # smoothness gives, and better from the fit (measured: 1.20x on one clip)
            no_face = self.evidence.expression["usable"].numpy() < 0.5
            points[no_face] = np.nan
        return points


@contextlib.contextmanager
def torch_seeded(seed: int):
    """Torch's global generator seeded inside and restored after, so that nothing the
    networks draw depends on what ran before."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def run_networks(checkpoint, tracking, features, mouth_conf: np.ndarray, *, fov_deg: float,
                 config: NetworksStageConfig = NetworksStageConfig(), device: str = "cpu", video: bool = True,
                 report: Callable[[float, str], None] | None = None) -> NetworkRun:
    """Evidence -> (adaptation) -> prediction. ``checkpoint`` is a loaded
    :class:`~avface.models.checkpoint.Checkpoint`; ``video=False`` hides the face from the
    expression branch (its embedding is the "missing" zero), so the lower face comes from
    the speech and the context alone."""
    from .evidence import build_evidence
    from .geometry import intrinsics_for
    from .predict import predict

    evidence = build_evidence(tracking, features, mouth_conf=mouth_conf, fov_deg=fov_deg)
    if not video:
        evidence.expression["usable"] = evidence.expression["usable"] * 0.0
    networks = checkpoint.networks
    meta = {"checkpoint": str(checkpoint.path), "checkpoint_sha256": checkpoint.sha256, "seed": config.seed,
            "adapt": None, "readout": None, "video": video}
    if config.adapt and config.adapt_steps > 0:
        if report:
            report(0.05, "adapting")
        networks, meta["adapt"] = _adapt(networks, tracking, features, mouth_conf, fov_deg, config, device)
    if report:
        report(0.6, "predicting")
    k = intrinsics_for(tracking.width, tracking.height, fov_deg)
    with torch_seeded(config.seed):
        prediction = predict(networks, evidence, k, device=device)
    trusted = trusted_mouth(evidence, mouth_conf)
    f_a = audio_embedding(networks, evidence, device)
    if config.adapt and video:
        if report:
            report(0.8, "adapting the fill")
        prediction, meta["readout"] = _readout(networks, evidence, prediction, trusted, f_a, k, config, device)
    speaking = evidence.activity.numpy() > AUDIO_CARRIES_ABOVE
    straight = meta["readout"] is not None and meta["readout"]["choice"] == "interp"
    audio_frames = ~trusted & speaking & (not straight)
    meta["audio_frames"] = int(audio_frames.sum())
    return NetworkRun(networks, evidence, prediction, meta, audio_frames, f_a)


def audio_embedding(networks, evidence, device: str = "cpu") -> np.ndarray | None:
    """(T, 64) float32 the audio encoder's f_a per frame, 0 where there is no speech
    track; None for a clip without audio. Computed once per clip by :func:`run_networks`
    (``NetworkRun.f_a``)."""
    import torch

    e = evidence.expression
    if float(e["audio_present"].max()) <= 0:
        return None
    net = networks.expression.to(device).eval()
    with torch.no_grad():
        f_a = net.audio(e["phones"].to(device), e["mel"].to(device)) * e["audio_present"].to(device)[:, None]
    return f_a.cpu().numpy()


def trusted_mouth(evidence, mouth_conf: np.ndarray) -> np.ndarray:
    """(T,) bool: frames whose mouth the tracker sees (detected, confidence at least
    avface.confidence.OCCLUDED_BELOW)."""
    from .confidence import OCCLUDED_BELOW

    usable = evidence.expression["usable"].numpy() > 0.5
    return usable & (np.asarray(mouth_conf, np.float64) >= OCCLUDED_BELOW)


def _readout(networks, evidence, prediction, trusted: np.ndarray, f_a: np.ndarray | None, k: np.ndarray,
             config: NetworksStageConfig, device: str):
    """The prediction with the frames that are not ``trusted`` (T,) filled as the clip's own
    closed-form adaptation chooses (avface.train.readout) from the audio embedding ``f_a``,
    and the record for meta."""
    import torch

    from .evidence import landmarks_from_offsets
    from avface.models.avnets import infer_expression
    from .train.readout import ReadoutConfig, adapt_fill

    e = {name: v.to(device) for name, v in evidence.expression.items()}
    net = networks.expression.to(device).eval()

    def network(hidden: np.ndarray) -> np.ndarray:
        seen = torch.as_tensor(trusted & ~hidden, dtype=torch.float32, device=device)
        return infer_expression(net, dict(e, usable=e["usable"] * seen)).cpu().numpy()

    lips = None
    if config.lips:
        from .predict import predict_lips
        from .topology import LIPS

        frame = evidence.frame
        lips = predict_lips(networks, evidence, frame.neutral[list(LIPS)], device=device) / frame.iod
    filled, record = adapt_fill(evidence.expression["landmarks"].numpy(), trusted, f_a, network,
                                ReadoutConfig(seed=config.seed), lips=lips)
    log.info("adapted fill: %s on %d frames (chosen on %d hidden trusted frames)", record.choice,
             int((~trusted).sum()), record.hidden_frames)
    landmarks = landmarks_from_offsets(filled, evidence.frame, k, prediction.rotation, prediction.translation)
    return replace(prediction, offsets=filled.astype(np.float32), landmarks=landmarks), record.to_meta()


def _adapt(networks, tracking, features, mouth_conf, fov_deg: float, config: NetworksStageConfig, device: str):
    """(adapted networks, the record for meta); the given networks and the reason when the
    clip is too short to hold a part out."""
    from .train.adapt import AdaptConfig, adapt, holdout_starts
    from .train.data import prepare_clip

    cfg = AdaptConfig(max_steps=config.adapt_steps, seed=config.seed)
    kept, held = holdout_starts(tracking.n_frames, cfg)
    if len(kept) == 0 or len(held) == 0:
        reason = f"a clip of {tracking.n_frames} frames is too short to hold a part out (blocks of {cfg.block_frames})"
        log.warning("adaptation skipped: %s", reason)
        return networks, {"skipped": reason}
    clip = prepare_clip(tracking, features, mouth_conf=mouth_conf, fov_deg=fov_deg)
    with torch_seeded(config.seed):
        adapted, record = adapt(networks, clip, cfg, device=device)
    return adapted, record.to_meta()


def refine_lips(net: NetworkRun, fit, *, device: str = "cpu") -> LipPCA:
    """The SIREN's offsets for the fitted model's lip vertices, weighted by how little the
    mouth is seen (1 - its confidence) and by the gain the clip's adaptation chose, moved
    from the head frame to the rest frame (before skinning, as the result contract wants),
    as a PCA."""
    from .predict import predict_lips

    m, p = fit.model, fit.params
    betas = p.betas[:1] if p.betas.shape[1] else None
    positions = m.neutral_vertices(betas)[np.asarray(m.lip_vertex_ids)]
    head = predict_lips(net.networks, net.evidence, positions, device=device)
    # where the tracker sees the lips the fit already follows them: the SIREN's offsets count
    # as much as the mouth is not seen (measured: on every frame they cost visible frames'
    # lips NME 0.89 -> 1.21 %)
    unseen = 1.0 - np.clip(net.evidence.expression["region_conf"][:, 0].numpy(), 0.0, 1.0)
    # and as much as they helped on the trusted frames the adaptation hid (all without it)
    gain = net.meta["readout"]["lip_gain"] if net.meta.get("readout") else 1.0
    pca = lip_pca(rest_frame_offsets(m, p, head * (gain * unseen)[:, None, None]))
    log.info("lips: %d components, PCA residual %.2e m", pca.basis.shape[0], pca.residual_m)
    return pca


def vertices_with_lips(fit, lips: LipPCA | None) -> np.ndarray:
    """(T, V, 3) float32 camera-frame vertices of the coarse fit plus the lips' rest-frame
    offsets (``lip_coeffs . lip_basis``) as skinning moves them."""
    from .geometry import WORLD_TO_CAMERA

    vertices = fit.camera_vertices()
    if lips is not None and lips.basis.shape[0]:
        ids = np.asarray(fit.model.lip_vertex_ids)
        rest = np.einsum("tk,klc->tlc", lips.coeffs, lips.basis)
        world = posed_displacement(fit.model, fit.params, rest)
        vertices[:, ids] += (world @ WORLD_TO_CAMERA.T.astype(np.float64)).astype(np.float32)
    return vertices
