"""Every option of a reconstruction, one frozen dataclass per stage, with a docstring per
field: the CLI's flags and ``--config`` YAML, the service's submit options and the
``config.yaml`` written beside each result all come from here. Torch-free, so that the
service validates options without loading the pipeline.

Values are checked against the fields' types when they come from outside (YAML, JSON):
``ReconstructOptions.from_dict`` names the option and what was wrong with it.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from avface.errors import InputError

MODELS = ("default", "flame", "ict")
DEVICES = ("cpu", "cuda")
PATH_OPTIONS = {"flame_dir": "dir", "audio": "file", "transcript": "file", "cache_dir": "dir",
                "networks_checkpoint": "file"}
"""Options that name a path on the backend's machine, and what they must name (the service
accepts them only under its roots)."""
#: Values of a path option that name no path: the shipped checkpoint, or none.
NAMED_CHECKPOINTS = ("default", "none")


def networks_off(checkpoint: str | None) -> bool:
    """True when ``networks_checkpoint`` turns the networks stage off (None or ``none``)."""
    return checkpoint is None or checkpoint == "none"


@dataclass(frozen=True)
class TrackingConfig:
    """Options of the visual front end."""

    min_detection_confidence: float = 0.5
    """Face detector score below which a frame has no face."""
    min_presence_confidence: float = 0.5
    """Landmarker's face-presence score below which the tracker re-detects."""
    min_tracking_confidence: float = 0.5
    """Score below which tracking falls back to detection."""
    hands: bool = True
    """Run the hand landmarker to find hands over the face."""
    hand_margin: float = 0.08
    """Grow each hand's hull by this fraction of the face width before testing cover."""
    hand_stride: int = 1
    """Run the hand landmarker on every n-th frame only; a skipped frame's hand cover is the
    larger of its tracked neighbours'. 2 cuts tracking's CPU time by about a quarter, but on
    the benchmark (seed 0) it lowered the hand variant's flagged share on two of eight clips
    (feifeili 0.31 -> 0.24, lrs3 0.79 -> 0.64), so every frame stays the default."""


@dataclass(frozen=True)
class FitConfig:
    """Options of the coarse fit."""

    fov_deg: float = 63.0
    """Vertical field of view of the camera, degrees, where the pipeline has neither the
    user's nor an estimate (ReconstructOptions.fov_deg)."""
    max_expression: int = 50
    """Upper bound on the per-clip expression basis size (FLAME uses 50)."""
    explained_variance: float = 0.999
    """Keep the fewest expression components that explain this fraction of the variance."""
    iterations: int = 40
    """Joint refinement steps (L-BFGS iterations)."""
    w_depth: float = 0.05
    """Weight of the tracker's relative depth against 2D reprojection (both in percent of
    the inter-ocular distance, squared)."""
    w_smooth_pose: float = 0.5
    """Second-difference penalty on pose, in degrees and millimetres per frame squared."""
    w_smooth_expression: float = 0.1
    """Second-difference penalty on expression coefficients (unit variance over the clip)
    and jaw (degrees)."""
    w_expression: float = 1e-3
    """L2 prior on expression coefficients."""
    w_expression_l1: float = 0.01
    """L1 prior on bounded expression weights (the ICT model's, in [0, 1]): a shape stays at 0
    unless the landmarks ask for it. Per frame it is multiplied by 1 + l1_unseen_boost x (1 -
    the mouth's confidence), so where the evidence is weak fewer shapes are used."""
    l1_unseen_boost: float = 3.0
    """How much more the L1 prior weighs on a frame whose mouth is not seen at all."""
    start_l1: float = 1e-5
    """L1 prior on the bounded expression weights where the fit starts (a linear solve in
    metres, :func:`avface.stages.fit._linear_start`), which sets most of the weights: with
    it, fewer shapes combine to make one motion, so the jaw opens with ``jawOpen``. ICT
    model, four real clips: jawOpen's correlation with the lip gap 0.83 -> 0.89 (GRID) and
    0.52 -> 0.65 (20-s clip), landmark NME 0.40 -> 0.45 %."""
    start_lip_weight: float = 2.0
    """Weight of the lip landmarks in the start of a bounded fit (the refinement's own is 2).
    ICT model, four real clips: lips NME 0.52-0.55 -> 0.49-0.51 %."""
    jawless_l1_scale: float = 20.0
    """How much more the start's L1 prior weighs on the shapes that part or close the lips
    without the jaw (the ICT model's ``jawless_mouth_shapes``): speech opens the mouth with
    the jaw, and left alone the fit parts the lips with ``mouthLowerDown`` and its kin as often.
    Four real clips: jawOpen's correlation with the lip gap 0.52-0.84 -> 0.88-0.94, lips NME
    +0.01 %."""
    shape_adaptation: float = 1e-3
    """Ridge of the clip's own expression shapes (the ICT model): each shape's landmark
    offsets are learned from the clip's seen frames, pulled towards the generic shape with
    this weight per frame (0: the generic shapes as they ship). On four real clips, landmark
    NME 1.5 -> 0.4 % and lips 2.1 -> 0.6 %."""
    w_shape: float = 1e-2
    """L2 prior on identity coefficients (FLAME betas)."""
    identity_prior: float = 0.4
    """How far the clip's identity is pulled from the tracker's shape towards the canonical
    mean face (0 keeps the tracker's, 1 uses the mean face); the lips are left alone.
    MediaPipe's per-frame 3D shape carries a systematic bias (forehead top, nose ridge, above
    the eyelids) about as large as an identity's own deviation from the mean face, so halving
    the deviation would be the MAP estimate for equal variances; 0.4 leans to the tracker,
    since real identities vary more than the synthetic ones it was checked on. Synthetic clips
    with known identity, seeds 1 and 2 (the demo is seed 0): 3D error 2.31 -> 2.01 mm and
    2.08 -> 1.70 mm, landmark NME 0.7 -> 1.1 %. Set 0 to keep the tracker's shape exactly."""
    w_networks: float = 1.0
    """Weight of the networks' lower-face landmarks on frames whose mouth is not seen (times
    1 - the mouth's confidence), against the tracker's landmarks at weight 1; used only when
    the networks stage ran."""
    use_visual_confidence: bool = True
    """Weight the lower-face landmarks of each frame by the mouth's visual confidence, so
    that occluded spans are filled from their visible neighbours instead of fitted to a
    tracker that is guessing."""


