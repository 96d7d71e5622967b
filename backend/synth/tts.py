"""Speech synthesis with espeak-ng, for the synthetic demo clip and for tests.

The PyPI package ``espeakng-loader`` ships ``libespeak-ng.so`` and its data folder, so real,
repeatable English speech needs no recording and no download. The library is driven through
ctypes in synchronous mode (``AUDIO_OUTPUT_SYNCHRONOUS``): a callback receives the 16-bit
samples and espeak's events (``espeak_EVENT`` of speak_lib.h), among them one event per
phoneme, with espeak's own ASCII mnemonic (``@``, ``aI``, ``p``, ``s``) and its position in
the audio, and one per word. That timing is the ground truth the synthetic clip animates
its lips from; :func:`phoneme_to_viseme` maps the mnemonics to visemes.

espeak-ng keeps global state between utterances that cannot be reset from outside, so each
call speaks in a fresh worker process (see ``_WORKER``): deterministic and thread-safe.
"""
from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avface.errors import InputError, ModelFileError

log = logging.getLogger(__name__)

ESPEAK_PIP_NAME = "espeakng-loader"

# speak_lib.h: espeak_AUDIO_OUTPUT.AUDIO_OUTPUT_SYNCHRONOUS (samples to our callback, espeak_Synth
# returns when synthesis is done, no sound device).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000
_PARAM_RATE = 1
# espeak_EVENT_TYPE
_EVENT_WORD = 1
_EVENT_END = 5
_EVENT_MSG_TERMINATED = 6
_EVENT_PHONEME = 7

RATE_WPM_RANGE = (80, 450)
"""espeak's accepted speaking rates (espeakRATE_MINIMUM, espeakRATE_MAXIMUM), words per minute."""

MS_TO_S = 1e-3
INT16_FULL_SCALE = 32768.0
#: Characters espeak prefixes to a phoneme to mark stress (primary ', secondary ,); dropped.
_STRESS_MARKS = "',"


@dataclass(frozen=True, eq=False)
class Speech:
    """Synthesised speech and its timing, all times in seconds from the first sample."""

    wave: np.ndarray
    """(N,) float32 mono in [-1, 1]."""
    sample_rate: int
    """Hz (espeak-ng's own rate, 22050)."""
    phonemes: list[tuple[str, float, float]]
    """(phoneme, start_s, end_s) in time order: espeak's mnemonic without stress marks
    (``aI``, ``@``, ``t#``); pauses are left out, so gaps between entries are silence."""
    words: list[tuple[str, float, float]]
    """(word, start_s, end_s) as espeak spoke them."""

    @property
    def duration_s(self) -> float:
        return len(self.wave) / float(self.sample_rate)


# --------------------------------------------------------------------------- visemes

#: The 15 visemes of the Oculus/Meta lip-sync set, the usual target of phoneme-driven lips.
VISEMES: tuple[str, ...] = ("sil", "PP", "FF", "TH", "DD", "kk", "CH", "SS", "nn", "RR", "aa", "E", "ih", "oh", "ou")

# espeak-ng's English phoneme mnemonics (phsource/ph_english and its en-us variant) -> viseme.
_VISEME_OF: dict[str, str] = {
    # consonants
    "p": "PP", "b": "PP", "m": "PP",
    "f": "FF", "v": "FF",
    "T": "TH", "D": "TH",
    "t": "DD", "d": "DD", "t#": "DD", "d#": "DD", "t2": "DD", "d2": "DD", "?": "DD",
    "k": "kk", "g": "kk", "N": "kk", "h": "kk", "x": "kk",
    "tS": "CH", "dZ": "CH", "S": "CH", "Z": "CH",
    "s": "SS", "z": "SS",
    "n": "nn", "l": "nn", "n-": "nn", "l-": "nn", "@L": "nn", "L": "nn",
    "r": "RR", "r-": "RR", "3": "RR", "3:": "RR", "@r": "RR",
    "w": "ou", "j": "ih", "W": "ou",
    # vowels and diphthongs
    "a": "aa", "a#": "aa", "A:": "aa", "A": "aa", "A@": "aa", "aI": "aa", "aU": "aa", "V": "aa", "aa": "aa",
    "a2": "E", "e": "E", "E": "E", "e@": "E", "eI": "E", "@": "E", "@2": "E", "@5": "E", "e#": "E", "E2": "E",
    "i": "ih", "i:": "ih", "I": "ih", "I#": "ih", "I2": "ih", "i@": "ih", "i@3": "ih", "IR": "ih",
    "0": "oh", "O": "oh", "O:": "oh", "O@": "oh", "o@": "oh", "oU": "oh", "OI": "oh", "o": "oh", "0#": "oh",
    "u": "ou", "u:": "ou", "U": "ou", "U@": "ou", "u@": "ou", "U2": "ou",
}
# Fallback by the first letter, for mnemonics of other languages or new espeak versions.
_VISEME_OF_INITIAL: dict[str, str] = {
    "a": "aa", "A": "aa", "V": "aa", "e": "E", "E": "E", "@": "E", "3": "RR", "i": "ih", "I": "ih", "y": "ih",
    "o": "oh", "O": "oh", "0": "oh", "u": "ou", "U": "ou", "p": "PP", "b": "PP", "m": "PP", "f": "FF",
    "v": "FF", "s": "SS", "z": "SS", "r": "RR", "w": "ou", "j": "ih", "k": "kk", "g": "kk", "h": "kk",
}


