"""The service's spare worker: a worker that imports the pipeline before its job comes, so a
job submitted to an idle server does not wait for torch and MediaPipe to load. Real server
subprocess, the controllable fake pipeline."""
from __future__ import annotations

import os
import signal

from fake_pipeline import validate
from service_util import fake_clip, make_server, pid_gone, wait_for  # noqa: F401  (make_server is a fixture)

from avface.service import protocol as P
from avface.service.client import JobRun

SPARE_BANNER = "a spare, ready before the job came"


def _ready_spare(server, client, *, other_than=None) -> int:
    """The pid of a spare worker that has finished importing the pipeline."""
    log = server.data_dir / "spare-worker.log"

    def ready():
        pid = client.stats()["spare_worker_pid"]
        if pid is None or pid == other_than or not log.exists():
            return None
        return pid if log.read_text().count("spare worker ready") >= 1 else None

    return wait_for(ready, timeout_s=60, what="a ready spare worker")


def _job_log(server, run) -> str:
    return (server.data_dir / "jobs" / run.job_id / "worker.log").read_text()


def _run_job(client, tmp_path, name: str):
    clip = fake_clip(tmp_path / "in", name=f"{name}.json", steps=2, step_s=0.01, seed=3)
    run = client.run(JobRun(client, video=clip, out_dir=tmp_path / name))
    assert run.phase == "done", run.error
    validate(tmp_path / name / "result.npz")
    return run


def test_a_job_runs_in_the_spare_that_waited_for_it_and_a_new_one_follows(make_server, tmp_path):
    server = make_server()
    client = server.client()
    spare = _ready_spare(server, client)
    run = _run_job(client, tmp_path, "first")
    log = _job_log(server, run)
    assert f"process {spare}, {SPARE_BANNER}" in log, "the job did not run in the spare worker"
    assert f"job {run.job_id}: reconstruct" in log  # the spare's output went to the job's log
    # once the job is done the server starts another spare, and the next job uses that one
    second = _ready_spare(server, client, other_than=spare)
    run2 = _run_job(client, tmp_path, "second")
    assert f"process {second}, {SPARE_BANNER}" in _job_log(server, run2)
    # stopping the server stops the waiting spare
    third = _ready_spare(server, client, other_than=second)
    server.stop()
    wait_for(lambda: pid_gone(third), timeout_s=10, what="the spare to stop with the server")


def test_a_spare_that_died_is_replaced_and_the_job_still_runs(make_server, tmp_path):
    server = make_server()
    client = server.client()
    spare = _ready_spare(server, client)
    os.kill(spare, signal.SIGKILL)
    run = _run_job(client, tmp_path, "after_kill")  # however soon: a dead spare never takes a job
    job = client.status(run.job_id)
    assert job["state"] == P.DONE and job["attempts"] == 1
    assert f"process {spare}," not in _job_log(server, run)
    _ready_spare(server, client, other_than=spare)


def test_no_spare_worker_starts_each_jobs_worker_with_the_job(make_server, tmp_path):
    server = make_server(args=("--no-spare-worker",))
    client = server.client()
    run = _run_job(client, tmp_path, "plain")
    assert client.stats()["spare_worker_pid"] is None
    assert SPARE_BANNER not in _job_log(server, run)
    assert not (server.data_dir / "spare-worker.log").exists()
