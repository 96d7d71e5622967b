"""``avface bench-service``: many clients against one server, with the figures the issue asks
for: every result correct and none lost, hello latency throughout, and peak memory against
the number of workers.

It starts its own server (a subprocess on a free loopback port, in a temporary data dir),
makes the synthetic demo clip unless ``--video`` is given, and runs ``--clients`` clients in
threads, each submitting ``--jobs-per-client`` jobs at once and fetching the results, while
another client sends hello every ``--hello-interval-s``.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from avface.service import protocol as P

HELLO_BOUND_MS = 200.0
READY_TIMEOUT_S = 60.0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench-service", help="load-test the service: clients x jobs, hello latency, memory",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--jobs-per-client", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--video", type=Path, help="input video (default: the synthetic demo clip)")
    p.add_argument("--duration-s", type=float, default=2.0, help="length of the demo clip (default 2 s)")
    p.add_argument("--upload", action="store_true", help="send the video as bytes instead of its path")
    p.add_argument("--hello-interval-s", type=float, default=0.05)
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout of the clients (s)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--work-dir", type=Path, help="keep the data dir and results here (default: a temp dir, removed)")
    p.set_defaults(func=cmd_bench)


def _validator():
    name = os.environ.get("AVFACE_PIPELINE")  # the worker's test hook, so the bench can run on it too
    mod = importlib.import_module(name) if name else None
    if mod is not None and hasattr(mod, "validate"):
        return mod.validate
    return importlib.import_module("avface.result").validate


def _demo_clip(out_dir: Path, duration_s: float) -> Path:
    from avface.synth import make_demo_clip

    return Path(make_demo_clip(out_dir, seed=0, duration_s=duration_s).video_path)


def start_server(work: Path, workers: int, roots: list[Path]) -> tuple[subprocess.Popen, str]:
    """``avface serve`` on a free loopback port; (process, endpoint)."""
    ready = work / "ready.json"
    cmd = [sys.executable, "-m", "avface", "serve", "--bind", "tcp://127.0.0.1:*", "--workers", str(workers),
           "--data-dir", str(work / "data"), "--ready-file", str(ready)]
    for r in roots:
        cmd += ["--root", str(r)]
    log = open(work / "server.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    end = time.monotonic() + READY_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"the server did not start; see {work / 'server.log'}")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["endpoint"]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_bench(*, clients: int, jobs_per_client: int, workers: int, video: Path, work: Path, upload: bool = False,
              hello_interval_s: float = 0.05, timeout_s: float = 60.0) -> dict:
    proc, endpoint = start_server(work, workers, [video.parent.resolve()])
    try:
        results, hello_ms, hello_failures, wall, stats, listed = _drive(
            endpoint, clients=clients, jobs_per_client=jobs_per_client, video=video, work=work, upload=upload,
            hello_interval_s=hello_interval_s, timeout_s=timeout_s)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()

    correct, identical, problems = _check_results(results)
    total = clients * jobs_per_client
    lost = [key for key, r in results.items() if r["job_id"] is None or listed.get(r["job_id"]) != P.DONE]
    job_s = [r["seconds"] for r in results.values() if r["phase"] == "done"]
    mib = 1 / (1 << 20)
    return {
        "clients": clients, "jobs_per_client": jobs_per_client, "workers": workers, "video": str(video),
        "upload": upload, "jobs": total, "correct": correct, "identical_to_first": identical,
        "lost": len(lost) + (total - len(results)), "problems": problems,
        "wall_s": round(wall, 2), "jobs_per_min": round(60 * total / wall, 2),
        "job_latency_s": {"p50": round(_percentile(job_s, 50), 2), "max": round(max(job_s, default=float("nan")), 2)},
        "hello_ms": {"n": len(hello_ms), "p50": round(_percentile(hello_ms, 50), 2),
                     "p95": round(_percentile(hello_ms, 95), 2), "p99": round(_percentile(hello_ms, 99), 2),
                     "max": round(max(hello_ms, default=float("nan")), 2),
                     "over_200ms": sum(h > HELLO_BOUND_MS for h in hello_ms), "failures": len(hello_failures)},
        "memory_mib": {"server_peak": round(stats["server_peak_rss_bytes"] * mib, 1),
                       "server_now": round(stats["server_rss_bytes"] * mib, 1),
                       "peak_worker": round(stats["peak_worker_rss_bytes"] * mib, 1),
                       "peak_total": round(stats["peak_total_rss_bytes"] * mib, 1),
                       "bound_server_plus_workers_x_peak_worker": round(
                           (stats["server_peak_rss_bytes"] + workers * stats["peak_worker_rss_bytes"]) * mib, 1)},
        "peak_concurrent_workers": stats["peak_workers"],
        "server_requests": stats["requests"], "server_errors": stats["errors"],
    }


def _drive(endpoint: str, *, clients: int, jobs_per_client: int, video: Path, work: Path, upload: bool,
           hello_interval_s: float, timeout_s: float) -> tuple[dict, list, list, float, dict, dict]:
    """Run the clients' jobs and the hello pinger against ``endpoint``: (results by job key,
    hello latencies in ms, hello failures, wall seconds, the server's stats, job states)."""
    from avface.service.client import Client, JobRun

    results: dict[str, dict] = {}
    hello_ms: list[float] = []
    hello_failures: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def pinger() -> None:
        with Client(endpoint, timeout_s=2.0, retries=2) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    c.hello()
                    hello_ms.append(1000 * (time.perf_counter() - t0))
                except Exception as e:  # counted, the bench goes on
                    hello_failures.append(str(e))
                stop.wait(hello_interval_s)

    def client(i: int) -> None:
        with Client(endpoint, timeout_s=timeout_s, retries=3) as c:
            runs = {f"c{i}j{k}": JobRun(c, video=video, out_dir=work / "results" / f"c{i}j{k}", upload=upload)
                    for k in range(jobs_per_client)}
            started = time.perf_counter()
            ended: dict[str, float] = {}
            while len(ended) < len(runs):
                for key, run in runs.items():
                    if key not in ended:
                        run.step(0.02)
                        if run.finished:
                            ended[key] = time.perf_counter() - started
            with lock:
                for key, run in runs.items():
                    results[key] = {"job_id": run.job_id, "phase": run.phase, "seconds": ended[key],
                                    "error": None if run.error is None else f"{run.error.code}: {run.error.message}",
                                    "result": None if run.result_path is None else str(run.result_path)}

    ping_thread = threading.Thread(target=pinger, daemon=True)
    ping_thread.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        stop.set()
        ping_thread.join(10)
        with Client(endpoint, timeout_s=10.0) as c:
            stats = c.stats()
            listed = {j["job_id"]: j["state"] for j in c.jobs()}
    finally:
        stop.set()
    return results, hello_ms, hello_failures, wall, stats, listed