def phoneme_to_viseme(phoneme: str) -> str:
    """The viseme (one of ``VISEMES``) of an espeak phoneme mnemonic; pauses (``_``, ``_:``)
    and unknown symbols with no letter map to ``sil``, other unknown consonants to ``DD``."""
    p = phoneme.lstrip(_STRESS_MARKS)
    if not p or p.startswith("_"):
        return "sil"
    if p in _VISEME_OF:
        return _VISEME_OF[p]
    base = p.rstrip("#-:0123456789")
    if base in _VISEME_OF:
        return _VISEME_OF[base]
    return _VISEME_OF_INITIAL.get(p[0], "DD" if p[0].isalpha() else "sil")


#: espeak English mnemonic -> ARPAbet (the CMU phones avface.stages.audio recognises), so espeak's
#: timing can score the phone recogniser. Diphthongs map to their ARPAbet diphthong.
ESPEAK_TO_ARPABET: dict[str, str] = {
    "p": "P", "b": "B", "m": "M", "f": "F", "v": "V", "T": "TH", "D": "DH", "t": "T", "d": "D", "t#": "T",
    "d#": "D", "k": "K", "g": "G", "N": "NG", "h": "HH", "tS": "CH", "dZ": "JH", "S": "SH", "Z": "ZH",
    "s": "S", "z": "Z", "n": "N", "l": "L", "n-": "N", "l-": "L", "@L": "L", "r": "R", "r-": "R", "w": "W",
    "j": "Y", "a": "AE", "a#": "AH", "A:": "AA", "A@": "AA", "aI": "AY", "aU": "AW", "V": "AH", "e": "EH",
    "E": "EH", "e@": "EH", "eI": "EY", "@": "AH", "@2": "AH", "@5": "AH", "3": "ER", "3:": "ER", "i": "IY",
    "i:": "IY", "I": "IH", "I#": "IH", "I2": "IH", "i@": "IH", "0": "AA", "O": "AO", "O:": "AO", "O@": "AO",
    "o@": "AO", "oU": "OW", "OI": "OY", "u": "UW", "u:": "UW", "U": "UH", "U@": "UH",
}


# --------------------------------------------------------------------------- the library

