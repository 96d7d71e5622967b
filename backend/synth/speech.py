"""The clip's speech: the default text, and espeak-ng's wave and timing placed on the clip's
time line."""
from __future__ import annotations

import functools
import logging

import numpy as np
import scipy.signal

log = logging.getLogger(__name__)

AUDIO_RATE_HZ = 16_000
"""demo.wav is written at the method's audio rate."""
AUDIO_PEAK = 0.7
"""The speech is normalised to this peak (full scale 1)."""
LEAD_SILENCE_S = 0.5
"""Silence before the speech starts."""
MIN_TAIL_SILENCE_S = 0.3
"""At least this much silence after the speech."""

DEFAULT_SENTENCES = (
    "Hello there!",
    "My name is Ava, and I am reading a short story.",
    "We went to the beach, and the blue water was cool and calm.",
    "Please pass me that big orange box.",
    "Few people who wait will see the moon rise.",
    "Thank you, and have a wonderful day.",
    "Yes.",
)
"""The default text is the longest run of these sentences, in order, that fits the clip."""


@functools.lru_cache(maxsize=16)
def default_text(duration_s: float) -> str:
    """The longest run of DEFAULT_SENTENCES that fits in the clip at the default rate."""
    from avface.synth.tts import synthesise

    room = duration_s - LEAD_SILENCE_S - MIN_TAIL_SILENCE_S
    chosen: list[str] = []
    for sentence in DEFAULT_SENTENCES:
        trial = " ".join(chosen + [sentence])
        speech = synthesise(trial)
        if speech.phonemes and speech.phonemes[-1][2] <= room:
            chosen.append(sentence)  # a sentence that does not fit is skipped; a shorter one may
    return " ".join(chosen) if chosen else DEFAULT_SENTENCES[0]


def place_speech(speech, duration_s: float):
    """(wave at AUDIO_RATE_HZ of exactly the clip's length, phonemes and words on the clip's
    time line, offset s). Speech that runs past the clip is cut at the last word that fits."""
    from math import gcd

    offset = LEAD_SILENCE_S
    g = gcd(AUDIO_RATE_HZ, speech.sample_rate)
    wave = scipy.signal.resample_poly(speech.wave.astype(np.float64), AUDIO_RATE_HZ // g, speech.sample_rate // g)
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    if peak > 0:
        wave *= AUDIO_PEAK / peak
    n = int(round(duration_s * AUDIO_RATE_HZ))
    out = np.zeros(n, np.float32)
    a = int(round(offset * AUDIO_RATE_HZ))
    limit = duration_s - MIN_TAIL_SILENCE_S * 0.5
    words = [(w, s + offset, e + offset) for w, s, e in speech.words]
    phonemes = [(p, s + offset, e + offset) for p, s, e in speech.phonemes]
    if phonemes and phonemes[-1][2] > limit:
        keep_until = max([e for _, _, e in words if e <= limit] or [offset])
        log.warning("the speech (%.2f s) does not fit the %.2f s clip; cut after %.2f s", phonemes[-1][2], duration_s,
                    keep_until)
        phonemes = [p for p in phonemes if p[2] <= keep_until + 1e-6]
        words = [w for w in words if w[2] <= keep_until + 1e-6]
        cut = int(round((keep_until - offset + 0.03) * AUDIO_RATE_HZ))
        fade = np.ones(cut)
        m = min(cut, int(0.03 * AUDIO_RATE_HZ))
        fade[cut - m:] = np.linspace(1, 0, m)
        wave = wave[:cut] * fade
    m = max(0, min(len(wave), n - a))
    out[a:a + m] = wave[:m]
    return out, phonemes, words, offset
