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

The head first: a job with the detail stage is submitted with ``JobRun(head=True)``, which
ends as soon as the backend has the head (the result but for its detail maps, whose
``meta.detail.state`` is ``pending``). That head is imported as any result (fetched ->
imported by the modal operator or the timer), and the job goes on as ``detailing``: a second
``JobRun(job_id=...)`` waits for the job's end and fetches the whole result into the same
folder, and the timer adds its detail maps to the head already in the scene
(``Host.attach_detail``), leaving everything else on it as the animator has it by then. A
cancel or a failure in that second step keeps the head (``cancelled`` or ``failed``, the head
named in ``JobRecord.head``); a job detailing when Blender closed is ``detached`` in the next
session, and fetching it adds the detail to that head, found by name.
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
from ._vendor.result import detail_state

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
DETAILING = "detailing"    # the head is imported; the job goes on for its detail maps

#: States of a job on its way to the scene (the modal operator watches these).
ACTIVE = frozenset({STARTING, SUBMITTING, RUNNING, FETCHING})
#: States of a job still in flight: the timer advances these.
IN_FLIGHT = ACTIVE | {DETAILING}
#: States a job read from jobs.json cannot still be in: it was in flight when Blender closed.
UNFINISHED = IN_FLIGHT | {FETCHED}

#: ``meta.detail.state`` of a head whose detail maps are still being made (avface.result.DETAIL_STATES)
DETAIL_PENDING = "pending"
DETAIL_COMPLETE = "complete"
#: Why a result came without detail maps, by its ``meta.detail.state``.
NO_DETAIL = {"skipped": "no frame had a trusted face texel to learn them from",
             "cancelled": "their stage was cancelled", "failed": "their stage failed"}


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

    def attach_detail(self, context, rec: JobRecord):
        """Add the detail maps of the whole result in ``rec.out_dir`` to the head imported
        from its head (the mesh object named ``rec.head[0]``, or whichever mesh came from that
        result file), as a one-step import of the whole result would have made them, touching
        nothing else. Returns (the mesh object's name, whether the maps were added: False when
        it had them already), or None when that head is in no scene any more. Raises
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
    """when Reconstruct was pressed (wall clock): the start of head_s and detail_s"""
    head: list = field(default_factory=list)
    """[mesh object, armature object] names of the head imported from this job"""
    detail: str = ""
    """``meta.detail.state`` of the last result fetched ("" before any)"""
    head_s: float | None = None
    """seconds (wall) from Reconstruct to the head in the scene"""
    detail_s: float | None = None
    """seconds (wall) from Reconstruct to the detail maps on the head"""


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
    note: str = ""
    """what the head's import had to say besides its name (no sound, the render size)"""
    head_again: bool = False
    """the head was asked for again after its run failed"""

    def user_text(self, text: str) -> str:
        """``text`` naming the user's own files where the backend named its uploaded copies
        (a bare ``video.mp4`` only when this run uploaded them)."""
        files = {"video": self.record.video, "audio": self.submit_kwargs.get("audio")}
        uploaded = self.run is not None and not self.run.path_mode
        return footage.user_paths(text, files, bare_names=uploaded)


