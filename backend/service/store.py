"""On-disk job store of the service. One folder per job under ``DATA_DIR/jobs/``::

    jobs/<job_id>/
        job.json       state, options, inputs (or references to them), attempts, error
        events.jsonl   every progress and state event, in sequence order
        worker.log     the worker processes' stdout/stderr (all attempts)
        input/         uploaded inputs (video, audio) and the transcript
        result/        what the reconstruction wrote (result.npz, detail/, config.yaml, ...)
                       and manifest.json (every file's size and sha256), written by the worker

The socket loop is the only writer of ``job.json`` and ``events.jsonl``; the worker only
writes ``result/`` and ``worker.log``. ``job.json`` is replaced atomically, so a killed
server leaves either the old or the new record, never half of one.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from avface.service import protocol as P

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
EVENTS_FILE = "events.jsonl"
LOG_FILE = "worker.log"
INPUT_DIR = "input"
RESULT_DIR = "result"
MANIFEST_FILE = "manifest.json"
#: A job whose worker died (or was interrupted by a server restart) this many times is failed.
MAX_ATTEMPTS = 2


class StoreError(Exception):
    """A request that names a job or a file the store cannot serve; ``code`` is a protocol
    error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class InputRef:
    """One input file: a path on this machine (``mode="path"``) or an upload into ``input/``."""

    mode: str  # "path" | "upload"
    path: str  # absolute for "path", relative to the job folder for "upload"
    name: str  # the file name the client gave, for display
    size: int  # bytes (declared by the client for uploads)
    sha256: str | None = None
    chunks: int = 0  # upload chunks received


@dataclass
class Job:
    job_id: str
    state: str
    created: float
    options: dict
    video: InputRef
    audio: InputRef | None = None
    transcript: str | None = None  # relative path of the transcript file, if any
    submit_msg_id: str | None = None
    queued_at: float | None = None
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    history: list = field(default_factory=list)  # one {"attempt", "outcome", "reason"} per ended attempt
    stage: str | None = None
    fraction: float = 0.0
    message: str = ""
    error: dict | None = None  # {"code", "message", "detail"}
    worker_pid: int | None = None
    cancel_requested: bool = False
    last_seq: int = 0
    result_meta: dict | None = None
    head_meta: dict | None = None  # the head's meta once the worker wrote it (its detail maps follow)

    @classmethod
    def from_json(cls, data: dict) -> "Job":
        data = dict(data)
        data["video"] = InputRef(**data["video"])
        data["audio"] = InputRef(**data["audio"]) if data.get("audio") else None
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def summary(self) -> dict:
        """What status and list_jobs answer."""
        return {
            "job_id": self.job_id,
            "state": self.state,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "attempts": self.attempts,
            "max_attempts": MAX_ATTEMPTS,
            "stage": self.stage,
            "fraction": self.fraction,
            "message": self.message,
            "error": self.error,
            "worker_pid": self.worker_pid,
            "video": {"name": self.video.name, "mode": self.video.mode, "size": self.video.size},
            "audio": None if self.audio is None else {"name": self.audio.name, "mode": self.audio.mode, "size": self.audio.size},
            "options": self.options,
            "last_seq": self.last_seq,
            "history": self.history,
            "result_meta": self.result_meta,
            "head_ready": self.head_meta is not None,
        }


