"""Faults, each against a real server subprocess: a client that goes away, a worker that is
killed, a server that is killed and restarted, a job cancelled mid-run. The fake pipeline's
gate keeps a job running until the test lets it finish, so nothing depends on timing
except the 2 s cancellation bound the issue sets."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from service_util import fake_clip, make_server, pid_gone, wait_for  # noqa: F401  (make_server is a fixture)
from test_service_jobs import check_result

from avface.service import protocol as P
from avface.service.client import JobRun

CANCEL_BOUND_S = 2.0


def running_in_gate(server, client, job_id: str, attempt: int = 1) -> dict:
    """Wait until attempt ``attempt`` of the job is inside the fake pipeline's gate."""
    def check():
        job = client.status(job_id)
        ok = job["state"] == P.RUNNING and job["attempts"] == attempt and job["stage"] == "wait" and job["worker_pid"]
        return job if ok else None

    return wait_for(check, what=f"attempt {attempt} of job {job_id} to wait at its gate")


def test_client_disconnects_mid_job_then_reconnects_and_fetches(make_server, tmp_path):
    server = make_server()
    gate = tmp_path / "gate"
    spec = {"gate": str(gate), "seed": 21}
    first = server.client()
    run = JobRun(first, video=fake_clip(tmp_path / "in", **spec), out_dir=tmp_path / "never")
    wait_for(lambda: run.step(0.05) is not None and run.stage == "wait", what="the job to reach its gate")
    job_id = run.job_id
    first.close()  # the client vanishes mid-job (Blender closed)

    gate.touch()
    later = server.client()
    server.wait_state(later, job_id, P.DONE)
    again = later.run(JobRun(later, job_id=job_id, out_dir=tmp_path / "out"))
    assert again.phase == "done", again.error
    check_result(tmp_path / "out", spec)


def test_worker_killed_is_retried_once_then_failed_with_reason(make_server, tmp_path):
    server = make_server()
    client = server.client()
    job_id = client.submit(fake_clip(tmp_path, gate=str(tmp_path / "never-opened")))
    pids = []
    for attempt in (1, 2):
        job = running_in_gate(server, client, job_id, attempt)
        pids.append(job["worker_pid"])
        os.kill(job["worker_pid"], signal.SIGKILL)
    job = server.wait_state(client, job_id, P.FAILED)
    assert pids[0] != pids[1]
    assert job["attempts"] == 2
    assert job["error"]["code"] == "worker_died"
    assert job["error"]["message"].count("killed by SIGKILL during stage wait") == 2, job["error"]["message"]
    assert [h["outcome"] for h in job["history"]] == ["died", "died"]

    # the server goes on serving
    assert client.hello()["server"] == "avface"
    spec = {"seed": 4}
    run = client.run(JobRun(client, video=fake_clip(tmp_path, "next.json", **spec), out_dir=tmp_path / "out"))
    assert run.phase == "done", run.error
    check_result(tmp_path / "out", spec)


def test_worker_killed_once_then_the_retry_succeeds(make_server, tmp_path):
    server = make_server()
    client = server.client()
    spec = {"fail": "crash_once", "marker": str(tmp_path / "crashed"), "seed": 8}
    events: list[dict] = []
    run = client.run(JobRun(client, video=fake_clip(tmp_path, **spec), out_dir=tmp_path / "out"),
                     on_step=lambda r, evs: events.extend(evs))
    assert run.phase == "done", run.error
    check_result(tmp_path / "out", spec)
    job = client.status(run.job_id)
    assert job["attempts"] == 2 and [h["outcome"] for h in job["history"]] == ["died", "done"]
    states = [(e["state"], e["attempt"]) for e in events if e["kind"] == "state"]
    assert states == [(P.QUEUED, 0), (P.RUNNING, 1), (P.QUEUED, 1), (P.RUNNING, 2), (P.DONE, 2)]


def test_unexpected_exception_is_retried_then_failed(make_server, tmp_path):
    server = make_server()
    client = server.client()
    job_id = client.submit(fake_clip(tmp_path, fail="exception"))
    job = server.wait_state(client, job_id, P.FAILED)
    assert job["attempts"] == 2 and job["error"]["code"] == "internal"
    assert "CUDA out of memory" in job["error"]["message"] and "Traceback" in job["error"]["detail"]


