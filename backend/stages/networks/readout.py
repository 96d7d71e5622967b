"""Per-clip adaptation of the mouth fill, in closed form (docs/networks.md).

The generic networks know how mouths move with speech in general; a clip's own speaker has
a mouth, a voice and a microphone of their own. Before the networks fill the frames where
the mouth is not seen, this module learns, from the clip's own trusted frames, a linear
readout from the audio encoder's embedding f_a (with its temporal context) to the speaker's
lower-face offsets: ridge regression onto the leading principal components of the trusted
offsets. It is closed-form, so it takes milliseconds, is exactly reproducible and cannot
diverge.

Which fill serves this clip best is then decided on the clip itself. Spans as long as real
occlusions are hidden on trusted frames (drawn with the seed, so two runs agree), and each
candidate fills them from what is left:

* ``interp``: the straight line between the span's ends (what the video-only fit does);
* ``network``: the generic networks' own prediction with those frames hidden;
* ``ridge`` at each strength in ``ReadoutConfig.lambdas``: the per-clip audio readout;
* ``ridge+ends`` (per strength and decay): the readout, with its error at the span's visible
  ends carried into the span and decaying with the distance to them, so the fill meets the
  seen mouth without a jump.

The candidate with the lowest lip error on the hidden spans is refitted on every trusted
frame and fills the frames that are not trusted; trusted frames keep the tracker's offsets.
The lip SIREN's offsets are judged the same way: the gain (0, 0.5 or 1) that brings the
chosen fill closest to the hidden lips is how much of them the result gets.
A clip with too few trusted frames to hold spans out gets the straight line: on real clips
the generic networks alone had 1.1-1.2x its error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from avface.core.topology import LIPS
from avface.models.avnets import LOWER_FACE_LANDMARKS

#: Offsets of the lip landmarks within the networks' 97 lower-face landmarks.
LIP_ROWS = np.array([list(LOWER_FACE_LANDMARKS).index(i) for i in LIPS])


@dataclass(frozen=True)
class ReadoutConfig:
    """Options of the closed-form per-clip adaptation."""

    components: int = 8
    """Principal components of the trusted offsets the readout predicts."""
    lambdas: tuple = (1e3, 1e4, 1e5)
    """Ridge strengths tried (on standardised features)."""
    decays: tuple = (4.0, 12.0)
    """Frames over which the error at a span's ends fades, tried for ``ridge+ends``."""
    context: tuple = (-4, -2, 0, 2, 4)
    """Frame shifts of f_a stacked as the readout's input (speech before and after)."""
    span_frames: tuple = (12, 38)
    """Length range of the hidden spans, frames (0.5-1.5 s at 25 fps, as real occlusions)."""
    spans: int = 16
    """Spans hidden to choose the fill."""
    min_trusted: int = 24
    """Fewer trusted frames than this, or no room for a hidden span: the straight line (the
    generic networks alone were measured 1.1-1.2x its error on real clips)."""
    lip_gains: tuple = (0.5, 1.0)
    """Gains of the lip SIREN's offsets tried on the hidden spans (besides 0)."""
    seed: int = 0
    """Seeds the hidden spans."""


@dataclass
class ReadoutRecord:
    """What the adaptation chose, for the result's meta."""

    choice: str
    """The fill used on the frames that are not trusted."""
    scores: dict = field(default_factory=dict)
    """Mean lip error (inter-ocular units) of every candidate on the hidden spans."""
    hidden_frames: int = 0
    """Trusted frames hidden to score the candidates."""
    lip_gain: float = 0.0
    """How much of the lip SIREN's offsets to add where the mouth is not seen, chosen on the
    same hidden spans (0 when they did not help there, or were not given)."""
    lip_scores: dict = field(default_factory=dict)
    """Lip error of the chosen fill plus each gain of the SIREN's offsets on the hidden spans."""

    def to_meta(self) -> dict:
        return {"choice": self.choice, "scores": {k: round(float(v), 6) for k, v in self.scores.items()},
                "hidden_frames": int(self.hidden_frames), "lip_gain": float(self.lip_gain),
                "lip_scores": {k: round(float(v), 6) for k, v in self.lip_scores.items()}}


def linear_fill(x: np.ndarray, known: np.ndarray) -> np.ndarray:
    """``x`` (T, ...) with frames where ``known`` (T,) is False replaced by the straight line
    between the nearest known frames (held flat past the ends)."""
    x = np.array(x, np.float64, copy=True)
    if known.all() or known.sum() < 1:
        return x
    t = np.arange(len(x))
    flat = x.reshape(len(x), -1)
    for j in range(flat.shape[1]):
        flat[~known, j] = np.interp(t[~known], t[known], flat[known, j])
    return flat.reshape(x.shape)


def distance_to_known(known: np.ndarray) -> np.ndarray:
    """(T,) frames to the nearest known frame (0 on known frames; large without any)."""
    t = np.arange(len(known))
    idx = t[known]
    if len(idx) == 0:
        return np.full(len(known), 1e9)
    pos = np.clip(np.searchsorted(idx, t), 1, len(idx)) - 1
    left = np.abs(t - idx[pos])
    right = np.abs(idx[np.clip(pos + 1, 0, len(idx) - 1)] - t)
    return np.minimum(left, right).astype(np.float64)


def stack_context(f: np.ndarray, shifts) -> np.ndarray:
    """(T, F * len(shifts)): ``f`` (T, F) at each frame shift, edges held."""
    t = np.arange(len(f))
    return np.concatenate([f[np.clip(t + s, 0, len(f) - 1)] for s in shifts], axis=1)


