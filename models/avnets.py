"""The AVFace coarse-stage networks (docs/design.md section 2, docs/networks.md): the temporal
pose-and-camera encoder, and the expression branch (audio encoder, video encoder, fusion
transformer) that predicts model-independent lower-face geometry.

Pure functions hold the maths (masking, modality dropout, the feed-forward head); the
``nn.Module`` classes only own parameters and call them, as :mod:`avface.models.lbs` is
wrapped by the face models. Every network has one frozen config whose defaults are the
paper's sizes. Shapes: B windows, W frames per window (16), P phones, M = 97 landmarks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from avface.core.topology import LIPS
from avface.models.windows import WINDOW_FRAMES, run_windowed

#: The lower-face landmarks whose offsets the expression branch predicts (docs/networks.md):
#: lips, jaw line and chin, cheeks, between lips and chin, philtrum and nose base. MediaPipe
#: ids; every pair is a left-right mirror on the canonical mesh.
LOWER_FACE_LANDMARKS: tuple[int, ...] = tuple(LIPS) + (
    # jaw line and chin
    132, 361, 58, 288, 172, 397, 136, 365, 150, 379, 149, 378, 176, 400, 148, 377, 152,
    # cheeks
    50, 280, 205, 425, 187, 411, 207, 427, 216, 436, 212, 432, 214, 434, 192, 416,
    # between lips and chin
    57, 287, 43, 273, 106, 335, 204, 424, 83, 313, 201, 421, 18, 200, 199, 175,
    # philtrum and nose base
    167, 393, 165, 391, 92, 322, 164, 2,
)
N_LOWER_FACE = len(LOWER_FACE_LANDMARKS)
N_BLENDSHAPES = 52
N_REGIONS = 3  #: visual confidence regions: mouth, eyes, face (avface.stages.tracking.REGIONS)
N_MELS = 80
N_PHONES = 41  #: avface.stages.audio.PHONES: SIL, NOISE and the 39 CMU phones
SPEECH_WINDOWS = 16  #: 20 ms speech windows per video frame (avface.stages.audio.WINDOW_FRAMES)
POSE_DIM = 6  #: axis-angle rotation (3) and translation (3)
CAMERA_DIM = 3  #: log scale and 2D offset of the weak-perspective camera
#: Landmark offsets are a few hundredths of the inter-ocular distance; the video encoder
#: sees them times this, and the expression head predicts them times this, so that both
#: ends of the branch work with values of order one.
LANDMARK_INPUT_SCALE = 10.0


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class TemporalConfig:
    """The transformer over a window of frames, and the feed-forward head after it."""

    d_model: int = 128
    """Token width."""
    n_layers: int = 3
    """Transformer encoder layers."""
    n_heads: int = 4
    """Attention heads."""
    d_ff: int = 256
    """Feed-forward width inside each encoder layer."""
    dropout: float = 0.0
    """Dropout inside the encoder layers (the paper uses none)."""
    window: int = WINDOW_FRAMES
    """Frames per window (learned positions exist for this many)."""
    head_hidden: int = 256
    """Width of the 3 feed-forward layers (ReLU) after the transformer."""


@dataclass(frozen=True)
class PoseEncoderConfig:
    """Coarse temporal encoder: refines per-frame head pose and camera over a window."""

    temporal: TemporalConfig = TemporalConfig()
    """Transformer and head sizes."""
    residual_scale: float = 0.1
    """The head's output is multiplied by this before it is added to the input pose, so an
    untrained network starts close to the fit's pose."""


@dataclass(frozen=True)
class AudioEncoderConfig:
    """1D convolution over the per-frame 16 x (P + 80) speech block to f_a."""

    n_phones: int = N_PHONES
    """P, phone columns of the phone block."""
    n_mels: int = N_MELS
    """Log-mel bands."""
    channels: tuple[int, ...] = (64, 64, 64)
    """Output channels of the convolutions; all but the first halve the 16 windows."""
    kernel: int = 3
    """Convolution kernel, in speech windows."""
    dim: int = 64
    """f_a's size."""


@dataclass(frozen=True)
class VideoEncoderConfig:
    """MLP over the tracker's evidence of one frame to f_v."""

    n_landmarks: int = N_LOWER_FACE
    """Pose-normalised landmark offsets read (3 values each)."""
    n_blendshapes: int = N_BLENDSHAPES
    """MediaPipe blendshape scores read."""
    n_regions: int = N_REGIONS
    """Per-region visual confidences read."""
    hidden: int = 256
    """Hidden width."""
    dim: int = 64
    """f_v's size."""


