"""Audio front end: speech features per video frame.

The paper (AVFace, section 3) feeds the coarse stage a 16 x D block of DeepSpeech features
per video frame: 16 windows of 20 ms around the frame. DeepSpeech cannot be installed from
a registry, so this module builds the same kind of block from two sources:

- **phones**: pocketsphinx's en-US acoustic model decodes the audio into phones (allphone
  search with its phone language model), or force-aligns a transcript when one is given.
  Each 20 ms window then holds the fraction of it that each phone occupies, (16, P).
- **log-mel**: an 80-band log-mel spectrogram (numpy/scipy only) sampled at the same
  16 window centres, (16, 80).

plus a per-frame ``speech_activity`` in [0, 1] that later stages use to send the lip
offsets to zero when nobody speaks.

Time conventions (used everywhere below):

- video frame ``t`` is shown at ``t / fps`` seconds; its span is ``t / fps +- 0.5 / fps``;
- window ``k`` (0..15) of frame ``t`` is centred at ``t / fps + (k - 7.5) * step_s`` and is
  ``step_s`` wide, so the 16 windows tile the 320 ms around the frame (8 before, 8 after);
- log-mel frame ``i`` is centred at ``i * hop_s``;
- a pocketsphinx frame is 10 ms; a segment of frames ``[s, e]`` spans ``[s, e + 1] * 10 ms``.

Phone inventory (``PHONES``): ``SIL``, ``NOISE`` and the 39 CMU/ARPAbet phones, without
stress marks. pocketsphinx's silence symbols (``SIL``, ``<sil>``, ``<s>``, ``</s>``) map to
``SIL``. Its fillers (``+NSN+`` noise, ``+SPN+`` unintelligible speech-like noise, and the
``+BREATH+``, ``+COUGH+``, ``+LAUGH+``, ``+UM+``... of other models) map to ``NOISE``: they
are sound, so the network should see them apart from silence, but they are not phones that
shape the lips, so they do not count towards speech activity.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.signal

from avface.errors import InputError, ModelFileError

logger = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 16_000
N_MELS = 80
WINDOW_FRAMES = 16
WINDOW_STEP_S = 0.02

MEL_WIN_S = 0.025
MEL_HOP_S = 0.010
MEL_FMIN_HZ = 20.0
#: Power floor before the log, so digital silence gives a finite value (ln 1e-10 = -23.0).
LOG_MEL_FLOOR = 1e-10

#: pocketsphinx's frame rate (its default ``-frate``): one frame every 10 ms.
DECODER_FRAME_RATE_HZ = 100
#: Longer recordings are decoded in utterances of at most this length, cut at quiet points,
#: so that progress can be reported and memory stays bounded.
MAX_UTTERANCE_S = 30.0
#: Where to look for the quietest 10 ms frame to cut an utterance: this many seconds
#: before ``MAX_UTTERANCE_S``.
CUT_SEARCH_S = 5.0
#: Language-model weight of the allphone search. pocketsphinx's default (6.5, tuned for
#: words) lets the phone LM override the acoustics; on GRID and espeak-ng sentences 1.0
#: matched the forced alignment's phones on 49% of speech frames against 33% for 6.5.
ALLPHONE_LM_WEIGHT = 1.0
#: Peak level (linear, full scale 1.0) below which a clip counts as silence (-80 dBFS).
SILENT_PEAK = 1e-4
#: The decoder hears the clip normalised to this peak, as 16-bit PCM.
DECODER_PEAK = 0.9

#: Absolute level below which audio is never speech, dBFS (RMS over 10 ms).
ACTIVITY_ABS_FLOOR_DB = -60.0
#: The energy gate opens between these margins above the clip's noise floor, dB.
ACTIVITY_GATE_DB = (3.0, 9.0)
#: Percentile of the clip's (non-digital-silence) 10 ms energies taken as its noise floor.
ACTIVITY_NOISE_PERCENTILE = 5.0
#: The gate holds open this long around loud audio, so stop closures inside words
#: (up to about 100 ms of low energy) stay speech, s.
ACTIVITY_HOLD_S = 0.05

SIL = "SIL"
NOISE = "NOISE"
#: The 39 phones of the CMU pronouncing dictionary (ARPAbet, no stress), as pocketsphinx's
#: en-US model names them.
CMU_PHONES: tuple[str, ...] = (
    "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G",
    "HH", "IH", "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T",
    "TH", "UH", "UW", "V", "W", "Y", "Z", "ZH",
)
#: The phone inventory P of ``phone_block``: index 0 is silence, 1 non-speech sound.
PHONES: tuple[str, ...] = (SIL, NOISE) + CMU_PHONES
PHONE_INDEX: dict[str, int] = {p: i for i, p in enumerate(PHONES)}
_SILENCE_SYMBOLS = frozenset({"SIL", "<sil>", "<s>", "</s>", "sil", "sp"})
#: Phones that count as speech for ``speech_activity``.
_NON_SPEECH = frozenset({SIL, NOISE})

# pocketsphinx model files inside its wheel.
_ACOUSTIC_MODEL = "en-us/en-us"
_PHONE_LM = "en-us/en-us-phone.lm.bin"
_DICTIONARY = "en-us/cmudict-en-us.dict"


@dataclass(frozen=True)
class PhoneSegment:
    """One phone over a time span of the clip."""

    phone: str
    """A name from ``PHONES``."""
    start_s: float
    end_s: float
    score: float = 1.0
    """Confidence in [0, 1]: pocketsphinx's posterior for the segment. Its allphone and
    alignment searches build no lattice, so they report 1.0 (no confidence available);
    segments this module inserts (silence padding) carry 1.0 too."""
    word: str = ""
    """The transcript word this phone belongs to (forced alignment only, else empty)."""
    word_index: int = -1
    """Position of that word in ``transcript_words(text)``; -1 for silence, noise and
    recognised (not aligned) phones."""

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True, eq=False)
class AudioFeatures:
    """Speech features for the T frames of a video."""

    mel: np.ndarray
    """(T, 16, 80) float32 log-mel (natural log of power) at the 16 window centres."""
    phones: np.ndarray
    """(T, 16, P) float32 phone occupancy of each 20 ms window; rows sum to 1."""
    activity: np.ndarray
    """(T,) float32 speech activity in [0, 1]."""
    segments: list[PhoneSegment]
    """The phone segmentation the blocks were built from, covering the (padded) clip."""
    phone_names: tuple[str, ...] = field(default=PHONES)
    """Names of the P columns of ``phones``."""
    aligned: bool = False
    """True when a transcript was force-aligned, False when phones were recognised."""


class AlignmentFailedError(InputError):
    """The transcript could not be aligned to the audio (silence, or the wrong text).
    Same wire code as :class:`InputError`."""


# --------------------------------------------------------------------------- helpers


def _as_wave(wave, sample_rate: int) -> np.ndarray:
    """Check a mono waveform and bring it to 16 kHz float32, (N,)."""
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    w = np.asarray(wave)
    if w.ndim != 1:
        raise ValueError(f"expected a mono (N,) waveform, got shape {tuple(w.shape)}")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"expected a float waveform in [-1, 1], got dtype {w.dtype}")
    w = w.astype(np.float32, copy=False)
    if not np.all(np.isfinite(w)):
        raise ValueError("waveform contains NaN or infinite samples")
    if sample_rate != SAMPLE_RATE_HZ:
        g = np.gcd(int(sample_rate), SAMPLE_RATE_HZ)
        w = scipy.signal.resample_poly(w, SAMPLE_RATE_HZ // g, int(sample_rate) // g).astype(np.float32)
    return w


def _check_frames(n_frames: int, fps: float) -> None:
    if not isinstance(n_frames, (int, np.integer)) or n_frames < 0:
        raise ValueError(f"n_frames must be a non-negative integer, got {n_frames!r}")
    if not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")


def _window_centres(n_frames: int, fps: float, window: int, step_s: float) -> np.ndarray:
    """(T, window) centre times, s: frame t's window k is centred at
    t / fps + (k - (window - 1) / 2) * step_s."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not step_s > 0:
        raise ValueError(f"step_s must be positive, got {step_s}")
    t = np.arange(n_frames, dtype=np.float64)[:, None] / float(fps)
    k = np.arange(window, dtype=np.float64)[None, :] - (window - 1) / 2.0
    return t + k * step_s