def _check_results(results: dict) -> tuple[int, int, list[str]]:
    """(valid results, results identical to the first valid one, problems)."""
    validate = _validator()
    reference, correct, identical, problems = None, 0, 0, []
    for key, r in sorted(results.items()):
        if r["phase"] != "done":
            problems.append(f"{key}: {r['phase']} {r['error']}")
            continue
        try:
            validate(Path(r["result"]))
            correct += 1
        except Exception as e:
            problems.append(f"{key}: invalid result: {e}")
            continue
        with np.load(r["result"]) as z:
            arrays = {k: z[k] for k in z.files if k != "meta"}
        if reference is None:
            reference = arrays
        if arrays.keys() == reference.keys() and all(np.array_equal(arrays[k], reference[k]) for k in arrays):
            identical += 1
    return correct, identical, problems


def _print_report(r: dict) -> None:
    h, m = r["hello_ms"], r["memory_mib"]
    lines = [
        f"clients x jobs      {r['clients']} x {r['jobs_per_client']} = {r['jobs']} jobs, {r['workers']} workers, "
        f"{'upload' if r['upload'] else 'path'} mode",
        f"results             {r['correct']} correct, {r['identical_to_first']} identical to the first, {r['lost']} lost",
        f"wall                {r['wall_s']} s ({r['jobs_per_min']} jobs/min); job latency p50 {r['job_latency_s']['p50']} s, "
        f"max {r['job_latency_s']['max']} s",
        f"hello               n={h['n']} p50 {h['p50']} ms, p95 {h['p95']} ms, p99 {h['p99']} ms, max {h['max']} ms; "
        f"{h['over_200ms']} over 200 ms, {h['failures']} unanswered",
        f"memory (MiB)        server peak {m['server_peak']}, one worker peak {m['peak_worker']}, "
        f"server+workers peak {m['peak_total']} (bound {m['bound_server_plus_workers_x_peak_worker']}); "
        f"at most {r['peak_concurrent_workers']} workers at once",
    ]
    for p in r["problems"]:
        lines.append(f"problem             {p}")
    print("\n".join(lines))


def cmd_bench(args) -> int:
    import shutil

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="avface-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        video = args.video.resolve() if args.video else _demo_clip(work / "clip", args.duration_s)
        report = run_bench(clients=args.clients, jobs_per_client=args.jobs_per_client, workers=args.workers,
                           video=video, work=work, upload=args.upload, hello_interval_s=args.hello_interval_s,
                           timeout_s=args.timeout)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    _print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    ok = report["correct"] == report["jobs"] and report["lost"] == 0
    return 0 if ok else 1
