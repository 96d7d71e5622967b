"""Overlapping temporal windows (docs/design.md section 2: the networks see 16 frames at a time;
at test time every window at stride 1 is run and each frame's predictions are averaged).

Pure functions over tensors whose first axis is time. A clip of T >= W frames has
T - W + 1 windows; a clip shorter than W is one window padded at the end, with a mask that
says which positions are real.
"""
from __future__ import annotations

from typing import Callable

import torch

WINDOW_FRAMES = 16


def window_index(n_frames: int, window: int = WINDOW_FRAMES, stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame index and validity of every window position.

    Returns (index (N, W) long, valid (N, W) bool). Windows start at 0, stride, ... and the
    last one ends at the last frame, so every frame is covered. Padding positions (clips
    shorter than W) index frame 0 and are invalid.
    """
    if n_frames < 1:
        raise ValueError(f"expected at least one frame, got {n_frames}")
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be positive, got {window} and {stride}")
    if n_frames <= window:
        pos = torch.arange(window)
        return torch.where(pos < n_frames, pos, 0)[None], (pos < n_frames)[None]
    starts = list(range(0, n_frames - window + 1, stride))
    if starts[-1] != n_frames - window:
        starts.append(n_frames - window)
    start = torch.tensor(starts)
    index = start[:, None] + torch.arange(window)[None]  # (N, W)
    return index, torch.ones_like(index, dtype=torch.bool)


def unfold(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(T, ...) per-frame values to (N, W, ...) windows by a window index from window_index."""
    return x[index.reshape(-1)].reshape(*index.shape, *x.shape[1:])


def average(y: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, n_frames: int) -> torch.Tensor:
    """(N, W, ...) per-window predictions to (T, ...) per-frame means over the windows that
    hold each frame. The identity on predictions that agree across windows."""
    flat = y.reshape(-1, *y.shape[2:])  # (N*W, ...)
    w = valid.reshape(-1).to(y.dtype)
    wshape = (-1,) + (1,) * (y.ndim - 2)
    total = torch.zeros((n_frames, *y.shape[2:]), dtype=y.dtype, device=y.device)
    # total[t] = sum over (n, k) with index[n, k] == t of y[n, k] * valid[n, k]
    total.index_add_(0, index.reshape(-1).to(y.device), flat * w.view(wshape).to(y.device))
    count = torch.zeros(n_frames, dtype=y.dtype, device=y.device)
    count.index_add_(0, index.reshape(-1).to(y.device), w.to(y.device))
    return total / count.clamp(min=1.0).view((-1,) + (1,) * (y.ndim - 2))


def run_windowed(fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor], n_frames: int, *,
                 window: int = WINDOW_FRAMES, stride: int = 1, batch: int = 256) -> torch.Tensor:
    """Run ``fn(**windows, valid=(B, W) bool) -> (B, W, ...)`` on every window of the (T, ...)
    per-frame ``inputs``, ``batch`` windows at a time, and average per frame: (T, ...)."""
    for name, x in inputs.items():
        if x.shape[0] != n_frames:
            raise ValueError(f"input {name!r} has {x.shape[0]} frames, expected {n_frames}")
    index, valid = window_index(n_frames, window, stride)
    outs = []
    for s in range(0, index.shape[0], batch):
        idx = index[s:s + batch]
        v = valid[s:s + batch]
        windows = {name: unfold(x, idx.to(x.device)) for name, x in inputs.items()}
        outs.append(fn(**windows, valid=v.to(next(iter(inputs.values())).device)))
    return average(torch.cat(outs), index, valid, n_frames)
