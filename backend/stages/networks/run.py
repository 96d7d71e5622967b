"""The networks stage (docs/networks.md) as plain functions, shared by the pipeline
and the benchmark's audio-visual methods: the clip's evidence, per-clip adaptation (seeded),
the networks' prediction for the fit, and after the fit the lip refinement as the result
contract wants it (rest-frame offsets, a PCA of K <= 16 components)."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from avface.config import NetworksStageConfig

log = logging.getLogger(__name__)


#: Speech activity above which a filled mouth counts as carried by the audio.
AUDIO_CARRIES_ABOVE = 0.5


@dataclass
class NetworkRun:
    """What the networks stage hands on to the fit and the export."""

    networks: object
    """The (adapted) :class:`~avface.models.checkpoint.AVFaceNetworks`."""
    evidence: object
    """The clip's :class:`~avface.stages.networks.evidence.Evidence`."""
    prediction: object
    """Their :class:`~avface.stages.networks.predict.Prediction` (``landmarks`` go to the fit)."""
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
        from avface.stages.networks.evidence import offsets_to_points

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


@dataclass(frozen=True)
class ClipInputs:
    """What the networks stage reads of one clip."""

    tracking: object
    """The clip's :class:`~avface.stages.tracking.Tracking`."""
    features: object
    """Its :class:`~avface.stages.audio.AudioFeatures` (None without speech)."""
    mouth_conf: np.ndarray
    """(T,) the visual confidence of the mouth."""
    fov_deg: float
    """The camera's vertical field of view (the ``camera`` stage's)."""


#: Gradient fine-tuning of the networks on one clip: (networks, clip, config, device) ->
#: (adapted networks, the record for meta). Training code, so the caller hands it in
#: (reconstruct and the benchmark give :func:`avface.train.adapt.adapt_networks`) and nothing
#: under ``avface.stages`` imports ``avface.train``.
Adapter = Callable[[object, ClipInputs, NetworksStageConfig, str], tuple]


def run_networks(checkpoint, clip: ClipInputs, *, config: NetworksStageConfig = NetworksStageConfig(),
                 device: str = "cpu", video: bool = True, report: Callable[[float, str], None] | None = None,
                 adapter: Adapter | None = None) -> NetworkRun:
    """Evidence -> (adaptation) -> prediction. ``checkpoint`` is a loaded
    :class:`~avface.models.checkpoint.Checkpoint`; ``video=False`` hides the face from the
    expression branch (its embedding is the "missing" zero), so the lower face comes from
    the speech and the context alone. ``adapter`` runs the gradient adaptation that
    ``config.adapt_steps > 0`` asks for."""
    from avface.core.geometry import intrinsics_for
    from avface.stages.networks.evidence import build_evidence
    from avface.stages.networks.predict import predict

    tracking, mouth_conf, fov_deg = clip.tracking, clip.mouth_conf, clip.fov_deg
    evidence = build_evidence(tracking, clip.features, mouth_conf=mouth_conf, fov_deg=fov_deg)
    if not video:
        evidence.expression["usable"] = evidence.expression["usable"] * 0.0
    networks = checkpoint.networks
    meta = {"checkpoint": str(checkpoint.path), "checkpoint_sha256": checkpoint.sha256, "seed": config.seed,
            "adapt": None, "readout": None, "video": video}
    if config.adapt and config.adapt_steps > 0:
        if report:
            report(0.05, "adapting")
        if adapter is None:
            raise ValueError("config.adapt_steps > 0 asks for gradient adaptation: pass adapter= "
                             "(avface.train.adapt.adapt_networks)")
        networks, meta["adapt"] = adapter(networks, clip, config, device)
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
    avface.stages.confidence.OCCLUDED_BELOW)."""
    from avface.stages.confidence import OCCLUDED_BELOW

    usable = evidence.expression["usable"].numpy() > 0.5
    return usable & (np.asarray(mouth_conf, np.float64) >= OCCLUDED_BELOW)


def _readout(networks, evidence, prediction, trusted: np.ndarray, f_a: np.ndarray | None, k: np.ndarray,
             config: NetworksStageConfig, device: str):
    """The prediction with the frames that are not ``trusted`` (T,) filled as the clip's own
    closed-form adaptation chooses (avface.stages.networks.readout) from the audio embedding ``f_a``,
    and the record for meta."""
    import torch

    from avface.models.avnets import infer_expression
    from avface.stages.networks.evidence import landmarks_from_offsets
    from avface.stages.networks.readout import ReadoutConfig, adapt_fill

    e = {name: v.to(device) for name, v in evidence.expression.items()}
    net = networks.expression.to(device).eval()

    def network(hidden: np.ndarray) -> np.ndarray:
        seen = torch.as_tensor(trusted & ~hidden, dtype=torch.float32, device=device)
        return infer_expression(net, dict(e, usable=e["usable"] * seen)).cpu().numpy()

    lips = None
    if config.lips:
        from avface.core.topology import LIPS
        from avface.stages.networks.predict import predict_lips

        frame = evidence.frame
        lips = predict_lips(networks, evidence, frame.neutral[list(LIPS)], device=device) / frame.iod
    filled, record = adapt_fill(evidence.expression["landmarks"].numpy(), trusted, f_a, network,
                                ReadoutConfig(seed=config.seed), lips=lips)
    log.info("adapted fill: %s on %d frames (chosen on %d hidden trusted frames)", record.choice,
             int((~trusted).sum()), record.hidden_frames)
    landmarks = landmarks_from_offsets(filled, evidence.frame, k, prediction.rotation, prediction.translation)
    return replace(prediction, offsets=filled.astype(np.float32), landmarks=landmarks), record.to_meta()
