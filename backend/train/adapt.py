"""Per-clip adaptation (docs/networks.md): fine-tune the generic networks on the clip's own trusted
frames, with early stopping on a held-out part of the clip and a fixed seed, so that two runs
give the same result and the clip's own style is learned without overfitting its noise.

The clip is cut into blocks of ``block_frames``; every ``holdout_every``-th block is held
out. Training windows lie wholly inside the kept frames, validation windows wholly inside
the held-out ones; validation draws no occluder and drops no modality, so its loss is a fixed
function of the weights. The weights with the lowest validation loss are returned (the given
ones, if no step improved on them).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from avface.config import NetworksStageConfig
from avface.errors import InputError
from avface.models.checkpoint import AVFaceNetworks
from avface.models.windows import WINDOW_FRAMES
from avface.stages.networks.run import ClipInputs, torch_seeded
from avface.train.data import check_clip
from avface.train.loop import TrainConfig, TrainingModule, collate, make_sample

log = logging.getLogger(__name__)

#: The step number validation windows are drawn with: never a training step.
VALIDATION_STEP = 2**31 - 1


@dataclass(frozen=True)
class AdaptConfig:
    """Options of per-clip adaptation."""

    max_steps: int = 200
    """Most optimiser steps."""
    batch: int = 8
    """Windows per step."""
    lr: float = 5e-5
    """Adam learning rate (half the generic training's: the networks start trained)."""
    eval_every: int = 10
    """Steps between validation losses."""
    patience: int = 3
    """Validations without improvement before stopping."""
    block_frames: int = 32
    """Length of the blocks the clip is cut into for holding out."""
    holdout_every: int = 5
    """Every this-many-th block is held out for validation."""
    val_windows: int = 16
    """Validation windows (fixed for the run)."""
    seed: int = 0
    """Seeds every draw; the same seed gives the same adapted weights."""
    train: TrainConfig = TrainConfig()
    """Loss weights, occluders and modality dropout, as in generic training."""


@dataclass(frozen=True)
class AdaptRecord:
    """What adaptation did, for the result's meta."""

    steps: int
    """Steps taken."""
    best_step: int
    """Step whose weights were kept (0: the given networks)."""
    val_losses: list
    """(step, validation loss) at every validation."""
    train_losses: list
    """Total training loss per step."""

    def to_meta(self) -> dict:
        return dataclasses.asdict(self)


def holdout_starts(n_frames: int, config: AdaptConfig, window: int = WINDOW_FRAMES) -> tuple[np.ndarray, np.ndarray]:
    """(training starts, validation starts): window starts whose 16 frames lie wholly in the
    kept, or wholly in the held-out, blocks."""
    block = np.arange(n_frames) // config.block_frames
    held = (block % config.holdout_every) == config.holdout_every - 1
    if not held.any():  # a short clip: hold out its last fifth
        held = np.arange(n_frames) >= n_frames - max(n_frames // 5, 1)
    starts = np.arange(max(n_frames - window + 1, 0))
    inside = lambda mask: np.array([mask[s:s + window].all() for s in starts], bool)  # noqa: E731
    return starts[inside(~held)], starts[inside(held)]


def adapt(networks: AVFaceNetworks, clip: dict, config: AdaptConfig = AdaptConfig(), *,
          device: str = "cpu") -> tuple[AVFaceNetworks, AdaptRecord]:
    """Adapted copy of ``networks`` (which is left as it was) and the record of the run."""
    n = check_clip(clip, "the clip to adapt to")
    train_starts, val_starts = holdout_starts(n, config)
    if len(train_starts) == 0 or len(val_starts) == 0:
        raise InputError(f"a clip of {n} frames is too short to adapt to with a held-out part "
                         f"(blocks of {config.block_frames}); turn adaptation off for it")
    tcfg = dataclasses.replace(config.train, seed=config.seed, batch=config.batch)
    nets = copy.deepcopy(networks).to(device)
    module = TrainingModule(nets, tcfg)
    opt = torch.optim.Adam(nets.parameters(), lr=config.lr, weight_decay=tcfg.weight_decay)
    val_batch = collate([make_sample([clip], tcfg, VALIDATION_STEP, i, starts=[val_starts], augment=False)
                         for i in range(config.val_windows)])
    val_batch = {k: v.to(device) for k, v in val_batch.items()}

    def validate() -> float:
        module.eval()
        with torch.no_grad():
            loss = float(module(val_batch)["total"])
        module.train()
        return loss

    best = validate()
    best_state, best_step = copy.deepcopy(nets.state_dict()), 0
    val_losses, train_losses = [(0, best)], []
    since_best, step = 0, 0
    module.train()
    for step in range(1, config.max_steps + 1):
        batch = collate([make_sample([clip], tcfg, step, i, starts=[train_starts]) for i in range(config.batch)])
        opt.zero_grad(set_to_none=True)
        loss = module({k: v.to(device) for k, v in batch.items()})["total"]
        loss.backward()
        opt.step()
        train_losses.append(float(loss.detach()))
        if step % config.eval_every == 0 or step == config.max_steps:
            v = validate()
            val_losses.append((step, v))
            if v < best:
                best, best_state, best_step, since_best = v, copy.deepcopy(nets.state_dict()), step, 0
            else:
                since_best += 1
                if since_best >= config.patience:
                    break
    nets.load_state_dict(best_state)
    nets.eval()
    log.info("adaptation: %d steps, kept step %d (validation loss %.4f -> %.4f)", step, best_step,
             val_losses[0][1], best)
    return nets, AdaptRecord(step, best_step, val_losses, train_losses)


def adapt_networks(networks, clip: ClipInputs, config: NetworksStageConfig, device: str = "cpu"):
    """The networks stage's gradient adaptation (``NetworksStageConfig.adapt_steps > 0``; the
    ``adapter`` of :func:`avface.stages.networks.run.run_networks`): (adapted networks, the
    record for meta); the given networks and the reason when the clip is too short to hold a
    part out."""
    from avface.train.data import prepare_clip

    tracking = clip.tracking
    cfg = AdaptConfig(max_steps=config.adapt_steps, seed=config.seed)
    kept, held = holdout_starts(tracking.n_frames, cfg)
    if len(kept) == 0 or len(held) == 0:
        reason = f"a clip of {tracking.n_frames} frames is too short to hold a part out (blocks of {cfg.block_frames})"
        log.warning("adaptation skipped: %s", reason)
        return networks, {"skipped": reason}
    prepared = prepare_clip(tracking, clip.features, mouth_conf=clip.mouth_conf, fov_deg=clip.fov_deg)
    with torch_seeded(config.seed):
        adapted, record = adapt(networks, prepared, cfg, device=device)
    return adapted, record.to_meta()
