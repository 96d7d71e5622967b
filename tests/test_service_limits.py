"""What the Blender add-on needs from the service (docs/protocol.md): a job that hangs is
stopped with its own code, a video over the duration limit is refused at submit (before any
worker starts), and a frame too big for ZeroMQ to deliver ends in a client error that names
the limit."""
from __future__ import annotations

import subprocess

import imageio_ffmpeg
import pytest
from service_util import fake_clip, make_server, pid_gone, wait_for  # noqa: F401  (make_server is a fixture)

from avface.service import protocol as P
from avface.service.client import Client, JobRun, ServiceError

HANG_TIMEOUT_S = 1.0


def test_a_silent_worker_is_stopped_with_job_timeout(make_server, tmp_path):
    server = make_server(args=("--hang-timeout-s", str(HANG_TIMEOUT_S)))
    client = server.client()
    run = client.run(JobRun(client, video=fake_clip(tmp_path / "in", stages=["decode"], hang_s=120),
                            out_dir=tmp_path / "out"))
    assert run.phase == "failed" and run.error.code == "job_timeout", run.error
    assert "no progress for 1 s" in run.error.message and "--hang-timeout-s" in run.error.message
    job = client.status(run.job_id)
    assert job["state"] == P.FAILED and job["attempts"] == 1  # not retried
    assert not server.worker_pids()
    # a job that reports progress is not hung, however long it runs
    ok = client.run(JobRun(client, video=fake_clip(tmp_path / "in2", steps=30, step_s=0.05, seed=3),
                           out_dir=tmp_path / "out2"))
    assert ok.phase == "done", ok.error
    assert client.hello()["limits"]["hang_timeout_s"] == HANG_TIMEOUT_S


def _video(path, seconds):
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    f"testsrc=size=64x64:rate=25:duration={seconds}", "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def test_a_video_over_the_duration_limit_is_refused_at_submit(make_server, tmp_path):
    server = make_server(args=("--max-duration-s", "1"))
    client = server.client()
    video = _video(tmp_path / "long.mp4", 2)
    with pytest.raises(ServiceError) as e:
        client.call("submit", {"video": {"path": str(video)}})
    assert e.value.code == "too_long" and "2.0 s long" in e.value.message
    assert client.jobs() == []  # no job was made, so no worker ever started
    # within the limit through a frame range: accepted
    job_id = client.call("submit", {"video": {"path": str(video)}, "options": {"frame_end": 20}})["job_id"]
    client.cancel(job_id)
    # uploaded bytes: refused when the upload completes, before the job is queued
    run = client.run(JobRun(client, video=video, upload=True, out_dir=tmp_path / "out"))
    assert run.phase == "failed" and run.error.code == "too_long", run.error
    job = client.status(run.job_id)
    assert job["state"] == P.FAILED and job["attempts"] == 0


def test_a_frame_too_big_to_deliver_names_the_limit(make_server):
    server = make_server()
    client = Client(server.address, timeout_s=1.0, retries=0)
    try:
        big = bytes(P.HARD_FRAME_CAP_BYTES + 1)
        with pytest.raises(ServiceError) as e:
            client.call("upload", {"job_id": "0" * 32, "part": "video", "offset": 0}, buffers=[big])
        assert e.value.code == "no_answer"
        assert f"{len(big):,}-byte frame" in e.value.message and f"{P.HARD_FRAME_CAP_BYTES:,}" in e.value.message
    finally:
        client.close()
    assert server.client().ping()  # the server is still serving