def check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not P.JOB_ID_RE.match(job_id):
        shown = repr(job_id)[:80]
        raise StoreError("bad_job_id", f"job id {shown} is not 32 lowercase hex digits")
    return job_id


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class JobStore:
    """Job folders under ``root/jobs``; the in-memory ``jobs`` dict mirrors every job.json."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.jobs_dir = self.root / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, Job] = {}
        self._lock_file = None

    # -- the data dir belongs to one server at a time ------------------------------------
    def lock(self) -> None:
        f = open(self.root / "server.lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            raise StoreError("internal", f"data dir {self.root} is in use by another server") from e
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- paths --------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        path = (self.jobs_dir / check_job_id(job_id)).resolve()
        # The id pattern already rules out separators; this guards the invariant itself.
        if path.parent != self.jobs_dir:
            raise StoreError("bad_job_id", f"job id {job_id!r} escapes the data dir")
        return path

    def get(self, job_id: object) -> Job:
        job = self.jobs.get(check_job_id(job_id))
        if job is None:
            raise StoreError("unknown_job", f"no job {job_id}")
        return job

    # -- records ------------------------------------------------------------------------
    def load_all(self) -> list[Job]:
        """Read every job folder; unreadable ones are logged and skipped (never deleted)."""
        for d in sorted(self.jobs_dir.iterdir()):
            if not d.is_dir() or not P.JOB_ID_RE.match(d.name):
                continue
            try:
                job = Job.from_json(json.loads((d / JOB_FILE).read_text()))
            except (OSError, ValueError, TypeError, KeyError) as e:
                log.warning("skipping job folder %s: unreadable %s (%s)", d, JOB_FILE, e)
                continue
            self.jobs[job.job_id] = job
            # A server killed between appending an event and saving job.json left last_seq behind.
            tail = self.events(job, job.last_seq)
            if tail:
                job.last_seq = tail[-1]["seq"]
        return list(self.jobs.values())

    def create(self, *, options: dict, video: InputRef, audio: InputRef | None, state: str,
               submit_msg_id: str | None) -> Job:
        job_id = uuid.uuid4().hex
        d = self.job_dir(job_id)
        (d / INPUT_DIR).mkdir(parents=True)
        job = Job(job_id=job_id, state=state, created=time.time(), options=options, video=video, audio=audio,
                  submit_msg_id=submit_msg_id)
        self.jobs[job_id] = job
        self.save(job)
        return job

    def save(self, job: Job) -> None:
        _atomic_write(self.job_dir(job.job_id) / JOB_FILE, json.dumps(asdict(job), indent=1).encode())

    def delete(self, job_id: str) -> None:
        d = self.job_dir(job_id)
        self.jobs.pop(job_id, None)
        shutil.rmtree(d, ignore_errors=True)

    # -- events -------------------------------------------------------------------------
    def append_event(self, job: Job, event: dict) -> dict:
        """Number the event, append it to events.jsonl and return it."""
        job.last_seq += 1
        event = {"seq": job.last_seq, "time": time.time(), **event}
        with open(self.job_dir(job.job_id) / EVENTS_FILE, "ab") as f:
            f.write(P.dumps(event) + b"\n")
        return event

    def events(self, job: Job, since: int = 0, limit: int = 10_000) -> list[dict]:
        """Events with seq > since, oldest first, at most ``limit`` (the newest ones)."""
        path = self.job_dir(job.job_id) / EVENTS_FILE
        out = []
        try:
            with open(path, "rb") as f:
                for line in f:
                    try:
                        ev = json.loads(line)
                    except ValueError:  # a line cut short by a killed server
                        continue
                    if ev.get("seq", 0) > since:
                        out.append(ev)
        except FileNotFoundError:
            return []
        return out[-limit:]

    # -- files --------------------------------------------------------------------------
    def input_path(self, job: Job, ref: InputRef) -> Path:
        return Path(ref.path) if ref.mode == "path" else self.job_dir(job.job_id) / ref.path

    def manifest(self, job: Job) -> dict:
        """The result's manifest.json (written by the worker): {"files": [{"path", "size", "sha256"}]}."""
        try:
            return json.loads((self.job_dir(job.job_id) / RESULT_DIR / MANIFEST_FILE).read_text())
        except (OSError, ValueError) as e:
            raise StoreError("not_ready", f"job {job.job_id} has no result manifest ({e})") from e

    def result_file(self, job: Job, rel: object) -> tuple[Path, int]:
        """A result file named in the manifest (nothing else can be fetched) and its size."""
        if not isinstance(rel, str):
            raise StoreError("bad_request", "fetch.path must be a string")
        for entry in self.manifest(job)["files"]:
            if entry["path"] == rel:
                return self.job_dir(job.job_id) / RESULT_DIR / rel, int(entry["size"])
        raise StoreError("not_found", f"{rel!r} is not a file of job {job.job_id}'s result")
