"""The closed-form per-clip adaptation of the mouth fill (avface.stages.networks.readout)."""
import numpy as np
import pytest

from avface.stages.networks.readout import (LIP_ROWS, ReadoutConfig, adapt_fill, distance_to_known, hidden_spans,
    linear_fill, ridge_readout, with_ends)

M = 97


def _speaker(t: int = 600, seed: int = 0, noise: float = 0.002):
    """Offsets (T, M, 3) driven linearly by a smooth audio embedding (T, 64) through 3
    mouth modes, plus tracker noise."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(t + 20, 64))
    kernel = np.hanning(9) / np.hanning(9).sum()
    f_a = np.stack([np.convolve(raw[:, j], kernel, mode="same") for j in range(64)], 1)[10:-10]
    modes = rng.normal(size=(3, M * 3)) * 0.02
    drive = f_a[:, :3] * 3.0
    offsets = (drive @ modes).reshape(t, M, 3) + rng.normal(size=(t, M, 3)) * noise
    return f_a, offsets


def _occlude(t: int, spans) -> np.ndarray:
    trusted = np.ones(t, bool)
    for a, b in spans:
        trusted[a:b] = False
    return trusted


def _lip_err(a, b):
    return float(np.linalg.norm(a[:, LIP_ROWS] - b[:, LIP_ROWS], axis=-1).mean())


def test_linear_fill_draws_the_line_and_holds_the_ends():
    x = np.arange(10, dtype=float)[:, None] * 2.0
    known = np.array([0, 1, 1, 0, 0, 0, 1, 1, 1, 0], bool)
    filled = linear_fill(np.where(known[:, None], x, 99.0), known)
    np.testing.assert_allclose(filled[1:9, 0], x[1:9, 0])
    assert filled[0, 0] == x[1, 0] and filled[9, 0] == x[8, 0]  # held flat past the ends


def test_distance_to_known():
    known = np.array([1, 0, 0, 0, 1, 0], bool)
    np.testing.assert_array_equal(distance_to_known(known), [0, 1, 2, 1, 0, 1])


def test_hidden_spans_lie_inside_trusted_frames_with_seen_ends_and_repeat_with_the_seed():
    trusted = _occlude(800, [(100, 140), (500, 530)])
    cfg = ReadoutConfig(seed=3)
    hidden = hidden_spans(trusted, cfg)
    assert hidden.any() and not (hidden & ~trusted).any()
    edges = np.flatnonzero(np.diff(hidden.astype(int)))
    starts, ends = edges[::2] + 1, edges[1::2] + 1
    lengths = ends - starts
    assert len(starts) <= cfg.spans and lengths.min() >= cfg.span_frames[0] and lengths.max() <= cfg.span_frames[1]
    assert trusted[starts - 1].all() and trusted[ends].all() and not hidden[starts - 1].any() and not hidden[ends].any()
    np.testing.assert_array_equal(hidden, hidden_spans(trusted, cfg))
    assert not np.array_equal(hidden, hidden_spans(trusted, ReadoutConfig(seed=4)))


def test_ridge_readout_recovers_a_linear_speaker():
    f_a, offsets = _speaker()
    train = np.arange(len(offsets)) < 450
    est = ridge_readout(f_a, offsets, train, lam=1.0, components=3)
    assert _lip_err(est[~train], offsets[~train]) < 0.25 * _lip_err(offsets[~train] * 0 + offsets[train].mean(0),
                                                                    offsets[~train])


def test_with_ends_meets_the_seen_frames():
    f_a, offsets = _speaker()
    known = _occlude(len(offsets), [(200, 230)])
    est = np.zeros_like(offsets)
    out = with_ends(est, offsets, known, decay=4.0)
    np.testing.assert_allclose(out[known], offsets[known])
    # next to the span the estimate carries the seen error, in its middle almost none of it
    assert np.abs(out[200] - linear_fill(offsets, known)[200]).max() < 1e-12
    assert np.abs(out[215]).max() < 0.05 * np.abs(offsets[199]).max() + 1e-9


def test_adapt_fill_learns_the_speaker_and_keeps_trusted_frames():
    f_a, offsets = _speaker()
    trusted = _occlude(len(offsets), [(120, 150), (400, 436)])
    observed = np.where(trusted[:, None, None], offsets, 0.3)  # what a hand does to the tracker
    cfg = ReadoutConfig(lambdas=(1.0, 100.0))
    filled, record = adapt_fill(observed, trusted, f_a, None, cfg)
    np.testing.assert_array_equal(filled[trusted], observed[trusted])
    assert record.choice.startswith("ridge") and record.hidden_frames > 0
    occ = ~trusted
    line = linear_fill(observed, trusted)
    assert _lip_err(filled[occ], offsets[occ]) < 0.5 * _lip_err(line[occ], offsets[occ])
    again, record2 = adapt_fill(observed, trusted, f_a, None, cfg)
    np.testing.assert_array_equal(again, filled)
    assert record2.to_meta() == record.to_meta()


def test_adapt_fill_without_speech_or_with_too_few_frames():
    f_a, offsets = _speaker(t=300)
    trusted = _occlude(300, [(100, 130)])
    _, record = adapt_fill(offsets, trusted, None, None)
    assert not any(name.startswith("ridge") for name in record.scores)
    few = _occlude(300, [(20, 300)])
    network = lambda hidden: np.full_like(offsets, 0.01)  # noqa: E731
    filled, record = adapt_fill(offsets, few, f_a, network)
    assert record.choice == "interp" and record.hidden_frames == 0  # nothing to judge the networks by
    np.testing.assert_allclose(filled[~few], np.broadcast_to(offsets[19], filled[~few].shape))


def test_adapt_fill_asks_the_network_with_the_hidden_frames_removed():
    f_a, offsets = _speaker(t=400)
    trusted = _occlude(400, [(100, 130)])
    seen = []

    def network(hidden):
        seen.append(hidden.copy())
        return np.zeros_like(offsets)

    _, record = adapt_fill(offsets, trusted, f_a, network)
    assert "network" in record.scores
    assert seen[0].sum() == record.hidden_frames > 0
    if record.choice == "network":  # then once more, with nothing hidden
        assert len(seen) == 2 and not seen[1].any()


@pytest.mark.parametrize("t", [1, 20])
def test_adapt_fill_short_clips(t):
    offsets = np.zeros((t, M, 3))
    filled, record = adapt_fill(offsets, np.ones(t, bool), None, None)
    assert filled.shape == offsets.shape and record.choice == "interp"
