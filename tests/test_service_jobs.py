"""Whole jobs through a real server subprocess with the controllable fake pipeline: by path
and by uploaded bytes, events in order, the job folder, status/list/delete, idempotent
retries. (The same with the real pipeline on the demo clip: test_service_real.py.)"""
from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import pytest
from conftest import assert_close
from fake_pipeline import expected_frames, validate
from service_util import fake_clip, make_server, send_raw, wait_for  # noqa: F401  (make_server is a fixture)

from avface.service import protocol as P
from avface.service.client import JobRun, ServiceError

STAGES = ["decode", "track", "fit"]


def check_events(events: list[dict], stages=STAGES) -> None:
    """Sequence numbers 1, 2, ... without gaps; states queued → running → done; stages in
    pipeline order, each stage's fraction never going back and ending at 1."""
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    states = [e["state"] for e in events if e["kind"] == "state"]
    assert states[-3:] == [P.QUEUED, P.RUNNING, P.DONE], states
    seen: list[str] = []
    last: dict[str, float] = {}
    for e in (e for e in events if e["kind"] == "progress"):
        if e["stage"] not in seen:
            seen.append(e["stage"])
        assert e["stage"] == seen[-1], f"stage {e['stage']} came back after {seen[-1]}"
        assert e["fraction"] >= last.get(e["stage"], 0.0)
        last[e["stage"]] = e["fraction"]
    assert seen == stages
    assert all(last[s] == 1.0 for s in stages)


def check_result(out_dir, spec: dict, *, n_detail: int = 3) -> dict:
    meta = validate(out_dir / "result.npz")
    with np.load(out_dir / "result.npz") as z:
        assert_close(z["frames"], expected_frames(spec), what="result frames")
    assert sorted(p.name for p in (out_dir / "detail").iterdir()) == [f"{i:06d}.png" for i in range(n_detail)]
    assert not list(out_dir.rglob("*.part"))
    return meta


def test_full_job_by_path(make_server, tmp_path):
    server = make_server()
    spec = {"stages": STAGES, "steps": 4, "step_s": 0.02, "seed": 11}
    clip = fake_clip(tmp_path / "in", **spec)
    client = server.client()
    run = JobRun(client, video=clip, out_dir=tmp_path / "out", options={"model": "default"})
    events: list[dict] = []
    client.run(run, on_step=lambda r, evs: events.extend(evs))
    assert run.phase == "done", run.error
    assert run.result_path == tmp_path / "out" / "result.npz"
    check_events(events)
    meta = check_result(tmp_path / "out", spec)
    assert meta["video_sha256"] == hashlib.sha256(clip.read_bytes()).hexdigest()
    assert run.result_meta == meta

    # the job folder holds the reference, options, log, events, state and result
    job = client.status(run.job_id)
    assert job["state"] == P.DONE and job["attempts"] == 1 and job["video"]["mode"] == "path"
    folder = server.data_dir / "jobs" / run.job_id
    record = json.loads((folder / "job.json").read_text())
    assert record["video"]["path"] == str(clip.resolve()) and record["options"] == {"model": "default"}
    assert (folder / "worker.log").stat().st_size > 0
    assert len((folder / "events.jsonl").read_text().splitlines()) == job["last_seq"] == len(events)
    assert (folder / "result" / "manifest.json").exists()


def test_full_job_with_uploaded_bytes(make_server, tmp_path):
    server = make_server(args=("--max-frame-bytes", str(256 << 10)))  # several chunks per file
    spec = {"stages": STAGES, "steps": 3, "step_s": 0.01, "seed": 5, "pad": "x" * 600_000, "n_detail": 40}
    clip = fake_clip(tmp_path / "in", **spec)
    audio = tmp_path / "in" / "speech.wav"
    audio.write_bytes(np.random.default_rng(0).bytes(700_000))
    client = server.client()
    assert client.hello()["limits"]["chunk_bytes"] == 256 << 10
    run = JobRun(client, video=clip, audio=audio, transcript="bin blue at f two now", out_dir=tmp_path / "out",
                 upload=True)
    events: list[dict] = []
    phases = []
    client.run(run, on_step=lambda r, evs: (events.extend(evs), phases.append(r.phase)))
    assert run.phase == "done", run.error
    assert "hashing" in phases and "uploading" in phases and "fetching" in phases
    assert run.upload_bytes == run.upload_total == clip.stat().st_size + audio.stat().st_size
    check_events(events)
    meta = check_result(tmp_path / "out", spec, n_detail=40)
    assert meta["video_sha256"] == hashlib.sha256(clip.read_bytes()).hexdigest()
    assert meta["audio_sha256"] == hashlib.sha256(audio.read_bytes()).hexdigest()
    folder = server.data_dir / "jobs" / run.job_id
    assert (folder / "input" / "video.json").read_bytes() == clip.read_bytes()
    assert (folder / "input" / "audio.wav").read_bytes() == audio.read_bytes()
    assert (folder / "input" / "transcript.txt").read_text() == "bin blue at f two now"
    job = client.status(run.job_id)
    assert job["video"]["mode"] == "upload" and job["audio"]["size"] == audio.stat().st_size


