"""Bad input through the real command line: a clear message with its error code, and a
non-zero exit status, for each case the issue lists."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from clip_util import faceless_clip, tone_wav


def avface(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "avface", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def faceless(tmp_path_factory) -> Path:
    return faceless_clip(tmp_path_factory.mktemp("clips") / "pattern.mp4")


def _reconstruct(video: Path, tmp_path: Path, *extra: str):
    return avface("reconstruct", str(video), "-o", str(tmp_path / "out"), "-q",
                  "--cache-dir", str(tmp_path / "cache"), *extra)


def test_not_a_video(tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("these are my notes, not a video\n" * 20)
    r = _reconstruct(bad, tmp_path)
    assert r.returncode == 3, r.stderr
    assert "[bad_media]" in r.stderr and "not a video" in r.stderr


def test_truncated_video(tmp_path, faceless):
    cut = tmp_path / "cut.mp4"
    data = faceless.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    r = _reconstruct(cut, tmp_path)
    assert r.returncode == 3, r.stderr
    assert "[bad_media]" in r.stderr


def test_zero_length_file(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    r = _reconstruct(empty, tmp_path)
    assert r.returncode == 3 and "[bad_media]" in r.stderr and "empty" in r.stderr.lower()


def test_audio_only_file(tmp_path):
    r = _reconstruct(tone_wav(tmp_path / "tone.wav"), tmp_path)
    assert r.returncode == 3 and "no video stream" in r.stderr


def test_no_face_in_any_frame(tmp_path, faceless):
    r = _reconstruct(faceless, tmp_path)
    assert r.returncode == 4, r.stderr
    assert "[no_face]" in r.stderr and "no face was detected" in r.stderr
    assert not (tmp_path / "out" / "result.npz").exists()


def test_missing_flame_files(tmp_path, faceless):
    (tmp_path / "flame").mkdir()
    r = _reconstruct(faceless, tmp_path, "--model", "flame", "--flame-dir", str(tmp_path / "flame"))
    assert r.returncode == 5, r.stderr
    assert "[model_file]" in r.stderr and "generic_model.pkl" in r.stderr and "flame.is.tue.mpg.de" in r.stderr


def test_unwritable_output_folder(tmp_path, faceless):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = avface("reconstruct", str(faceless), "-o", str(blocker / "out"), "-q")
    assert r.returncode == 6, r.stderr
    assert "[output]" in r.stderr and "cannot write to the output folder" in r.stderr


def test_missing_video_path(tmp_path):
    r = _reconstruct(tmp_path / "nowhere.mp4", tmp_path)
    assert r.returncode == 3 and "nowhere.mp4" in r.stderr


def test_inspect_rejects_a_non_result(tmp_path):
    bad = tmp_path / "result.npz"
    bad.write_bytes(b"junk")
    r = avface("inspect", str(bad))
    assert r.returncode == 7 and "[bad_result]" in r.stderr


def test_models_lists_default_and_why_not_flame(tmp_path):
    r = avface("models", "--check", "--flame-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "default  available" in r.stdout
    assert "flame    not available" in r.stdout and "face_landmarker.task" in r.stdout


def test_command_line_loads_no_torch_until_a_command_needs_it():
    # `avface serve` builds the whole parser; its socket loop must stay free of torch
    code = "import sys, avface.cli; avface.cli.build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


def test_bad_audio_and_transcript_fail_before_tracking(tmp_path, faceless):
    r = _reconstruct(faceless, tmp_path, "--audio", str(tmp_path / "missing.wav"))
    assert r.returncode == 3 and "missing.wav" in r.stderr
    r = _reconstruct(faceless, tmp_path, "--transcript", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "[bad_input]" in r.stderr and "missing.txt" in r.stderr
    assert not (tmp_path / "cache").exists()  # the tracker never ran
