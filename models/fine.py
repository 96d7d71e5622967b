"""The fine stage's network (AVFace, docs/design.md section 2): a UNet-ResNet encoder-decoder on
the frame unwrapped into UV space (and the coarse normals) that predicts a one-channel
displacement map D, with the audio features concatenated as an extra channel after the
encoder's third level, as the paper does. Detailed points are V_d = V_c + D * N_c
(:func:`avface.stages.detail.uvspace.displace`).

As with :mod:`avface.models.lbs`, the maths is pure functions of a flat parameter dict
(:func:`init_params`, :func:`detail_net`), and :class:`DetailNet` only holds the parameters.
Nothing depends on the face model or the clip: the same weights serve FLAME and the default
model at any map size divisible by 2^levels.

Layout (levels L = len(widths) - 1, each halving the map):

    input (B, 7, S, S): unwrapped RGB in [-1, 1] (0 where untrusted), coarse normals,
                        validity
    stem:     conv 3x3 -> widths[0], ResBlock                            -> f0 (S)
    level k:  conv 3x3 stride 2 -> widths[k], ResBlock                   -> fk (S / 2^k)
              after level 3: audio (B, A) -> linear -> (B, 1, g, g) -> bilinear to
              f3's size, concatenated as one more channel of f3
    decoder:  from f_L up: bilinear x2, concat f_{k}, conv 3x3 -> widths[k], ResBlock
    head:     conv 1x1 -> 1, D = max_displacement_m * tanh(.)

ResBlocks are pre-activation (GroupNorm, LeakyReLU, conv, twice), GroupNorm so that a
batch of one frame normalises like a batch of many.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

N_INPUT_CHANNELS = 7
"""Unwrapped RGB (3), coarse normals (3), validity (1)."""


@dataclass(frozen=True)
class FineNetConfig:
    """Sizes of the fine-stage network."""

    widths: tuple[int, ...] = (8, 16, 24, 32, 48)
    """Channels of the stem and of each encoder level; len - 1 levels, each halving the map
    (256^2 -> 16^2 at the bottom). Small by default: the fine stage trains per clip on the
    CPU, and the full-resolution stem and last decoder level dominate its cost. One thread
    of a loaded 2-core machine, one 256^2 frame, forward / forward + backward:
    (16, 24, 32, 48, 64) 0.19 / 0.48 s (374 k parameters); (8, 16, 24, 32, 48) 0.06 / 0.21 s
    (186 k)."""
    audio_dim: int = 64
    """Length of the per-frame audio feature vector (the coarse stage's f_a is 64-d)."""
    audio_level: int = 3
    """Encoder level after which the audio channel is concatenated (the paper's third)."""
    audio_grid: int = 8
    """The audio features are projected to an audio_grid x audio_grid map, then resized to
    the level's size, so the weights do not depend on the UV map size."""
    groups: int = 4
    """GroupNorm groups (every width must be divisible by it)."""
    max_displacement_m: float = 0.01
    """|D| < this, metres (tanh output scale; DECA uses 0.01 in FLAME's metre units)."""
    negative_slope: float = 0.2
    """LeakyReLU slope."""

    def __post_init__(self):
        if len(self.widths) < 2:
            raise ValueError(f"need a stem and at least one level, got widths {self.widths}")
        if not 1 <= self.audio_level < len(self.widths):
            raise ValueError(f"audio_level {self.audio_level} must name an encoder level 1..{len(self.widths) - 1}")
        bad = [w for w in self.widths if w % self.groups]
        if bad:
            raise ValueError(f"widths {bad} are not divisible by groups={self.groups}")

    @property
    def levels(self) -> int:
        return len(self.widths) - 1


# --------------------------------------------------------------------------- parameters


def _conv_shapes(cfg: FineNetConfig) -> dict[str, tuple[int, int, int]]:
    """name -> (out channels, in channels, kernel) of every convolution."""
    w = cfg.widths
    shapes: dict[str, tuple[int, int, int]] = {"stem": (w[0], N_INPUT_CHANNELS, 3)}
    res = lambda name, c: shapes.update({f"{name}_a": (c, c, 3), f"{name}_b": (c, c, 3)})  # noqa: E731
    res("stem_res", w[0])
    for k in range(1, cfg.levels + 1):
        c_in = w[k - 1] + (1 if k - 1 == cfg.audio_level else 0)
        shapes[f"down{k}"] = (w[k], c_in, 3)
        res(f"down{k}_res", w[k])
    for k in range(cfg.levels - 1, -1, -1):
        c_up = w[k + 1] + (1 if k + 1 == cfg.audio_level and k + 1 == cfg.levels else 0)
        c_skip = w[k] + (1 if k == cfg.audio_level else 0)
        shapes[f"up{k}"] = (w[k], c_up + c_skip, 3)
        res(f"up{k}_res", w[k])
    shapes["head"] = (1, w[0], 1)
    return shapes


def init_params(cfg: FineNetConfig, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A fresh parameter dict: He-normal convolutions with zero bias, residual branches
    scaled by 0.1 so each block starts near identity, a small head so D starts near 0 but
    not at it, GroupNorm at identity."""
    p: dict[str, torch.Tensor] = {}
    gain = math.sqrt(2.0 / (1.0 + cfg.negative_slope ** 2))
    for name, (c_out, c_in, k) in _conv_shapes(cfg).items():
        std = gain / math.sqrt(c_in * k * k)
        if name.endswith("_b"):
            std *= 0.1
        if name == "head":
            std *= 0.01
        p[f"{name}_w"] = torch.randn(c_out, c_in, k, k, generator=generator) * std
        p[f"{name}_b"] = torch.zeros(c_out)
        if name not in ("head", "stem"):  # these two see no norm: the raw input, the last features
            # the norm before each convolution, over its input channels
            p[f"{name}_gn_w"] = torch.ones(c_in)
            p[f"{name}_gn_b"] = torch.zeros(c_in)
    g2 = cfg.audio_grid * cfg.audio_grid
    p["audio_w"] = torch.randn(g2, cfg.audio_dim, generator=generator) / math.sqrt(cfg.audio_dim)
    p["audio_b"] = torch.zeros(g2)
    return p


# --------------------------------------------------------------------------- pure functions


def _groups_for(channels: int, groups: int) -> int:
    # an input with one extra (audio) channel is normalised in groups that divide it
    return math.gcd(channels, groups)


def conv(p: dict, name: str, x: torch.Tensor, cfg: FineNetConfig, *, stride: int = 1, norm: bool = True) -> torch.Tensor:
    """Pre-activation convolution ``name``: GroupNorm, LeakyReLU, conv (padding keeps the size)."""
    if norm:
        x = F.group_norm(x, _groups_for(x.shape[1], cfg.groups), p[f"{name}_gn_w"], p[f"{name}_gn_b"])
        x = F.leaky_relu(x, cfg.negative_slope)
    w = p[f"{name}_w"]
    return F.conv2d(x, w, p[f"{name}_b"], stride=stride, padding=w.shape[-1] // 2)


def res_block(p: dict, name: str, x: torch.Tensor, cfg: FineNetConfig) -> torch.Tensor:
    """x + conv(conv(x)), both pre-activation: (B, C, H, W) -> (B, C, H, W)."""
    return x + conv(p, f"{name}_b", conv(p, f"{name}_a", x, cfg), cfg)


def audio_channel(p: dict, audio: torch.Tensor, size: tuple[int, int], cfg: FineNetConfig) -> torch.Tensor:
    """(B, A) audio features -> (B, 1, h, w): a learned audio_grid^2 map, resized."""
    if audio.ndim != 2 or audio.shape[1] != cfg.audio_dim:
        raise ValueError(f"expected (B, {cfg.audio_dim}) audio features, got {tuple(audio.shape)}")
    g = cfg.audio_grid
    a = F.linear(audio, p["audio_w"], p["audio_b"]).view(-1, 1, g, g)
    return F.interpolate(a, size=size, mode="bilinear", align_corners=False)


def encode(p: dict, x: torch.Tensor, audio: torch.Tensor, cfg: FineNetConfig) -> list[torch.Tensor]:
    """(B, 7, S, S) input and (B, A) audio -> features [f0 (S), f1 (S/2), ..., fL (S/2^L)];
    f at ``cfg.audio_level`` carries the audio as its last channel."""
    f = res_block(p, "stem_res", conv(p, "stem", x, cfg, norm=False), cfg)
    feats = [f]
    for k in range(1, cfg.levels + 1):
        f = res_block(p, f"down{k}_res", conv(p, f"down{k}", f, cfg, stride=2), cfg)
        if k == cfg.audio_level:
            f = torch.cat([f, audio_channel(p, audio, f.shape[-2:], cfg)], dim=1)
        feats.append(f)
    return feats


def decode(p: dict, feats: list[torch.Tensor], cfg: FineNetConfig) -> torch.Tensor:
    """Features from :func:`encode` -> (B, 1, S, S) pre-activation displacement."""
    h = feats[-1]
    for k in range(cfg.levels - 1, -1, -1):
        h = F.interpolate(h, size=feats[k].shape[-2:], mode="bilinear", align_corners=False)
        h = conv(p, f"up{k}", torch.cat([h, feats[k]], dim=1), cfg)
        h = res_block(p, f"up{k}_res", h, cfg)
    h = F.leaky_relu(h, cfg.negative_slope)
    return conv(p, "head", h, cfg, norm=False)


def network_input(image_uv: torch.Tensor, normals_uv: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, 7, S, S) network input from channels-last maps: image (B, S, S, 3) in [0, 1],
    coarse normals (B, S, S, 3), valid (B, S, S) bool or weight. Untrusted texels show 0
    colour, so an occluder's colour never reaches the network."""
    if image_uv.ndim != 4 or image_uv.shape[-1] != 3:
        raise ValueError(f"expected (B, S, S, 3) unwrapped frames, got {tuple(image_uv.shape)}")
    if normals_uv.shape != image_uv.shape or valid.shape != image_uv.shape[:3]:
        raise ValueError(f"normals {tuple(normals_uv.shape)} and validity {tuple(valid.shape)} must match the "
                         f"frames {tuple(image_uv.shape)}")
    v = valid.to(image_uv.dtype)[..., None]
    x = torch.cat([(2.0 * image_uv - 1.0) * v, normals_uv, v], dim=-1)
    return x.permute(0, 3, 1, 2)


def detail_net(p: dict, image_uv: torch.Tensor, normals_uv: torch.Tensor, valid: torch.Tensor,
               audio: torch.Tensor, cfg: FineNetConfig) -> torch.Tensor:
    """The fine stage's forward pass: (B, S, S) displacement D in metres along N_c.

    image_uv: (B, S, S, 3) the frame unwrapped into UV space, [0, 1]; normals_uv: (B, S, S, 3)
    coarse camera-frame normals; valid: (B, S, S) trusted texels; audio: (B, A).
    """
    size = image_uv.shape[1]
    step = 2 ** cfg.levels
    if size % step or image_uv.shape[2] != size:
        raise ValueError(f"UV maps must be square with a side divisible by {step}, got {tuple(image_uv.shape[1:3])}")
    feats = encode(p, network_input(image_uv, normals_uv, valid), audio, cfg)
    return cfg.max_displacement_m * torch.tanh(decode(p, feats, cfg))[:, 0]


class DetailNet(nn.Module):
    """:func:`detail_net` with its parameters held as module parameters."""

    def __init__(self, cfg: FineNetConfig = FineNetConfig(), *, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.params = nn.ParameterDict(
            {k: nn.Parameter(v) for k, v in init_params(cfg, torch.Generator().manual_seed(seed)).items()})

    def forward(self, image_uv: torch.Tensor, normals_uv: torch.Tensor, valid: torch.Tensor,
                audio: torch.Tensor) -> torch.Tensor:
        return detail_net(dict(self.params), image_uv, normals_uv, valid, audio, self.cfg)