def _follow(t: Tracked, **kwargs) -> JobRun:
    """A new run on the job ``t`` runs (the job's id, the same client), which names the files
    as the one before it did (an upload's copies are the user's files in the messages)."""
    run = JobRun(t.client, job_id=t.record.job_id, **kwargs)
    if t.run is not None:
        run.path_mode = t.run.path_mode
    return run


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
                    record.message = ("started in an earlier session; fetch it to import" if not record.head else
                                      f"started in an earlier session; fetch it to add its detail maps to {record.head[0]}")
                    record.state = DETACHED
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
        if rec.head:  # its head is in a scene already: the whole result, for the head's detail maps
            rec.state, rec.message = DETAILING, f"fetching the detail maps of {rec.head[0]}"
        else:
            rec.state, rec.message = RUNNING, "fetching the job started earlier"
            rec.scene, rec.blend = context.scene.name, self.host.blend_path()
        old.client = Client(rec.address, timeout_s=prefs.timeout_s, retries=prefs.retries)
        old.run, old.server, old.backend_note, old.cancelling, old.modal = None, None, "", False, False
        old.head_again = False
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
            if t.run.head and t.run.phase == FETCHING and t.run.job_id is not None:
                # the head is downloading while the job goes on for its detail: cancel the job
                t.run.cancel()  # (which stops the download only)
                t.run = _follow(t, fetch=False)
            t.run.cancel()
            t.cancelling = True
            t.record.message = "cancelling on the backend"
        elif t.run is None and t.record.state in (STARTING, SUBMITTING):
            self._finish(t, CANCELLED, "cancelled before the job was submitted")

    def active(self) -> list[Tracked]:
        """The jobs the timer advances (IN_FLIGHT: the head on its way, or the detail)."""
        return [t for t in self.jobs.values() if t.record.state in IN_FLIGHT]

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
        detailing = rec.state == DETAILING
        if not detailing and run.phase in (RUNNING, FETCHING) and rec.state != run.phase:
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
        if detailing:
            self._detail_ended(t)
        elif run.phase == CANCELLED:
            self._finish(t, CANCELLED, "Cancelled")
        elif run.phase == FAILED:
            if run.head and run.job_id is not None and not t.head_again and not _lost(run.error):
                # a job that fails after its head keeps that head on the backend, but this run
                # may have ended without it (its download failed while the job's end rewrote
                # result.npz): ask once for the head the job kept (its detail then fails, and says why)
                t.head_again = True
                t.run = _follow(t, out_dir=rec.out_dir, head=True)
                return
            self._finish(t, FAILED, _failure(run.error, rec))
        elif run.result_path is None:  # cancelled while the head downloaded, and the job ended meanwhile
            self._finish(t, CANCELLED, "Cancelled")
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
            # with its head in a scene already, the whole result; else the head as soon as it is ready
            t.run = JobRun(t.client, job_id=rec.job_id, out_dir=rec.out_dir, head=not rec.head)
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
        # with the detail stage, the head first (then the detail onto it); without, one step
        head = bool(t.submit_kwargs["options"].get("detail", True))
        t.run = JobRun(t.client, out_dir=rec.out_dir, head=head, **t.submit_kwargs)
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
        rec.detail = detail_state(meta)
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
        rec.head = list(t.imported)
        note = "" if rec.audio_present else " (video only: the strip has no sound)"
        if head.video_size is not None:
            note += (f"; the scene renders at another size than the video's {head.video_size[0]}x{head.video_size[1]}:"
                     " set it to that for the camera to match")
        t.note = note
        if rec.detail == DETAIL_PENDING and rec.job_id is not None:
            self._await_detail(t)
        elif rec.detail in NO_DETAIL:
            self._finish(t, IMPORTED, f"Imported {head.mesh_object.name} without detail maps: {NO_DETAIL[rec.detail]}{note}")
        else:
            self._finish(t, IMPORTED, f"Imported {head.mesh_object.name}{note}")

    # -- the second step: the detail maps onto the head in the scene ---------------------------
    def _await_detail(self, t: Tracked) -> None:
        """The head is in the scene; the job goes on for its detail maps: wait for its end
        and fetch the whole result into the same folder (the timer adds the maps)."""
        rec = t.record
        rec.head_s = time.time() - rec.created
        rec.state, rec.stage, rec.fraction = DETAILING, "", 0.0
        rec.message = f"Head imported in {rec.head_s:.0f} s: {rec.head[0]}; its detail maps follow"
        log.info("job %s: head %s imported in %.1f s; the detail maps follow", rec.job_id, rec.head[0], rec.head_s)
        if t.client is None:  # imported with the panel's Import button, after the client was closed
            prefs = self.host.prefs()
            t.client = Client(rec.address, timeout_s=prefs.timeout_s, retries=prefs.retries)
        t.run, t.cancelling = _follow(t, out_dir=rec.out_dir), False
        self.save()
        self.ensure_timer()

    def _detail_ended(self, t: Tracked) -> None:
        """The second run has ended: add the detail maps to the head, or say why there are none
        (the head stays as it is)."""
        rec, run = t.record, t.run
        name = rec.head[0] if rec.head else "the head"
        if run.phase == CANCELLED:
            rec.detail = "cancelled"
            self._finish(t, CANCELLED, f"Detail cancelled: the head {name} is kept without detail maps")
            return
        if run.phase == FAILED:
            error = run.error
            if _lost(error):
                # the job may well go on: listed as a job of an earlier session, to fetch again
                self._finish(t, DETACHED, f"Lost the AVFace backend at {rec.address} during the detail maps ({error}); "
                                          f"fetch the job from the panel once the backend is back to add them to {name}")
                return
            rec.detail = "failed"
            why = f"{error.code}: {error.message}" if error is not None else "the job failed"
            self._finish(t, FAILED, f"The detail maps failed ({why}); the head {name} is kept without them")
            return
        meta = run.result_meta or {}
        rec.detail = detail_state(meta)
        io_result.write_source(rec.out_dir, rec.video)
        if rec.detail != DETAIL_COMPLETE:
            why = NO_DETAIL.get(rec.detail, "the job was submitted without them")
            self._finish(t, IMPORTED, f"Imported {name} without detail maps: {why}{t.note}")
            return
        try:
            attached = self.host.attach_detail(self.host.context(), rec)
        except io_result.ResultError as e:
            self._finish(t, FAILED, f"The detail maps cannot be added: {e}; the head {name} is kept without them")
            return
        except Exception as e:
            log.exception("adding the detail maps of %s failed", rec.out_dir)
            self._finish(t, FAILED, f"Adding the detail maps failed ({type(e).__name__}: {e}); "
                                    f"the head {name} is kept without them")
            return
        if attached is None:
            self._finish(t, DONE, f"The head {name} is no longer in the scene, so its detail maps were not added; "
                                  f"the whole result is in {rec.out_dir}: press Import, or File > Import > AVFace result")
            return
        mesh_name, added = attached
        rec.head[0] = mesh_name  # renamed meanwhile, perhaps
        if not added:
            self._finish(t, IMPORTED, f"{mesh_name} has its detail maps already")
            return
        rec.detail_s = time.time() - rec.created
        log.info("job %s: detail maps added to %s in %.1f s (head in %.1f s)", rec.job_id, mesh_name, rec.detail_s,
                 rec.head_s or 0.0)
        self._finish(t, IMPORTED, f"Imported {mesh_name}: the head in {rec.head_s or 0.0:.0f} s, its detail maps in "
                                  f"{rec.detail_s:.0f} s{t.note}")

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


def _lost(error: ServiceError | None) -> bool:
    """The backend stopped answering (the job itself may well go on)."""
    return error is not None and (isinstance(error, NoAnswer) or error.code == "no_answer")


def _failure(error: ServiceError | None, rec: JobRecord) -> str:
    if error is None:
        return "The job failed"
    if _lost(error):
        return (f"Lost the AVFace backend at {rec.address} during the job ({error}); "
                f"the job {rec.job_id or ''} can be fetched again from the panel once the backend is back")
    return f"The backend reports {error.code}: {error.message}"
