"""The local backend the add-on starts by itself (Preferences > "Start a local backend
automatically"), recorded in ``backend.json`` in the add-on's user folder, which every Blender
of the user shares. No ``bpy`` here: tested with plain pytest.

- A Blender that finds the recorded backend still running uses it, answering or still
  starting, instead of starting a second one (:func:`find`).
- Every Blender that uses it is one of its owners (:func:`adopt`); each owner leaves the list
  when it quits (an ``atexit`` handler that ``reconstruct.register`` installs), and the last
  one to leave stops the backend (:func:`release`). A backend the user started by hand is
  never recorded, so never stopped.

``avface serve`` has no watch of its own on the process that started it (no parent-pid or
idle exit), so a Blender that crashes, and so never runs its ``atexit`` handlers, leaves the
backend running until a later Blender adopts it and quits.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

STATE_FILE = "backend.json"
#: How long the last owner waits, on quitting, for the backend to exit after SIGTERM, so that
#: a Blender started right after finds the port and the job store free.
STOP_WAIT_S = 5.0


@dataclass
class BackendState:
    pid: int
    address: str
    owners: list[int] = field(default_factory=list)
    """Process ids of the Blenders that use it."""


def read(folder: Path) -> BackendState | None:
    try:
        raw = json.loads((Path(folder) / STATE_FILE).read_text())
        return BackendState(int(raw["pid"]), str(raw["address"]), [int(p) for p in raw.get("owners", [])])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write(folder: Path, state: BackendState | None) -> None:
    path = Path(folder) / STATE_FILE
    if state is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(state)))
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    """The process runs (a zombie does not count)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate it on Windows
        return _windows_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): kill(0) is all there is
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _windows_alive(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    code = ctypes.c_ulong()
    try:
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
    finally:
        kernel32.CloseHandle(handle)
    return code.value == 259  # STILL_ACTIVE


def _is_backend(state: BackendState) -> bool:
    """The recorded process still runs and is still that backend (where /proc says what a
    process runs: a process id may have been reused since)."""
    if not pid_alive(state.pid):
        return False
    try:
        cmdline = Path(f"/proc/{state.pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"serve" in cmdline and state.address.encode() in cmdline


def record_started(folder: Path, pid: int, address: str, owner: int | None = None) -> BackendState:
    """This Blender started a backend at ``address``: record it, with this Blender its owner."""
    state = BackendState(pid, address, [os.getpid() if owner is None else owner])
    write(folder, state)
    return state


def find(folder: Path, address: str) -> BackendState | None:
    """The backend the add-on started at ``address`` if it still runs (answering or not yet);
    a record of one that has gone is cleared."""
    state = _live_record(folder)
    return state if state is not None and state.address == address else None


def _live_record(folder: Path) -> BackendState | None:
    """The recorded backend if its process still runs; a record of one that has gone is
    cleared."""
    state = read(folder)
    if state is None:
        return None
    if not _is_backend(state):
        write(folder, None)
        return None
    return state


def adopt(folder: Path, address: str, owner: int | None = None) -> bool:
    """A backend answered at ``address``: when it is the one the add-on started, this Blender
    becomes one of its owners (so the backend stops once every Blender using it has quit).
    True when it is such a backend."""
    owner = os.getpid() if owner is None else owner
    state = find(folder, address)
    if state is None:
        return False
    if owner not in state.owners:
        state.owners.append(owner)
        write(folder, state)
    return True


def release(folder: Path, owner: int | None = None, wait_s: float = STOP_WAIT_S) -> int | None:
    """``owner`` (this Blender) quits: it leaves the owners, and when no owner is left running,
    the backend is stopped (SIGTERM: it stops its workers; a job it was running is run again
    when a backend next starts). Returns the stopped backend's pid, or None."""
    owner = os.getpid() if owner is None else owner
    state = _live_record(folder)
    if state is None:
        return None
    state.owners = [p for p in state.owners if p != owner and pid_alive(p)]
    if state.owners:
        write(folder, state)
        return None
    try:
        os.kill(state.pid, signal.SIGTERM)
    except OSError as e:
        log.warning("cannot stop the local AVFace backend (pid %d): %s", state.pid, e)
        return None
    end = time.monotonic() + wait_s
    while _running(state.pid) and time.monotonic() < end:
        time.sleep(0.05)
    write(folder, None)
    log.info("stopped the local AVFace backend (pid %d)", state.pid)
    return state.pid


def _running(pid: int) -> bool:
    """``pid`` has not exited yet (reaping it when it is this process's own child, which would
    otherwise stay a zombie)."""
    try:
        if os.name != "nt" and os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    return pid_alive(pid)
