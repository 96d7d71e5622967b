"""Reconstruct face in Blender against a real `avface serve` subprocess running the real
pipeline on the short synthetic clip: end to end from a movie strip to an animated head, a
job that outlives its Blender session, and the failure paths (no backend, backend killed
mid-job, corrupt result, no sound, cancel). Each failure ends in a readable message and leaves
nothing half-built (the Blender side compares the data-block counts)."""
from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
from addon_util import demo_clip  # noqa: F401 (fixture)
from blender_harness import blender, isolated_home, staged_addon  # noqa: F401 (fixtures)
from service_util import ServerProcess

from avface.service.client import JobRun

pytestmark = [pytest.mark.blender, pytest.mark.slow]

CHECK_FRAMES = [0, 13, 29]
TRIM_START = 5


@pytest.fixture(scope="module")
def media(demo_clip, tmp_path_factory):
    """The demo clip's video (with sound), its speech as a separate WAV, and a silent copy."""
    import imageio_ffmpeg

    folder = demo_clip.video_path.parent
    silent = folder / "silent.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(demo_clip.video_path),
                    "-an", "-c:v", "copy", str(silent)], check=True)
    return {"video": str(demo_clip.video_path), "wav": str(demo_clip.wav_path), "silent": str(silent), "folder": folder}


def _server(work, media) -> ServerProcess:
    return ServerProcess(work, workers=2, fake=False, roots=(media["folder"], work),
                         env={"AVFACE_CACHE_DIR": str(work / "cache")}).start()


@pytest.fixture(scope="module")
def server(tmp_path_factory, media):
    s = _server(tmp_path_factory.mktemp("addon-service"), media)
    yield s
    s.stop()


def _assert_vertices(report):
    for t, err, tol in zip(report["frames"], report["max_error_m"], report["tolerance_m"]):
        assert err <= tol, f"frame {t}: vertices differ by up to {err:.3g} m (tolerance {tol:.3g} m)"


def test_end_to_end_from_a_movie_strip(blender, server, media, tmp_path):
    """From a strip whose footage lies outside the server's roots, so it is uploaded: the
    scene and every message name the user's file, never the backend's copy of it."""
    import shutil

    outside = tmp_path / "footage outside the roots"
    outside.mkdir()
    video = shutil.copy(media["video"], outside / "take 3.mp4")
    report = blender.run("bl_reconstruct.py", "end_to_end", env=isolated_home(tmp_path), address=server.address,
                         video=str(video), sound=media["wav"], frames=[0, 10, 29 - TRIM_START], trim_start=TRIM_START)
    _assert_vertices(report)
    # the backdrop is the user's file (same bytes as the upload: compare the paths), at the strip's frame 0
    assert report["backdrop"] == str(video) and report["backdrop_start"] == 10
    bad = report["bad_range"]
    assert bad["uploaded"] and "is not inside the clip take 3.mp4, which has 30 frames" in bad["message"], bad
    assert "video.mp4" not in bad["message"] and "/input/" not in bad["message"], bad
    # the panel's message follows the job's stage
    assert report["running"] and all(message.startswith(f"{stage}") for stage, message in report["running"]), \
        report["running"]
    assert not any("input/video" in message for _, message in report["running"])
    # source frame TRIM_START is the strip's first visible frame, at scene frame 10 + TRIM_START
    assert report["first_key_frame"] == 10 + TRIM_START
    assert report["n_frames"] == 30 - TRIM_START
    # the panel (drawn into a recording layout) shows the strip, then progress and Cancel, then the outcome
    panel = report["panel"]
    assert "Strip: clip" in panel["before"] and "(avface.reconstruct)" in panel["before"]
    assert any(line.startswith("<") for line in panel["running"]) and "(avface.cancel)" in panel["running"]
    assert any(line.startswith("Imported") for line in panel["after"]), panel["after"]
    assert report["audio_present"] is True and "video only" not in report["message"]
    # the editor's 1920x1080 output is left alone, and the message says the camera needs the video's size
    assert "for the camera to match" in report["message"], report["message"]
    # progress reached the panel stage by stage (each tick sees the latest; a cached stage may pass unseen)
    assert "fit" in report["stages"] and len(report["stages"]) >= 3, report["stages"]
    assert len(report["animated_properties"]) == 55
    job = server.client().status(report["job_id"])
    assert job["video"]["mode"] == "upload" and job["video"]["name"] == "take 3.mp4", job["video"]
    if blender.major_minor >= (5, 0):
        # the separate WAV of the sound strip reached the backend
        assert report["sound_strip"] and job["audio"] is not None and job["audio"]["name"].endswith(".wav")
    else:
        # the bpy 4.2 wheel has no Audaspace, so no sound strip: the video's own track was used
        assert not report["sound_strip"] and job["audio"] is None