def test_hello_reports_versions_models_and_limits(make_server):
    server = make_server()
    client = server.client()
    hello = wait_for(lambda: (h := client.hello())["probe"] == "done" and h, what="the model probe")
    assert hello["protocol_version"] == P.PROTOCOL_VERSION and hello["server"] == "avface"
    assert hello["models"]["default"]["available"] is True
    assert hello["models"]["flame"] == {"available": False, "reason": "fake pipeline: no FLAME files"}
    assert hello["device"] == "cpu" and hello["auth"] == "none" and hello["accepts_paths"] is True
    assert hello["limits"]["max_frame_bytes"] == P.DEFAULT_MAX_FRAME_BYTES
    with pytest.raises(ServiceError) as e:
        client.call("submit", {"video": {"path": str(fake_clip(server.work))}, "options": {"model": "flame"}})
    assert e.value.code == "model_file" and "no FLAME" in e.value.message
    with pytest.raises(ServiceError) as e:
        client.call("submit", {"video": {"path": str(fake_clip(server.work))}, "options": {"model": "nope"}})
    assert e.value.code == "bad_input"


def test_status_list_and_delete(make_server, tmp_path):
    server = make_server()
    client = server.client()
    done = client.submit(fake_clip(tmp_path, "a.json", steps=1))
    server.wait_state(client, done, P.DONE)
    gate = tmp_path / "gate"
    running = client.submit(fake_clip(tmp_path, "b.json", gate=str(gate)))
    server.wait_state(client, running, P.RUNNING)
    listed = {j["job_id"]: j for j in client.jobs()}
    assert listed[done]["state"] == P.DONE and listed[running]["state"] == P.RUNNING
    assert listed[running]["video"]["name"] == "b.json"
    with pytest.raises(ServiceError) as e:
        client.delete(running)
    assert e.value.code == "job_active"
    with pytest.raises(ServiceError) as e:
        client.call("fetch", {"job_id": running})
    assert e.value.code == "not_ready"
    assert client.delete(done)["deleted"] is True
    assert client.delete(done)["deleted"] is True  # a retried delete is not an error
    assert not (server.data_dir / "jobs" / done).exists()
    with pytest.raises(ServiceError) as e:
        client.status(done)
    assert e.value.code == "unknown_job"
    gate.touch()
    server.wait_state(client, running, P.DONE)


def test_retried_submit_is_the_same_job(make_server, tmp_path):
    """Lazy Pirate resends the very same message; the server must not make a second job."""
    server = make_server()
    client = server.client()
    msg = P.build("submit", {"video": {"path": str(fake_clip(tmp_path, steps=1))}})
    first = send_raw(client, P.encode(msg))
    again = send_raw(client, P.encode(msg))
    assert first.msg_type == again.msg_type == "submit_reply"
    assert first.content["job_id"] == again.content["job_id"]
    assert len(client.jobs()) == 1


def test_upload_chunks_are_idempotent_and_resumable(make_server, tmp_path):
    server = make_server()
    client = server.client()
    data = fake_clip(tmp_path, steps=1).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    job_id = client.call("submit", {"video": {"upload": {"size": len(data), "name": "c.json", "sha256": sha}}})["job_id"]
    assert client.status(job_id)["state"] == P.UPLOADING
    half = len(data) // 2
    r = client.call("upload", {"job_id": job_id, "part": "video", "offset": 0}, buffers=[data[:half]])
    assert r["received"] == half and r["state"] == P.UPLOADING
    r = client.call("upload", {"job_id": job_id, "part": "video", "offset": 0}, buffers=[data[:half]])  # a retry
    assert r["received"] == half
    with pytest.raises(ServiceError) as e:  # a gap
        client.call("upload", {"job_id": job_id, "part": "video", "offset": half + 1}, buffers=[data[half + 1:]])
    assert e.value.code == "upload_mismatch" and e.value.content["received"] == half
    r = client.call("upload", {"job_id": job_id, "part": "video", "offset": half}, buffers=[data[half:]])
    assert r["state"] == P.QUEUED
    with pytest.raises(ServiceError) as e:
        client.call("upload", {"job_id": job_id, "part": "video", "offset": 0}, buffers=[data])
    assert e.value.code == "bad_state"
    server.wait_state(client, job_id, P.DONE)


