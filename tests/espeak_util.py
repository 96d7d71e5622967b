"""Speech synthesis for tests: espeak-ng driven through ctypes.

The PyPI package ``espeakng-loader`` ships ``libespeak-ng.so`` and its data folder, so
tests can make real, repeatable English speech without any recording. The synthesiser
also reports where each word starts (espeak's word events), which gives tests a ground
truth for word timings.

Self-contained (numpy, ctypes, espeakng_loader) so that it can move into the package as is.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import numpy as np

# espeak_AUDIO_OUTPUT: synchronous, samples handed to our callback, no sound device.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
# espeak_POSITION_TYPE
_POS_CHARACTER = 1
# Synth flags: the text is UTF-8; pause at the end of the text.
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_ENDPAUSE = 0x1000
# espeak_PARAMETER
_ESPEAK_RATE = 1
# espeak_EVENT_TYPE
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_EE_OK = 0


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    """``espeak_EVENT`` from speak_lib.h."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based character offset
        ("length", ctypes.c_int),  # characters
        ("audio_position", ctypes.c_int),  # milliseconds
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass(frozen=True)
class SpokenWord:
    """One word of the synthesised text and where espeak started speaking it."""

    word: str
    start_s: float


@dataclass(frozen=True)
class Speech:
    """Synthesised speech: ``wave`` (N,) float32 in [-1, 1] at ``sample_rate`` Hz."""

    wave: np.ndarray
    sample_rate: int
    words: list[SpokenWord]


class _Espeak:
    """The process-wide espeak-ng instance (the C library keeps global state)."""

    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetVoiceByName.restype = ctypes.c_int
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_SetParameter.restype = ctypes.c_int
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
        ]
        self.lib.espeak_Synth.restype = ctypes.c_int
        self.lib.espeak_Synchronize.restype = ctypes.c_int

        data_path = espeakng_loader.get_data_path().encode()
        rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, 0)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {rate}) with data at {data_path!r}")
        self.sample_rate = int(rate)
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int]] = []  # (text_position, length, sample)
        # Keep a reference: ctypes callbacks are freed when the Python object is.
        self._callback = _SynthCallback(self._on_audio)
        self.lib.espeak_SetSynthCallback(self._callback)
        self.lock = threading.Lock()

    def _on_audio(self, wav, n_samples, events) -> int:
        if n_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            ev = events[i]
            if ev.type == _EVENT_WORD:
                self._events.append((ev.text_position, ev.length, ev.sample))
            i += 1
        return 0  # 0 = continue synthesis

    def synthesise(self, text: str, voice: str, rate_wpm: int) -> Speech:
        with self.lock:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            self.lib.espeak_SetParameter(_ESPEAK_RATE, int(rate_wpm), 0)
            self._chunks, self._events = [], []
            encoded = text.encode("utf-8") + b"\0"
            buf = ctypes.create_string_buffer(encoded)
            err = self.lib.espeak_Synth(buf, len(encoded), 0, _POS_CHARACTER, 0,
                                        _ESPEAK_CHARS_UTF8 | _ESPEAK_ENDPAUSE, None, None)
            if err != _EE_OK:
                raise RuntimeError(f"espeak_Synth failed with status {err}")
            self.lib.espeak_Synchronize()
            pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
            # text_position is a 1-based character offset into the UTF-8 text (ASCII here).
            words = [
                SpokenWord(word=text[pos - 1:pos - 1 + length], start_s=sample / self.sample_rate)
                for pos, length, sample in self._events
            ]
            return Speech(wave=(pcm.astype(np.float32) / 32768.0), sample_rate=self.sample_rate, words=words)


_instance: _Espeak | None = None
_instance_lock = threading.Lock()


def synthesise(text: str, *, voice: str = "en-us", rate_wpm: int = 150) -> Speech:
    """Speak ``text`` with espeak-ng; returns the wave at espeak's own rate (22050 Hz)
    and the start time of each word."""
    global _instance
    with _instance_lock:
        if _instance is None:
            _instance = _Espeak()
    return _instance.synthesise(text, voice, rate_wpm)
