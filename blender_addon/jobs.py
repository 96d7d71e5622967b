"""The job manager behind Reconstruct face: a state machine per job, advanced a little on
every tick without blocking, and the record of every job in ``jobs.json`` so that a job
outlives its Blender session.

No ``bpy`` here (nor anything that imports it): what the manager needs from Blender (the
preferences, the user folder, the timer, redrawing, importing a result into the scene,
starting a local backend) comes through a :class:`Host` that ``reconstruct.py`` implements
with ``bpy``, and the tests with a fake. The manager runs on Blender's main thread only.

A job's ``state`` goes starting -> submitting -> running -> fetching -> fetched, then
imported (or done: the result is on disk and waits for the panel's Import button), or ends in
failed or cancelled. A job still in flight when Blender closed is
``detached`` in the next session, until it is fetched (then ``running`` again).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import footage, io_result, local_backend
from ._vendor import protocol as P
from ._vendor.client import Client, JobRun, NoAnswer, ServiceError

log = logging.getLogger(__name__)

JOBS_FILE = "jobs.json"

# -- the states of a job (JobRecord.state); the only place they are spelled -----------------
STARTING = "starting"      # asking the backend whether it is there (and starting one)
SUBMITTING = "submitting"  # the job is being submitted (JobRun's hashing/submitting/uploading)
RUNNING = "running"        # the backend runs it (JobRun's phase of the same name)
FETCHING = "fetching"      # the result is being downloaded (JobRun's phase of the same name)
FETCHED = "fetched"        # the result is on disk, not yet imported
DONE = "done"              # the result is on disk and waits for the panel's Import button
IMPORTED = "imported"
FAILED = "failed"
CANCELLED = "cancelled"
DETACHED = "detached"      # in flight when an earlier session ended: fetch it to import

#: States of a job still in flight: the timer advances these.
ACTIVE = frozenset({STARTING, SUBMITTING, RUNNING, FETCHING})
#: States a job read from jobs.json cannot still be in: it was in flight when Blender closed.
UNFINISHED = ACTIVE | {FETCHED}


class Host:
    """What the job manager needs from Blender. ``reconstruct.BlenderHost`` implements it with
    ``bpy``; tests implement it with a fake. ``context`` is Blender's context (the manager only
    reads ``context.scene.name``); ``prefs`` returns the add-on's preferences (``address``,
    ``timeout_s``, ``retries``, ``start_timeout_s``, ``autostart``, ``executable``, ``flame_dir``)."""

    def user_dir(self) -> Path:
        """The add-on's folder for user files (jobs.json, results/, backend.log)."""
        raise NotImplementedError

    def prefs(self, context=None):
        raise NotImplementedError

    def context(self):
        """The current context (what the timer runs in)."""
        raise NotImplementedError

    def online_access(self) -> bool:
        raise NotImplementedError

    def background(self) -> bool:
        """Blender runs without a window (scripts, tests)."""
        raise NotImplementedError

    def blend_path(self) -> str:
        """The open .blend file's path ("" when unsaved)."""
        raise NotImplementedError

    def ensure_timer(self) -> None:
        """Make sure the timer that calls :meth:`JobManager.tick` runs."""
        raise NotImplementedError

    def redraw(self) -> None:
        raise NotImplementedError

    def import_scene(self, context, rec: JobRecord):
        """The scene to import ``rec`` into: its own scene when that is the current one in its
        own file; None otherwise."""
        raise NotImplementedError

    def import_result(self, context, rec: JobRecord, scene):
        """Import the result in ``rec.out_dir`` into ``scene``; returns the head (with
        ``mesh_object.name``, ``armature_object.name`` and ``video_size``). Raises
        ``io_result.ResultError`` when the result cannot be read."""
        raise NotImplementedError

    def start_backend(self, executable: str, address: str, flame_dir: str, folder: Path) -> subprocess.Popen:
        raise NotImplementedError


@dataclass
class JobRecord:
    """What is remembered of a job across Blender sessions (jobs.json)."""

    key: str
    address: str
    video: str
    scene: str
    blend: str
    first_frame: float
    out_dir: str
    job_id: str | None = None
    state: str = STARTING
    """one of the states above"""
    message: str = ""
    stage: str = ""
    fraction: float = 0.0
    audio_present: bool = True
    created: float = field(default_factory=time.time)