def ridge_readout(features: np.ndarray, offsets: np.ndarray, train: np.ndarray, lam: float,
                  components: int) -> np.ndarray:
    """Offsets (T, M, 3) predicted on every frame by ridge regression from ``features``
    (T, F) onto the leading ``components`` principal components of ``offsets`` on the
    ``train`` frames."""
    t = len(offsets)
    y = offsets.reshape(t, -1).astype(np.float64)
    mean = y[train].mean(0)
    _, _, vt = np.linalg.svd(y[train] - mean, full_matrices=False)
    basis = vt[:components]
    z = (y[train] - mean) @ basis.T
    mu, sd = features[train].mean(0), features[train].std(0) + 1e-6
    x = (features - mu) / sd
    a = x[train]
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ z)
    return (mean + x @ w @ basis).reshape(offsets.shape)


def with_ends(estimate: np.ndarray, offsets: np.ndarray, known: np.ndarray, decay: float) -> np.ndarray:
    """``estimate`` plus its error at the nearest known frames, fading over ``decay`` frames."""
    resid = linear_fill(np.where(known[:, None, None], offsets - estimate, 0.0), known)
    w = np.exp(-np.maximum(distance_to_known(known) - 1.0, 0.0) / decay)
    return estimate + w[:, None, None] * resid


def hidden_spans(trusted: np.ndarray, config: ReadoutConfig) -> np.ndarray:
    """(T,) bool: up to ``config.spans`` non-overlapping spans wholly inside trusted frames,
    each with a trusted frame on both sides, drawn with ``config.seed``."""
    rng = np.random.default_rng(config.seed)
    t = len(trusted)
    hidden = np.zeros(t, bool)
    lo, hi = config.span_frames
    for _ in range(config.spans * 20):
        if hidden.sum() and (hidden[:-1] < hidden[1:]).sum() >= config.spans:
            break
        length = int(rng.integers(lo, hi + 1))
        length = min(length, max(t // 4, 1))
        start = int(rng.integers(1, max(t - length - 1, 2)))
        a, b = start - 1, start + length + 1  # one trusted, not hidden frame on each side
        if b > t or not trusted[a:b].all() or hidden[max(a - 1, 0):b + 1].any():
            continue
        hidden[start:start + length] = True
    return hidden


def _lip_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a[:, LIP_ROWS] - b[:, LIP_ROWS], axis=-1).mean())


def _candidates(offsets, known, features, network: np.ndarray | None, config: ReadoutConfig) -> dict:
    """Every candidate fill (T, M, 3), from the frames where ``known`` is True."""
    out = {"interp": linear_fill(offsets, known)}
    if network is not None:
        out["network"] = network
    if features is not None:
        for lam in config.lambdas:
            est = ridge_readout(features, offsets, known, lam, config.components)
            out[f"ridge {lam:g}"] = est
            for d in config.decays:
                out[f"ridge {lam:g}+ends {d:g}"] = with_ends(est, offsets, known, d)
    return out


def _lip_gain(fill: np.ndarray, offsets: np.ndarray, lips: np.ndarray, hidden: np.ndarray,
              config: ReadoutConfig) -> tuple[float, dict]:
    """(the gain of the SIREN's lip offsets with the lowest lip error on the hidden spans,
    every gain's error)."""
    scores = {}
    for g in (0.0,) + tuple(config.lip_gains):
        est = fill[hidden][:, LIP_ROWS] + g * lips[hidden]
        scores[f"{g:g}"] = float(np.linalg.norm(est - offsets[hidden][:, LIP_ROWS], axis=-1).mean())
    best = min(scores, key=scores.get)
    return float(best), scores


def adapt_fill(offsets: np.ndarray, trusted: np.ndarray, f_a: np.ndarray | None,
               network: Callable[[np.ndarray], np.ndarray] | None, config: ReadoutConfig = ReadoutConfig(),
               lips: np.ndarray | None = None) -> tuple[np.ndarray, ReadoutRecord]:
    """(filled offsets (T, M, 3), record). ``offsets`` are the tracker's (trusted frames
    matter), ``f_a`` (T, 64) the audio embedding (None: no speech), ``network(hidden)``
    the generic networks' offsets with the ``hidden`` (T,) frames' video evidence removed,
    ``lips`` (T, 40, 3) the lip SIREN's offsets of the lip landmarks (same units), whose
    gain on top of the fill is chosen on the hidden spans too (``record.lip_gain``)."""
    offsets = np.asarray(offsets, np.float64)
    trusted = np.asarray(trusted, bool)
    features = None if f_a is None else stack_context(np.asarray(f_a, np.float64), config.context)
    if trusted.sum() < config.min_trusted:  # nothing to judge by: the safe fill
        return np.where(trusted[:, None, None], offsets, linear_fill(offsets, trusted)), ReadoutRecord("interp")
    hidden = hidden_spans(trusted, config)
    record = ReadoutRecord("interp", hidden_frames=int(hidden.sum()))
    if hidden.any():
        known = trusted & ~hidden
        net_hidden = None if network is None else np.asarray(network(hidden), np.float64)
        candidates = _candidates(offsets, known, features, net_hidden, config)
        for name, est in candidates.items():
            record.scores[name] = _lip_error(est[hidden], offsets[hidden])
        record.choice = min(record.scores, key=record.scores.get)
        if lips is not None:
            record.lip_gain, record.lip_scores = _lip_gain(candidates[record.choice], offsets, lips, hidden, config)
    base = np.asarray(network(np.zeros_like(trusted)), np.float64) if record.choice == "network" else None
    final = _candidates(offsets, trusted, features if "ridge" in record.choice else None, base, config)[record.choice]
    return np.where(trusted[:, None, None], offsets, final), record