# The worker: a fresh interpreter that loads espeak-ng, speaks one text and exits.
# In one process, espeak-ng carries hidden state from one utterance to the next: the same
# text spoken four times gave four different waves (lengths 83241, 83245, 83246, 83231
# samples) and phoneme times that moved by a millisecond, and neither srand(1) nor
# espeak_Terminate + espeak_Initialize before each call made them repeat; the first call
# of each fresh process always gave the same wave. A fresh process per call makes every
# call the first, so a seed's ground truth is reproducible whatever was spoken before; it
# also keeps the library's process-global state (one callback, one voice) out of this
# process, so calls from several threads cannot interleave. Only the standard library is
# imported there (about 30 ms to start, ~50 ms a call in all).
#
# espeak_EVENT (speak_lib.h) on 64-bit: six 4-byte ints, then a pointer (user_data), then
# the 8-byte union id {int number; const char *name; char string[8]}: 40 bytes. Phoneme
# events carry their mnemonic in id.string, not zero-terminated when it fills all 8 bytes.
_WORKER = r"""
import ctypes, json, struct, sys

cfg = json.loads(sys.stdin.buffer.read().decode("utf-8"))

class EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]

class Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", EventId)]

Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(Event))
try:
    lib = ctypes.CDLL(cfg["lib"])
except OSError as e:
    sys.stderr.write(str(e)); sys.exit(3)
lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
lib.espeak_SetSynthCallback.argtypes = [Callback]
lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                             ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p]
rate = lib.espeak_Initialize(cfg["output"], 0, cfg["data"].encode(), cfg["options"])
if rate <= 0:
    sys.stderr.write("espeak_Initialize returned %d" % rate); sys.exit(4)
pcm, events = [], []

def on_audio(wav, n, ev):
    if n > 0 and wav:
        pcm.append(ctypes.string_at(wav, 2 * n))
    i = 0
    while ev[i].type != 0:
        e = ev[i]
        name = e.id.string.decode("ascii", "replace") if e.type == cfg["phoneme_event"] else ""
        events.append((e.type, e.text_position, e.length, e.audio_position, name))
        i += 1
    return 0

callback = Callback(on_audio)
lib.espeak_SetSynthCallback(callback)
if lib.espeak_SetVoiceByName(cfg["voice"].encode()) != 0:
    sys.stderr.write("no voice %r" % cfg["voice"]); sys.exit(5)
lib.espeak_SetParameter(cfg["rate_param"], cfg["rate_wpm"], 0)
text = cfg["text"].encode("utf-8") + b"\0"
buf = ctypes.create_string_buffer(text, len(text))
err = lib.espeak_Synth(buf, len(text), 0, cfg["pos_character"], 0, cfg["flags"], None, None)
if err != 0:
    sys.stderr.write("espeak_Synth failed with status %d" % err); sys.exit(6)
lib.espeak_Synchronize()
lib.espeak_Terminate()
header = json.dumps({"sample_rate": rate, "events": events}).encode("utf-8")
out = sys.stdout.buffer
out.write(struct.pack("<I", len(header))); out.write(header); out.write(b"".join(pcm)); out.flush()
"""

WORKER_TIMEOUT_S = 120.0
"""A worker that has not finished after this long is killed (espeak speaks ~50x real time)."""

_EXIT_LIBRARY, _EXIT_INIT, _EXIT_VOICE, _EXIT_SYNTH = 3, 4, 5, 6


def _library_paths() -> tuple[str, str]:
    """(shared library, data folder) of espeak-ng as espeakng-loader installs them."""
    try:
        import espeakng_loader
    except ImportError as e:
        raise ModelFileError(f"speech synthesis needs the espeak-ng library from the PyPI package "
                             f"{ESPEAK_PIP_NAME}: `pip install {ESPEAK_PIP_NAME}` ({e})") from e
    lib_path = espeakng_loader.get_library_path()
    try:
        data_path = espeakng_loader.get_data_path()
    except RuntimeError as e:
        raise ModelFileError(f"the espeak-ng data folder of {ESPEAK_PIP_NAME} is missing ({e}); reinstall it with "
                             f"`pip install --force-reinstall {ESPEAK_PIP_NAME}`") from e
    if not Path(lib_path).is_file():
        raise ModelFileError(f"the espeak-ng library {lib_path} of {ESPEAK_PIP_NAME} is missing; reinstall it with "
                             f"`pip install --force-reinstall {ESPEAK_PIP_NAME}`")
    return lib_path, data_path