def canonical_phone(name: str) -> str:
    """Map a decoder or dictionary phone name to ``PHONES``: stress digits are dropped,
    silence symbols become ``SIL`` and fillers (``+NSN+``, ``+SPN+``, ``+BREATH+``...)
    become ``NOISE``. Raises ValueError for anything else."""
    if name in _SILENCE_SYMBOLS:
        return SIL
    if name == NOISE or (len(name) > 2 and name.startswith("+") and name.endswith("+")):
        return NOISE
    base = name.rstrip("012").upper()
    if base in PHONE_INDEX:
        return base
    raise ValueError(f"unknown phone {name!r}; expected one of {', '.join(PHONES)} or a filler like +NSN+")


def _timeline(segments: Iterable[PhoneSegment], lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Segments as a gapless labelling of [lo, hi]: boundaries (M + 1,) increasing, labels
    (M,) indices into PHONES. Gaps and everything outside the segments are SIL."""
    segs = sorted((s for s in segments if s.end_s > s.start_s), key=lambda s: s.start_s)
    bounds: list[float] = [lo]
    labels: list[int] = []
    for s in segs:
        label = PHONE_INDEX[canonical_phone(s.phone)]
        start, end = float(s.start_s), float(s.end_s)
        if start < bounds[-1] - 1e-6 and labels:
            raise ValueError(f"phone segments overlap: {s} starts before {bounds[-1]:.4f} s")
        start = max(start, bounds[-1])
        if start > bounds[-1]:
            labels.append(PHONE_INDEX[SIL])
            bounds.append(start)
        if end > start:
            labels.append(label)
            bounds.append(end)
    if hi > bounds[-1]:
        labels.append(PHONE_INDEX[SIL])
        bounds.append(hi)
    return np.asarray(bounds, dtype=np.float64), np.asarray(labels, dtype=np.int64)


def _occupancy(segments: Sequence[PhoneSegment], starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """(Q, P) seconds that each phone occupies in each interval [starts[q], ends[q]]."""
    lo = float(min(starts.min(initial=0.0), 0.0)) - 1.0
    hi = float(ends.max(initial=0.0)) + 1.0
    if segments:
        hi = max(hi, max(s.end_s for s in segments) + 1.0)
        lo = min(lo, min(s.start_s for s in segments) - 1.0)
    bounds, labels = _timeline(segments, lo, hi)
    n_phones = len(PHONES)
    # cum[j, p]: seconds of phone p before boundary j
    durations = np.diff(bounds)
    onehot = np.zeros((len(labels), n_phones))
    onehot[np.arange(len(labels)), labels] = 1.0
    cum = np.vstack([np.zeros((1, n_phones)), np.cumsum(onehot * durations[:, None], axis=0)])

    def cumulative(x: np.ndarray) -> np.ndarray:
        # C[q, p] = seconds of phone p before time x[q]
        j = np.clip(np.searchsorted(bounds, x, side="right") - 1, 0, len(labels) - 1)
        c = cum[j].copy()
        c[np.arange(len(x)), labels[j]] += x - bounds[j]
        return c

    return cumulative(ends) - cumulative(starts)


def _tidy(raw: list[PhoneSegment], duration_s: float) -> list[PhoneSegment]:
    """Contiguous segments covering [0, duration_s]: clamp, fill gaps with SIL, stretch
    the first and last segment to the clip's ends."""
    if duration_s <= 0:
        return []
    out: list[PhoneSegment] = []
    t = 0.0
    for s in sorted(raw, key=lambda s: s.start_s):
        start, end = max(s.start_s, t), min(s.end_s, duration_s)
        if end <= start:
            continue
        if start > t + 1e-9:
            if out and out[-1].phone == SIL:
                out[-1] = PhoneSegment(SIL, out[-1].start_s, start)
            else:
                out.append(PhoneSegment(SIL, t, start))
        out.append(PhoneSegment(s.phone, start, end, s.score, s.word, s.word_index))
        t = end
    if not out:
        return [PhoneSegment(SIL, 0.0, duration_s)]
    first, last = out[0], out[-1]
    out[0] = PhoneSegment(first.phone, 0.0, first.end_s, first.score, first.word, first.word_index)
    last = out[-1]
    out[-1] = PhoneSegment(last.phone, last.start_s, duration_s, last.score, last.word, last.word_index)
    return out


# --------------------------------------------------------------------------- log-mel


def _hz_to_mel(f):
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_frequencies_hz(n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """(n_mels,) centre frequency of each band of ``log_mel``, Hz (HTK mel scale from
    MEL_FMIN_HZ to the Nyquist frequency)."""
    edges = np.linspace(_hz_to_mel(MEL_FMIN_HZ), _hz_to_mel(sample_rate / 2.0), n_mels + 2)
    return _mel_to_hz(edges[1:-1])


def _mel_filterbank(n_mels: int, n_fft: int, sample_rate: int) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters, peak 1 (HTK style)."""
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(MEL_FMIN_HZ), _hz_to_mel(sample_rate / 2.0), n_mels + 2))
    bins_hz = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    lower = (bins_hz[None, :] - edges_hz[:-2, None]) / np.diff(edges_hz)[:-1, None]
    upper = (edges_hz[2:, None] - bins_hz[None, :]) / np.diff(edges_hz)[1:, None]
    return np.maximum(0.0, np.minimum(lower, upper))


def log_mel(wave, sample_rate: int = SAMPLE_RATE_HZ, *, n_mels: int = N_MELS,
            win_s: float = MEL_WIN_S, hop_s: float = MEL_HOP_S) -> np.ndarray:
    """Log-mel spectrogram, (N, n_mels) float32, N = 1 + n_samples // hop (at 16 kHz).

    Frame ``i`` is centred at ``i * hop_s`` (the wave is zero-padded by half a window at
    both ends). Periodic Hann window of ``win_s``, FFT size the next power of two, power
    spectrum, HTK mel filters from 20 Hz to 8 kHz, natural log with a floor of 1e-10.
    Input at another rate is resampled to 16 kHz first, so that the bands always mean
    the same frequencies.
    """
    w = _as_wave(wave, sample_rate)
    sr = SAMPLE_RATE_HZ
    win = int(round(win_s * sr))
    hop = int(round(hop_s * sr))
    if win < 2 or hop < 1:
        raise ValueError(f"window {win_s} s and hop {hop_s} s are too short at {sr} Hz")
    n_fft = 1 << (win - 1).bit_length()
    n_out = 1 + len(w) // hop
    padded = np.zeros((n_out - 1) * hop + win, dtype=np.float32)
    # sample j of the wave sits at padded[j + win // 2], so frame i is centred at i * hop
    n_copy = min(len(w), len(padded) - win // 2)
    padded[win // 2:win // 2 + n_copy] = w[:n_copy]
    frames = np.lib.stride_tricks.sliding_window_view(padded, win)[::hop]  # (N, win), a view
    taper = scipy.signal.get_window("hann", win, fftbins=True).astype(np.float32)
    fbank = _mel_filterbank(n_mels, n_fft, sr).astype(np.float32).T  # (F, n_mels)
    out = np.empty((n_out, n_mels), dtype=np.float32)
    chunk = 4096  # frames per FFT batch: bounds memory on long recordings
    for a in range(0, n_out, chunk):
        spec = scipy.fft.rfft(frames[a:a + chunk] * taper, n=n_fft, axis=1)  # (n, F) complex64
        power = spec.real ** 2 + spec.imag ** 2
        out[a:a + chunk] = np.log(np.maximum(power @ fbank, LOG_MEL_FLOOR))
    return out


def mel_block(mel: np.ndarray, n_frames: int, fps: float, *, window: int = WINDOW_FRAMES,
              step_s: float = WINDOW_STEP_S, hop_s: float = MEL_HOP_S) -> np.ndarray:
    """(T, window, n_mels) float32: the log-mel (N, n_mels) linearly interpolated at the
    window centres of each video frame (see the module docstring). Centres before the
    first or after the last mel frame take the edge frame's value."""
    _check_frames(n_frames, fps)
    mel = np.asarray(mel, dtype=np.float32)
    if mel.ndim != 2 or mel.shape[0] == 0:
        raise ValueError(f"expected an (N, n_mels) log-mel with N >= 1, got shape {tuple(mel.shape)}")
    centres = _window_centres(n_frames, fps, window, step_s)  # (T, W)
    pos = np.clip(centres / hop_s, 0.0, mel.shape[0] - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, mel.shape[0] - 1)
    frac = (pos - i0).astype(np.float32)[..., None]
    # block[t, k, m] = (1 - a) * mel[i0[t, k], m] + a * mel[i1[t, k], m]
    return ((1.0 - frac) * mel[i0] + frac * mel[i1]).astype(np.float32)


# --------------------------------------------------------------------------- phones


def phone_block(segments: Sequence[PhoneSegment], n_frames: int, fps: float, *,
                window: int = WINDOW_FRAMES, step_s: float = WINDOW_STEP_S) -> np.ndarray:
    """(T, window, P) float32 phone occupancy: entry [t, k, p] is the fraction of window k
    of frame t (``step_s`` wide, centred at ``t / fps + (k - 7.5) * step_s``) covered by
    phone ``PHONES[p]``. Rows sum to 1; time not covered by any segment, including
    everything outside the clip, counts as SIL."""
    _check_frames(n_frames, fps)
    segments = list(segments)
    centres = _window_centres(n_frames, fps, window, step_s).ravel()  # (T*W,)
    out = np.empty((n_frames * window, len(PHONES)), dtype=np.float32)
    batch = 32_768  # windows at a time: bounds the float64 temporaries on long videos
    for a in range(0, len(centres), batch):
        c = centres[a:a + batch]
        occ = np.clip(_occupancy(segments, c - step_s / 2.0, c + step_s / 2.0), 0.0, None)  # (n, P) seconds
        out[a:a + batch] = occ / np.maximum(occ.sum(axis=1, keepdims=True), 1e-12)
    return out.reshape(n_frames, window, len(PHONES))


def _model_file(subpath: str) -> str:
    """Path of a file in pocketsphinx's bundled model folder; ModelFileError when absent."""
    try:
        import pocketsphinx
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ModelFileError("pocketsphinx is not installed; install it with `pip install 'pocketsphinx>=5'`") from e
    path = Path(pocketsphinx.get_model_path(subpath))
    if not path.exists():
        raise ModelFileError(
            f"pocketsphinx model file {path} is missing; it ships in the pocketsphinx wheel "
            "(reinstall it with `pip install --force-reinstall 'pocketsphinx>=5'`)")
    return str(path)


def _decoder(**kwargs):
    import pocketsphinx

    return pocketsphinx.Decoder(hmm=_model_file(_ACOUSTIC_MODEL), samprate=SAMPLE_RATE_HZ,
                                loglevel="FATAL", **kwargs)


def _to_pcm16(w: np.ndarray) -> np.ndarray:
    """The decoder's input, (N,) little-endian int16: peak-normalised PCM with +-1 LSB triangular dither.

    pocketsphinx normalises cepstra per utterance, so the gain does not matter to it, but
    runs of digital zeros do (log energy of nothing): the dither keeps them finite, and is
    seeded so that results repeat."""
    peak = float(np.abs(w).max()) if len(w) else 0.0
    x = w * (DECODER_PEAK / peak) * 32767.0 if peak > 0 else np.zeros_like(w)
    rng = np.random.default_rng(0)
    x = x + rng.random(len(w), dtype=np.float32) - rng.random(len(w), dtype=np.float32)
    return np.clip(np.round(x), -32768, 32767).astype("<i2")


def _utterances(w: np.ndarray) -> list[tuple[int, int]]:
    """Split a long wave into (start, end) sample ranges of at most MAX_UTTERANCE_S, each
    cut at the quietest 10 ms within CUT_SEARCH_S before the limit."""
    max_n = int(MAX_UTTERANCE_S * SAMPLE_RATE_HZ)
    hop = SAMPLE_RATE_HZ // DECODER_FRAME_RATE_HZ
    out, a = [], 0
    while len(w) - a > max_n:
        lo = a + max_n - int(CUT_SEARCH_S * SAMPLE_RATE_HZ)
        n_hops = (a + max_n - lo) // hop
        energy = (w[lo:lo + n_hops * hop].reshape(n_hops, hop) ** 2).sum(axis=1)
        cut = lo + int(np.argmin(energy)) * hop + hop // 2
        out.append((a, cut))
        a = cut
    out.append((a, len(w)))
    return out


def _segment_score(prob: float) -> float:
    return float(min(max(prob, 0.0), 1.0))


def recognise_phones(wave, sample_rate: int = SAMPLE_RATE_HZ, *,
                     progress: Callable[[float], None] | None = None) -> list[PhoneSegment]:
    """Phone recognition: pocketsphinx allphone search with the en-US phone language model.

    ``wave`` is (N,) float mono at ``sample_rate`` (resampled to 16 kHz when different).
    Returns contiguous segments covering [0, N / sample_rate] (an empty list for an empty
    wave); a silent clip (peak below -80 dBFS) is one SIL segment. Recordings longer than
    MAX_UTTERANCE_S are decoded in pieces cut at quiet points; ``progress`` gets the
    fraction done after each piece.
    """
    w = _as_wave(wave, sample_rate)
    duration_s = len(w) / SAMPLE_RATE_HZ
    if len(w) == 0:
        return []
    if float(np.abs(w).max()) < SILENT_PEAK:
        logger.info("audio is silent (peak below %.0f dBFS): no phones", 20 * np.log10(SILENT_PEAK))
        if progress:
            progress(1.0)
        return [PhoneSegment(SIL, 0.0, duration_s)]
    t0 = time.perf_counter()
    decoder = _decoder(allphone=_model_file(_PHONE_LM), lw=ALLPHONE_LM_WEIGHT)
    raw: list[PhoneSegment] = []
    pieces = _utterances(w)
    for i, (a, b) in enumerate(pieces):
        decoder.start_utt()
        decoder.process_raw(_to_pcm16(w[a:b]).tobytes(), full_utt=True)
        decoder.end_utt()
        offset = a / SAMPLE_RATE_HZ
        for seg in decoder.seg():
            raw.append(PhoneSegment(
                canonical_phone(seg.word),
                offset + seg.start_frame / DECODER_FRAME_RATE_HZ,
                offset + (seg.end_frame + 1) / DECODER_FRAME_RATE_HZ,
                _segment_score(seg.prob)))
        if progress:
            progress((i + 1) / len(pieces))
    elapsed = time.perf_counter() - t0
    logger.info("recognised %d phone segments in %.1f s of audio in %.2f s (%.3f x real time)",
                len(raw), duration_s, elapsed, elapsed / max(duration_s, 1e-9))
    return _tidy(raw, duration_s)


# --------------------------------------------------------------------------- transcripts

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _number_words(n: int) -> list[str]:
    """English words for 0 <= n < 10**9 ("105" -> one hundred five)."""
    if n < 20:
        return [_ONES[n]]
    if n < 100:
        return [_TENS[n // 10]] + ([_ONES[n % 10]] if n % 10 else [])
    for size, name in ((10**6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            return _number_words(n // size) + [name] + (_number_words(n % size) if n % size else [])
    raise AssertionError("unreachable")


def transcript_words(text: str) -> list[str]:
    """Normalise a transcript into dictionary words: lower case, punctuation dropped
    (apostrophes inside words kept), digits spelled out ("2" -> two, "25" -> twenty
    five; longer digit strings digit by digit), mixed tokens split ("3d" -> three d).
    Single letters stay as they are: the dictionary spells them ("p" -> P IY)."""
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    words: list[str] = []
    for token in re.findall(r"[a-z0-9']+", text):
        token = token.strip("'")
        for part in re.findall(r"[0-9]+|[a-z']+", token):
            if part.isdigit():
                if len(part) <= 9 and not (len(part) > 1 and part.startswith("0")):
                    words.extend(_number_words(int(part)))
                else:
                    words.extend(_ONES[int(c)] for c in part)
            elif part.strip("'"):
                words.append(part.strip("'"))
    return words


def _align_words(decoder, pcm: bytes, words: list[str]) -> list[tuple[int, int, int]]:
    """Word-level forced alignment (pass 1): (word index or -1 for silence and fillers,
    start frame, end frame exclusive) in order. Raises RuntimeError when it fails."""
    decoder.set_align_text(" ".join(words))
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)
    decoder.end_utt()
    if decoder.hyp() is None:
        raise RuntimeError("no word alignment")
    out, index = [], 0
    for seg in decoder.seg():
        base = re.sub(r"\(\d+\)$", "", seg.word)  # "white(2)": an alternative pronunciation
        if index < len(words) and base == words[index]:
            out.append((index, seg.start_frame, seg.end_frame + 1))
            index += 1
        else:
            out.append((-1, seg.start_frame, seg.end_frame + 1))
    if index != len(words):
        raise RuntimeError(f"aligned {index} of {len(words)} words")
    return out


def _align_phones(decoder, pcm: bytes, words: list[str], first_index: int, offset_s: float) -> list[PhoneSegment]:
    """Both passes on one utterance: word alignment, then the phone/state pass. Raises
    RuntimeError when either fails."""
    _align_words(decoder, pcm, words)
    decoder.set_alignment()
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)
    decoder.end_utt()
    alignment = decoder.get_alignment()
    if alignment is None:
        raise RuntimeError("no phone alignment")
    out: list[PhoneSegment] = []
    index = 0
    for entry in alignment:
        base = re.sub(r"\(\d+\)$", "", entry.name)
        is_word = index < len(words) and base == words[index]
        for ph in entry:
            start = offset_s + ph.start / DECODER_FRAME_RATE_HZ
            end = offset_s + (ph.start + ph.duration) / DECODER_FRAME_RATE_HZ
            if is_word:
                out.append(PhoneSegment(canonical_phone(ph.name), start, end, 1.0, words[index], first_index + index))
            else:
                out.append(PhoneSegment(canonical_phone(ph.name), start, end, 1.0))
        if is_word:
            index += 1
    if index != len(words):
        raise RuntimeError(f"phone pass aligned {index} of {len(words)} words")
    return out


def _alignment_pieces(spans: list[tuple[int, int, int]], n_total: int) -> list[tuple[int, int, int, int]]:
    """Cut a word alignment into pieces of about MAX_UTTERANCE_S: (start frame, end frame,
    first word, end word exclusive).

    Cuts go only in the middle of pauses, so that every piece starts and ends in silence
    (a cut between two words loses the few frames of context that the cepstral deltas
    need, and a short word at the edge then fails to align): the longest pause within
    CUT_SEARCH_S before the limit, else the latest pause before it, else the first pause
    after it (a piece of pause-less speech is allowed to run long)."""
    max_f = int(MAX_UTTERANCE_S * DECODER_FRAME_RATE_HZ)
    search_f = int(CUT_SEARCH_S * DECODER_FRAME_RATE_HZ)
    # candidate cuts: (frame, pause length in frames, words before the cut)
    cuts: list[tuple[int, int, int]] = []
    n_words = 0
    for index, start, end in spans:
        if index >= 0:
            n_words += 1
        elif n_words > 0 and end > start:
            cuts.append(((start + end) // 2, end - start, n_words))
    pieces, start, first = [], 0, 0
    while n_total - start > max_f:
        ahead = [c for c in cuts if c[0] > start and c[2] > first]
        if not ahead:
            break
        within = [c for c in ahead if c[0] <= start + max_f]
        near = [c for c in within if c[0] > start + max_f - search_f]
        if near:
            frame, _, words_before = max(near, key=lambda c: (c[1], c[0]))
        else:
            frame, _, words_before = within[-1] if within else ahead[0]
        pieces.append((start, frame, first, words_before))
        start, first = frame, words_before
    pieces.append((start, n_total, first, n_words))
    return pieces


def align_transcript(wave, sample_rate: int, text: str, *,
                     progress: Callable[[float], None] | None = None) -> list[PhoneSegment]:
    """Forced alignment of a transcript to the audio: pocketsphinx word alignment, then a
    second pass for phones. Returns contiguous segments covering the clip: the
    transcript's phones in order (with ``word``/``word_index`` set), SIL and NOISE where
    the decoder put optional silences and fillers.

    The phone pass keeps a back-pointer per frame and state, so its memory grows with the
    square of the length (about 1 GB for 3 minutes in one piece). Clips longer than
    MAX_UTTERANCE_S are therefore aligned word by word first, cut at pauses into pieces of
    about MAX_UTTERANCE_S, and each piece is aligned on its own; ``progress`` gets the
    fraction done after each piece.

    Raises InputError naming the words missing from the pronunciation dictionary, or when
    the text has no words; AlignmentFailedError when the audio cannot carry the text
    (silence, or the wrong transcript).
    """
    w = _as_wave(wave, sample_rate)
    words = transcript_words(text)
    if not words:
        raise InputError(f"the transcript {text!r} contains no words to align")
    duration_s = len(w) / SAMPLE_RATE_HZ
    t0 = time.perf_counter()
    decoder = _decoder(dict=_model_file(_DICTIONARY), lm=None)
    missing = sorted({x for x in words if decoder.lookup_word(x) is None})
    if missing:
        raise InputError(
            "these transcript words are not in the pronunciation dictionary (CMUdict): "
            + ", ".join(repr(x) for x in missing)
            + "; spell them as ordinary English words, or leave the transcript out")
    if len(w) < SAMPLE_RATE_HZ // 10 or float(np.abs(w).max()) < SILENT_PEAK:
        raise AlignmentFailedError(f"cannot align a transcript to {duration_s:.2f} s of silent or empty audio")
    pcm = _to_pcm16(w)
    hop = SAMPLE_RATE_HZ // DECODER_FRAME_RATE_HZ
    n_total = len(w) // hop
    raw: list[PhoneSegment] = []
    try:
        if duration_s <= MAX_UTTERANCE_S:
            pieces = [(0, n_total, 0, len(words))]
        else:
            pieces = _alignment_pieces(_align_words(decoder, pcm.tobytes(), words), n_total)
            logger.info("aligning %.1f s of audio in %d pieces", duration_s, len(pieces))
        for i, (f0, f1, a, b) in enumerate(pieces):
            offset_s = f0 / DECODER_FRAME_RATE_HZ
            if b > a:
                chunk = pcm[f0 * hop:len(w) if i == len(pieces) - 1 else f1 * hop]
                raw += _align_phones(decoder, chunk.tobytes(), words[a:b], a, offset_s)
            else:
                raw.append(PhoneSegment(SIL, offset_s, f1 / DECODER_FRAME_RATE_HZ))
            if progress:
                progress((i + 1) / len(pieces))
    except RuntimeError as e:
        raise AlignmentFailedError(
            f"could not align the transcript ({len(words)} words) to the audio; is it the right text?") from e
    elapsed = time.perf_counter() - t0
    logger.info("aligned %d words (%d phones) to %.1f s of audio in %.2f s (%.3f x real time)",
                len(words), len(raw), duration_s, elapsed, elapsed / max(duration_s, 1e-9))
    return _tidy(raw, duration_s)


# --------------------------------------------------------------------------- activity


def speech_activity(segments: Sequence[PhoneSegment], wave, sample_rate: int, n_frames: int,
                    fps: float) -> np.ndarray:
    """(T,) float32 in [0, 1]: for each video frame, the fraction of its span
    (``t / fps +- 0.5 / fps``) covered by speech phones (not SIL or NOISE) where the audio
    also has energy, then smoothed with a [1/4, 1/2, 1/4] kernel over frames.

    The energy gate is per 10 ms: 0 below -60 dBFS (fully open from -50) or within 3 dB of the clip's noise floor
    (5th percentile of its levels), 1 from 9 dB above it, held open for 50 ms around loud
    audio so that closures inside words still count. So a decoder that hears phones in
    quiet noise does not make the face talk.
    """
    _check_frames(n_frames, fps)
    w = _as_wave(wave, sample_rate)
    if n_frames == 0:
        return np.zeros(0, dtype=np.float32)
    hop = SAMPLE_RATE_HZ // DECODER_FRAME_RATE_HZ
    bin_s = hop / SAMPLE_RATE_HZ
    end_s = max(len(w) / SAMPLE_RATE_HZ, (n_frames + 1) / fps)
    n_bins = int(np.ceil(end_s / bin_s))
    # energy per 10 ms bin, dBFS; beyond the wave the level is -inf (no sound)
    padded = np.zeros(n_bins * hop, dtype=np.float32)
    n_copy = min(len(w), len(padded))
    padded[:n_copy] = w[:n_copy]
    level_db = 10.0 * np.log10((padded.reshape(n_bins, hop).astype(np.float64) ** 2).mean(axis=1) + 1e-12)
    audible = level_db[level_db > -100.0]  # ignore digital silence when estimating the floor
    noise_db = float(np.percentile(audible, ACTIVITY_NOISE_PERCENTILE)) if len(audible) else ACTIVITY_ABS_FLOOR_DB
    g_lo, g_hi = ACTIVITY_GATE_DB
    gate = np.clip((level_db - noise_db - g_lo) / (g_hi - g_lo), 0.0, 1.0)
    gate *= np.clip((level_db - ACTIVITY_ABS_FLOOR_DB) / 10.0, 0.0, 1.0)
    hold = 2 * int(round(ACTIVITY_HOLD_S / bin_s)) + 1
    gate = scipy.ndimage.maximum_filter1d(gate, size=hold, mode="constant", cval=0.0)
    # speech occupancy per bin (s of speech phones / bin length)
    edges = np.arange(n_bins + 1, dtype=np.float64) * bin_s
    occ = _occupancy(list(segments), edges[:-1], edges[1:])
    speech_idx = [i for i, p in enumerate(PHONES) if p not in _NON_SPEECH]
    speech = occ[:, speech_idx].sum(axis=1) / bin_s
    # integrate speech * gate (piecewise constant per bin) over each frame's span
    cum = np.concatenate([[0.0], np.cumsum(speech * gate * bin_s)])
    t = np.arange(n_frames, dtype=np.float64) / fps
    a = np.clip(t - 0.5 / fps, 0.0, edges[-1])
    b = np.clip(t + 0.5 / fps, 0.0, edges[-1])
    frac = (np.interp(b, edges, cum) - np.interp(a, edges, cum)) * fps
    frac = np.clip(frac, 0.0, 1.0)
    if n_frames >= 3:
        frac = scipy.ndimage.convolve1d(frac, np.array([0.25, 0.5, 0.25]), mode="nearest")
    return frac.astype(np.float32)


# --------------------------------------------------------------------------- all of it


def extract_features(wave, sample_rate: int, n_frames: int, fps: float, *, transcript: str | None = None,
                     progress: Callable[[float], None] | None = None) -> AudioFeatures:
    """All speech features for a video of ``n_frames`` frames at ``fps``.

    ``wave`` (N,) float mono at ``sample_rate``. Audio shorter than the video is padded
    with silence; audio longer than the video is decoded up to one second past its end
    (context for the decoder) and ignored beyond, unless a transcript is given (it may
    run past the video). With a ``transcript`` (blank counts as none) the phones are
    force-aligned; when the audio cannot carry the text the phones are recognised
    instead and ``aligned`` is False (words missing from the dictionary still raise
    InputError). ``progress`` receives non-decreasing fractions in [0, 1].
    """
    _check_frames(n_frames, fps)
    w = _as_wave(wave, sample_rate)
    has_text = transcript is not None and bool(transcript.strip())
    done = 0.0

    def report(fraction: float) -> None:
        # monotonic even when a failed alignment hands over to recognition
        nonlocal done
        done = max(done, fraction)
        if progress:
            progress(done)

    video_s = n_frames / fps
    keep = int(np.ceil((video_s + 1.0) * SAMPLE_RATE_HZ))
    need = int(np.ceil(video_s * SAMPLE_RATE_HZ))
    if len(w) > keep and not has_text:  # a transcript may run past the video: keep it all
        w = w[:keep]
    elif len(w) < need:
        logger.info("audio (%.2f s) is shorter than the video (%.2f s): padding with silence",
                    len(w) / SAMPLE_RATE_HZ, video_s)
        w = np.concatenate([w, np.zeros(need - len(w), dtype=np.float32)])
    report(0.0)
    mel = log_mel(w)
    report(0.1)
    aligned = False
    segments: list[PhoneSegment] | None = None
    if has_text:
        try:
            segments = align_transcript(w, SAMPLE_RATE_HZ, transcript, progress=lambda f: report(0.1 + 0.7 * f))
            aligned = True
        except AlignmentFailedError as e:
            logger.warning("%s; recognising phones instead", e)
    if segments is None:
        segments = recognise_phones(w, progress=lambda f: report(0.1 + 0.7 * f))
    phones = phone_block(segments, n_frames, fps)
    mel_b = mel_block(mel, n_frames, fps)
    report(0.9)
    activity = speech_activity(segments, w, SAMPLE_RATE_HZ, n_frames, fps)
    report(1.0)
    return AudioFeatures(mel=mel_b, phones=phones, activity=activity, segments=segments,
                         phone_names=PHONES, aligned=aligned)
