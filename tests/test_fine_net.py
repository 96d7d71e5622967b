"""The fine stage's UNet-ResNet: shapes, refusals, that it can fit a tiny clip, and that the
audio channel after the third encoder level is really used."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from avface.models.fine import DetailNet, FineNetConfig, detail_net

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = FineNetConfig(widths=(8, 8, 16, 16, 16), audio_dim=12, groups=4)
SIZE = 32


def _inputs(batch, seed=0, size=SIZE):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, size, size, 3, generator=g)
    normals = F.normalize(torch.randn(batch, size, size, 3, generator=g) * 0.3 + torch.tensor([0.0, 0.0, -1.0]), dim=-1)
    valid = torch.rand(batch, size, size, generator=g) > 0.1
    audio = torch.randn(batch, TINY.audio_dim, generator=g)
    return image, normals, valid, audio


def test_shapes_and_range():
    net = DetailNet(TINY)
    d = net(*_inputs(2))
    assert d.shape == (2, SIZE, SIZE)
    assert d.abs().max() < TINY.max_displacement_m
    assert 0 < d.abs().max() < 0.1 * TINY.max_displacement_m  # starts near, not at, zero
    # the module is only a holder: the pure function gives the same numbers
    assert torch.equal(d, detail_net(dict(net.params), *_inputs(2), TINY))
    # one set of weights serves any map size divisible by 2^levels
    assert net(*_inputs(1, size=64)).shape == (1, 64, 64)


def test_default_config_runs_at_256():
    net = DetailNet()
    with torch.no_grad():
        d = net(*[x[:1] for x in _inputs(1, size=256)[:3]], torch.zeros(1, 64))
    assert d.shape == (1, 256, 256)
    n = sum(p.numel() for p in net.parameters())
    assert n < 500_000, n  # small enough to adapt per clip on a CPU


def test_refusals():
    net = DetailNet(TINY)
    image, normals, valid, audio = _inputs(1)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(image[:, :24, :24], normals[:, :24, :24], valid[:, :24, :24], audio)
    with pytest.raises(ValueError, match=r"\(B, 12\) audio"):
        net(image, normals, valid, audio[:, :5])
    with pytest.raises(ValueError, match="must match"):
        net(image, normals[:, :16], valid, audio)
    with pytest.raises(ValueError, match="not divisible by groups"):
        FineNetConfig(widths=(8, 8, 8, 10), groups=4)
    with pytest.raises(ValueError, match="audio_level"):
        FineNetConfig(widths=(8, 8, 8), audio_level=3)


def _targets(size=SIZE):
    """Two smooth displacement maps of about a millimetre, different from each other."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    a = 1e-3 * torch.sin(2 * torch.pi * 2 * x) * torch.cos(2 * torch.pi * y)
    b = 1e-3 * torch.cos(2 * torch.pi * 3 * y) * (x - 0.5) * 2
    return torch.stack([a, b])


def _overfit(steps=150):
    """Two frames with the same unwrapped image and normals but different speech and
    different targets: only the audio can tell them apart."""
    torch.manual_seed(0)
    net = DetailNet(TINY, seed=0)
    image, normals, valid, _ = _inputs(1)
    image, normals, valid = (x.expand(2, *x.shape[1:]) for x in (image, normals, valid))
    audio = torch.randn(2, TINY.audio_dim, generator=torch.Generator().manual_seed(1))
    target = _targets()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    scale = target.pow(2).mean()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (net(image, normals, valid, audio) - target).pow(2).mean() / scale  # relative MSE
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return net, (image, normals, valid, audio), target, losses


@pytest.fixture(scope="module")
def overfitted():
    return _overfit()


def test_overfits_a_tiny_clip(overfitted):
    _, _, _, losses = overfitted
    # relative MSE: 1 at D = 0. Target: under 2 % of the targets' energy after 150 Adam steps
    # (measured: 0.05 after 50 steps, 0.004 after 150).
    assert losses[0] > 0.9
    assert min(losses[-10:]) < 0.02, (losses[0], losses[-1])


def test_audio_channel_is_used(overfitted):
    net, (image, normals, valid, audio), target, _ = overfitted
    with torch.no_grad():
        d = net(image, normals, valid, audio)
        d_zero = net(image, normals, valid, torch.zeros_like(audio))
        d_swap = net(image, normals, valid, audio.flip(0))
    # the two frames differ only in their audio, and the network tells them apart
    assert (d[0] - d[1]).abs().mean() > 0.5 * (target[0] - target[1]).abs().mean()
    # zeroing the audio channel changes the output by a good part of a target's size...
    assert (d - d_zero).abs().mean() > 0.2 * target.abs().mean()
    # ...and swapping it swaps the outputs
    assert (d_swap - d.flip(0)).abs().mean() < 0.2 * (d[0] - d[1]).abs().mean()


def test_audio_changes_an_untrained_network_too():
    net = DetailNet(TINY, seed=3)
    image, normals, valid, audio = _inputs(2)
    with torch.no_grad():
        diff = (net(image, normals, valid, audio) - net(image, normals, valid, torch.zeros_like(audio))).abs()
    assert diff.max() > 1e-7
