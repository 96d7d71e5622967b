"""The lip refinement network (docs/design.md section 2, docs/networks.md): a SIREN whose sine
layers are FiLM-conditioned on the frame's audio embedding, after NHA's geometry network
and pi-GAN's FiLM-SIREN.

Input: a lip vertex's position on the neutral face, relative to the lip centroid and in
inter-ocular units, so that one network serves any topology (the default model's 40 lip
vertices, FLAME's lip region). Output: that vertex's 3D offset in the head frame, in
inter-ocular units, multiplied by the frame's speech activity so that it is exactly zero in
silence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from avface.models.avnets import check_shape


@dataclass(frozen=True)
class LipSirenConfig:
    """Sizes of the lip SIREN and its FiLM mapping network."""

    cond_dim: int = 64
    """Size of the conditioning vector (the audio embedding f_a)."""
    hidden: int = 128
    """Width of the sine layers."""
    n_layers: int = 4
    """Sine layers."""
    mapping_hidden: int = 128
    """Width of the mapping network from the condition to frequencies and phases."""
    mapping_layers: int = 3
    """Layers of the mapping network (LeakyReLU between)."""
    omega0: float = 30.0
    """Base angular frequency of the sine layers (SIREN's w0)."""
    omega_film: float = 15.0
    """How far the FiLM frequency can move per unit of the mapping output (pi-GAN: 15)."""
    out_scale: float = 0.01
    """The output layer's initial weights are scaled by this, so an untrained network
    predicts offsets of a few thousandths of the inter-ocular distance."""


def film_sine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, freq: torch.Tensor,
              phase: torch.Tensor) -> torch.Tensor:
    """One FiLM-modulated sine layer.

    x: (B, T, L, I); weight: (H, I); bias: (H,); freq, phase: (B, T, H). Returns (B, T, L, H):
    sin(freq * (W x + b) + phase), the same frequency and phase for every vertex of a frame.
    """
    # h[b, t, l, k] = sum_i x[b, t, l, i] * weight[k, i] + bias[k]
    h = torch.einsum("btli,ki->btlk", x, weight) + bias
    return torch.sin(freq[:, :, None] * h + phase[:, :, None])


def normalise_lip_positions(positions, iod: float) -> torch.Tensor:
    """(L, 3) neutral lip vertex positions (head frame, any unit) -> relative to their
    centroid, divided by the inter-ocular distance in the same unit: the SIREN's input."""
    p = torch.as_tensor(positions, dtype=torch.float32)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"expected (L, 3) lip positions, got {tuple(p.shape)}")
    if not iod > 0:
        raise ValueError(f"the inter-ocular distance must be positive, got {iod}")
    return (p - p.mean(0)) / float(iod)


class LipSiren(nn.Module):
    """positions (L, 3) or (B, T, L, 3), cond (B, T, C), activity (B, T) -> offsets (B, T, L, 3)."""

    def __init__(self, config: LipSirenConfig = LipSirenConfig()):
        super().__init__()
        self.config = config
        h = config.hidden
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i in range(config.n_layers):
            n_in = 3 if i == 0 else h
            # SIREN's initialisation: the first layer spans a few periods over the input's
            # range, later layers keep the pre-activations' spread at about one period.
            bound = 1.0 / n_in if i == 0 else math.sqrt(6.0 / n_in) / config.omega0
            self.weights.append(nn.Parameter(torch.empty(h, n_in).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(h).uniform_(-1.0 / math.sqrt(n_in), 1.0 / math.sqrt(n_in))))
        dims = [config.cond_dim] + [config.mapping_hidden] * (config.mapping_layers - 1)
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
        self.mapping = nn.Sequential(*layers)
        self.film = nn.Linear(dims[-1], 2 * config.n_layers * h)
        # start unmodulated: frequency omega0, phase 0
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.out = nn.Linear(h, 3)
        with torch.no_grad():
            self.out.weight.mul_(config.out_scale)
            self.out.bias.zero_()

    def forward(self, positions: torch.Tensor, cond: torch.Tensor, activity: torch.Tensor) -> torch.Tensor:
        c = self.config
        check_shape(cond, (None, c.cond_dim), "cond")
        if cond.ndim != 3:
            raise ValueError(f"expected cond of shape (B, T, {c.cond_dim}), got {tuple(cond.shape)}")
        b, t = cond.shape[:2]
        if activity.shape != (b, t):
            raise ValueError(f"expected activity of shape ({b}, {t}), got {tuple(activity.shape)}")
        if positions.ndim == 2:
            positions = positions.expand(b, t, -1, -1)
        check_shape(positions, (None, 3), "positions")
        film = self.film(self.mapping(cond)).view(b, t, c.n_layers, 2, c.hidden)  # (B, T, layers, 2, H)
        freq = c.omega0 + c.omega_film * film[:, :, :, 0]  # (B, T, layers, H)
        phase = film[:, :, :, 1]
        h = positions
        for i in range(c.n_layers):
            h = film_sine(h, self.weights[i], self.biases[i], freq[:, :, i], phase[:, :, i])  # (B, T, L, H)
        offsets = self.out(h)  # (B, T, L, 3)
        gate = activity.clamp(0.0, 1.0)[..., None, None]
        return offsets * gate