def test_backend_not_running_and_autostart_off(blender, tmp_path, media):
    """Default preferences and no sound strip: the message says one thing, what to do about
    the backend (the no-sound note is not pasted into it)."""
    report = blender.run("bl_reconstruct.py", "not_running", env=isolated_home(tmp_path), address="tcp://127.0.0.1:9",
                         video=media["silent"], sound=None)
    assert report["message"] == ("The AVFace backend is not reachable at tcp://127.0.0.1:9: switch on 'Start a local "
                                 "backend automatically' in the add-on's preferences, or run `avface serve`")


def test_strip_without_sound_reconstructs_video_only(blender, server, media, tmp_path):
    report = blender.run("bl_reconstruct.py", "no_sound", env=isolated_home(tmp_path), address=server.address,
                         video=media["silent"], frames=CHECK_FRAMES)
    assert "no sound" in report["first_message"] and "video only" in report["message"]
    assert report["audio_present"] is False
    _assert_vertices(report)


def test_cancel_stops_the_job_on_the_backend(blender, server, media, tmp_path):
    report = blender.run("bl_reconstruct.py", "cancel", env=isolated_home(tmp_path), address=server.address,
                         video=media["video"], sound=media["wav"])
    assert report["server_state"] == "cancelled" and report["message"] == "Cancelled"


def test_backend_dies_mid_job(blender, media, tmp_path):
    (tmp_path / "doomed").mkdir()
    doomed = _server(tmp_path / "doomed", media)
    try:
        report = blender.run("bl_reconstruct.py", "backend_dies", env=isolated_home(tmp_path), address=doomed.address,
                             video=media["video"], sound=media["wav"], server_pid=doomed.proc.pid)
    finally:
        doomed.stop()
    assert "Lost the AVFace backend" in report["message"] and report["job_id"] in report["message"]


def test_job_from_an_earlier_session_can_be_fetched(blender, server, media, tmp_path):
    env = isolated_home(tmp_path)
    first = blender.run("bl_reconstruct.py", "start_and_quit", env=env, address=server.address,
                        video=media["video"], sound=media["wav"])
    report = blender.run("bl_reconstruct.py", "fetch_earlier", env=env, address=server.address, key=first["key"],
                         frames=CHECK_FRAMES)
    _assert_vertices(report)


