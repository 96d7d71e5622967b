"""The training loop of the AVFace networks: windows drawn from training clips, synthetic
occluders pasted on them, modality dropout, the losses of :mod:`avface.train.losses`, and
data parallelism with torch's own engine.

Launched under ``torchrun --nproc-per-node N`` (which sets ``WORLD_SIZE`` and ``RANK``), each
process takes an equal share of every global batch and DDP averages the gradients (gloo on
CPU, nccl on CUDA). Every random draw of a sample (its clip and start, its occluder, its
modality dropout) comes from a generator seeded by (seed, step, sample index), never from
the process, so N processes make the same global batch as one, and their weights match a
single-process run within floating-point reduction order.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from avface.errors import InputError
from avface.models.checkpoint import AVFaceNetworks, NetworksConfig, build_networks, save_checkpoint
from avface.models.windows import WINDOW_FRAMES
from avface.train import losses as L
from avface.train.data import CLIP_KEYS, EXPRESSION_KEYS, FRAME_KEYS, check_clip
from avface.train.occluders import OccluderConfig, occlude_window, random_track

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Options of one training run."""

    steps: int = 2000
    """Optimiser steps."""
    batch: int = 32
    """Windows per step over all processes (each of N processes takes batch / N)."""
    lr: float = 1e-4
    """Adam learning rate (the paper's)."""
    weight_decay: float = 5e-4
    """Adam weight decay (the paper's)."""
    optimizer: str = "adam"
    """``adam`` (the paper's) or ``sgd`` (plain, for checking the data-parallel gradient: Adam
    divides each step by the gradient's own size, so a parameter whose true gradient is zero,
    such as an attention key bias, steps by the learning rate on rounding noise)."""
    seed: int = 0
    """Seeds the initial weights and every draw of every sample."""
    trust_threshold: float = 0.5
    """A frame's landmarks supervise only where its mouth confidence reaches this."""
    p_mask_pose: float = 0.15
    """Share of frames whose pose input is hidden, so the pose encoder learns to fill from context."""
    w_landmarks: float = 1.0
    """Weight of the lower-face landmark term."""
    w_closure: float = 0.5
    """Weight of the mouth-closure term."""
    w_corner: float = 0.5
    """Weight of the lip-corner term."""
    w_pose: float = 1.0
    """Weight of the rigid landmarks' reprojection under the refined pose."""
    w_camera: float = 1.0
    """Weight of the camera against the tracker's on visible frames (squared, per cent)."""
    w_pose_smooth: float = 10.0
    """Weight of the second difference of the refined pose."""
    w_siren: float = 1.0
    """Weight of the refined lip landmarks."""
    w_silence: float = 0.1
    """Weight of the lip offsets in silence."""
    occluders: OccluderConfig = OccluderConfig()
    """Synthetic occluders pasted on training windows."""
    p_drop_audio: float = 0.4
    """Modality dropout of the audio embedding (the paper's)."""
    p_drop_video: float = 0.5
    """Modality dropout of the video embedding (the paper's)."""
    save_every: int = 100
    """Write the checkpoint, the optimiser state and the loss plot every this many steps
    (0: only at the end)."""


# --------------------------------------------------------------------------- batches


def _keep(rng: np.random.Generator, p_audio: float, p_video: float) -> tuple[float, float]:
    """One window's modality dropout, as avface.models.avnets.modality_keep draws it."""
    u = rng.random(3)
    keep_a, keep_v = u[0] >= p_audio, u[1] >= p_video
    if not keep_a and not keep_v:
        keep_a, keep_v = u[2] < 0.5, u[2] >= 0.5
    return float(keep_a), float(keep_v)