def _run_worker(text: str, voice: str, rate_wpm: int) -> tuple[int, np.ndarray, list]:
    lib_path, data_path = _library_paths()
    cfg = dict(lib=lib_path, data=data_path, text=text, voice=voice, rate_wpm=rate_wpm,
               output=_AUDIO_OUTPUT_SYNCHRONOUS, options=_INITIALIZE_PHONEME_EVENTS, rate_param=_PARAM_RATE,
               pos_character=_POS_CHARACTER, flags=_CHARS_UTF8 | _ENDPAUSE, phoneme_event=_EVENT_PHONEME)
    try:
        proc = subprocess.run([sys.executable, "-I", "-c", _WORKER], input=json.dumps(cfg).encode("utf-8"),
                              capture_output=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"espeak-ng did not finish within {WORKER_TIMEOUT_S:.0f} s") from e
    err = proc.stderr.decode("utf-8", "replace").strip()
    if proc.returncode in (_EXIT_LIBRARY, _EXIT_INIT):
        raise ModelFileError(f"cannot load the espeak-ng library {lib_path} shipped by {ESPEAK_PIP_NAME}: {err}; "
                             f"reinstall it with `pip install --force-reinstall {ESPEAK_PIP_NAME}`", detail=err)
    if proc.returncode == _EXIT_VOICE:
        raise InputError(f"espeak-ng has no voice {voice!r} (try 'en-us' or 'en')")
    if proc.returncode != 0:
        raise RuntimeError(f"the espeak-ng worker failed (exit status {proc.returncode}): {err[-2000:]}")
    out = proc.stdout
    (n_header,) = struct.unpack("<I", out[:4])
    header = json.loads(out[4:4 + n_header].decode("utf-8"))
    pcm = np.frombuffer(out[4 + n_header:], dtype="<i2")
    return int(header["sample_rate"]), pcm, [tuple(e) for e in header["events"]]


def _timing(text: str, events: list, duration_s: float):
    """Phoneme and word spans from espeak's event stream.

    A phoneme lasts until the next phoneme or pause event. espeak places a word event a
    little before the word's sounds (sometimes inside the previous word's last phoneme),
    so each phoneme belongs to the last word whose event is at or before the phoneme's
    start, and a word spans its phonemes.
    """
    marks = [(pos_ms * MS_TO_S, name) for typ, _, _, pos_ms, name in events if typ == _EVENT_PHONEME]
    ends = [e[3] * MS_TO_S for e in events if e[0] in (_EVENT_END, _EVENT_MSG_TERMINATED)]
    phonemes: list[tuple[str, float, float]] = []
    for k, (start, name) in enumerate(marks):
        name = name.lstrip(_STRESS_MARKS)
        if not name or name.startswith("_"):
            continue  # a pause
        if k + 1 < len(marks):
            end = marks[k + 1][0]
        else:
            end = min([e for e in ends if e > start] or [duration_s])
        phonemes.append((name, start, max(end, start)))
    word_events = [(pos, length, pos_ms * MS_TO_S) for typ, pos, length, pos_ms, _ in events if typ == _EVENT_WORD]
    starts = [w[2] for w in word_events]
    owned: list[list[tuple[str, float, float]]] = [[] for _ in word_events]
    for p in phonemes:
        k = int(np.searchsorted(starts, p[1] + 1e-9, side="right")) - 1
        if k >= 0:
            owned[k].append(p)
    words: list[tuple[str, float, float]] = []
    for (pos, length, start), ph in zip(word_events, owned):
        # text_position counts characters (1-based) of the UTF-8 text
        word = text[pos - 1:pos - 1 + length]
        if ph:
            words.append((word, ph[0][1], ph[-1][2]))
        else:  # a word espeak did not voice (punctuation read as nothing)
            log.debug("espeak word %r has no phonemes", word)
    return phonemes, words


def synthesise(text: str, *, voice: str = "en-us", rate_wpm: int = 150) -> Speech:
    """Speak ``text`` with espeak-ng (at espeak's 22050 Hz) and report its phoneme and word timing.

    Deterministic: the same text, voice and rate give the same samples and times, in any
    process and whatever was spoken before. Thread-safe (each call has its own worker).
    Raises ModelFileError when the espeak-ng library cannot be loaded, InputError for an
    unknown voice, an empty text or a rate outside espeak's 80-450 words per minute.
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError("synthesise needs a non-empty text")
    if not RATE_WPM_RANGE[0] <= int(rate_wpm) <= RATE_WPM_RANGE[1]:
        raise InputError(f"rate_wpm must be in {RATE_WPM_RANGE}, got {rate_wpm}")
    sample_rate, pcm, events = _run_worker(text, voice, int(rate_wpm))
    wave = pcm.astype(np.float32) / INT16_FULL_SCALE
    phonemes, words = _timing(text, events, len(wave) / float(sample_rate))
    if not phonemes:
        log.warning("espeak-ng reported no phonemes for %r", text[:60])
    log.debug("espeak-ng spoke %d phonemes, %.2f s, for %r", len(phonemes), len(wave) / sample_rate, text[:60])
    return Speech(wave=wave, sample_rate=sample_rate, phonemes=phonemes, words=words)
