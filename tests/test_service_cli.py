"""The commands on top of the client, through the main ``avface`` entry point: submit
(progress, result, --detach), jobs, fetch, cancel, and their one-line errors; and that
register() wires every subcommand."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from service_util import TESTS_DIR, fake_clip, make_server, wait_for  # noqa: F401  (make_server is a fixture)
from test_service_jobs import check_result

from avface.service import cli
from avface.service import protocol as P


def avface(*args, timeout=120):
    env = dict(os.environ, AVFACE_PIPELINE="fake_pipeline",
               PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "avface", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_register_adds_every_subcommand():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    cli.register(sub)
    for argv in (["serve"], ["submit", "v.mp4", "-o", "out"], ["jobs"], ["fetch", "x", "-o", "o"], ["cancel", "x"],
                 ["keys"], ["bench-service"]):
        args = ap.parse_args(argv)
        assert callable(args.func), argv


def test_submit_shows_progress_and_writes_the_result(make_server, tmp_path):
    server = make_server()
    spec = {"seed": 9, "stages": ["decode", "track", "fit"]}
    out = avface("submit", fake_clip(tmp_path, **spec), "--server", server.address, "-o", tmp_path / "out",
                 "--model", "default", "--no-vertices")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "out" / "result.npz")
    for stage in ("decode", "track", "fit", "download"):
        assert f"{stage}: 100%" in out.stderr, out.stderr
    check_result(tmp_path / "out", spec)
    job = server.client().jobs()[0]
    assert job["state"] == P.DONE


def test_submit_uploads_when_asked(make_server, tmp_path):
    server = make_server()
    out = avface("submit", fake_clip(tmp_path, seed=2), "--server", server.address, "-o", tmp_path / "out",
                 "--upload", "yes")
    assert out.returncode == 0, out.stderr
    assert "upload: 100%" in out.stderr
    check_result(tmp_path / "out", {"seed": 2})


def test_detach_jobs_fetch_and_cancel(make_server, tmp_path):
    server = make_server()
    gate = tmp_path / "gate"
    out = avface("submit", fake_clip(tmp_path, "slow.json", gate=str(gate), seed=3), "--server", server.address,
                 "--detach")
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    assert P.JOB_ID_RE.match(job_id)

    listing = avface("jobs", "--server", server.address)
    assert listing.returncode == 0 and job_id in listing.stdout and "slow.json" in listing.stdout

    early = avface("fetch", job_id, "--server", server.address, "-o", tmp_path / "early")
    assert early.returncode != 0 and "not_ready" in early.stderr and len(early.stderr.strip().splitlines()) == 1

    gate.touch()
    fetched = avface("fetch", job_id, "--server", server.address, "-o", tmp_path / "out", "--wait")
    assert fetched.returncode == 0, fetched.stderr
    check_result(tmp_path / "out", {"seed": 3})

    other = avface("submit", fake_clip(tmp_path, "other.json", gate=str(tmp_path / "never")), "--server",
                   server.address, "--detach").stdout.strip()
    client = server.client()
    wait_for(lambda: client.status(other)["state"] == P.RUNNING)
    cancelled = avface("cancel", other, "--server", server.address)
    assert cancelled.returncode == 0 and "cancel" in cancelled.stdout
    server.wait_state(client, other, P.CANCELLED)


def test_errors_are_one_line_with_their_exit_status(make_server, tmp_path):
    server = make_server()
    failed = avface("submit", fake_clip(tmp_path, fail="no_face"), "--server", server.address, "-o", tmp_path / "o")
    assert failed.returncode == 4  # NoFaceError.exit_status
    assert failed.stderr.strip().splitlines()[-1].startswith("avface submit: no_face: ")
    missing = avface("submit", tmp_path / "missing.mp4", "--server", server.address, "-o", tmp_path / "o")
    assert missing.returncode == 2 and "is not a file" in missing.stderr
    bad_id = avface("cancel", "../etc", "--server", server.address)
    assert bad_id.returncode != 0 and "bad_job_id" in bad_id.stderr
    nobody = avface("jobs", "--server", "tcp://127.0.0.1:9", "--timeout", "0.2", "--retries", "1")
    assert nobody.returncode != 0 and "no_answer" in nobody.stderr