def make_sample(clips: list[dict], config: TrainConfig, step: int, index: int, window: int = WINDOW_FRAMES,
                starts: list[np.ndarray] | None = None, augment: bool = True) -> dict:
    """Sample ``index`` of global batch ``step``: a window of a clip, occluded or not, with
    its clean targets and its modality dropout draws. ``starts`` limits each clip's window
    starts (held-out frames stay out); ``augment=False`` draws no occluder and drops nothing."""
    rng = np.random.default_rng([config.seed, step, index])
    lengths = np.array([len(c["usable"]) for c in clips])
    if starts is None:
        starts = [np.arange(max(n - window + 1, 1)) for n in lengths]
    n_windows = np.array([len(s) for s in starts], np.float64)
    if n_windows.sum() == 0:
        raise InputError("no window to draw: every clip is shorter than its held-out part")
    c = int(rng.choice(len(clips), p=n_windows / n_windows.sum()))
    clip = clips[c]
    start = int(starts[c][rng.integers(len(starts[c]))])
    t = np.arange(start, start + window)
    valid = t < lengths[c]
    t = np.where(valid, t, 0)
    clean = {k: clip[k][t] for k in FRAME_KEYS}
    inputs = {k: clean[k] for k in EXPRESSION_KEYS}
    if augment and rng.random() < config.occluders.p_occlude:
        inputs = occlude_window(inputs, random_track(rng, window, config.occluders), rng, config.occluders)
    keep_a, keep_v = _keep(rng, config.p_drop_audio, config.p_drop_video) if augment else (1.0, 1.0)
    pose_usable = inputs["usable"] * ((rng.random(window) >= config.p_mask_pose) if augment else 1.0)
    trust = clean["usable"] * (clean["region_conf"][:, 0] >= config.trust_threshold) * clean["frontal"] * valid
    sample = {k: v for k, v in inputs.items()}
    sample.update(
        target=clean["landmarks"], trust=trust, valid=valid, keep_audio=keep_a, keep_video=keep_v,
        pose=clean["pose"], camera=clean["camera"], pose_usable=pose_usable, face_conf=inputs["region_conf"][:, 2],
        pose_trust=clean["usable"] * clean["frontal"] * valid, activity=clean["activity"], rigid_px=clean["rigid_px"],
        iod_px=clean["iod_px"],
    )
    sample.update({k: clip[k] for k in CLIP_KEYS})
    return sample


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    out = {}
    for k in samples[0]:
        arr = np.stack([np.asarray(s[k]) for s in samples])
        out[k] = torch.as_tensor(arr, dtype=torch.bool if k == "valid" else torch.float32)
    return out


def make_batch(clips: list[dict], config: TrainConfig, step: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """This process's share of global batch ``step``: samples rank * B/N ... (rank + 1) * B/N - 1."""
    share = config.batch // world
    return collate([make_sample(clips, config, step, i) for i in range(rank * share, (rank + 1) * share)])


# --------------------------------------------------------------------------- losses


class TrainingModule(nn.Module):
    """Every network's forward pass and loss for one batch in one ``forward``, so DDP sees
    one module and synchronises all gradients after one backward."""

    def __init__(self, networks: AVFaceNetworks, config: TrainConfig):
        super().__init__()
        self.networks = networks
        self.config = config

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c, n = self.config, self.networks
        x = {k: batch[k] for k in EXPRESSION_KEYS}
        pred = n.expression(**x, valid=batch["valid"], keep_audio=batch["keep_audio"], keep_video=batch["keep_video"])
        trust, target = batch["trust"], batch["target"]
        out = {
            "landmarks": L.landmark_loss(pred, target, trust),
            "closure": L.mouth_closure_loss(pred, target, trust),
            "corner": L.lip_corner_loss(pred, target, trust),
        }
        pose, cam = n.pose(batch["pose"], batch["camera"], batch["pose_usable"], batch["face_conf"], batch["valid"])
        out["pose"] = L.reprojection_loss(pose, batch["rigid_points"], batch["origin"], batch["depth"], batch["focal"],
                                          batch["rigid_px"], batch["iod_px"], batch["pose_trust"])
        out["camera"] = L.camera_loss(cam, batch["camera"], batch["pose_trust"])
        out["pose_smooth"] = L.smoothness_loss(pose, batch["valid"])
        # the SIREN refines the coarse lips it is given; it does not move them
        lips = n.lips(batch["lip_positions"][:, None].expand(-1, pred.shape[1], -1, -1),
                      n.expression.audio(batch["phones"], batch["mel"]), batch["activity"] * batch["audio_present"])
        out["siren"] = L.siren_lip_loss(pred.detach(), lips, target, trust)
        out["silence"] = L.silence_loss(lips, batch["activity"] * batch["audio_present"])
        out["total"] = (c.w_landmarks * out["landmarks"] + c.w_closure * out["closure"] + c.w_corner * out["corner"]
                        + c.w_pose * out["pose"] + c.w_camera * out["camera"] + c.w_pose_smooth * out["pose_smooth"]
                        + c.w_siren * out["siren"] + c.w_silence * out["silence"])
        return out


# --------------------------------------------------------------------------- the loop


def _distributed() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; starts the process group when N > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return rank, world


def state_path(out: str | Path) -> Path:
    """Where the optimiser state and loss history of a run writing ``out`` are kept."""
    out = Path(out)
    return out.with_name(out.name + ".state.pt")


def plot_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".loss.png")


