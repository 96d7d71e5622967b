"""Audio front end (avface.stages.audio): log-mel, phone blocks, speech activity, pocketsphinx
phone recognition and forced alignment on synthetic (espeak-ng) and real (GRID) speech."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close
from scipy.signal import resample_poly

from avface.errors import InputError
from avface.stages import audio
from avface.stages.audio import PHONE_INDEX, PHONES, PhoneSegment
from avface.synth.tts import synthesise

SR = audio.SAMPLE_RATE_HZ
VOWELS = {"AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW"}
SENTENCE = "please call stella and ask her to bring these things with her from the store"
PAD_S = 1.0


def tone(freq_hz: float, seconds: float, sample_rate: int = SR, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def expected_occupancy(t_s: float, k: int, start_s: float, end_s: float, step_s: float = 0.02) -> float:
    """Fraction of window k of a frame shown at t_s that lies in [start_s, end_s]."""
    lo = t_s + (k - 7.5) * step_s - step_s / 2
    hi = lo + step_s
    return max(0.0, min(hi, end_s) - max(lo, start_s)) / step_s


# ----------------------------------------------------------------------------- log-mel


def test_log_mel_shape_and_tone_band():
    mel = audio.log_mel(tone(1000.0, 1.0))
    assert mel.shape == (1 + SR // 160, audio.N_MELS)
    assert mel.dtype == np.float32
    # HTK mel scale from 20 Hz to 8 kHz, 80 bands: centres are 82 equally spaced mel
    # points minus the two edges, so 1 kHz (999.99 mel) sits nearest band 27.
    def to_mel(f):
        return 2595 * np.log10(1 + f / 700)
    step = (to_mel(8000) - to_mel(20)) / 81
    expected_band = int(round((to_mel(1000) - to_mel(20)) / step - 1))
    assert expected_band == 27
    assert int(np.argmax(mel[5:-5].mean(axis=0))) == expected_band
    assert abs(audio.mel_frequencies_hz()[expected_band] - 1000) < step
    # a higher tone lands in a higher band, and input at 44.1 kHz means the same frequencies
    assert int(np.argmax(audio.log_mel(tone(3000.0, 1.0))[5:-5].mean(axis=0))) > expected_band + 20
    mel_441 = audio.log_mel(tone(1000.0, 1.0, sample_rate=44_100), 44_100)
    assert mel_441.shape == mel.shape
    assert int(np.argmax(mel_441[5:-5].mean(axis=0))) == expected_band


def test_log_mel_silence_is_finite_floor_and_frames_are_centred():
    silent = audio.log_mel(np.zeros(1600, np.float32))
    assert silent.shape == (11, audio.N_MELS)
    assert_close(silent, np.full_like(silent, np.log(audio.LOG_MEL_FLOOR)), rtol=1e-6, what="silence log-mel")
    # a click at 0.5 s shows up in the frame centred at 0.5 s (index 50), not one hop later
    click = np.zeros(SR, np.float32)
    click[SR // 2] = 1.0
    energy = audio.log_mel(click).mean(axis=1)
    assert set(np.flatnonzero(energy > energy.min() + 1.0)) <= {49, 50, 51}
    assert int(np.argmax(energy)) == 50


def test_log_mel_rejects_bad_input():
    with pytest.raises(ValueError, match="mono"):
        audio.log_mel(np.zeros((100, 2), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        audio.log_mel(np.full(100, np.nan, np.float32))
    with pytest.raises(ValueError, match="float"):
        audio.log_mel(np.zeros(100, np.int16))


def test_mel_block_samples_window_centres():
    n_mel_frames = 300
    # mel[i, :] = i: interpolated values read back the fractional mel-frame position
    ramp = np.repeat(np.arange(n_mel_frames, dtype=np.float32)[:, None], audio.N_MELS, axis=1)
    for fps in (25.0, 30.0):
        block = audio.mel_block(ramp, 60, fps)
        assert block.shape == (60, audio.WINDOW_FRAMES, audio.N_MELS)
        centres = np.arange(60)[:, None] / fps + (np.arange(16)[None, :] - 7.5) * 0.02
        expected = np.clip(centres / 0.010, 0, n_mel_frames - 1)
        assert_close(block[..., 0], expected, atol=1e-4, what=f"mel block positions at {fps} fps")
    # frame 0's first 8 windows lie before the audio: they repeat the first mel frame
    assert_close(audio.mel_block(ramp, 1, 25.0)[0, :8, 3], np.zeros(8), what="edge padding")


# ----------------------------------------------------------------------------- phone blocks


def test_phone_inventory_and_filler_mapping():
    assert len(PHONES) == 41 and PHONES[:2] == ("SIL", "NOISE")
    assert len(set(PHONES)) == len(PHONES)
    assert audio.canonical_phone("+NSN+") == "NOISE"
    assert audio.canonical_phone("+SPN+") == "NOISE"
    assert audio.canonical_phone("+BREATH+") == "NOISE"
    assert audio.canonical_phone("<sil>") == "SIL"
    assert audio.canonical_phone("AA1") == "AA"
    with pytest.raises(ValueError, match="unknown phone"):
        audio.canonical_phone("QQ")


def test_phone_block_shape_and_rows_sum_to_one():
    segs = [PhoneSegment("SIL", 0.0, 0.31), PhoneSegment("HH", 0.31, 0.37), PhoneSegment("AH", 0.37, 0.5),
            PhoneSegment("+NSN+", 0.5, 0.55), PhoneSegment("L", 0.6, 0.64), PhoneSegment("OW", 0.64, 0.9)]
    block = audio.phone_block(segs, 40, 29.97)
    assert block.shape == (40, audio.WINDOW_FRAMES, len(PHONES))
    assert block.dtype == np.float32
    assert_close(block.sum(axis=2), np.ones((40, 16)), atol=1e-5, what="row sums")
    assert block.min() >= 0.0
    assert block[..., PHONE_INDEX["NOISE"]].max() > 0.99  # the filler went to NOISE
    assert block[..., PHONE_INDEX["SIL"]].max() == pytest.approx(1.0)  # the gap 0.55-0.6 s is SIL


@pytest.mark.parametrize("fps", [25.0, 30.0])
def test_phone_block_alignment(fps):
    aa = PhoneSegment("AA", 1.00, 1.20)
    n_frames = int(2.0 * fps)
    block = audio.phone_block([aa], n_frames, fps)
    col = block[..., PHONE_INDEX["AA"]]
    expected = np.array([[expected_occupancy(t / fps, k, 1.0, 1.2) for k in range(16)] for t in range(n_frames)])
    assert_close(col, expected, atol=1e-5, what=f"AA occupancy at {fps} fps")
    assert_close(block[..., PHONE_INDEX["SIL"]], 1.0 - expected, atol=1e-5, what="SIL elsewhere")
    seen = np.flatnonzero(col.max(axis=1) > 1e-6)
    if fps == 25.0:
        # the windows reach 160 ms either side: frames 22 (0.88 s) to 33 (1.32 s) see AA
        assert list(seen) == list(range(22, 34))
        assert_close(col[25], [0] * 8 + [1] * 8, atol=1e-5, what="frame at 1.00 s: AA in the second half")
        assert_close(col[30], [1] * 8 + [0] * 8, atol=1e-5, what="frame at 1.20 s: AA in the first half")
        assert_close(col[22], [0] * 14 + [1] * 2, atol=1e-5, what="frame at 0.88 s: the last two windows")
    else:
        # at 30 fps windows straddle the phone's edges: frame 26 (0.8667 s), window 14 spans
        # 0.9867-1.0067 s, a third of it AA
        assert list(seen) == list(range(26, 41))
        assert col[26, 14] == pytest.approx(1 / 3, abs=1e-5)
        assert col[26, 15] == pytest.approx(1.0, abs=1e-5)


def test_phone_block_edges_outside_audio_are_silence():
    segs = [PhoneSegment("M", 0.0, 0.1), PhoneSegment("SIL", 0.1, 0.9), PhoneSegment("B", 0.9, 1.0)]
    block = audio.phone_block(segs, 25, 25.0)
    m, b, sil = PHONE_INDEX["M"], PHONE_INDEX["B"], PHONE_INDEX["SIL"]
    # frame 0 (0 s): windows 0-7 lie before the audio (SIL), windows 8-12 cover 0-0.1 s (M)
    assert_close(block[0, :8, sil], np.ones(8), atol=1e-6, what="before the audio")
    assert_close(block[0, 8:13, m], np.ones(5), atol=1e-6, what="M at the start")
    # the last frame (0.96 s): windows 5-9 span 0.90-1.00 s (B), windows 10-15 lie past the end (SIL)
    assert_close(block[24, 5:10, b], np.ones(5), atol=1e-6, what="B at the end")
    assert_close(block[24, 10:, sil], np.ones(6), atol=1e-6, what="after the audio")


def test_phone_block_rejects_overlaps_and_bad_args():
    with pytest.raises(ValueError, match="overlap"):
        audio.phone_block([PhoneSegment("AA", 0.0, 0.5), PhoneSegment("B", 0.3, 0.6)], 10, 25.0)
    with pytest.raises(ValueError, match="fps"):
        audio.phone_block([], 10, 0.0)
    assert audio.phone_block([], 0, 25.0).shape == (0, 16, len(PHONES))


# ----------------------------------------------------------------------------- activity and silence


def test_speech_activity_silence_and_energy_gate():
    n_frames, fps = 50, 25.0
    zeros = np.zeros(2 * SR, np.float32)
    speech_all_along = [PhoneSegment("AA", 0.0, 2.0)]
    assert_close(audio.speech_activity([PhoneSegment("SIL", 0.0, 2.0)], zeros, SR, n_frames, fps),
                 np.zeros(n_frames), what="silence")
    # a decoder that hears a phone in digital silence or in faint noise does not make it speech
    assert audio.speech_activity(speech_all_along, zeros, SR, n_frames, fps).max() == 0.0
    faint = (np.random.default_rng(1).standard_normal(2 * SR) * 1e-4).astype(np.float32)  # -80 dBFS
    assert audio.speech_activity(speech_all_along, faint, SR, n_frames, fps).max() == 0.0
    # a loud burst from 0.8 to 1.2 s labelled as speech over quiet noise: active there only
    wave = (np.random.default_rng(2).standard_normal(2 * SR) * 1e-3).astype(np.float32)
    wave[int(0.8 * SR):int(1.2 * SR)] += tone(200.0, 0.4, amplitude=0.3)
    act = audio.speech_activity(speech_all_along, wave, SR, n_frames, fps)
    assert act.shape == (n_frames,) and act.dtype == np.float32
    assert act[22:29].min() > 0.95  # 0.88-1.12 s
    assert act[:15].max() < 0.05 and act[36:].max() < 0.05


def test_extract_features_on_silence_and_short_audio():
    calls: list[float] = []
    feats = audio.extract_features(np.zeros(SR, np.float32), SR, 50, 25.0, progress=calls.append)
    assert feats.mel.shape == (50, 16, audio.N_MELS)
    assert feats.phones.shape == (50, 16, len(PHONES))
    assert feats.activity.shape == (50,)
    assert feats.phone_names == PHONES and not feats.aligned
    assert_close(feats.phones[..., PHONE_INDEX["SIL"]], np.ones((50, 16)), what="all SIL")
    assert feats.activity.max() == 0.0
    assert [s.phone for s in feats.segments] == ["SIL"]
    assert feats.segments[-1].end_s == pytest.approx(2.0)  # 1 s of audio padded to the 2 s video
    assert calls[0] == 0.0 and calls[-1] == 1.0 and calls == sorted(calls)
    # a transcript over silence cannot be aligned: recognised instead, and says so
    feats = audio.extract_features(np.zeros(SR, np.float32), SR, 25, 25.0, transcript="hello world")
    assert not feats.aligned and feats.activity.max() == 0.0


# ----------------------------------------------------------------------------- real speech (espeak-ng)


@pytest.fixture(scope="module")
def spoken():
    """SENTENCE spoken by espeak-ng at 16 kHz with PAD_S of silence on both sides."""
    speech = synthesise(SENTENCE)
    wave = resample_poly(speech.wave, 320, 441).astype(np.float32)  # 22050 Hz -> 16 kHz
    pad = np.zeros(int(PAD_S * SR), np.float32)
    wave = np.concatenate([pad, wave, pad])
    # espeak appends a pause after the text: find where the sound really ends
    loud = np.flatnonzero(np.abs(wave) > 0.01)
    return {"wave": wave, "words": speech.words, "speech_start_s": loud[0] / SR, "speech_end_s": loud[-1] / SR}


def test_transcript_words_normalisation():
    assert audio.transcript_words("Set white with P 2 soon.") == ["set", "white", "with", "p", "two", "soon"]
    assert audio.transcript_words("It's 25 past, in 3d!") == ["it's", "twenty", "five", "past", "in", "three", "d"]
    assert audio.transcript_words("room 105, code 007") == [
        "room", "one", "hundred", "five", "code", "zero", "zero", "seven"]


def test_recognise_phones_on_speech(spoken):
    wave = spoken["wave"]
    duration = len(wave) / SR
    segs = audio.recognise_phones(wave, SR)
    # contiguous, covering the clip
    assert segs[0].start_s == 0.0 and segs[-1].end_s == pytest.approx(duration)
    for a, b in zip(segs, segs[1:]):
        assert a.end_s == pytest.approx(b.start_s)
    assert all(s.phone in PHONE_INDEX and 0.0 <= s.score <= 1.0 for s in segs)
    phones = [s for s in segs if s.phone not in ("SIL", "NOISE")]
    assert len(phones) >= 25, [s.phone for s in segs]  # 14 words, about 45 phones
    # the padding is silence, the speech is mostly phones and many of them vowels
    assert segs[0].phone == "SIL" and segs[0].end_s > spoken["speech_start_s"] - 0.1
    assert segs[-1].phone == "SIL" and segs[-1].start_s < spoken["speech_end_s"] + 0.1
    assert all(spoken["speech_start_s"] - 0.1 < s.start_s < spoken["speech_end_s"] + 0.1 for s in phones)
    speech_s = spoken["speech_end_s"] - spoken["speech_start_s"]
    assert sum(s.duration_s for s in phones) > 0.7 * speech_s
    assert sum(s.duration_s for s in phones if s.phone in VOWELS) > 0.25 * speech_s


def test_recognise_phones_in_pieces_matches_and_reports_progress(spoken, monkeypatch):
    wave = spoken["wave"]
    whole = audio.recognise_phones(wave, SR)
    monkeypatch.setattr(audio, "MAX_UTTERANCE_S", 2.0)
    monkeypatch.setattr(audio, "CUT_SEARCH_S", 1.0)
    calls: list[float] = []
    pieces = audio.recognise_phones(wave, SR, progress=calls.append)
    assert len(calls) >= 3 and calls == sorted(calls) and calls[-1] == 1.0
    assert pieces[0].start_s == 0.0 and pieces[-1].end_s == pytest.approx(len(wave) / SR)
    for a, b in zip(pieces, pieces[1:]):
        assert a.end_s == pytest.approx(b.start_s)
    # cutting at quiet points changes little: speech time agrees within 15%
    def speech_time(segs):
        return sum(s.duration_s for s in segs if s.phone not in ("SIL", "NOISE"))
    assert speech_time(pieces) == pytest.approx(speech_time(whole), rel=0.15)


def test_speech_activity_on_speech(spoken):
    wave, fps = spoken["wave"], 25.0
    n_frames = int(len(wave) / SR * fps)
    feats = audio.extract_features(wave, SR, n_frames, fps)
    t = np.arange(n_frames) / fps
    inside = (t > spoken["speech_start_s"] + 0.1) & (t < spoken["speech_end_s"] - 0.1)
    padding = (t < PAD_S - 0.2) | (t > spoken["speech_end_s"] + 0.3)
    assert feats.activity[inside].mean() > 0.7
    assert feats.activity[padding].max() < 0.05
    # the phone block agrees: the padded frames are silence
    assert feats.phones[padding][..., PHONE_INDEX["SIL"]].min() > 0.99


def test_align_transcript_on_speech(spoken):
    wave = spoken["wave"]
    segs = audio.align_transcript(wave, SR, SENTENCE)
    words = audio.transcript_words(SENTENCE)
    assert segs[0].start_s == 0.0 and segs[-1].end_s == pytest.approx(len(wave) / SR)
    in_words = [s for s in segs if s.word_index >= 0]
    # the transcript's words, in order, each with its dictionary phones
    order = [s.word_index for s in in_words]
    assert order == sorted(order) and sorted(set(order)) == list(range(len(words)))
    assert all(s.word == words[s.word_index] for s in in_words)
    assert [s.phone for s in in_words if s.word == "stella"] == ["S", "T", "EH", "L", "AH"]
    assert all(s.phone in ("SIL", "NOISE") for s in segs if s.word_index < 0)
    # spanning the speech, and each word starting where espeak started saying it
    assert in_words[0].start_s == pytest.approx(spoken["speech_start_s"], abs=0.1)
    assert in_words[-1].end_s == pytest.approx(spoken["speech_end_s"], abs=0.15)
    starts = {i: min(s.start_s for s in in_words if s.word_index == i) for i in range(len(words))}
    # espeak reports no event for some short function words ("the" here): match in order
    errors, i = [], 0
    for word, start_s, _ in spoken["words"]:
        while i < len(words) and words[i] != word:
            i += 1
        assert i < len(words), f"espeak word {word!r} is not in the transcript"
        errors.append(abs(starts[i] - (PAD_S + start_s)))
        i += 1
    assert len(errors) >= len(words) - 2
    assert np.median(errors) < 0.05 and max(errors) < 0.15, np.round(errors, 3)


def test_align_transcript_in_pieces_matches_whole(spoken, monkeypatch):
    # the sentence twice: pauses inside it and 2 s of silence between the two
    wave = np.concatenate([spoken["wave"], spoken["wave"]])
    text = SENTENCE + " " + SENTENCE
    whole = audio.align_transcript(wave, SR, text)
    monkeypatch.setattr(audio, "MAX_UTTERANCE_S", 2.0)
    monkeypatch.setattr(audio, "CUT_SEARCH_S", 1.0)
    calls: list[float] = []
    pieces = audio.align_transcript(wave, SR, text, progress=calls.append)
    assert len(calls) >= 3 and calls == sorted(calls) and calls[-1] == 1.0
    assert pieces[0].start_s == 0.0 and pieces[-1].end_s == pytest.approx(len(wave) / SR)
    for a, b in zip(pieces, pieces[1:]):
        assert a.end_s == pytest.approx(b.start_s)

    def word_starts(segs):
        return [min(s.start_s for s in segs if s.word_index == i) for i in range(len(audio.transcript_words(text)))]
    # each piece has its own cepstral mean, so a word may move by a frame or a few
    diff = np.abs(np.subtract(word_starts(pieces), word_starts(whole)))
    assert np.median(diff) <= 0.02 and diff.max() < 0.1, np.round(diff, 3)


def test_align_transcript_unknown_words(spoken):
    with pytest.raises(InputError, match="'zorblaxian'") as info:
        audio.align_transcript(spoken["wave"], SR, "please call zorblaxian and qwxzt")
    assert "'qwxzt'" in str(info.value) and "'please'" not in str(info.value)
    with pytest.raises(InputError, match="no words"):
        audio.align_transcript(spoken["wave"], SR, " ... ")


def test_extract_features_with_transcript(spoken):
    wave, fps = spoken["wave"], 30.0
    n_frames = int(len(wave) / SR * fps)
    feats = audio.extract_features(wave, SR, n_frames, fps, transcript=SENTENCE.capitalize() + ".")
    assert feats.aligned
    assert feats.phones.shape == (n_frames, 16, len(PHONES))
    assert [s.word for s in feats.segments if s.word_index >= 0][0] == "please"


def test_extract_features_resamples_and_trims_long_audio():
    speech = synthesise(SENTENCE)  # 22050 Hz, about 4 s
    feats = audio.extract_features(speech.wave, speech.sample_rate, 50, 25.0)  # a 2 s video
    assert feats.mel.shape == (50, 16, audio.N_MELS) and feats.phones.shape == (50, 16, len(PHONES))
    # decoded up to 1 s past the video's end, no further
    assert feats.segments[-1].end_s == pytest.approx(3.0, abs=0.01)
    assert feats.activity[5:45].mean() > 0.7


# ----------------------------------------------------------------------------- real speech (GRID)


def read_audio_ffmpeg(path: Path) -> np.ndarray:
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path),
           "-f", "f32le", "-ac", "1", "-ar", str(SR), "pipe:"]
    return np.frombuffer(subprocess.run(cmd, capture_output=True, check=True).stdout, np.float32).copy()


@pytest.mark.shared
def test_grid_alignment_matches_reference(shared_data):
    """GRID ships word timings (1000 units = one 25 fps frame); pocketsphinx's forced
    alignment lands within about 30 ms of them (median; measured 0.03 s)."""
    wave = read_audio_ffmpeg(shared_data / "lipnet-grid" / "id2_vcd_swwp2s.mpg")
    reference = []
    for line in (shared_data / "lipnet-grid" / "swwp2s.align").read_text().split("\n"):
        if line.strip():
            start, end, word = line.split()
            if word not in ("sil", "sp"):
                reference.append((word, int(start) / 25_000, int(end) / 25_000))
    segs = audio.align_transcript(wave, SR, "set white with p two soon")
    words = audio.transcript_words("set white with p two soon")
    assert [w for w, _, _ in reference] == words
    errors = []
    for i, (word, ref_start, ref_end) in enumerate(reference):
        mine = [s for s in segs if s.word_index == i]
        assert mine and all(s.word == word for s in mine)
        errors += [mine[0].start_s - ref_start, mine[-1].end_s - ref_end]
    errors = np.abs(errors)
    assert np.median(errors) < 0.06 and errors.max() < 0.12, np.round(errors, 3)
    # recognition without the transcript: active where the words are, not in the silences
    feats = audio.extract_features(wave, SR, 75, 25.0)
    t = np.arange(75) / 25.0
    speech = (t > reference[0][1] + 0.1) & (t < reference[-1][2] - 0.1)
    quiet = (t < reference[0][1] - 0.15) | (t > reference[-1][2] + 0.2)
    assert feats.activity[speech].mean() > 0.8 and feats.activity[quiet].max() < 0.1