@dataclass
class Tracked:
    record: JobRecord
    client: Client | None = None
    run: JobRun | None = None
    submit_kwargs: dict = field(default_factory=dict)
    hello: object = None
    deadline: float = 0.0
    server: subprocess.Popen | None = None
    imported: list = field(default_factory=list)
    modal: bool = False
    """a modal operator watches this job and imports it (with a full context)"""
    backend_note: str = ""
    """what happened when the add-on tried to start a local backend for this job"""
    cancelling: bool = False
    attach: bool = False
    """the job was submitted in an earlier session: attach to it, do not submit"""

    def user_text(self, text: str) -> str:
        """``text`` naming the user's own files where the backend named its uploaded copies
        (a bare ``video.mp4`` only when this run uploaded them)."""
        files = {"video": self.record.video, "audio": self.submit_kwargs.get("audio")}
        uploaded = self.run is not None and not self.run.path_mode
        return footage.user_paths(text, files, bare_names=uploaded)


def _hello(client: Client, timeout_s: float):
    return client.send("hello", {"client": "avface-blender", "protocol_version": P.PROTOCOL_VERSION},
                       timeout_s=timeout_s, retries=0)


class JobManager:
    def __init__(self, host: Host):
        self.host = host
        self.jobs: dict[str, Tracked] = {}
        self._timer = False

    # -- persistence ------------------------------------------------------------------------
    def path(self) -> Path:
        return self.host.user_dir() / JOBS_FILE

    def load(self) -> None:
        """Jobs from earlier sessions (not running here): listed in the panel, fetchable."""
        try:
            data = json.loads(self.path().read_text())
        except (OSError, json.JSONDecodeError):
            return
        for raw in data.get("jobs", []):
            try:
                record = JobRecord(**raw)
            except TypeError:
                continue
            if record.key not in self.jobs:
                if record.state in UNFINISHED:
                    record.state, record.message = DETACHED, "started in an earlier session; fetch it to import"
                self.jobs[record.key] = Tracked(record)

    def save(self) -> None:
        path = self.path()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"jobs": [asdict(t.record) for t in self.jobs.values()
                                            if t.record.job_id is not None]}, indent=1))
        os.replace(tmp, path)

    # -- starting ---------------------------------------------------------------------------
    def start(self, context, *, video: Path, audio: Path | None, has_sound: bool, options: dict,
              first_frame: float, job_id: str | None = None) -> Tracked:
        prefs = self.host.prefs(context)
        address = prefs.address.strip()
        if not P.is_loopback(address) and not self.host.online_access():
            raise ServiceError("bad_input", f"Blender's online access is off, so the add-on will not connect to "
                                            f"{address}; allow it in Preferences > System > Network or use a local backend")
        key = job_id or f"local-{time.time_ns():x}"
        out_dir = self.host.user_dir() / "results" / key
        record = JobRecord(key=key, address=address, video=str(video), scene=context.scene.name,
                           blend=self.host.blend_path(), first_frame=float(first_frame), out_dir=str(out_dir),
                           job_id=job_id, audio_present=has_sound or audio is not None)
        if not has_sound and audio is None:
            record.message = ("The strip has no sound strip: the backend uses the video's own audio track if it has "
                              "one, else reconstructs from the video only")
        tracked = Tracked(record, submit_kwargs=dict(video=video, audio=audio, options=options))
        tracked.client = Client(address, timeout_s=prefs.timeout_s, retries=prefs.retries)
        # is anyone there? (no retries: an absent backend must be reported quickly)
        tracked.hello = _hello(tracked.client, prefs.timeout_s)
        tracked.deadline = time.monotonic() + prefs.start_timeout_s
        self.jobs[key] = tracked
        self.ensure_timer()
        return tracked

    def fetch(self, context, key: str) -> Tracked:
        """Attach to a job recorded in an earlier session and import it when done. The backend
        is asked first, as for a new job: a local backend stopped when Blender quit is started
        again (with autostart on), and runs the job again if it was interrupted."""
        old = self.jobs[key]
        rec = old.record
        prefs = self.host.prefs(context)
        rec.state, rec.message = RUNNING, "fetching the job started earlier"
        rec.scene, rec.blend = context.scene.name, self.host.blend_path()
        old.client = Client(rec.address, timeout_s=prefs.timeout_s, retries=prefs.retries)
        old.run, old.server, old.backend_note, old.cancelling, old.modal = None, None, "", False, False
        old.attach = True
        old.hello = _hello(old.client, prefs.timeout_s)
        old.deadline = time.monotonic() + prefs.start_timeout_s
        self.save()
        self.ensure_timer()
        return old

    def cancel(self, key: str) -> None:
        t = self.jobs.get(key)
        if t is None:
            return
        if t.run is not None and not t.run.finished:
            t.run.cancel()
            t.cancelling = True
            t.record.message = "cancelling on the backend"
        elif t.run is None and t.record.state in (STARTING, SUBMITTING):
            self._finish(t, CANCELLED, "cancelled before the job was submitted")

    def active(self) -> list[Tracked]:
        return [t for t in self.jobs.values() if t.record.state in ACTIVE]

    def ensure_timer(self) -> None:
        self.host.ensure_timer()

    # -- advancing ----------------------------------------------------------------------------
    def tick(self) -> bool:
        """Advance every active job a little (never blocks); True while any is active."""
        for t in list(self.active()):
            try:
                self._advance(t)
            except Exception as e:  # one job's failure must never stop the timer
                log.exception("job %s", t.record.key)
                self._finish(t, FAILED, f"{type(e).__name__}: {e}")
        self.host.redraw()
        return bool(self.active())

    def _advance(self, t: Tracked) -> None:
        rec = t.record
        if t.run is None and not self._advance_starting(t):
            return
        run = t.run
        run.step(0.0)
        if run.job_id and rec.job_id is None:
            rec.job_id = run.job_id
            self.save()
        if run.phase in (RUNNING, FETCHING) and rec.state != run.phase:
            rec.state = run.phase
            self.save()
        if run.stage:
            rec.stage, rec.fraction = run.stage, float(run.fraction)
        if run.phase == FETCHING and run.fetch_total:
            rec.stage, rec.fraction = FETCHING, run.fetch_bytes / run.fetch_total
        if not run.finished:
            if not t.cancelling:
                rec.message = t.user_text(_progress_message(run))
            return
        if run.phase == CANCELLED:
            self._finish(t, CANCELLED, "Cancelled")
        elif run.phase == FAILED:
            self._finish(t, FAILED, _failure(run.error, rec))
        else:
            self._import(t)

    def _advance_starting(self, t: Tracked) -> bool:
        """Wait for the backend's hello, then submit (or attach to the job of an earlier
        session); True once the job has its run."""
        rec = t.record
        t.client.poll(0.0)
        if not t.hello.done:
            return False
        if t.hello.error is not None:
            if self._autostart(t):
                return False
            # a job of an earlier session stays listed, to fetch once the backend is there
            self._finish(t, DETACHED if t.attach else FAILED, _unreachable(rec.address, t, self.host.prefs()))
            return False
        if t.attach:
            local_backend.adopt(self.host.user_dir(), rec.address)
            t.run = JobRun(t.client, job_id=rec.job_id, out_dir=rec.out_dir)
            return True
        # a backend the add-on started (here or in another Blender): this Blender uses it too
        local_backend.adopt(self.host.user_dir(), rec.address)
        hello = t.hello.reply.content
        model = t.submit_kwargs["options"].get("model", "default")
        info = (hello.get("models") or {}).get(model)
        if info is not None and not info.get("available", True):
            self._finish(t, FAILED, f"The backend cannot use the {model} model: {info.get('reason') or 'missing files'}"
                         + (" (set the FLAME folder in the add-on's preferences)" if model == "flame" else ""))
            return False
        t.run = JobRun(t.client, out_dir=rec.out_dir, **t.submit_kwargs)
        rec.state = SUBMITTING
        return True

    def _import(self, t: Tracked) -> None:
        """The result is on disk. Import it here when nothing else will: in background mode
        (scripts, tests) the timer's context is the only one. With a window, the modal
        operator imports on its next event, where the context is complete; a job whose
        operator has gone (a file was loaded) waits for the panel's Import button."""
        rec = t.record
        meta = t.run.result_meta or {}
        if "audio_present" in meta:  # what the backend really used
            rec.audio_present = bool(meta["audio_present"])
        # the result names the file the backend read, an uploaded copy perhaps: the scene gets the user's
        io_result.write_source(rec.out_dir, rec.video)
        rec.state, rec.stage, rec.fraction = FETCHED, "", 1.0
        self.save()
        if self.host.background() or not t.modal:
            self.import_job(self.host.context(), t)

    def import_job(self, context, t: Tracked) -> None:
        rec = t.record
        scene = self.host.import_scene(context, rec)
        if scene is None:
            self._finish(t, DONE, f"Result ready in {rec.out_dir}: press Import, or File > Import > AVFace result")
            return
        try:
            head = self.host.import_result(context, rec, scene)
        except io_result.ResultError as e:
            self._finish(t, FAILED, f"The backend's result cannot be imported: {e}")
            return
        except Exception as e:
            log.exception("import of %s failed", rec.out_dir)
            self._finish(t, FAILED, f"The import failed: {type(e).__name__}: {e}")
            return
        t.imported = [head.mesh_object.name, head.armature_object.name]
        note = "" if rec.audio_present else " (video only: the strip has no sound)"
        if head.video_size is not None:
            note += (f"; the scene renders at another size than the video's {head.video_size[0]}x{head.video_size[1]}:"
                     " set it to that for the camera to match")
        self._finish(t, IMPORTED, f"Imported {head.mesh_object.name}{note}")

    def _finish(self, t: Tracked, state: str, message: str) -> None:
        rec = t.record
        rec.state, rec.message = state, t.user_text(message)
        if state != IMPORTED:
            rec.stage = ""
        log.info("job %s: %s: %s", rec.job_id or rec.key, state, message)
        if t.client is not None:
            t.client.close()
            t.client = None
        if rec.job_id is not None:  # a job never submitted leaves nothing to remember
            self.save()

    def _autostart(self, t: Tracked) -> bool:
        """Start a local backend when allowed, or wait for the one the add-on started earlier
        (here or in another Blender) that has not answered yet; True while waiting for it."""
        prefs = self.host.prefs()
        rec = t.record
        if not (prefs.autostart and P.is_loopback(rec.address)):
            return False
        folder = self.host.user_dir()
        if t.server is None and not t.backend_note:
            found = local_backend.find(folder, rec.address)
            if found is not None:
                t.backend_note = f"the local backend started earlier (process {found.pid}) did not answer in time"
                rec.message = f"waiting for the local backend (process {found.pid}) to answer"
            else:
                try:
                    t.server = self.host.start_backend(prefs.executable, rec.address, prefs.flame_dir, folder)
                except OSError as e:
                    t.backend_note = f"cannot start the backend: {e}"
                    return False
                if isinstance(getattr(t.server, "pid", None), int):
                    local_backend.record_started(folder, t.server.pid, rec.address)
                t.backend_note = "the local backend started but did not answer in time"
                rec.message = "starting a local backend"
        if t.server is not None and t.server.poll() is not None:
            t.backend_note = f"the local backend exited with code {t.server.returncode}; see {folder / 'backend.log'}"
            return False
        if time.monotonic() > t.deadline:
            return False
        t.hello = _hello(t.client, 1.0)
        return True


