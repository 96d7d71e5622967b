"""ARKit curves: the 52 names as ARKit spells them, mapped from MediaPipe's scores, gaps
filled, flicker filtered, blinks kept."""
from __future__ import annotations

import numpy as np

from avface.core.timeseries import fill_missing
from avface.stages.assemble.arkit import ARKIT_NAMES, arkit_curves
from avface.stages.tracking import _BLENDSHAPE_NAMES as MEDIAPIPE_NAMES


def test_names_are_arkits_52():
    assert len(ARKIT_NAMES) == len(set(ARKIT_NAMES)) == 52
    # every MediaPipe category but "_neutral" is an ARKit name; tongueOut is ARKit's only extra
    assert set(MEDIAPIPE_NAMES) - {"_neutral"} == set(ARKIT_NAMES) - {"tongueOut"}
    for name in ("jawOpen", "mouthFunnel", "eyeBlinkLeft", "browInnerUp", "cheekPuff", "tongueOut"):
        assert name in ARKIT_NAMES


def test_curves_map_fill_and_filter():
    fps, t = 30.0, 120
    rng = np.random.default_rng(0)
    scores = np.zeros((t, len(MEDIAPIPE_NAMES)))
    jaw = MEDIAPIPE_NAMES.index("jawOpen")
    blink = MEDIAPIPE_NAMES.index("eyeBlinkLeft")
    slow = 0.5 + 0.3 * np.sin(2 * np.pi * 1.0 * np.arange(t) / fps)  # 1 Hz mouth motion
    scores[:, jaw] = slow + rng.normal(0, 0.05, t)  # plus frame-to-frame flicker
    scores[60:65, blink] = 1.0  # a 167 ms blink
    valid = np.ones(t, bool)
    valid[30:35] = False
    scores[30:35] = np.nan  # no face there
    out = arkit_curves(scores, MEDIAPIPE_NAMES, valid, fps)
    assert out.shape == (t, 52) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    a_jaw, a_blink = ARKIT_NAMES.index("jawOpen"), ARKIT_NAMES.index("eyeBlinkLeft")
    ok = valid.copy()
    ok[25:40] = False
    # flicker reduced: white noise keeps only the band under 8 Hz of the 15 Hz Nyquist band,
    # sqrt(8/15) = 0.73 of its size
    raw_err = np.abs(scores[ok, jaw] - slow[ok]).mean()
    assert np.abs(out[ok, a_jaw] - slow[ok]).mean() < 0.8 * raw_err
    # the gap is bridged by the motion around it
    assert np.abs(out[30:35, a_jaw] - slow[30:35]).max() < 0.1
    # the blink survives the filter
    assert out[60:65, a_blink].max() > 0.7 and out[:50, a_blink].max() < 0.1
    assert (out[:, ARKIT_NAMES.index("tongueOut")] == 0).all()


def test_fill_missing_edges_and_all_invalid():
    x = np.array([[np.nan], [1.0], [np.nan], [3.0], [np.nan]])
    filled = fill_missing(x, np.array([False, True, False, True, False]))
    assert filled[:, 0].tolist() == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert (fill_missing(x, np.zeros(5, bool)) == 0).all()
