"""Per-clip adaptation of the fine stage: fit the shading to the clip, train the detail
network on the clip's trusted texels, predict D for every frame and carry it over what was
not trusted (docs/fine_stage.md).

This is the training side of :mod:`avface.models.fine`, beside the other networks' training
(:mod:`avface.train.adapt` adapts the coarse networks the same way), kept apart from
:mod:`avface.stages.detail.fine` (losses and maps) so that inference needs no optimiser.

Frames are split into training frames and held-out frames (every ``holdout_stride``-th
frame): held-out frames never reach the optimiser, so the photometric residuals reported on
them measure what the detail generalises to (the benchmark's ``detail_gain``).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from avface.models.fine import DetailNet, FineNetConfig
from avface.stages.detail import shading, uvspace
from avface.stages.detail.fine import (ClipUV, FineLossBatch, FineLossConfig, TexelLayout, carry_displacement,
    fine_loss, masked_gaussian, photo_residual)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FineAdaptConfig:
    """Options of the fine stage's per-clip adaptation."""

    steps: int = 300
    """Optimiser steps (each one batch of frames)."""
    batch: int = 4
    """Frames per step."""
    predict_batch: int = 8
    """Frames per forward pass when every frame is predicted (no gradients: larger batches
    use the cores better; each frame's D does not depend on its batch)."""
    lr: float = 1e-3
    """Adam learning rate. The paper's 1e-4 is for training on a corpus; per clip from a
    fresh network it barely moves D in a few hundred steps."""
    weight_decay: float = 5e-4
    """Adam weight decay (the paper's)."""
    holdout_stride: int = 5
    """Every holdout_stride-th frame (1, 1 + stride, ...) is held out of training; 0 holds
    none out."""
    max_train_frames: int = 0
    """Train on at most this many of the training frames, evenly spaced (0: all of them).
    Each training frame's shading targets are solved once (0.2 s at 256^2 on one CPU
    thread), and a few dozen frames of one speaker already show every fold the clip has; the
    frames left out are still predicted, like the held-out ones, but not measured."""
    shading_frames: int = 48
    """At most this many training frames, evenly spaced, fit the clip's albedo and light."""
    albedo_blur_texels: float = 4.0
    """Standard deviation of the Gaussian that low-passes the fitted albedo, in texels at
    256^2 (scaled with the map size). A per-clip albedo absorbs whatever shading does not
    change over the clip, wrinkles included, and would leave the detail nothing to explain;
    skin albedo is smooth at this scale, so the low-pass keeps the wrinkles' shading in the
    residual. 0 keeps the fitted albedo as it is."""
    shading_prior: float = 0.05
    """Pull of the shading-implied normals towards the coarse normals
    (:func:`avface.stages.detail.shading.shading_normals`)."""
    frame_weight: bool = True
    """Scale a batch's loss by the share of its frames that are trusted, so that every frame
    weighs what it weighs in a full batch. Without it, a batch that lost frames to a hand
    teaches its remaining frames harder, and the same clip with and without the hand adapts
    to different amplitudes of D everywhere (benchmark, feifeili's hand, seed 0: mouth |D|
    0.31 against 0.23 mm on frames far from the hand; with it 0.28). The shipped checkpoint's
    generic fine part was trained without it (:mod:`avface.train.fine_generic` keeps that
    recipe, so that its documented command still reproduces the file)."""
    seed: int = 0
    loss: FineLossConfig = field(default_factory=FineLossConfig)
    net: FineNetConfig = field(default_factory=FineNetConfig)