@dataclass(frozen=True)
class FusionConfig:
    """Expression branch: [f_a, f_v] through the transformer, then 3 feed-forward layers to
    the lower-face landmark offsets."""

    audio: AudioEncoderConfig = AudioEncoderConfig()
    video: VideoEncoderConfig = VideoEncoderConfig()
    temporal: TemporalConfig = TemporalConfig()
    """d_model must equal audio.dim + video.dim."""
    n_out: int = N_LOWER_FACE
    """Landmarks predicted (3 offsets each)."""
    p_drop_audio: float = 0.4
    """Modality dropout in training: chance that a window's f_a is zeroed."""
    p_drop_video: float = 0.5
    """Chance that a window's f_v is zeroed."""

    def __post_init__(self):
        if self.temporal.d_model != self.audio.dim + self.video.dim:
            raise ValueError(f"fusion d_model {self.temporal.d_model} must be f_a + f_v = "
                             f"{self.audio.dim} + {self.video.dim}")


# --------------------------------------------------------------------------- pure functions


def key_padding_mask(present: torch.Tensor) -> torch.Tensor:
    """(B, W) bool of tokens that carry evidence -> (B, W) bool mask of keys attention must
    skip (True = skip). A window with no present token attends to all of its tokens (they
    are all the learned missing token then), so softmax never sees an empty row."""
    none = ~present.any(dim=1, keepdim=True)  # (B, 1)
    return ~(present | none)