def test_server_killed_and_restarted(make_server, tmp_path):
    server = make_server(workers=1)
    client = server.client()
    finished_spec = {"seed": 1}
    finished = client.submit(fake_clip(tmp_path, "finished.json", **finished_spec))
    server.wait_state(client, finished, P.DONE)
    gate = tmp_path / "gate"
    interrupted_spec = {"gate": str(gate), "seed": 2}
    interrupted = client.submit(fake_clip(tmp_path, "interrupted.json", **interrupted_spec))
    queued_spec = {"seed": 3}
    queued = client.submit(fake_clip(tmp_path, "queued.json", **queued_spec))
    old_worker = running_in_gate(server, client, interrupted)["worker_pid"]
    assert client.status(queued)["state"] == P.QUEUED

    server.kill()
    # the orphaned worker stops itself when its server's life pipe closes
    wait_for(lambda: pid_gone(old_worker), timeout_s=10, what="the orphaned worker to exit")
    server.start()  # same data dir
    client = server.client()
    gate.touch()
    for job_id, spec, name in ((finished, finished_spec, "f"), (interrupted, interrupted_spec, "i"), (queued, queued_spec, "q")):
        run = client.run(JobRun(client, job_id=job_id, out_dir=tmp_path / name))
        assert run.phase == "done", (name, run.error)
        check_result(tmp_path / name, spec)
    job = client.status(interrupted)
    assert job["attempts"] == 2
    assert job["history"][0] == {"attempt": 1, "outcome": "interrupted", "reason": "the server stopped while the job ran"}
    assert client.status(queued)["attempts"] == 1
    assert client.status(finished)["attempts"] == 1


def test_interrupted_twice_by_server_kills_is_failed(make_server, tmp_path):
    server = make_server()
    client = server.client()
    job_id = client.submit(fake_clip(tmp_path, gate=str(tmp_path / "never")))
    for attempt in (1, 2):
        running_in_gate(server, client, job_id, attempt)
        server.kill()
        server.start()
        client = server.client()
    job = client.status(job_id)
    assert job["state"] == P.FAILED and job["error"]["code"] == "worker_died"
    assert [h["outcome"] for h in job["history"]] == ["interrupted", "interrupted"]


@pytest.mark.parametrize("ignore_term", [False, True], ids=["sigterm", "sigterm-ignored"])
def test_cancel_stops_the_worker_within_2_s(make_server, tmp_path, ignore_term):
    server = make_server()
    client = server.client()
    job_id = client.submit(fake_clip(tmp_path, gate=str(tmp_path / "never"), ignore_term=ignore_term))
    pid = running_in_gate(server, client, job_id)["worker_pid"]
    if ignore_term:  # the fake sets SIG_IGN once inside reconstruct, which the gate proves
        assert not pid_gone(pid)
    reply = client.cancel(job_id)
    acknowledged = time.monotonic()
    assert reply["accepted"] and reply["worker_pid"] == pid
    wait_for(lambda: pid_gone(pid), timeout_s=10, interval_s=0.01, what="the worker to exit")
    stopped_after = time.monotonic() - acknowledged
    assert stopped_after < CANCEL_BOUND_S, f"worker stopped {stopped_after:.2f} s after the cancel was acknowledged"
    job = server.wait_state(client, job_id, P.CANCELLED)
    assert job["error"]["code"] == "cancelled" and job["history"][-1]["outcome"] == "cancelled"
    assert not server.worker_pids()
    assert client.cancel(job_id)["accepted"] is False  # already ended


def test_cancel_a_queued_job_and_through_a_job_run(make_server, tmp_path):
    server = make_server(workers=1)
    client = server.client()
    blocker = client.submit(fake_clip(tmp_path, "blocker.json", gate=str(tmp_path / "gate")))
    running_in_gate(server, client, blocker)
    queued = client.submit(fake_clip(tmp_path, "queued.json"))
    assert client.cancel(queued)["state"] == P.CANCELLED
    run = JobRun(client, job_id=blocker, out_dir=tmp_path / "out")
    run.step(0.1)
    run.cancel()
    client.run(run)
    assert run.phase == "cancelled" and run.error.code == "cancelled"
    assert client.status(blocker)["state"] == P.CANCELLED


def test_a_watch_that_lost_its_subscription_catches_up(make_server, tmp_path):
    """An event the server could not deliver (here: the subscription is gone) is not lost:
    the watch's heartbeat asks again from its last seq and gets the end of the job."""
    server = make_server()
    client = server.client()
    gate = tmp_path / "gate"
    spec = {"gate": str(gate), "seed": 6}
    run = JobRun(client, video=fake_clip(tmp_path, **spec), out_dir=tmp_path / "out")
    wait_for(lambda: run.step(0.05) is not None and run.stage == "wait", what="the job to reach its gate")
    client.call("unwatch", {"job_id": run.job_id})  # the server forgets us; the client does not know
    gate.touch()
    client.run(run)
    assert run.phase == "done", run.error
    check_result(tmp_path / "out", spec)


def test_lazy_pirate_retries_through_a_stalled_server(make_server, tmp_path):
    """The server stops answering for a while (SIGSTOP): the client times out, reconnects
    and sends the same submit again; the server makes one job of it."""
    server = make_server()
    client = server.client(timeout_s=0.3, retries=20)
    client.hello()
    os.kill(server.proc.pid, signal.SIGSTOP)
    resume = threading.Timer(1.0, os.kill, (server.proc.pid, signal.SIGCONT))
    resume.start()
    try:
        job_id = client.submit(fake_clip(tmp_path, seed=12))
    finally:
        resume.join()
        os.kill(server.proc.pid, signal.SIGCONT)
    assert client.reconnects >= 1
    server.wait_state(client, job_id, P.DONE)
    assert [j["job_id"] for j in client.jobs()] == [job_id]
