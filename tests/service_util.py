"""Helpers for the service tests: a real ``avface serve`` in a subprocess on an ephemeral
loopback port, always killed by the fixture's finalizer, and fake clips for the
controllable pipeline in tests/fake_pipeline.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avface.service import protocol as P
from avface.service.client import Client

TESTS_DIR = Path(__file__).resolve().parent
READY_TIMEOUT_S = 30.0


def wait_for(predicate, *, timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy (returned) or time runs out."""
    end = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def fake_clip(folder: Path, name: str = "clip.json", **spec) -> Path:
    """A "video" for the fake pipeline: JSON that says how the job behaves."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(spec))
    return path


def pid_gone(pid: int) -> bool:
    """The process has exited (no longer exists, or a zombie not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


class ServerProcess:
    """``avface serve`` on ``tcp://127.0.0.1:*`` in a subprocess."""

    def __init__(self, work: Path, *, workers: int = 1, args: tuple = (), fake: bool = True,
                 data_dir: Path | None = None, roots: tuple = (), env: dict | None = None):
        self.work = work
        self.data_dir = data_dir or work / "data"
        self.workers = workers
        self.args = tuple(args)
        self.fake = fake
        self.roots = tuple(roots) or (work,)
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.public_key: str | None = None
        self._clients: list[Client] = []
        self._n = 0

    def start(self) -> "ServerProcess":
        self._n += 1
        ready = self.work / f"ready-{self._n}.json"
        env = dict(os.environ, **self.env)
        if self.fake:
            env["AVFACE_PIPELINE"] = "fake_pipeline"
            env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        cmd = [sys.executable, "-m", "avface", "serve", "--bind", "tcp://127.0.0.1:*",
               "--workers", str(self.workers), "--data-dir", str(self.data_dir), "--ready-file", str(ready),
               *(a for r in self.roots for a in ("--root", str(r))), *self.args]
        self.log_path = self.work / f"server-{self._n}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        end = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > end:
                self.kill()
                raise AssertionError(f"server not ready after {READY_TIMEOUT_S} s:\n{self.log()}")
            time.sleep(0.02)
        info = json.loads(ready.read_text())
        self.address, self.public_key = info["endpoint"], info["public_key"]
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kw) -> Client:
        kw.setdefault("timeout_s", 5.0)
        kw.setdefault("retries", 3)
        c = Client(self.address, **kw)
        self._clients.append(c)
        return c

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        for c in self._clients:
            c.close()
        self._clients.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def wait_state(self, client: Client, job_id: str, states, *, timeout_s: float = 30.0) -> dict:
        states = {states} if isinstance(states, str) else set(states)

        def check():
            job = client.status(job_id)
            return job if job["state"] in states else None

        return wait_for(check, timeout_s=timeout_s, what=f"job {job_id} to reach {sorted(states)}")

    def worker_pids(self) -> set[int]:
        """Live worker processes of this server (children running avface.service.worker)."""
        pids = set()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes()
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.proc.pid and b"avface.service.worker" in cmd and b"--job-dir" in cmd and not pid_gone(int(d.name)):
                pids.add(int(d.name))
        return pids


@pytest.fixture
def make_server(tmp_path):
    """Factory of ServerProcess objects; every one is stopped (or killed) at the end."""
    servers: list[ServerProcess] = []

    def make(**kw) -> ServerProcess:
        kw.setdefault("args", ())
        server = ServerProcess(kw.pop("work", tmp_path), **kw)
        servers.append(server)
        return server.start()

    yield make
    for s in servers:
        s.stop()


def send_raw(client: Client, frames: list, *, timeout_s: float = 5.0):
    """Send ``frames`` as they are on the client's socket and return the first message back."""
    client.socket.send_multipart(frames)
    if not client.socket.poll(int(timeout_s * 1000)):
        raise AssertionError("no answer from the server")
    return P.decode(client.socket.recv_multipart(), max_frame_bytes=1 << 30)