def write_loss_plot(history: list[dict], path: Path) -> None:
    """Every loss term against the step, log scale, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = np.arange(len(history))
    for key in history[0]:
        ax.plot(steps, [max(h[key], 1e-12) for h in history], label=key, lw=1.5 if key == "total" else 0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (percent of the inter-ocular distance, squared)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _resume_config(config: TrainConfig) -> dict:
    """What must match for a run to resume another: everything but the step count."""
    d = dataclasses.asdict(config)
    d.pop("steps")
    return json.loads(json.dumps(d))


def _save(out: Path, networks: AVFaceNetworks, opt, config: TrainConfig, history: list[dict], world: int,
          seconds: float, n_clips: int) -> None:
    meta = {"steps": len(history), "processes": world, "train_config": dataclasses.asdict(config),
            "final_losses": history[-1] if history else {}, "seconds": seconds, "n_clips": n_clips}
    save_checkpoint(out, networks, json.loads(json.dumps(meta)))
    state = {"step": len(history), "optimizer": opt.state_dict(), "history": json.dumps(history),
             "config": json.dumps(_resume_config(config))}
    tmp = state_path(out).with_name(f".{state_path(out).name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, state_path(out))
    if history:
        write_loss_plot(history, plot_path(out))


def train(clips: list[dict], out: str | Path, config: TrainConfig = TrainConfig(), *,
          networks_config: NetworksConfig = NetworksConfig(), device: str = "cpu", resume: bool = True,
          progress: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train on ``clips`` and write the checkpoint to ``out``, with its optimiser state beside
    it (``out.state.pt``) and a loss plot (``out``'s stem + ``.loss.png``), every
    ``config.save_every`` steps and at the end (rank 0 writes). With ``resume`` and a state
    file of the same run (same options but the step count), training continues from its last
    save; since every sample is seeded by its step, the result is the one an uninterrupted
    run gives. Returns the per-step losses (averaged over processes), resumed ones included."""
    if not clips:
        raise InputError("no training clips given")
    for i, clip in enumerate(clips):
        check_clip(clip, f"training clip {i}")
    out = Path(out)
    rank, world = _distributed()
    if config.batch % world:
        raise InputError(f"the global batch ({config.batch}) must divide among {world} processes")
    if world > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    networks = build_networks(networks_config, seed=config.seed)
    if config.optimizer == "adam":
        opt = torch.optim.Adam(networks.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    elif config.optimizer == "sgd":
        opt = torch.optim.SGD(networks.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        raise InputError(f"optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")
    history: list[dict] = []
    if resume and state_path(out).is_file():
        history = _load_state(out, networks, opt, config, networks_config)
    networks.to(device)
    for state in opt.state.values():  # the optimiser's moments follow the weights' device
        for k, v in state.items():
            if torch.is_tensor(v) and k != "step":
                state[k] = v.to(device)
    module = TrainingModule(networks, config)
    model: nn.Module = module
    if world > 1:
        model = nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.startswith("cuda") else None)
    t0 = time.perf_counter()
    model.train()
    for step in range(len(history), config.steps):
        batch = {k: v.to(device) for k, v in make_batch(clips, config, step, rank, world).items()}
        opt.zero_grad(set_to_none=True)
        losses = model(batch)
        losses["total"].backward()
        opt.step()
        values = torch.stack([v.detach() for v in losses.values()])
        if world > 1:
            torch.distributed.all_reduce(values)
            values /= world
        record = {k: float(v) for k, v in zip(losses, values)}
        history.append(record)
        if not math.isfinite(record["total"]):
            raise FloatingPointError(f"training diverged at step {step}: {record}; lower the learning rate")
        if progress is not None and rank == 0:
            progress(step, record)
        if rank == 0 and config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            _save(out, networks, opt, config, history, world, time.perf_counter() - t0, len(clips))
    bad = [name for name, p in networks.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"training diverged: non-finite weights in {bad[:5]}; lower the learning rate")
    if rank == 0:
        _save(out, networks, opt, config, history, world, time.perf_counter() - t0, len(clips))
    if world > 1:
        torch.distributed.barrier()
    return history


def _load_state(out: Path, networks: AVFaceNetworks, opt, config: TrainConfig,
                networks_config: NetworksConfig) -> list[dict]:
    """Load a previous run's weights and optimiser state into ``networks`` and ``opt``;
    returns its loss history."""
    from avface.models.checkpoint import load_checkpoint

    path = state_path(out)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved_config = json.loads(state["config"])
        history = json.loads(state["history"])
    except Exception as e:
        raise InputError(f"cannot resume from {path}: {e}; delete it to start afresh") from e
    if saved_config != _resume_config(config):
        changed = sorted(k for k in saved_config if saved_config.get(k) != _resume_config(config).get(k))
        raise InputError(f"{path} belongs to a run with other options ({changed}); delete it to start afresh, "
                         f"or write the checkpoint elsewhere")
    ck = load_checkpoint(out)
    if ck.networks.config != networks_config:
        raise InputError(f"{out} holds networks of another configuration; delete it and {path} to start afresh")
    if len(history) != int(state["step"]) or ck.meta.get("steps") != len(history):
        raise InputError(f"{out} and {path} are from different steps; delete both to start afresh")
    networks.load_state_dict(ck.networks.state_dict())
    opt.load_state_dict(state["optimizer"])
    log.info("resuming %s from step %d", out, len(history))
    return history