@pytest.fixture(scope="module")
def corrupt_job(server, media):
    """A finished job whose result.npz on the backend is cut in half, consistently with its
    manifest (so the transfer succeeds and the damage reaches the importer)."""
    client = server.client(timeout_s=10.0)
    run = client.run(JobRun(client, video=media["video"], upload=False))
    assert run.phase == "done", run.error
    job_dir = server.data_dir / "jobs" / run.job_id
    result = next(job_dir.rglob("result.npz"))
    data = result.read_bytes()[: result.stat().st_size // 2]
    result.write_bytes(data)
    manifest_path = result.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"]:
        if entry["path"] == "result.npz":
            entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    return run.job_id


def test_corrupt_result_is_reported_and_nothing_built(blender, server, media, corrupt_job, tmp_path):
    report = blender.run("bl_reconstruct.py", "fetch_corrupt", env=isolated_home(tmp_path), address=server.address,
                         job_id=corrupt_job, video=media["video"])
    assert "cannot be imported" in report["message"] and "not a readable AVFace result" in report["message"]


def test_job_that_hangs_times_out_on_the_backend(blender, tmp_path):
    from service_util import fake_clip

    work = tmp_path / "hang"
    work.mkdir()
    hanging = ServerProcess(work, fake=True, args=("--hang-timeout-s", "1")).start()
    try:
        clip = fake_clip(work / "in", stages=["decode"], hang_s=120)
        report = blender.run("bl_reconstruct.py", "backend_timeout", env=isolated_home(tmp_path),
                             address=hanging.address, video=str(clip))
    finally:
        hanging.stop()
    assert "job_timeout" in report["message"] and "no progress" in report["message"]


def _backend_at(port):
    """The pid of an `avface serve` bound to ``port`` (a check failed before saying), or None."""
    import os

    for d in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read()
        except OSError:
            continue
        if b"serve" in cmd and f"127.0.0.1:{port}".encode() in cmd:
            return int(d)
    return None


def test_autostart_starts_a_local_backend_that_stops_with_blender(blender, media, tmp_path):
    """Blender A starts a local backend and runs a job on it, the panel's message following the
    job's stages; Blender B, started while A runs, uses that backend (no second start) and
    quits, which leaves it to A; when A quits, the backend stops."""
    import os
    import signal
    import socket
    import sys
    import threading

    from service_util import pid_gone, wait_for

    with socket.socket() as s:  # a free loopback port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    env = isolated_home(tmp_path)
    ready, go = tmp_path / "a-ready.json", tmp_path / "a-go"
    first: dict = {}

    def blender_a():
        try:
            first["report"] = blender.run("bl_reconstruct.py", "autostart", env=env, address=address,
                                          video=media["video"], sound=media["wav"], executable=sys.executable,
                                          ready_file=str(ready), go_file=str(go))
        except BaseException as e:  # reported by the main thread
            first["error"] = e

    thread = threading.Thread(target=blender_a)
    thread.start()
    pid = None
    try:
        try:
            wait_for(lambda: ready.exists() or not thread.is_alive(), timeout_s=600, interval_s=0.5,
                     what="Blender A's job")
            if "error" in first:
                raise first["error"]
            pid = json.loads(ready.read_text())["pid"]
            second = blender.run("bl_reconstruct.py", "autostart_reuse", env=env, address=address,
                                 video=media["video"], sound=media["wav"], executable=sys.executable)
            assert not second["started"] and second["recorded_pid"] == pid, second
            assert not pid_gone(pid), "Blender B quit and stopped the backend Blender A still uses"
        finally:
            go.touch()
            thread.join(120)
        if "error" in first:
            raise first["error"]
        report = first["report"]
        assert report["message"].startswith("Imported")
        assert report["recorded_pid"] == pid and report["blender_pid"] in report["owners"]
        messages = [m for _, _, m in report["seen"]]
        assert "starting a local backend" in messages, messages
        running = [(stage, m) for state, stage, m in report["seen"] if state == "running" and stage]
        assert running and all(m.startswith(stage) for stage, m in running), running
        assert {"tracking", "fit"} <= {stage for stage, _ in running}, running
        # Blender A has quit: the backend it started stops with it
        wait_for(lambda: pid_gone(pid), timeout_s=30, what="the autostarted backend to stop when Blender quit")
    finally:  # whatever failed, no backend is left behind
        pid = pid or _backend_at(port)
        if pid is not None and not pid_gone(pid):
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: pid_gone(pid), timeout_s=20, what="the autostarted backend to stop")


def test_remote_backend_needs_online_access(blender, media, tmp_path):
    report = blender.run("bl_reconstruct.py", "online_access_refused", env=isolated_home(tmp_path), video=media["video"])
    assert "online access is off" in report["message"] and report["jobs"] == 0
