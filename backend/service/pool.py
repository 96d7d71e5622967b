"""The worker processes of the service and the queue of jobs waiting for one.

The pool starts a worker (worker.py) for each queued job while fewer than ``workers`` run,
reads their progress, stops the ones that hang or are cancelled, reaps the ones that exit
and decides what becomes of their job: done, failed, cancelled, or queued again for one more
attempt. Every change of a job's state goes through :meth:`WorkerPool.set_state`, which
saves the job and hands the event to the server to send to the job's watchers. The model
probe (a short-lived process that reports the device and models) is started and read here too.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import zmq

from avface.core.threads import job_threads
from avface.service import protocol as P
from avface.service import store as S
from avface.service.worker import WorkerProcess, describe_exit, proc_rss_bytes, start_probe, write_manifest

if TYPE_CHECKING:
    from avface.service.server import ServerConfig

log = logging.getLogger(__name__)

#: The spare worker's output until it has a job (then it writes into the job's log), in the data dir.
SPARE_LOG = "spare-worker.log"


class WorkerPool:
    def __init__(self, config: ServerConfig, store: S.JobStore, poller: zmq.Poller, stats,
                 broadcast: Callable[[S.Job, dict], None]):
        """``poller``: the server's, which the workers' message pipes join; ``stats``: the
        server's counters, whose peaks the pool keeps; ``broadcast``: sends a job's event to
        its watchers."""
        self.config = config
        self.store = store
        self.poller = poller
        self.stats = stats
        self.broadcast = broadcast
        self.queue: deque[str] = deque()
        self.workers: dict[str, WorkerProcess] = {}
        self.probe = None
        self.probe_info: dict = {}
        self.probe_state = "pending"
        #: A worker that has imported the pipeline and waits for the next job (``spare_worker``).
        self.spare: WorkerProcess | None = None
        self._spare_failures = 0

    # -- job life -------------------------------------------------------------------------
    def set_state(self, job: S.Job, state: str, *, message: str = "") -> None:
        job.state = state
        job.message = message
        event = self.store.append_event(job, {"kind": "state", "state": state, "attempt": job.attempts,
                                              "message": message, "error": job.error})
        self.store.save(job)
        self.broadcast(job, event)

    def enqueue(self, job: S.Job) -> None:
        job.queued_at = time.time()
        self.queue.append(job.job_id)
        self.set_state(job, P.QUEUED, message="waiting for a worker")

    def finish(self, job: S.Job, state: str, error: dict | None) -> None:
        if state != P.DONE and job.head_meta is not None:
            # the head stays fetchable; its manifest is made again from what is on disk (a
            # worker stopped in the fine stage may have left part of the maps: not listed)
            write_manifest(self.store.job_dir(job.job_id) / S.RESULT_DIR, include_detail=False)
            detail = job.head_meta.get("detail")
            if isinstance(detail, dict) and detail.get("state") == "pending":  # what a fetch of the head says now
                cancelled = state == P.CANCELLED
                job.head_meta["detail"] = {**detail, "state": "cancelled" if cancelled else "failed",
                                           "reason": "cancelled" if cancelled else (error or {}).get("message", state)}
        job.error = error
        job.finished = time.time()
        job.worker_pid = None
        job.fraction = 1.0 if state == P.DONE else job.fraction
        self.set_state(job, state, message=(error or {}).get("message", "") if state != P.DONE else "done")
        log.info("job %s %s%s", job.job_id, state, f": {error['code']}: {error['message']}" if error else "")

    @staticmethod
    def failure(code: str, job: S.Job) -> dict:
        reasons = "; ".join(f"attempt {h['attempt']}: {h['reason']}" for h in job.history)
        return {"code": code, "message": f"the job failed {len(job.history)} times ({reasons})", "detail": None}

    def recover(self, job: S.Job) -> None:
        """A job as the last server left it: a queued one waits again, an interrupted one runs
        again unless this was its last attempt."""
        if job.state == P.RUNNING:
            _kill_stray_worker(job)
            job.worker_pid = None
            job.history.append({"attempt": job.attempts, "outcome": "interrupted",
                                "reason": "the server stopped while the job ran"})
            if job.cancel_requested:
                self.finish(job, P.CANCELLED, {"code": "cancelled", "message": "cancelled", "detail": None})
                return
            if job.attempts >= S.MAX_ATTEMPTS:
                self.finish(job, P.FAILED, self.failure("worker_died", job))
                return
            self.set_state(job, P.QUEUED, message="requeued after a server restart")
        if job.state == P.QUEUED:
            self.queue.append(job.job_id)

    def cancel(self, job: S.Job) -> int | None:
        """Cancel a queued or running job: the pid of the worker told to stop (the job ends
        when it exits), or None when the job is cancelled already."""
        if job.state == P.RUNNING:
            worker = self.workers.get(job.job_id)
            job.cancel_requested = True
            self.store.save(job)
            if worker is not None:
                worker.terminate()
                log.info("job %s: cancelling, terminating worker %d", job.job_id, worker.pid)
                return worker.pid
        if job.job_id in self.queue:
            self.queue.remove(job.job_id)
        self.finish(job, P.CANCELLED, {"code": "cancelled", "message": "cancelled by the client", "detail": None})
        return None

    # -- workers --------------------------------------------------------------------------
    def schedule(self) -> None:
        while self.queue and len(self.workers) < self.config.workers:
            job = self.store.jobs.get(self.queue.popleft())
            if job is None or job.state != P.QUEUED:
                continue
            job.attempts += 1
            job.started = time.time()
            job.stage, job.fraction, job.cancel_requested = None, 0.0, False
            job.head_meta = None  # a new attempt writes its own head
            jdir = self.store.job_dir(job.job_id)
            how = dict(max_duration_s=self.config.max_duration_s, device=self.config.device,
                       flame_dir=self.config.flame_dir, threads=job_threads(self.config.threads, self.config.workers))
            worker, self.spare = self.spare, None
            if worker is not None:
                if worker.assign(job.job_id, jdir, **how):
                    self._spare_failures = 0
                else:
                    self._drop_spare(worker)
                    worker = None
            try:
                if worker is None:
                    worker = WorkerProcess(job.job_id, jdir, **how)
            except OSError as e:
                job.history.append({"attempt": job.attempts, "outcome": "error", "reason": f"cannot start a worker: {e}"})
                self.finish(job, P.FAILED, {"code": "internal", "message": f"cannot start a worker: {e}", "detail": None})
                continue
            self.workers[job.job_id] = worker
            self.poller.register(worker.fd, zmq.POLLIN)
            job.worker_pid = worker.pid
            self.stats.peak_workers = max(self.stats.peak_workers, len(self.workers))
            self.set_state(job, P.RUNNING, message=f"attempt {job.attempts} of {S.MAX_ATTEMPTS}")
            log.info("job %s running in worker %d (attempt %d)", job.job_id, worker.pid, job.attempts)
        self._keep_spare()

    def _keep_spare(self) -> None:
        """Start a spare worker while a job could start (``ServerConfig.spare_worker``), and
        notice one that died waiting: three deaths in a row and the server stops making them
        (jobs then start their own workers, as without spares)."""
        if self.spare is not None and self.spare.poll() is not None:
            self._spare_failures += 1
            log.warning("the spare worker %s before any job; see %s", describe_exit(self.spare.poll()),
                        self.store.root / SPARE_LOG)
            self._drop_spare(self.spare)
            self.spare = None
        if (self.spare is None and self.config.spare_worker and self._spare_failures < 3
                and len(self.workers) < self.config.workers):
            try:
                self.spare = WorkerProcess.spare(self.store.root / SPARE_LOG)
            except OSError as e:
                self._spare_failures += 1
                log.warning("cannot start a spare worker: %s", e)

    @staticmethod
    def _drop_spare(worker: WorkerProcess) -> None:
        worker.close()
        try:
            worker.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass

    def read(self, events: dict) -> None:
        """Take in what the workers with ``events`` (from the poller) wrote."""
        for job_id, worker in list(self.workers.items()):
            if not worker.eof and events.get(worker.fd):
                self._on_worker_lines(job_id, worker.read())
                if worker.eof:
                    self.poller.unregister(worker.fd)

    def reap(self, now: float) -> None:
        """Stop the workers over the hang timeout, kill those past their deadline, and take
        the exit of those that ended."""
        for job_id, worker in list(self.workers.items()):
            if (not worker.hung and worker.cancelled_at is None
                    and now - worker.last_activity > self.config.hang_timeout_s):
                # alive but silent: a deadlock or a stuck device; stop it instead of waiting forever
                worker.hung = True
                log.warning("job %s: no progress for %.0f s; stopping worker %d", job_id,
                            now - worker.last_activity, worker.pid)
                worker.terminate()
            if worker.kill_deadline is not None and now >= worker.kill_deadline:
                worker.kill()
                worker.kill_deadline = None
            rc = worker.poll()
            if rc is not None:
                self._on_worker_exit(job_id, worker, rc)

    def sample_memory(self) -> None:
        rss = [w.rss_bytes() for w in self.workers.values()]
        spare = self.spare.rss_bytes() if self.spare is not None else 0
        st = self.stats
        st.peak_total_rss = max(st.peak_total_rss, proc_rss_bytes() + sum(rss) + spare)
        st.peak_worker_rss = max([st.peak_worker_rss, *rss])

    def shutdown(self) -> None:
        """Stop the workers; their jobs go back to the queue without using up an attempt."""
        for job_id, worker in list(self.workers.items()):
            worker.terminate()
        deadline = time.monotonic() + 2.0
        for job_id, worker in list(self.workers.items()):
            try:
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.proc.wait()
            worker.close()
            job = self.store.jobs.get(job_id)
            if job is not None and job.state == P.RUNNING:
                job.attempts = max(0, job.attempts - 1)
                job.worker_pid = None
                job.state = P.QUEUED
                job.queued_at = job.queued_at or time.time()
                self.store.save(job)
        self.workers.clear()
        if self.spare is not None:
            self._drop_spare(self.spare)
            self.spare = None
        if self.probe is not None and self.probe.poll() is None:
            self.probe.kill()
            self.probe.wait()

    def _on_worker_lines(self, job_id: str, lines: list[dict]) -> None:
        job = self.store.jobs.get(job_id)
        if job is None:
            return
        for line in lines:
            if line.get("t") == "head" and not job.cancel_requested:
                self._on_head(job, line.get("meta") or {})
                continue
            if line.get("t") != "progress" or job.cancel_requested:
                continue
            stage, fraction, message = str(line.get("stage")), float(line.get("fraction", 0.0)), str(line.get("message", ""))
            new_stage = stage != job.stage
            job.stage, job.fraction, job.message = stage, fraction, message
            event = self.store.append_event(job, {"kind": "progress", "stage": stage, "fraction": fraction,
                                                  "message": message, "attempt": job.attempts})
            if new_stage:
                self.store.save(job)
            self.broadcast(job, event)

    def _on_head(self, job: S.Job, meta: dict) -> None:
        """The worker wrote the head (the result but for its detail maps): it can be fetched
        now. Clients learn it from a ``state`` event that stays ``running`` with ``head``
        true, which a client that knows nothing of heads reads as a plain state event."""
        job.head_meta = meta
        event = self.store.append_event(job, {"kind": "state", "state": job.state, "attempt": job.attempts,
                                              "message": "the head is ready; its detail maps follow", "error": None,
                                              "head": True})
        self.store.save(job)
        self.broadcast(job, event)

    def _on_worker_exit(self, job_id: str, worker: WorkerProcess, rc: int) -> None:
        if not worker.eof:
            self._on_worker_lines(job_id, worker.read())
            self.poller.unregister(worker.fd)
        worker.close()
        del self.workers[job_id]
        job = self.store.jobs.get(job_id)
        if job is None:
            return
        final = worker.final
        if final is not None and final.get("t") == "done" and rc == 0:  # even if a cancel came too late
            job.result_meta = final.get("meta")
            job.history.append({"attempt": job.attempts, "outcome": "done", "reason": ""})
            self.finish(job, P.DONE, None)
        elif worker.hung and not job.cancel_requested:
            # not retried: a job that hung once will most likely hang again
            stage = f" in stage {job.stage}" if job.stage else ""
            reason = f"no progress for {self.config.hang_timeout_s:g} s{stage}"
            job.history.append({"attempt": job.attempts, "outcome": "timeout", "reason": reason})
            self.finish(job, P.FAILED, {"code": "job_timeout", "detail": None,
                                        "message": f"the job made no progress for {self.config.hang_timeout_s:g} s{stage} "
                                                   "and was stopped (the server's --hang-timeout-s)"})
        elif job.cancel_requested:
            gone = time.monotonic() - (worker.cancelled_at or time.monotonic())
            job.history.append({"attempt": job.attempts, "outcome": "cancelled", "reason": f"worker stopped {gone:.2f} s after cancel"})
            self.finish(job, P.CANCELLED, {"code": "cancelled", "message": "cancelled by the client", "detail": None})
        elif final is not None and final.get("t") == "error" and not final.get("retry"):
            job.history.append({"attempt": job.attempts, "outcome": "error", "reason": f"{final.get('code')}: {final.get('message')}"})
            self.finish(job, P.FAILED, {"code": final.get("code") or "internal", "message": final.get("message") or "",
                                        "detail": final.get("detail")})
        else:
            self._retry_or_fail(job, final, rc)

    def _retry_or_fail(self, job: S.Job, final: dict | None, rc: int) -> None:
        """An attempt that died or raised unexpectedly: the job runs again unless that was its
        last attempt."""
        if final is not None:  # an unexpected exception in the worker
            reason, code = f"{final.get('message')}", "internal"
        else:
            reason, code = f"worker process {describe_exit(rc)}" + (f" during stage {job.stage}" if job.stage else ""), "worker_died"
        job.history.append({"attempt": job.attempts, "outcome": "died" if final is None else "error", "reason": reason})
        log.warning("job %s: attempt %d ended: %s", job.job_id, job.attempts, reason)
        if job.attempts >= S.MAX_ATTEMPTS:
            error = self.failure(code, job)
            if final is not None:
                error["detail"] = final.get("detail")
            self.finish(job, P.FAILED, error)
        else:
            job.worker_pid = None
            job.queued_at = time.time()
            self.queue.appendleft(job.job_id)  # the retry goes first: it was already waiting
            self.set_state(job, P.QUEUED, message=f"retrying: {reason}")

    # -- the model probe ------------------------------------------------------------------
    def start_probe(self) -> None:
        self.probe = start_probe(self.config.flame_dir, self.config.device, self.store.root / "probe.log")

    def poll_probe(self) -> None:
        if self.probe is not None and self.probe.poll() is not None:
            self._on_probe()

    def _on_probe(self) -> None:
        out = self.probe.stdout.read() if self.probe.stdout else b""
        rc = self.probe.returncode
        self.probe.stdout and self.probe.stdout.close()
        self.probe = None
        try:
            self.probe_info = json.loads(out.decode().strip().splitlines()[-1])
            self.probe_state = "done"
        except (ValueError, IndexError):
            self.probe_state = f"failed ({describe_exit(rc)}; see {self.store.root / 'probe.log'})"
            log.warning("model probe %s", self.probe_state)


def _kill_stray_worker(job: S.Job) -> None:
    """A worker of a killed server normally kills itself (its life pipe closes); this makes
    sure, checking the command line so that a reused pid is left alone."""
    if not job.worker_pid:
        return
    try:
        cmdline = Path(f"/proc/{job.worker_pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"avface.service.worker" not in cmdline:
        return
    try:  # a spare that took the job writes into the job's log
        output = os.readlink(f"/proc/{job.worker_pid}/fd/2")
    except OSError:
        output = ""
    if job.job_id.encode() in cmdline or (b"--spare" in cmdline and job.job_id in output):
        try:
            os.killpg(job.worker_pid, signal.SIGKILL)
        except OSError:
            pass
