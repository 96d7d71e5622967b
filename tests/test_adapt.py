"""Per-clip adaptation (backend/train/adapt.py): held-out blocks, early stopping, the same
seed giving the same weights, and the generic networks left untouched."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train import training_clip

from avface.errors import InputError
from avface.models.checkpoint import build_networks
from avface.train.adapt import AdaptConfig, adapt, holdout_starts

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def clip():
    return training_clip(t=100, seed=2)


def test_held_out_windows_never_overlap_training_windows():
    cfg = AdaptConfig(block_frames=32, holdout_every=3)
    train, val = holdout_starts(200, cfg)
    train_frames = set((train[:, None] + np.arange(16)).ravel().tolist())
    val_frames = set((val[:, None] + np.arange(16)).ravel().tolist())
    assert train_frames and val_frames and not train_frames & val_frames
    # a short clip holds out its last fifth
    train, val = holdout_starts(100, AdaptConfig(block_frames=32, holdout_every=5))
    assert val.min() >= 80 and (train + 16 <= 80).all()


def test_adaptation_lowers_the_held_out_loss_and_is_repeatable(clip):
    nets = build_networks(seed=0)
    before = {k: v.clone() for k, v in nets.state_dict().items()}
    cfg = AdaptConfig(max_steps=20, eval_every=5, batch=4, lr=1e-3, patience=10)
    a, rec = adapt(nets, clip, cfg)
    for k, v in nets.state_dict().items():
        assert torch.equal(v, before[k]), f"adapt changed the given networks ({k})"
    assert rec.best_step > 0 and min(v for _, v in rec.val_losses) < rec.val_losses[0][1]
    b, rec2 = adapt(nets, clip, cfg)
    assert rec2 == rec
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_early_stopping_keeps_the_given_weights_when_nothing_helps(clip):
    nets = build_networks(seed=0)
    cfg = AdaptConfig(max_steps=40, eval_every=2, batch=2, lr=1.0, patience=2)
    adapted, rec = adapt(nets, clip, cfg)
    assert rec.best_step == 0 and rec.steps < 40
    for k, v in nets.state_dict().items():
        assert torch.equal(adapted.state_dict()[k], v), k


def test_too_short_a_clip_is_a_clear_error():
    with pytest.raises(InputError, match="too short"):
        adapt(build_networks(), training_clip(t=18, seed=0))
