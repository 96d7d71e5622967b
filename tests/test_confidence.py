"""Visual confidence from the lower face's appearance: an occluder of skin-like colour stands
out against the clip's own frames even when its absolute anomaly is moderate."""
from __future__ import annotations

import numpy as np

from avface.confidence import RELATIVE_MIN_FRAMES, relative_anomaly_confidence


def _series(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return 0.5 + 0.05 * rng.standard_normal(n), np.ones(n, bool)


def test_a_moderate_but_clip_unusual_anomaly_is_flagged():
    a, det = _series()
    a[80:100] = 1.6  # a skin-coloured hand: under the absolute onset (2.0), far outside the clip
    conf = relative_anomaly_confidence(a, det)
    assert (conf[80:100] < 0.5).all()
    assert (conf[:80] == 1).all() and (conf[100:] == 1).all()


def test_steady_clips_and_short_clips_are_left_alone():
    a, det = _series()
    a[50:55] = 0.9  # many MADs in a very steady clip, but below the minimum anomaly
    assert (relative_anomaly_confidence(a, det) == 1).all()
    short, det_short = _series(RELATIVE_MIN_FRAMES - 1)
    short[10:20] = 1.6  # too few frames for the clip to be its own reference
    assert (relative_anomaly_confidence(short, det_short) == 1).all()
    # undetected frames neither count nor get flagged here (detection has its own evidence)
    a2, det2 = _series()
    det2[:100] = False
    a2[:100] = 0.0
    a2[150:160] = 1.6
    conf = relative_anomaly_confidence(a2, det2)
    assert (conf[:100] == 1).all() and (conf[150:160] < 0.5).all()