def modality_keep(batch: int, p_drop_audio: float, p_drop_video: float, *,
                  generator: torch.Generator | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Modality dropout draws: (keep_audio (B,), keep_video (B,)) float 0/1, one draw per
    window. Never both dropped: where both are drawn, one of them, at random, is kept."""
    u = torch.rand(batch, 3, generator=generator, device=device)
    keep_a = u[:, 0] >= p_drop_audio
    keep_v = u[:, 1] >= p_drop_video
    both = ~keep_a & ~keep_v
    keep_a = keep_a | (both & (u[:, 2] < 0.5))
    keep_v = keep_v | (both & (u[:, 2] >= 0.5))
    return keep_a.float(), keep_v.float()


def mlp(dims: tuple[int, ...]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def check_shape(x: torch.Tensor, shape: tuple, name: str) -> None:
    """Check the trailing axes of x against shape (None matches anything); a ValueError
    names the input and both shapes."""
    tail = tuple(x.shape[-len(shape):]) if shape else ()
    if x.ndim < len(shape) or any(s is not None and s != t for s, t in zip(shape, tail)):
        raise ValueError(f"expected {name} of shape (..., {', '.join('*' if s is None else str(s) for s in shape)}), "
                         f"got {tuple(x.shape)}")


# --------------------------------------------------------------------------- modules


class TemporalTransformer(nn.Module):
    """Learned positions, a transformer encoder over the W tokens of a window, and 3
    feed-forward layers with ReLU: (B, W, d_model) -> (B, W, n_out)."""

    def __init__(self, config: TemporalConfig, n_out: int):
        super().__init__()
        self.config = config
        self.position = nn.Parameter(torch.zeros(config.window, config.d_model))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(config.d_model, config.n_heads, config.d_ff, config.dropout,
                                           batch_first=True, norm_first=False)
        # nested tensors change the numerics of padded rows between train and eval: keep off
        self.encoder = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.head = mlp((config.d_model, config.head_hidden, config.head_hidden, n_out))

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.config.window:
            raise ValueError(f"window of {tokens.shape[1]} frames, the network has positions for {self.config.window}")
        h = tokens + self.position[: tokens.shape[1]]
        h = self.encoder(h, src_key_padding_mask=key_padding_mask(present))
        return self.head(h)


class PoseEncoder(nn.Module):
    """Coarse temporal encoder: the fit's per-frame pose and the tracker's camera, refined
    over a window; frames without a usable face take their pose from the context."""

    def __init__(self, config: PoseEncoderConfig = PoseEncoderConfig()):
        super().__init__()
        self.config = config
        d = config.temporal.d_model
        self.embed = nn.Linear(POSE_DIM + CAMERA_DIM + 2, d)
        self.missing = nn.Parameter(torch.zeros(d))
        self.temporal = TemporalTransformer(config.temporal, POSE_DIM + CAMERA_DIM)

    def forward(self, pose: torch.Tensor, camera: torch.Tensor, usable: torch.Tensor, face_conf: torch.Tensor,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """pose (B, W, 6), camera (B, W, 3), usable (B, W) 0/1, face_conf (B, W) in [0, 1],
        valid (B, W) bool (False on padding). Returns refined (pose (B, W, 6), camera (B, W, 3));
        frames that are not usable get a pose from context alone (their input is ignored)."""
        check_shape(pose, (None, POSE_DIM), "pose")
        check_shape(camera, (None, CAMERA_DIM), "camera")
        use = usable.float()
        if valid is not None:
            use = use * valid.float()
        x = torch.cat([pose, camera], dim=-1) * use[..., None]  # (B, W, 9); 0 where unusable
        tokens = self.embed(torch.cat([x, use[..., None], face_conf[..., None] * use[..., None]], dim=-1))
        tokens = torch.where(use[..., None] > 0, tokens, self.missing.expand_as(tokens))  # (B, W, d)
        out = x + self.config.residual_scale * self.temporal(tokens, use > 0)  # (B, W, 9)
        return out[..., :POSE_DIM], out[..., POSE_DIM:]


class AudioEncoder(nn.Module):
    """1D convolution over the 16 speech windows of one frame: phones (..., 16, P) and
    log-mel (..., 16, 80) -> f_a (..., 64)."""

    def __init__(self, config: AudioEncoderConfig = AudioEncoderConfig()):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in, length = config.n_phones + config.n_mels, SPEECH_WINDOWS
        for i, c_out in enumerate(config.channels):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv1d(c_in, c_out, config.kernel, stride=stride, padding=config.kernel // 2), nn.LeakyReLU(0.2)]
            c_in = c_out
            length = (length + 2 * (config.kernel // 2) - config.kernel) // stride + 1
        self.conv = nn.Sequential(*layers)
        self.out = nn.Linear(c_in * length, config.dim)

    def forward(self, phones: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
        check_shape(phones, (SPEECH_WINDOWS, self.config.n_phones), "phones")
        check_shape(mel, (SPEECH_WINDOWS, self.config.n_mels), "mel")
        lead = phones.shape[:-2]
        x = torch.cat([phones, mel], dim=-1).reshape(-1, SPEECH_WINDOWS, phones.shape[-1] + mel.shape[-1])
        h = self.conv(x.transpose(1, 2))  # (N, C, 16 / 2^k): channels are features, length is time
        return self.out(h.flatten(1)).reshape(*lead, self.config.dim)


class VideoEncoder(nn.Module):
    """MLP over one frame's tracker evidence: landmark offsets (..., M, 3), blendshapes
    (..., 52), per-region confidence (..., 3) -> f_v (..., 64)."""

    def __init__(self, config: VideoEncoderConfig = VideoEncoderConfig()):
        super().__init__()
        self.config = config
        n_in = 3 * config.n_landmarks + config.n_blendshapes + config.n_regions
        self.net = mlp((n_in, config.hidden, config.dim))

    def forward(self, landmarks: torch.Tensor, blendshapes: torch.Tensor, region_conf: torch.Tensor) -> torch.Tensor:
        check_shape(landmarks, (self.config.n_landmarks, 3), "landmarks")
        check_shape(blendshapes, (self.config.n_blendshapes,), "blendshapes")
        check_shape(region_conf, (self.config.n_regions,), "region_conf")
        x = torch.cat([LANDMARK_INPUT_SCALE * landmarks.flatten(-2), blendshapes, region_conf], dim=-1)
        return self.net(x)


class ExpressionNet(nn.Module):
    """The expression branch: f_a and f_v per frame, concatenated, fused over the window,
    to lower-face landmark offsets (B, W, M, 3) in inter-ocular units."""

    def __init__(self, config: FusionConfig = FusionConfig()):
        super().__init__()
        self.config = config
        self.audio = AudioEncoder(config.audio)
        self.video = VideoEncoder(config.video)
        self.temporal = TemporalTransformer(config.temporal, 3 * config.n_out)

    def embed(self, phones, mel, audio_present, landmarks, blendshapes, region_conf, usable,
              keep_audio: torch.Tensor | None = None, keep_video: torch.Tensor | None = None):
        """Per-frame embeddings (f_a (B, W, 64), f_v (B, W, 64)), each exactly zero where its
        modality is absent (audio_present / usable are 0) or dropped (keep_* (B,) are 0)."""
        f_a = self.audio(phones, mel) * audio_present[..., None].float()
        f_v = self.video(landmarks, blendshapes, region_conf) * usable[..., None].float()
        if keep_audio is not None:
            f_a = f_a * keep_audio[:, None, None]
        if keep_video is not None:
            f_v = f_v * keep_video[:, None, None]
        return f_a, f_v

    def forward(self, phones: torch.Tensor, mel: torch.Tensor, audio_present: torch.Tensor,
                landmarks: torch.Tensor, blendshapes: torch.Tensor, region_conf: torch.Tensor,
                usable: torch.Tensor, valid: torch.Tensor | None = None, *,
                generator: torch.Generator | None = None,
                keep_audio: torch.Tensor | None = None, keep_video: torch.Tensor | None = None) -> torch.Tensor:
        """phones (B, W, 16, P), mel (B, W, 16, 80), audio_present (B, W), landmarks
        (B, W, M, 3), blendshapes (B, W, 52), region_conf (B, W, 3), usable (B, W), valid
        (B, W) bool. In training mode, modality dropout draws keep_* unless they are given.
        Returns offsets (B, W, M, 3)."""
        b, w = phones.shape[:2]
        if self.training and keep_audio is None and keep_video is None:
            keep_audio, keep_video = modality_keep(b, self.config.p_drop_audio, self.config.p_drop_video,
                                                   generator=generator, device=phones.device)
        f_a, f_v = self.embed(phones, mel, audio_present, landmarks, blendshapes, region_conf, usable,
                              keep_audio, keep_video)
        return self.fuse(f_a, f_v, valid)

    def fuse(self, f_a: torch.Tensor, f_v: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """f_a, f_v (B, W, 64) -> offsets (B, W, M, 3): the transformer over the window and
        the feed-forward head."""
        b, w = f_a.shape[:2]
        present = valid if valid is not None else torch.ones(b, w, dtype=torch.bool, device=f_a.device)
        out = self.temporal(torch.cat([f_a, f_v], dim=-1), present)  # (B, W, 3M)
        # the head works in the video encoder's input units (offsets times 10)
        return out.reshape(b, w, self.config.n_out, 3) / LANDMARK_INPUT_SCALE


# --------------------------------------------------------------------------- inference


@torch.no_grad()
def infer_expression(net: ExpressionNet, inputs: dict[str, torch.Tensor], *, batch: int = 256) -> torch.Tensor:
    """Lower-face offsets (T, M, 3) for a clip: every window at stride 1, ``batch`` windows
    at a time, each frame averaged over the windows that hold it. ``inputs`` are the
    per-frame (T, ...) tensors named as :meth:`ExpressionNet.forward`'s arguments.

    The encoders see one frame at a time, so f_a and f_v are computed once per frame and
    only the fusion runs per window (16 times less encoder work than windowing the inputs)."""
    was = net.training
    net.eval()
    try:
        n = next(iter(inputs.values())).shape[0]
        chunks = [net.embed(**{k: v[s:s + 4096][None] for k, v in inputs.items()}) for s in range(0, n, 4096)]
        f_a = torch.cat([c[0][0] for c in chunks])  # (T, 64)
        f_v = torch.cat([c[1][0] for c in chunks])
        return run_windowed(lambda valid, f_a, f_v: net.fuse(f_a, f_v, valid), {"f_a": f_a, "f_v": f_v}, n,
                            window=net.config.temporal.window, batch=batch)
    finally:
        net.train(was)


@torch.no_grad()
def infer_pose(net: PoseEncoder, inputs: dict[str, torch.Tensor], *, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Refined (pose (T, 6), camera (T, 3)) for a clip, windows averaged as above; ``inputs``
    hold pose, camera, usable and face_conf, (T, ...) each."""
    was = net.training
    net.eval()
    try:
        n = next(iter(inputs.values())).shape[0]
        out = run_windowed(lambda valid, **w: torch.cat(net(valid=valid, **w), dim=-1), inputs, n,
                           window=net.config.temporal.window, batch=batch)
        return out[:, :POSE_DIM], out[:, POSE_DIM:]
    finally:
        net.train(was)
