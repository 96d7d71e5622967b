"""Load: 8 clients submitting 3 jobs each at once. Every result correct, none lost, hello
answered throughout, never more workers than configured. Latency and memory figures come
from ``avface bench-service`` (smoke-tested at the end), not from a timed test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
from conftest import assert_close
from fake_pipeline import expected_frames, validate
from service_util import TESTS_DIR, fake_clip, make_server  # noqa: F401  (make_server is a fixture)

from avface.service import protocol as P
from avface.service.client import Client, JobRun

CLIENTS, JOBS_PER_CLIENT, WORKERS = 8, 3, 2


def test_8_clients_3_jobs_each(make_server, tmp_path):
    server = make_server(workers=WORKERS)
    results: dict[tuple[int, int], JobRun] = {}
    errors: list[str] = []
    hellos: list[dict] = []
    stop = threading.Event()

    def pinger():
        with Client(server.address, timeout_s=5.0, retries=2) as c:
            while not stop.is_set():
                hellos.append(c.hello())
                stop.wait(0.05)

    def client(i: int):
        try:
            with Client(server.address, timeout_s=10.0, retries=3) as c:
                runs = {}
                for k in range(JOBS_PER_CLIENT):
                    # every job has its own seed: a result that went to the wrong client shows
                    spec = {"seed": 100 * i + k, "steps": 2, "step_s": 0.005}
                    upload = (i + k) % 2 == 0  # half the jobs send bytes, half send paths
                    runs[k] = JobRun(c, video=fake_clip(tmp_path / "in", f"c{i}j{k}.json", **spec),
                                     out_dir=tmp_path / "out" / f"c{i}j{k}", upload=upload)
                for _ in range(100_000):  # bounded: every step waits up to 20 ms
                    if all(r.finished for r in runs.values()):
                        break
                    for r in runs.values():
                        r.step(0.02)
                results.update({(i, k): r for k, r in runs.items()})
        except Exception as e:  # reported below; a thread must not die silently
            errors.append(f"client {i}: {type(e).__name__}: {e}")

    ping = threading.Thread(target=pinger, daemon=True)
    ping.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    stop.set()
    ping.join(30)
    assert not errors, errors
    assert len(results) == CLIENTS * JOBS_PER_CLIENT
    for (i, k), run in sorted(results.items()):
        assert run.phase == "done", ((i, k), run.error)
        validate(run.result_path)
        with np.load(run.result_path) as z:
            assert_close(z["frames"], expected_frames({"seed": 100 * i + k}), what=f"client {i} job {k} frames")
    with Client(server.address) as c:
        listed = c.jobs()
        stats = c.stats()
    assert len(listed) == CLIENTS * JOBS_PER_CLIENT and all(j["state"] == P.DONE for j in listed)
    assert all(j["attempts"] == 1 for j in listed)
    assert len({r.job_id for r in results.values()}) == CLIENTS * JOBS_PER_CLIENT
    assert len(hellos) > 5 and all(h["server"] == "avface" for h in hellos)
    assert stats["peak_workers"] <= WORKERS
    assert stats["peak_total_rss_bytes"] <= stats["server_peak_rss_bytes"] + WORKERS * stats["peak_worker_rss_bytes"]


def test_bench_service_runs(tmp_path):
    """The benchmark itself, tiny, on the fake pipeline: it reports the figures and exits 0."""
    clip = fake_clip(tmp_path / "in", steps=1, step_s=0.0)
    env = dict(os.environ, AVFACE_PIPELINE="fake_pipeline",
               PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "avface", "bench-service", "--clients", "2",
                          "--jobs-per-client", "2", "--workers", "2", "--video", str(clip),
                          "--json", str(tmp_path / "bench.json"), "--work-dir", str(tmp_path / "work")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["jobs"] == report["correct"] == report["identical_to_first"] == 4 and report["lost"] == 0
    assert report["hello_ms"]["n"] > 0 and report["hello_ms"]["failures"] == 0
    assert report["peak_concurrent_workers"] <= 2 and report["memory_mib"]["server_peak"] > 0
    assert "hello" in out.stdout and "memory" in out.stdout
