"""The acceptance job with the real pipeline: the synthetic demo clip through a real server,
by path and as uploaded bytes, progress events in order, results that validate; and a
corrupt video and a video with no face answered with their codes."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from service_util import ServerProcess, wait_for

from avface.service import protocol as P
from avface.service.client import JobRun

pytestmark = pytest.mark.slow

DEMO_SECONDS = 2.0
PIPELINE_STAGES = ["probe", "tracking", "audio", "confidence", "camera", "networks", "fit", "lips", "export", "detail"]
"""What a job with the default options runs, in order (the fine stage is on by default, after
the head is written)."""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from avface.synth import make_demo_clip

    return make_demo_clip(tmp_path_factory.mktemp("demo"), seed=0, duration_s=DEMO_SECONDS, size=256)


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo):
    work = tmp_path_factory.mktemp("real-service")
    s = ServerProcess(work, workers=2, fake=False, roots=(demo.video_path.parent, work),
                      env={"AVFACE_CACHE_DIR": str(work / "cache")}).start()
    yield s
    s.stop()


def check_real_events(events: list[dict]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    # the head is reported (a state event that stays running) between the export and the detail
    marks = [("head" if e.get("head") else e["state"]) for e in events if e["kind"] == "state"]
    assert marks[-4:] == [P.QUEUED, P.RUNNING, "head", P.DONE], marks
    head_seq = next(e["seq"] for e in events if e.get("head"))
    last_export = max(e["seq"] for e in events if e["kind"] == "progress" and e["stage"] == "export")
    first_detail = min(e["seq"] for e in events if e["kind"] == "progress" and e["stage"] == "detail")
    assert last_export < head_seq < first_detail
    order: list[str] = []
    for e in events:
        if e["kind"] == "progress" and e["stage"] not in order:
            order.append(e["stage"])
    assert order == PIPELINE_STAGES, order
    for stage in PIPELINE_STAGES:
        fractions = [e["fraction"] for e in events if e["kind"] == "progress" and e["stage"] == stage]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0, (stage, fractions)


def test_demo_clip_by_path_and_as_bytes(server, demo, tmp_path):
    from avface.result import load_result, validate

    client = server.client(timeout_s=10.0)
    hello = wait_for(lambda: (h := client.hello())["probe"] == "done" and h, timeout_s=60, what="the model probe")
    assert hello["models"]["default"]["available"] is True
    assert hello["models"]["flame"]["available"] is False and hello["models"]["flame"]["reason"]
    assert hello["device"] == "cpu" and hello["torch"]

    runs = {"path": JobRun(client, video=demo.video_path, out_dir=tmp_path / "path", upload=False),
            "bytes": JobRun(client, video=demo.video_path, out_dir=tmp_path / "bytes", upload=True)}
    events: dict[str, list[dict]] = {k: [] for k in runs}
    for _ in range(20_000):  # bounded: each step waits at most 50 ms
        if all(r.finished for r in runs.values()):
            break
        for key, run in runs.items():
            events[key] += run.step(0.05)
    metas = {}
    for key, run in runs.items():
        assert run.phase == "done", (key, run.error)
        check_real_events(events[key])
        metas[key] = validate(run.result_path)
        assert metas[key]["n_frames"] == demo.n_frames and metas[key]["audio_present"] is True
        assert (run.result_path.parent / "config.yaml").exists()
        # the default job has the fine stage's maps, fetched beside the result
        assert metas[key]["detail"]["n_maps"] == demo.n_frames
        # no field of view given: the job estimated the demo camera's (40 degrees) from the video
        cam = metas[key]["camera"]
        assert cam["estimated"] and 25.0 < cam["fov_deg"] < 55.0, cam
        assert len(list((run.result_path.parent / "detail").glob("frame_*.png"))) == demo.n_frames
    assert client.status(runs["bytes"].job_id)["video"]["mode"] == "upload"
    a, b = load_result(runs["path"].result_path), load_result(runs["bytes"].result_path)
    assert a.arrays["vertices"].shape == b.arrays["vertices"].shape == (demo.n_frames, *a.arrays["vertices_neutral"].shape)
    assert np.array_equal(a.arrays["faces"], b.arrays["faces"])
    # torch ran in the workers only: the socket loop's process never loaded it
    assert "libtorch" not in (Path("/proc") / str(server.proc.pid) / "maps").read_text()


def test_audio_transcript_and_stage_options_reach_the_pipeline(server, demo):
    """Every option of ReconstructOptions travels through submit: a separate audio file and a
    transcript (paths under the server's roots) and a stage's section; the fine stage's
    detail maps come back with the result (small maps, few steps)."""
    import yaml

    from avface.result import load_result

    work = server.data_dir.parent
    transcript = work / "transcript.txt"
    transcript.write_text(demo.text)
    client = server.client(timeout_s=10.0)
    options = {"audio": str(demo.wav_path), "transcript": str(transcript), "fit": {"iterations": 7},
               "tracking": {"hands": False}, "detail": True,
               "fine": {"map_size": 32, "steps": 3, "train_frames": 4}}
    run = JobRun(client, video=demo.video_path, out_dir=work / "options-run", upload=False, options=options)
    for _ in range(20_000):  # bounded: each step waits at most 50 ms
        if run.finished:
            break
        run.step(0.05)
    assert run.phase == "done", run.error
    meta = load_result(run.result_path).meta
    assert meta["source"]["audio"] == str(demo.wav_path.resolve())
    assert meta["transcript_aligned"] is True and meta["audio_present"] is True
    config = yaml.safe_load((run.result_path.parent / "config.yaml").read_text())
    assert config["fit"]["iterations"] == 7 and config["tracking"]["hands"] is False
    assert config["transcript"] == str(transcript.resolve())
    # load_result read every fetched map (count, size, bit depth)
    assert meta["detail"]["n_maps"] == meta["n_frames"] and meta["detail"]["map_size"] == 32
    assert len(list((run.result_path.parent / "detail").glob("*.png"))) == meta["n_frames"]


def test_corrupt_video_and_no_face(server, tmp_path):
    import imageio_ffmpeg

    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x20ftypisom" + np.random.default_rng(3).bytes(20_000))
    noface = tmp_path / "noface.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc=size=128x128:rate=10",
                    "-t", "1", "-pix_fmt", "yuv420p", str(noface)], check=True)
    client = server.client(timeout_s=10.0)
    jobs = {"bad_media": client.submit(corrupt), "no_face": client.submit(noface)}
    for code, job_id in jobs.items():
        job = server.wait_state(client, job_id, P.FAILED, timeout_s=120)
        assert job["error"]["code"] == code, job["error"]
        assert job["attempts"] == 1
    assert client.hello()["server"] == "avface"