def test_uploaded_bytes_that_do_not_match_their_sha256_fail_the_job(make_server, tmp_path):
    server = make_server()
    client = server.client()
    data = fake_clip(tmp_path, steps=1).read_bytes()
    job_id = client.call("submit", {"video": {"upload": {"size": len(data), "name": "c.json", "sha256": "0" * 64}}})["job_id"]
    client.call("upload", {"job_id": job_id, "part": "video", "offset": 0}, buffers=[data])
    job = server.wait_state(client, job_id, P.FAILED)
    assert job["error"]["code"] == "upload_mismatch" and job["attempts"] == 1
    assert os.path.exists(server.data_dir / "jobs" / job_id / "input" / "video.json")


def test_the_head_can_be_fetched_before_the_detail_and_outlives_a_cancel(make_server, tmp_path):
    """A job reports its head (the result but for its detail maps) while it goes on; a client
    can fetch that head at once, and a cancel in the fine stage keeps it fetchable."""
    server = make_server()
    client = server.client()
    gate = tmp_path / "gate"
    job = client.submit(fake_clip(tmp_path, "h.json", steps=1, head=True, gate=str(gate), seed=5))
    wait_for(lambda: client.status(job)["head_ready"], what="the head")
    assert client.status(job)["state"] == P.RUNNING
    with pytest.raises(ServiceError) as e:  # a plain fetch still waits for the whole result
        client.fetch(job, tmp_path / "whole-too-early")
    assert e.value.code == "not_ready"
    head = client.fetch(job, tmp_path / "head", head=True)
    assert validate(head)["detail"]["state"] == "pending" and not (tmp_path / "head" / "detail").exists()
    assert client.call("fetch", {"job_id": job})["complete"] is False
    client.cancel(job)
    server.wait_state(client, job, P.CANCELLED)
    again = client.fetch(job, tmp_path / "head-after-cancel", head=True)
    assert validate(again)["detail"]["state"] == "pending"  # the fake pipeline does not rewrite it
    said = client.call("fetch", {"job_id": job})["meta"]["detail"]
    assert said["state"] == "cancelled" and said["reason"] == "cancelled"  # the server says how the job ended
    listed = [f["path"] for f in client.call("fetch", {"job_id": job})["manifest"]["files"]]
    assert "result.npz" in listed and not any(p.startswith("detail/") for p in listed)

    # the same with the gate open: the events say head, then done; the result is whole
    gate.touch()
    run = JobRun(client, video=fake_clip(tmp_path, "h2.json", steps=1, head=True, seed=6), out_dir=tmp_path / "whole")
    events: list[dict] = []
    client.run(run, on_step=lambda r, evs: events.extend(evs))
    assert run.phase == "done", run.error
    marks = [("head" if e.get("head") else e["state"]) for e in events if e["kind"] == "state"]
    assert marks[-3:] == [P.RUNNING, "head", P.DONE], marks
    meta = check_result(tmp_path / "whole", {"seed": 6})
    assert meta["detail"]["state"] == "complete"


def test_an_idle_server_exits_on_its_own_but_never_under_a_job(make_server, tmp_path):
    """``--idle-exit-s``: what a backend started by Blender uses, so that it ends even when the
    Blender that started it crashed. A running job, however long, keeps it up."""
    server = make_server(args=("--idle-exit-s", "1.5"))
    client = server.client()
    gate = tmp_path / "gate"
    job = client.submit(fake_clip(tmp_path, "long.json", steps=1, gate=str(gate)))
    server.wait_state(client, job, P.RUNNING)
    time.sleep(3.0)  # twice the idle limit, with a job running
    assert server.proc.poll() is None, server.log()
    gate.touch()
    server.wait_state(client, job, P.DONE)
    client.close()
    wait_for(lambda: server.proc.poll() is not None, timeout_s=30, what="the idle server to exit")
    assert server.proc.returncode == 0, server.log()
    assert "--idle-exit-s" in server.log()