def _progress_message(run: JobRun) -> str:
    """What the job is doing now, in a few words: its phase, and once it runs on the backend,
    its stage and the backend's note on it (``tracking: frame 12/30``)."""
    if run.phase == "hashing":
        return "reading the video for the upload"
    if run.phase == "submitting":
        return "submitting the job"
    if run.phase == "uploading":
        done = run.upload_bytes / run.upload_total if run.upload_total else 0.0
        return f"uploading the footage to the backend ({100 * done:.0f}%)"
    if run.phase == FETCHING:
        return "downloading the result"
    if run.stage:
        return f"{run.stage}: {run.message}" if run.message else str(run.stage)
    return "queued on the backend" if run.state == P.QUEUED else "waiting for the backend"


def _unreachable(address: str, t: Tracked, prefs) -> str:
    extra = f" ({t.backend_note})" if t.backend_note else ""
    hint = ("switch on 'Start a local backend automatically' in the add-on's preferences, or run `avface serve`"
            if not prefs.autostart else "check the avface executable in the add-on's preferences")
    return f"The AVFace backend is not reachable at {address}{extra}: {hint}"


def _failure(error: ServiceError | None, rec: JobRecord) -> str:
    if error is None:
        return "The job failed"
    if isinstance(error, NoAnswer) or error.code == "no_answer":
        return (f"Lost the AVFace backend at {rec.address} during the job ({error}); "
                f"the job {rec.job_id or ''} can be fetched again from the panel once the backend is back")
    return f"The backend reports {error.code}: {error.message}"