@dataclass(eq=False)
class FineAdaptResult:
    displacement: np.ndarray  #: (T, S, S) float32 metres, carried over untrusted texels
    net: DetailNet
    albedo: torch.Tensor  #: (S, S, 3)
    sh: torch.Tensor  #: (T, 9, 3) per-frame light (coarse normals)
    train_frames: np.ndarray  #: (Tt,) int
    held_out: np.ndarray  #: (Th,) int
    losses: list = field(default_factory=list)  #: per step, the total loss
    photo_residual_coarse: float = math.nan  #: held-out frames, 8-bit levels
    photo_residual_detail: float = math.nan
    seconds: float = 0.0
    phase_seconds: dict = field(default_factory=dict)  #: shading, train, predict

    @property
    def detail_gain(self) -> float:
        """1 - detail / coarse on the held-out frames."""
        return 1.0 - self.photo_residual_detail / self.photo_residual_coarse


def blur_masked(maps: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian low-pass of (S, S, C) maps over the (S, S) mask only (normalised
    convolution), so the empty background does not darken the borders; 0 outside the mask."""
    return masked_gaussian(maps[None], mask[None], sigma)[0]


def _split(n_frames: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(n_frames)
    if stride <= 0 or n_frames < 2:
        return idx, idx[:0]
    held = idx[1::stride]
    return np.setdiff1d(idx, held), held


@dataclass(frozen=True, eq=False)
class AdaptInputs:
    """One clip as the fine stage's adaptation reads it."""

    uv: ClipUV
    """The unwrapped frames (:func:`avface.stages.detail.fine.unwrap_clip`)."""
    vertices: torch.Tensor
    """(T, V, 3) the same camera-frame vertices."""
    faces: object
    """(F, 3) the mesh's triangles."""
    raster: uvspace.UVRaster
    """The UV layout the frames were unwrapped into."""
    audio: torch.Tensor | None = None
    """(T, A) per-frame audio features (A = the network's ``audio_dim``), or None for silence."""
    mirror: tuple[np.ndarray, np.ndarray] | None = None
    """:func:`avface.stages.detail.uvspace.mirror_texels` of the model, or None for no
    symmetry term."""


@dataclass(frozen=True, eq=False)
class _ClipTensors:
    """What every phase of :func:`adapt_clip` reads of the clip, on the device."""

    inputs: AdaptInputs
    device: torch.device
    audio: torch.Tensor  #: (T, A), zeros for silence
    layout: TexelLayout  #: covered texels and the mirror map
    trust_all: torch.Tensor  #: (T, S, S) the clip's trust times the covered texels
    trusted: torch.Tensor  #: (T, S, S) bool, trust_all >= min_trust
    min_trust: float

    @property
    def n_frames(self) -> int:
        return self.inputs.uv.image.shape[0]

    def geometry(self, idx):
        return uvspace.texel_geometry(self.inputs.raster, self.inputs.faces,
                                      self.inputs.vertices[torch.as_tensor(idx, device=self.device)].float())


@dataclass(frozen=True)
class _FrameSplit:
    """Which frames train (and in which order the batches draw them), and which are held out."""

    candidates: np.ndarray  #: the frames the batches are drawn from
    held: np.ndarray  #: the held-out frames
    train: np.ndarray  #: the candidates with a trusted texel
    usable_frame: np.ndarray  #: (T,) bool, True on ``train``


def _clip_tensors(inputs: AdaptInputs, net_cfg: FineNetConfig, cfg: FineAdaptConfig) -> _ClipTensors:
    """The clip on the device; refuses audio features of the wrong shape."""
    n_frames = inputs.uv.image.shape[0]
    device = inputs.vertices.device
    audio = inputs.audio
    if audio is None:
        audio = torch.zeros(n_frames, net_cfg.audio_dim, device=device)
    if audio.shape != (n_frames, net_cfg.audio_dim):
        raise ValueError(f"expected ({n_frames}, {net_cfg.audio_dim}) audio features, got {tuple(audio.shape)}")
    covered = uvspace.texel_mask(inputs.raster, device)
    size = inputs.raster.size
    mirror = inputs.mirror
    if mirror is None:
        mirror_idx = torch.zeros(size, size, dtype=torch.long, device=device)
        mirror_ok = torch.zeros(size, size, dtype=torch.bool, device=device)
    else:
        mirror_idx = torch.as_tensor(mirror[0], device=device)
        mirror_ok = torch.as_tensor(mirror[1], device=device)
    min_trust = cfg.loss.min_trust
    trust_all = inputs.uv.trust.to(device) * covered  # (T, S, S), on the device (the frames stay where they are)
    trusted = trust_all >= min_trust
    return _ClipTensors(inputs, device, audio, TexelLayout(covered, mirror_idx, mirror_ok), trust_all, trusted,
                        min_trust)


def _frame_split(c: _ClipTensors, cfg: FineAdaptConfig) -> _FrameSplit:
    """The training and held-out frames; ValueError when no frame has a trusted texel."""
    n_frames, trusted, device = c.n_frames, c.trusted, c.device
    # The candidate training frames and the order of the batches depend only on the clip's
    # length and the seed, not on which frames are trusted: the same clip with a hand over
    # its mouth trains on the same frames in the same order, less the hand's, so the two
    # runs' detail can be compared (the benchmark's detail_occluder_ratio).
    candidates, held = _split(n_frames, cfg.holdout_stride)
    if 0 < cfg.max_train_frames < len(candidates):
        candidates = candidates[np.linspace(0, len(candidates) - 1, cfg.max_train_frames).round().astype(int)]
    usable = trusted[torch.as_tensor(candidates, device=device)].flatten(1).any(1).cpu().numpy()
    if not usable.any():  # the evenly spaced frames all covered: any training frame that is not
        candidates = _split(n_frames, cfg.holdout_stride)[0]
        usable = trusted[torch.as_tensor(candidates, device=device)].flatten(1).any(1).cpu().numpy()
        candidates = candidates[usable][:cfg.max_train_frames or None]
        usable = np.ones(len(candidates), bool)
    train = candidates[usable]
    if len(train) == 0:
        raise ValueError("no frame has a trusted texel: nothing to learn detail from")
    usable_frame = np.zeros(n_frames, bool)
    usable_frame[train] = True
    return _FrameSplit(candidates, held, train, usable_frame)


def _fit_clip_shading(c: _ClipTensors, train: np.ndarray, cfg: FineAdaptConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(albedo (S, S, 3), sh (T, 9, 3)): the clip's albedo and light on coarse normals, from
    training frames only, then every frame's own light under that albedo."""
    clip, n_frames, trusted, device = c.inputs.uv, c.n_frames, c.trusted, c.device
    size = c.inputs.raster.size
    sfr = train[np.linspace(0, len(train) - 1, min(cfg.shading_frames, len(train))).round().astype(int)]
    _, n_s = c.geometry(sfr)
    fit = shading.fit_shading(clip.frames(torch.as_tensor(sfr)).to(device), n_s,
                              trusted[torch.as_tensor(sfr, device=device)], seed=cfg.seed)
    albedo = blur_masked(fit.albedo, fit.albedo.abs().sum(-1) > 0, cfg.albedo_blur_texels * size / 256.0)
    clip_light = fit.sh.mean(0)
    # every frame's own light under that albedo (held-out frames too: they are evaluated)
    sh = torch.empty(n_frames, shading.N_SH, 3, dtype=albedo.dtype, device=device)
    for s0 in range(0, n_frames, 32):
        idx = np.arange(s0, min(s0 + 32, n_frames))
        _, n_c = c.geometry(idx)
        sh[idx] = shading.fit_lighting(clip.frames(torch.as_tensor(idx)).to(device), albedo, n_c,
                                       trusted[torch.as_tensor(idx, device=device)], prior=clip_light,
                                       prior_weight=shading.LIGHT_TIE)
    return albedo, sh


def _shading_targets(c: _ClipTensors, albedo: torch.Tensor, sh: torch.Tensor, cfg: FineAdaptConfig):
    """(idx, image, normals, trust) -> the shading-implied normals of frames ``idx``. They
    depend only on the frame, the albedo and the light, all fixed while training: solved
    once per frame on first use, kept as float16."""
    cache: dict[int, torch.Tensor] = {}
    device, min_trust = c.device, c.min_trust

    def shading_targets(idx, image, normals, trust):
        todo = [j for j, t in enumerate(idx) if int(t) not in cache]
        if todo:
            with torch.no_grad():
                sel = torch.as_tensor(todo, device=device)
                solved = shading.shading_normals(image[sel], albedo, sh[torch.as_tensor(idx[todo], device=device)],
                                                 normals[sel], trust[sel] >= min_trust, prior=cfg.shading_prior)
            for j, target in zip(todo, solved):
                cache[int(idx[j])] = target.half()
        return torch.stack([cache[int(t)] for t in idx]).to(normals.dtype)

    return shading_targets


def _train(net: DetailNet, c: _ClipTensors, split: _FrameSplit, albedo: torch.Tensor, sh: torch.Tensor,
           cfg: FineAdaptConfig, *, extra_loss=None, progress=None) -> list:
    """Train ``net`` on the clip's training frames; returns the per-step losses."""
    clip, device, min_trust, covered = c.inputs.uv, c.device, c.min_trust, c.layout.covered
    candidates, usable_frame = split.candidates, split.usable_frame
    shading_targets = _shading_targets(c, albedo, sh, cfg)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    losses = []
    for step in range(cfg.steps):
        idx = rng.choice(candidates, size=min(cfg.batch, len(candidates)), replace=False)
        idx = idx[usable_frame[idx]]
        if len(idx) == 0:  # every frame of this batch untrusted: no step (the draws stay in step)
            continue
        ti = torch.as_tensor(idx, device=device)
        points, normals = c.geometry(idx)
        image = clip.frames(torch.as_tensor(idx)).to(device)
        trust = c.trust_all[ti]
        target = shading_targets(idx, image, normals, trust)
        d = net(image, normals, trust >= min_trust, c.audio[ti])
        nd = uvspace.detail_normals(points, normals, d, covered)
        loss, _ = fine_loss(cfg.loss, FineLossBatch(image_uv=image, albedo=albedo, sh=sh[ti], detail_normals=nd,
                                                    shading_normals=target, displacement=d, trust=trust), c.layout)
        if extra_loss is not None:
            loss = loss + extra_loss(idx, d, trust)
        if cfg.frame_weight:  # a batch that lost frames to a hand teaches the rest no harder
            loss = loss * (len(idx) / min(cfg.batch, len(candidates)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None and step % 20 == 0:
            progress(0.9 * step / max(cfg.steps, 1))
    return losses


def _predict(net: DetailNet, c: _ClipTensors, held: np.ndarray, albedo: torch.Tensor, sh: torch.Tensor,
             cfg: FineAdaptConfig) -> tuple[np.ndarray, float, float, float]:
    """(D (T, S, S) of every frame, not yet carried; the held-out frames' coarse and detail
    photometric residuals, each summed with the frame's trusted texel count; that count's sum)."""
    clip, device, min_trust, covered = c.inputs.uv, c.device, c.min_trust, c.layout.covered
    n_frames, size = c.n_frames, c.inputs.raster.size
    net.eval()
    out = np.zeros((n_frames, size, size), np.float32)
    res_c = res_d = w_sum = 0.0
    held_set = set(held.tolist())
    with torch.no_grad():
        for s0 in range(0, n_frames, cfg.predict_batch):
            idx = np.arange(s0, min(s0 + cfg.predict_batch, n_frames))
            ti = torch.as_tensor(idx, device=device)
            points, normals = c.geometry(idx)
            image = clip.frames(torch.as_tensor(idx)).to(device)
            trust = c.trust_all[ti]
            d = net(image, normals, trust >= min_trust, c.audio[ti]) * covered
            out[idx] = d.cpu().numpy()
            for j, t in enumerate(idx):
                if t in held_set:
                    w = (trust[j:j + 1] >= min_trust).float()
                    nw = float(w.sum())
                    if nw == 0:
                        continue
                    nd = uvspace.detail_normals(points[j:j + 1], normals[j:j + 1], d[j:j + 1], covered)
                    res_c += nw * photo_residual(image[j:j + 1], albedo, sh[t:t + 1], normals[j:j + 1], w)
                    res_d += nw * photo_residual(image[j:j + 1], albedo, sh[t:t + 1], nd, w)
                    w_sum += nw
    return out, res_c, res_d, w_sum


def adapt_clip(inputs: AdaptInputs, cfg: FineAdaptConfig = FineAdaptConfig(), *, net: DetailNet | None = None,
               progress=None, shading_fit: tuple[torch.Tensor, torch.Tensor] | None = None, predict: bool = True,
               extra_loss=None) -> FineAdaptResult:
    """Fit the fine stage to one clip.

    inputs: the clip (:class:`AdaptInputs`: the unwrapped frames, the same camera-frame
    vertices, the layout, the audio features or None for silence, the mirror map or None for
    no symmetry term); net: a network to start from (the generic checkpoint's), else a fresh
    one. ``progress(fraction)`` is called now and then. shading_fit: (albedo, sh) of an
    earlier call on the same clip (the result's), to skip the shading fit; predict: False
    skips the prediction of every frame (training on a corpus,
    :mod:`avface.train.fine_generic`): the result's displacement is then empty;
    extra_loss(frames, D, trust) -> scalar: a term added to every step's loss (the corpus's
    supervision by its true height).
    """
    t0 = time.perf_counter()
    n_frames = inputs.uv.image.shape[0]
    device = inputs.vertices.device
    if inputs.vertices.shape[0] != n_frames:
        raise ValueError(f"{inputs.vertices.shape[0]} vertex sets for {n_frames} unwrapped frames")
    net = net if net is not None else DetailNet(cfg.net, seed=cfg.seed).to(device)
    c = _clip_tensors(inputs, net.cfg, cfg)
    size = inputs.raster.size
    split = _frame_split(c, cfg)
    train, held = split.train, split.held

    phases: dict[str, float] = {}
    tp = time.perf_counter()
    if shading_fit is not None:
        albedo, sh = (t.to(device) for t in shading_fit)
    else:
        # 1. the clip's albedo and light, on coarse normals, from training frames only
        albedo, sh = _fit_clip_shading(c, train, cfg)
    phases["shading"] = time.perf_counter() - tp
    tp = time.perf_counter()
    # 2. train
    losses = _train(net, c, split, albedo, sh, cfg, extra_loss=extra_loss, progress=progress)

    phases["train"] = time.perf_counter() - tp
    if not predict:
        return FineAdaptResult(np.zeros((0, size, size), np.float32), net, albedo, sh, train, held, losses,
                               seconds=time.perf_counter() - t0, phase_seconds=phases)
    tp = time.perf_counter()
    # 3. predict every frame, carry D over what was not trusted, measure the held-out frames
    out, res_c, res_d, w_sum = _predict(net, c, held, albedo, sh, cfg)
    out = carry_displacement(out, c.trusted.cpu().numpy()) * inputs.raster.mask
    phases["predict"] = time.perf_counter() - tp
    result = FineAdaptResult(out.astype(np.float32), net, albedo, sh, train, held, losses,
                             res_c / w_sum if w_sum else math.nan, res_d / w_sum if w_sum else math.nan,
                             time.perf_counter() - t0, phases)
    log.info("fine stage: %d steps on %d frames in %.1f s (%s); held-out photometric residual %.2f -> %.2f (8-bit)",
             cfg.steps, len(train), result.seconds, ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()),
             result.photo_residual_coarse, result.photo_residual_detail)
    if progress is not None:
        progress(1.0)
    return result