@dataclass(frozen=True)
class NetworksStageConfig:
    """Options of the networks stage (the audio-visual coarse stage and the lip SIREN,
    docs/networks.md). It runs when ``ReconstructOptions.networks_checkpoint`` names a
    checkpoint."""

    adapt: bool = True
    """Adapt to the clip before filling the frames whose mouth is not seen: a closed-form
    readout from the audio embedding to the speaker's own mouth, learned on the clip's
    trusted frames, and the fill chosen on spans hidden from them (avface.stages.networks.readout).
    Off: the generic networks' prediction fills those frames."""
    adapt_steps: int = 0
    """Gradient fine-tuning steps of the networks on the clip's trusted frames before the
    readout (avface.train.adapt; early stopping on a held-out part). 0: none (on 2 CPU
    cores 200 steps cost about ten times the tracking, for no measured gain)."""
    lips: bool = True
    """Refine the lips with the SIREN: the result's lip_basis and lip_coeffs."""
    seed: int = 0
    """Seeds adaptation; the same seed gives the same result."""


@dataclass(frozen=True)
class DetailStageConfig:
    """Options of the fine stage (per-frame UV displacement maps, docs/fine_stage.md). It
    runs when ``ReconstructOptions.detail`` is on."""

    map_size: int = 0
    """Side of the UV maps in texels (a multiple of 16); 0: 128 on the CPU, 512 on CUDA."""
    steps: int = 30
    """Optimiser steps of the per-clip adaptation (batches of ``batch`` frames). From the
    checkpoint's generic start, 30 steps keep most of what 60 learn (20-s clip at 128^2:
    held-out gain 0.143 against 0.154) in half the training time."""
    batch: int = 2
    """Frames per step."""
    train_frames: int = 24
    """At most this many frames, evenly spaced over the trusted ones, train the network."""
    holdout_stride: int = 5
    """Every holdout_stride-th frame is kept out of training, and measured (meta.detail's
    held-out photometric residuals); 0 keeps none out."""
    seed: int = 0
    """Seeds the network's initial weights and the order of training; the same seed gives
    the same maps."""


