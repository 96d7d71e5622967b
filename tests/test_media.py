"""Tests for avface.media: probing, frame streaming (CFR and VFR), audio extraction, video
writing and bad input. Every clip is generated here with ffmpeg's lavfi sources; the real
clips in ../shared/data are only probed by the test marked ``shared``."""
from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import assert_close

from avface import media
from avface.errors import InputError, MediaError, OutputError

SINE_HZ = 440.0
"""Test tone frequency."""
GRAY_STEP = 4
"""Gray level per source frame index in the gray-coded clips: frame n is filled with 4 n."""


def _ffmpeg(*args: str) -> None:
    """Run the bundled ffmpeg; fail the test with its stderr if it fails."""
    proc = subprocess.run([media.ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg {' '.join(args)} failed:\n{proc.stderr}")


def _gray_coded(rate: str, seconds: float, select: str | None = None) -> str:
    """A lavfi graph whose frame n is uniformly gray at GRAY_STEP * n (so a decoded frame
    tells which source frame it is), optionally thinned with a select expression."""
    graph = (f"color=c=black:s=64x48:r={rate}:d={seconds},format=rgb24,"
             f"geq=r='N*{GRAY_STEP}':g='N*{GRAY_STEP}':b='N*{GRAY_STEP}'")
    return graph + (f",select='{select}'" if select else "")


def _source_index(frame: np.ndarray) -> int:
    """Which source frame of a gray-coded clip this decoded frame shows."""
    return int(round(float(frame.mean()) / GRAY_STEP))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Small test clips, made once for the module."""
    d = tmp_path_factory.mktemp("clips")
    c = {name: d / name for name in (
        "cfr_audio.mp4", "faststart.mp4", "odd.mp4", "no_audio.mp4", "vfr.mp4", "gray25.mp4",
        "rotated.mp4", "tone.wav", "short_tone.wav", "long_tone.wav",
    )}
    # 2 s, 25 fps, 160x120 + a 440 Hz tone, the same on both channels of 48 kHz stereo AAC.
    tone = f"sine=f={SINE_HZ:g}:r=48000:d=2"
    for name, extra in (("cfr_audio.mp4", []), ("faststart.mp4", ["-g", "5", "-movflags", "+faststart"])):
        _ffmpeg("-f", "lavfi", "-i", "testsrc2=s=160x120:r=25:d=2", "-f", "lavfi", "-i", tone,
                "-af", "pan=stereo|c0=c0|c1=c0", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                "-c:a", "aac", "-shortest", *extra, str(c[name]))
    # testsrc (RGB) keeps odd sizes; yuv444p lets H.264 store them.
    _ffmpeg("-f", "lavfi", "-i", "testsrc=s=161x97:r=25:d=1", "-c:v", "libx264", "-pix_fmt", "yuv444p",
            str(c["odd.mp4"]))
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=s=96x64:r=30:d=1", "-c:v", "libx264", str(c["no_audio.mp4"]))
    # VFR: 1 s at 10 fps (every third frame of a 30 fps source), then 1 s at 30 fps.
    # Lossless (qp 0) so the gray level identifies the source frame exactly.
    _ffmpeg("-f", "lavfi", "-i", _gray_coded("30", 2, "not(mod(n\\,3))+gte(n\\,30)"),
            "-fps_mode", "vfr", "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv420p", str(c["vfr.mp4"]))
    # 2.4 s CFR gray-coded, a key frame every 5 frames, so ranges really seek.
    _ffmpeg("-f", "lavfi", "-i", _gray_coded("25", 2.4), "-c:v", "libx264", "-qp", "0", "-g", "5",
            "-pix_fmt", "yuv420p", str(c["gray25.mp4"]))
    # Matroska keeps 1 ms timestamps, so 30 fps frames sit 33 or 34 ms apart.
    c["ms30.mkv"], c["ntsc.mkv"], c["gray25.ts"] = d / "ms30.mkv", d / "ntsc.mkv", d / "gray25.ts"
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=s=96x64:r=30:d=0.5", "-c:v", "libx264", str(c["ms30.mkv"]))
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=s=96x64:r=30000/1001:d=1", "-c:v", "libx264", str(c["ntsc.mkv"]))
    # MPEG-TS starts its clock at 1.4 s and has no index: ranges must not rely on seeking.
    _ffmpeg("-f", "lavfi", "-i", _gray_coded("25", 2.4), "-c:v", "libx264", "-qp", "0", "-g", "5",
            "-pix_fmt", "yuv420p", str(c["gray25.ts"]))
    _ffmpeg("-display_rotation", "90", "-i", str(c["no_audio.mp4"]), "-c", "copy", str(c["rotated.mp4"]))
    for name, seconds, rate in (("tone.wav", 1.5, 22050), ("short_tone.wav", 0.5, 16000),
                                ("long_tone.wav", 5.0, 16000)):
        _ffmpeg("-f", "lavfi", "-i", f"sine=f={SINE_HZ:g}:r={rate}:d={seconds}", str(c[name]))
    # Bad inputs.
    for name in ("text.mp4", "text.txt"):
        c[name] = d / name
        c[name].write_text("this is a text file, not a video\n" * 50)
    c["empty.mp4"] = d / "empty.mp4"
    c["empty.mp4"].write_bytes(b"")
    for src, dst in (("cfr_audio.mp4", "truncated.mp4"), ("faststart.mp4", "truncated_faststart.mp4")):
        data = c[src].read_bytes()
        c[dst] = d / dst
        c[dst].write_bytes(data[: len(data) // 2])
    # Intact index, but every byte of media data zeroed: nothing decodes.
    data = bytearray(c["faststart.mp4"].read_bytes())
    mdat = data.find(b"mdat")
    data[mdat + 4:] = bytes(len(data) - mdat - 4)
    c["zeroed.mp4"] = d / "zeroed.mp4"
    c["zeroed.mp4"].write_bytes(bytes(data))
    return c


# --------------------------------------------------------------------------- probe


def test_probe_cfr_with_audio(clips):
    info = media.probe(clips["cfr_audio.mp4"])
    assert (info.width, info.height) == (160, 120)
    assert info.fps == 25.0
    assert info.n_frames == 50
    assert_close(info.duration_s, 2.0, atol=1e-6, what="duration_s")
    assert not info.vfr
    assert info.codec == "h264"
    assert info.has_audio and info.audio_sample_rate == 48000 and info.audio_channels == 2
    assert info.path.is_absolute()


def test_probe_no_audio_and_read_audio_refuses(clips):
    info = media.probe(clips["no_audio.mp4"])
    assert (info.width, info.height, info.fps, info.n_frames) == (96, 64, 30.0, 30)
    assert not info.has_audio and info.audio_sample_rate is None and info.audio_channels is None
    with pytest.raises(MediaError, match="has no audio stream"):
        media.read_audio(clips["no_audio.mp4"])


def test_probe_rates_with_coarse_time_base(clips):
    ms30 = media.probe(clips["ms30.mkv"])
    assert (ms30.fps, ms30.n_frames, ms30.vfr) == (30.0, 15, False)
    ntsc = media.probe(clips["ntsc.mkv"])
    assert Fraction(ntsc.fps).limit_denominator(1001) == Fraction(30000, 1001)
    assert not ntsc.vfr and ntsc.n_frames == 30
    assert sum(1 for _ in media.iter_frames(ntsc)) == 30


def test_probe_applies_display_rotation(clips):
    info = media.probe(clips["rotated.mp4"])
    assert (info.width, info.height) == (64, 96)
    frames = list(media.iter_frames(info, 0, 3))
    assert frames[0].shape == (96, 64, 3)


# --------------------------------------------------------------------------- frames


@pytest.mark.parametrize("name", ["gray25.mp4", "gray25.ts"])
def test_iter_frames_cfr_yields_every_source_frame_in_order(clips, name):
    info = media.probe(clips[name])
    assert (info.fps, info.n_frames, info.vfr) == (25.0, 60, False)
    frames = list(media.iter_frames(info))
    assert len(frames) == info.n_frames
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in frames)
    assert [_source_index(f) for f in frames] == list(range(60))
    frames[0][0, 0, 0] = 7  # frames are the caller's to modify


def test_odd_size_frames(clips):
    info = media.probe(clips["odd.mp4"])
    assert (info.width, info.height, info.n_frames) == (161, 97, 25)
    frames = list(media.iter_frames(info))
    assert len(frames) == 25 and frames[0].shape == (97, 161, 3)


def test_vfr_clip_is_detected_and_resampled_to_constant_rate(clips):
    info = media.probe(clips["vfr.mp4"])
    assert info.vfr
    # 40 frames over 2 s: the average rate is 20 fps.
    assert_close(info.fps, 20.0, atol=1e-9, what="fps")
    assert_close(info.duration_s, 2.0, atol=1e-6, what="duration_s")
    assert info.n_frames == round(info.duration_s * info.fps) == 40
    frames = list(media.iter_frames(info))
    assert len(frames) == info.n_frames
    shown = [_source_index(f) for f in frames]
    # Source frame n (kept by the select) is presented at n / 30 s. Output frame i must show
    # the latest source frame whose time, rounded to the nearest 1/20 s slot, is <= i.
    kept = [n for n in range(60) if n % 3 == 0 or n >= 30]
    slot = {n: math.floor(Fraction(n, 30) * 20 + Fraction(1, 2)) for n in kept}
    expected = [max(n for n in kept if slot[n] <= i) for i in range(40)]
    assert shown == expected
    # Constant rate: the time of the shown frame never strays from i / fps by a slot or more.
    err_s = [abs(n / 30 - i / info.fps) for i, n in enumerate(shown)]
    assert max(err_s) < 1.0 / info.fps + info.max_gap_s


@pytest.mark.parametrize("name", ["gray25.mp4", "vfr.mp4", "gray25.ts"])
def test_frame_ranges_match_the_full_pass(clips, name):
    info = media.probe(clips[name])
    full = list(media.iter_frames(info))
    n = info.n_frames
    for start, end in [(0, 1), (3, 9), (n // 2, n // 2 + 4), (n - 10, n), (n - 1, None), (n // 4, n // 4 + 7)]:
        got = list(media.iter_frames(info, start, end))
        want = full[start:end]
        assert len(got) == len(want), (start, end)
        for k, (g, w) in enumerate(zip(got, want)):
            assert np.array_equal(g, w), f"{name}: frame {start + k} of range [{start}, {end}) differs from the full pass"


def test_frame_range_validation(clips):
    info = media.probe(clips["gray25.mp4"])
    n = info.n_frames
    assert info.frame_range(None, None) == (0, n)
    assert info.frame_range(5, None) == (5, n)
    assert info.frame_range(None, 7) == (0, 7)
    assert info.frame_range(np.int64(2), 4) == (2, 4)
    for bad in [(-1, 5), (5, 5), (6, 5), (0, n + 1), (n, None), (1.5, None), (True, 3), ("0", 3)]:
        with pytest.raises(InputError, match="frame"):
            info.frame_range(*bad)
    with pytest.raises(InputError):
        media.iter_frames(info, 10, 5)  # checked when called, before any ffmpeg starts


def _children_of(pid: int) -> set[int]:
    """Child processes of ``pid`` from /proc (zombies included: they are still listed)."""
    kids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            kids.add(int(entry.name))
    return kids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inspects /proc to find child processes")
def test_early_close_stops_and_reaps_ffmpeg(clips):
    info = media.probe(clips["gray25.mp4"])
    before = _children_of(os.getpid())
    gen = media.iter_frames(info)
    next(gen)
    started = _children_of(os.getpid()) - before
    assert len(started) == 1, "iter_frames should run exactly one ffmpeg"
    gen.close()
    assert not (_children_of(os.getpid()) & started), "ffmpeg is still running or left a zombie"
    # Dropping a half-consumed generator (garbage collection) closes it too.
    gen = media.iter_frames(info)
    next(gen)
    started = _children_of(os.getpid()) - before
    del gen
    assert not (_children_of(os.getpid()) & started)


def test_decode_failure_midstream_raises(clips, tmp_path):
    clip = tmp_path / "cut_later.mp4"
    clip.write_bytes(clips["faststart.mp4"].read_bytes())
    info = media.probe(clip)
    data = clip.read_bytes()
    clip.write_bytes(data[: len(data) * 2 // 5])  # the file is cut after it was probed
    with pytest.raises(MediaError) as e:
        for _ in media.iter_frames(info):
            pass
    assert "cut_later.mp4" in str(e.value)


# --------------------------------------------------------------------------- audio


def _peak_hz(wave: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    return float(np.fft.rfftfreq(wave.size, 1.0 / sample_rate)[np.argmax(spectrum)])


def test_read_audio_from_video_length_pitch_and_mono_average(clips):
    wave = media.read_audio(clips["cfr_audio.mp4"])
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(wave.size - 2.0 * media.SAMPLE_RATE_HZ) <= 0.01 * 2.0 * media.SAMPLE_RATE_HZ
    assert abs(_peak_hz(wave, media.SAMPLE_RATE_HZ) - SINE_HZ) < 2.0
    # Both channels carry lavfi's sine (amplitude 1/8): an average keeps that amplitude,
    # ffmpeg's default downmix would give 1/8 * sqrt(2).
    rms = float(np.sqrt(np.mean(wave[1000:-1000] ** 2)))
    assert_close(rms, 0.125 / math.sqrt(2), rtol=0.05, what="mono RMS")


def test_read_audio_window_and_rate(clips):
    full = media.read_audio(clips["cfr_audio.mp4"])
    part = media.read_audio(clips["cfr_audio.mp4"], start_s=0.5, duration_s=1.0)
    assert abs(part.size - media.SAMPLE_RATE_HZ) <= 2
    assert_close(part[100:-100], full[8000 + 100: 8000 + part.size - 100], atol=0.02, rtol=0, what="window")
    wave8k = media.read_audio(clips["cfr_audio.mp4"], sample_rate=8000)
    assert abs(wave8k.size - 16000) <= 160
    with pytest.raises(InputError):
        media.read_audio(clips["cfr_audio.mp4"], start_s=-1.0)
    with pytest.raises(InputError):
        media.read_audio(clips["cfr_audio.mp4"], duration_s=0.0)


def test_read_audio_from_wav(clips):
    wave = media.read_audio(clips["tone.wav"])
    assert abs(wave.size - 1.5 * media.SAMPLE_RATE_HZ) <= 16
    assert abs(_peak_hz(wave, media.SAMPLE_RATE_HZ) - SINE_HZ) < 2.0


def test_write_wav_round_trip(tmp_path):
    t = np.arange(8000) / 16000
    wave = (0.5 * np.sin(2 * np.pi * SINE_HZ * t)).astype(np.float32)
    path = media.write_wav(tmp_path / "sub" / "tone.wav", wave, 16000)
    back, rate = soundfile.read(path, dtype="float32")
    assert rate == 16000
    assert_close(back, wave, atol=1e-4, rtol=0, what="wav samples")
    assert_close(media.read_audio(path), wave, atol=1e-4, rtol=0, what="read_audio of the wav")
    with pytest.raises(InputError):
        media.write_wav(tmp_path / "bad.wav", np.zeros((2, 2, 2)), 16000)


# --------------------------------------------------------------------------- writing video


def _ramp_frames(n: int, height: int, width: int) -> list[np.ndarray]:
    """Frames with a horizontal colour ramp whose brightness grows with the frame index."""
    x = np.linspace(0, 1, width)[None, :, None]
    frames = []
    for i in range(n):
        f = np.empty((height, width, 3))
        f[...] = x * np.array([200.0, 120.0, 60.0]) + 3 * i
        frames.append(f.clip(0, 255).astype(np.uint8))
    return frames


def test_write_video_round_trip(tmp_path):
    frames = _ramp_frames(20, 48, 64)
    path = media.write_video(iter(frames), tmp_path / "out" / "clip.mp4", 10)
    assert path == (tmp_path / "out" / "clip.mp4").absolute() and path.is_file()
    info = media.probe(path)
    assert (info.width, info.height, info.fps, info.n_frames, info.vfr) == (64, 48, 10.0, 20, False)
    assert info.codec == "h264" and not info.has_audio
    back = list(media.iter_frames(info))
    assert len(back) == 20
    for k in (0, 10, 19):  # lossy codec: compare away from edges, a few levels of tolerance
        assert_close(back[k][8:-8, 8:-8], frames[k][8:-8, 8:-8], atol=6, rtol=0, what=f"frame {k}")
    assert not list(tmp_path.glob("out/.*partial*"))


def test_write_video_pads_odd_size(tmp_path):
    frames = _ramp_frames(5, 97, 161)
    info = media.probe(media.write_video(frames, tmp_path / "odd.mp4", 25))
    assert (info.width, info.height, info.n_frames) == (162, 98, 5)
    back = next(media.iter_frames(info))
    assert_close(back[8:89, 8:153], frames[0][8:89, 8:153], atol=6, rtol=0, what="odd frame")
    # The padding repeats the edge instead of adding a black line.
    assert_close(back[-1, 8:153].astype(float), back[-2, 8:153], atol=8, rtol=0, what="padded row")


@pytest.mark.parametrize(("audio", "seconds"), [("long_tone.wav", 5.0), ("short_tone.wav", 0.5),
                                                 ("cfr_audio.mp4", 2.0)])
def test_write_video_muxes_audio_to_the_video_length(clips, tmp_path, audio, seconds):
    frames = _ramp_frames(30, 48, 64)  # 1.5 s at 20 fps
    info = media.probe(media.write_video(frames, tmp_path / "av.mp4", 20, audio=clips[audio]))
    assert info.has_audio and info.n_frames == 30
    wave = media.read_audio(info.path)
    # Longer audio is cut and shorter audio padded with silence: the video sets the length.
    assert abs(wave.size / media.SAMPLE_RATE_HZ - 1.5) < 0.05, wave.size
    sounding = min(seconds, 1.5) - 0.05
    assert abs(_peak_hz(wave[: int(sounding * media.SAMPLE_RATE_HZ)], media.SAMPLE_RATE_HZ) - SINE_HZ) < 3.0
    if seconds < 1.5:
        assert float(np.abs(wave[int((seconds + 0.1) * media.SAMPLE_RATE_HZ):]).max()) < 1e-3


def test_write_video_rejects_bad_frames_and_leaves_no_file(tmp_path):
    target = tmp_path / "bad.mp4"
    with pytest.raises(InputError, match="no frames"):
        media.write_video([], target, 25)
    with pytest.raises(InputError, match="uint8"):
        media.write_video([np.zeros((4, 4, 3), np.float32)], target, 25)
    with pytest.raises(InputError, match="one size"):
        media.write_video([np.zeros((8, 8, 3), np.uint8)] * 3 + [np.zeros((8, 10, 3), np.uint8)], target, 25)
    with pytest.raises(InputError, match="fps"):
        media.write_video([np.zeros((8, 8, 3), np.uint8)], target, 0)
    assert list(tmp_path.iterdir()) == []


def test_write_video_output_and_audio_errors(clips, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        media.write_video(_ramp_frames(2, 8, 8), blocker / "sub" / "x.mp4", 25)
    with pytest.raises(MediaError, match="no audio stream"):
        media.write_video(_ramp_frames(2, 8, 8), tmp_path / "x.mp4", 25, audio=clips["no_audio.mp4"])
    with pytest.raises(MediaError, match="no such file"):
        media.write_video(_ramp_frames(2, 8, 8), tmp_path / "x.mp4", 25, audio=tmp_path / "missing.wav")


# --------------------------------------------------------------------------- hashing


def test_content_hash(clips, tmp_path):
    path = clips["tone.wav"]
    expected = hashlib.sha256(path.read_bytes() + b"cfg1").hexdigest()
    assert media.content_hash(path, "cfg1") == expected
    assert media.content_hash(path) != media.content_hash(path, "cfg2")
    with pytest.raises(MediaError):
        media.content_hash(tmp_path / "nope.mp4")


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("name", "message"), [
    ("text.mp4", "not a video or audio file"),
    ("text.txt", "text file, not a video"),
    ("truncated.mp4", "truncated"),
    ("truncated_faststart.mp4", "truncated"),
    ("empty.mp4", "empty"),
    ("zeroed.mp4", "corrupt"),
    ("tone.wav", "has no video stream; AVFace needs a video of a face"),
    ("missing.mp4", "no such file"),
])
def test_probe_rejects_bad_media(clips, name, message):
    path = clips.get(name, clips["cfr_audio.mp4"].parent / name)
    with pytest.raises(MediaError, match=message) as e:
        media.probe(path)
    assert e.value.code == "bad_media"
    if name not in ("empty.mp4", "missing.mp4"):  # these are caught before ffmpeg runs
        assert e.value.detail and ("Input #0" in e.value.detail or "Invalid data" in e.value.detail), \
            "ffmpeg's stderr belongs in .detail"


# --------------------------------------------------------------------------- real clips


@pytest.mark.shared
def test_probe_real_clips(shared_data):
    t0 = time.perf_counter()
    face = media.probe(shared_data / "video-retalking" / "face_1.mp4")
    probe_s = time.perf_counter() - t0
    assert face.vfr
    assert (face.width, face.height, face.codec) == (700, 700, "h264")
    assert_close(face.fps, 22.13, atol=0.05, what="face_1 average fps")
    assert abs(face.n_frames - 135) <= 1
    assert face.has_audio and face.audio_sample_rate == 44100 and face.audio_channels == 2
    assert probe_s < 2.0, f"probing a 6 s clip took {probe_s:.2f} s"
    assert sum(1 for _ in media.iter_frames(face)) == face.n_frames

    noem = media.probe(shared_data / "styletalk" / "KristiNoem.mp4")
    assert (noem.width, noem.height, noem.fps, noem.n_frames, noem.vfr) == (256, 256, 30.0, 542, False)
    assert not noem.has_audio

    grid = media.probe(shared_data / "lipnet-grid" / "id2_vcd_swwp2s.mpg")
    assert (grid.codec, grid.fps, grid.n_frames, grid.width, grid.height) == ("mpeg1video", 25.0, 75, 360, 288)
    assert grid.has_audio
    frames = list(media.iter_frames(grid, 70))
    assert len(frames) == 5 and frames[0].shape == (288, 360, 3)