@dataclass(frozen=True)
class ReconstructOptions:
    """What the user chooses for one job (the CLI's flags, the service's submit options)."""

    model: str = "default"
    """``default`` (the embedded canonical face), ``ict`` (the ICT Face Model Light: a whole head
    whose expression shapes are ARKit's) or ``flame``."""
    flame_dir: str | None = None
    """Folder with FLAME's generic_model.pkl or flame2023.pkl and mediapipe_landmark_embedding.npz."""
    audio: str | None = None
    """A separate audio file to use instead of the video's own track."""
    transcript: str | None = None
    """A text file with what is said; switches phones to forced alignment."""
    device: str = "cpu"
    """``cpu`` or ``cuda`` for the torch stages."""
    frame_start: int | None = None
    """First frame to reconstruct (0-based, at the clip's frame rate); None: the first."""
    frame_end: int | None = None
    """One past the last frame to reconstruct; None: to the end."""
    preview: bool = False
    """Also write preview.mp4: the fitted mesh over the frames, with the audio."""
    threads: int = 0
    """torch's intra-op threads for the job's stages; 0: what the process has (one per core unless
    ``OMP_NUM_THREADS`` says otherwise; ``avface.core.threads``).
    The service gives each job its share (``avface serve --threads``)."""
    write_vertices: bool = True
    """Store the final per-frame mesh (T, V, 3) float16 in the result."""
    fov_deg: float | None = None
    """Vertical field of view of the camera, degrees; None estimates it from the clip
    (avface.stages.camera.estimate_fov; FitConfig.fov_deg where too few frames have a trusted face)."""
    cache_dir: str | None = None
    """Where tracking is cached; None uses ~/.cache/avface (or $AVFACE_CACHE_DIR)."""
    networks_checkpoint: str | None = "default"
    """The AVFace networks' checkpoint: ``default`` (the one that ships,
    ``models/weights/avface_networks.pt``), a file ``avface train`` wrote, or ``none``
    (or None): video only, no networks stage."""
    detail: bool = True
    """Run the fine stage: one 16-bit displacement map per frame in ``detail/``. On by
    default: with the generic start it fits the speed budget on a CPU (the benchmark's
    ``av_full``: 6.6x tracking for the whole job, aggregated; docs/fine_stage.md)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """The tracking stage's options."""
    fit: FitConfig = field(default_factory=FitConfig)
    """The coarse fit's options."""
    networks: NetworksStageConfig = field(default_factory=NetworksStageConfig)
    """The networks stage's options."""
    fine: DetailStageConfig = field(default_factory=DetailStageConfig)
    """The fine stage's options."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ReconstructOptions":
        """Options from plain data (YAML, JSON): unknown names, wrong types and bad values are
        an InputError that names the option."""
        opts = _from_dict(cls, d, "")
        if opts.model not in MODELS:
            raise InputError(f"--model must be one of {', '.join(MODELS)}, got {opts.model!r}")
        if opts.device not in DEVICES:
            raise InputError(f"--device must be 'cpu' or 'cuda', got {opts.device!r}")
        return opts

    @classmethod
    def from_yaml(cls, path: Path, **overrides) -> "ReconstructOptions":
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise InputError(f"cannot read config {path}: {e}") from e
        if not isinstance(data, dict):
            raise InputError(f"config {path} must be a mapping of option names to values")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)


def _from_dict(cls, d: object, prefix: str):
    """An instance of dataclass ``cls`` from a mapping, every value checked against its field's type."""
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise InputError(f"options{' ' + prefix.rstrip('.') if prefix else ''} must be a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        what = f"{prefix.rstrip('.')} options" if prefix else "options"
        raise InputError(f"unknown {what} {sorted(unknown)}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _checked(prefix + k, v, hints[k]) for k, v in d.items()})


def _checked(name: str, value, hint):
    """value as the type ``hint`` (a scalar, ``X | None`` or a config dataclass), or InputError."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, name + ".")
    # bool is an int to Python, never to a user; an int is a fine float ("fov_deg: 60")
    ok = (isinstance(value, bool) if hint is bool else
          isinstance(value, int) and not isinstance(value, bool) if hint is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if hint is float else
          isinstance(value, hint))
    if not ok:
        raise InputError(f"option {name} must be {hint.__name__}, got {value!r}")
    return float(value) if hint is float else value
