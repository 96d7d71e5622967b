"""Reconstruct face: the panel (Sequencer and 3D Viewport sidebars), the modal operator and
the job manager that talks to the backend.

Why no thread: the vendored client is a non-blocking state machine (``JobRun.step(0)`` never
waits), so the manager advances every job from a timer on Blender's main thread. No ``bpy``
data is touched anywhere but there, and the UI never waits on the network.

Why a manager apart from the operator: Blender ends modal operators when a file is loaded,
but a job must survive that. The manager lives in this module, is driven by a persistent
``bpy.app.timers`` timer, and records every job in ``jobs.json`` under the add-on's user
folder (``bpy.utils.extension_path_user``), so a job started before Blender was closed appears
in the panel again and can be fetched. The modal operator only listens for Esc and reports.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bpy
from bpy.props import EnumProperty, PointerProperty, StringProperty

from . import importer, io_result, preferences
from ._vendor import protocol as P
from ._vendor.client import Client, JobRun, NoAnswer, ServiceError

log = logging.getLogger(__name__)

TICK_S = 0.1
JOBS_FILE = "jobs.json"
MODELS = (("default", "Default", "The embedded MediaPipe canonical head (no download)"),
          ("flame", "FLAME", "FLAME (the backend needs the FLAME files)"))


# ---------------------------------------------------------------------------------------
# Where user files go
# ---------------------------------------------------------------------------------------
def user_dir() -> Path:
    """The add-on's folder for user files: ``extension_path_user`` when installed as an
    extension; Blender's user data folder otherwise (a development checkout)."""
    package = __package__
    try:
        path = bpy.utils.extension_path_user(package, path="", create=True)
    except (ValueError, AttributeError):
        path = bpy.utils.user_resource("DATAFILES", path="avface", create=True)
    return Path(path)


# ---------------------------------------------------------------------------------------
# Strips
# ---------------------------------------------------------------------------------------
def _all_strips(scene):
    ed = scene.sequence_editor
    if ed is None:
        return []
    return list(getattr(ed, "strips_all", None) or getattr(ed, "sequences_all", None) or [])


def movie_strip(scene):
    """The active strip if it is a movie, else the only movie strip, else None."""
    ed = scene.sequence_editor
    if ed is None:
        return None
    active = ed.active_strip
    if active is not None and active.type == "MOVIE":
        return active
    movies = [s for s in _all_strips(scene) if s.type == "MOVIE"]
    return movies[0] if len(movies) == 1 else None


def sound_strip(scene, movie):
    """The sound strip that goes with ``movie``: one that starts where it starts (as Blender
    adds a movie's sound), else one that overlaps it."""
    sounds = [s for s in _all_strips(scene) if s.type == "SOUND" and s.sound is not None]
    same = [s for s in sounds if abs(s.frame_start - movie.frame_start) < 0.5]
    if same:
        return same[0]
    overlap = [s for s in sounds if s.frame_final_start < movie.frame_final_end and s.frame_final_end > movie.frame_final_start]
    return overlap[0] if overlap else None


def strip_inputs(scene, movie) -> dict:
    """Paths and frames to submit for ``movie``: video, audio (a separate sound file or None),
    whether there is sound at all, the source frame range and the scene frame of source frame 0."""
    video = Path(bpy.path.abspath(movie.filepath)).resolve()
    sound = sound_strip(scene, movie)
    audio = None
    if sound is not None:
        sound_path = Path(bpy.path.abspath(sound.sound.filepath)).resolve()
        if sound_path != video:
            audio = sound_path
    # The strip shows source frames [offset_start, frame_duration - offset_end); the offsets
    # count scene frames, so a movie at another rate converts them to its own frames.
    scene_fps = scene.render.fps / scene.render.fps_base
    to_source = (getattr(movie, "fps", 0.0) or scene_fps) / scene_fps
    start = int(round(movie.frame_offset_start * to_source))
    end = int(round((movie.frame_final_duration + movie.frame_offset_start) * to_source))
    return {"video": video, "audio": audio, "has_sound": sound is not None, "frame_start": start,
            "frame_end": end, "first_frame": float(movie.frame_start)}


# ---------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------
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
    state: str = "starting"
    """starting, submitting, running, fetching, done (fetched), imported, failed, cancelled"""
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


class JobManager:
    def __init__(self):
        self.jobs: dict[str, Tracked] = {}
        self._timer = False

    # -- persistence ------------------------------------------------------------------------
    def path(self) -> Path:
        return user_dir() / JOBS_FILE

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
                if record.state in ("starting", "submitting", "running", "fetching", "fetched"):
                    record.state, record.message = "detached", "started in an earlier session; fetch it to import"
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
        prefs = preferences.get(context)
        address = prefs.address.strip()
        if not P.is_loopback(address) and not bpy.app.online_access:
            raise ServiceError("bad_input", f"Blender's online access is off, so the add-on will not connect to "
                                            f"{address}; allow it in Preferences > System > Network or use a local backend")
        key = job_id or f"local-{time.time_ns():x}"
        out_dir = user_dir() / "results" / key
        record = JobRecord(key=key, address=address, video=str(video), scene=context.scene.name,
                           blend=bpy.data.filepath, first_frame=float(first_frame), out_dir=str(out_dir),
                           job_id=job_id, audio_present=has_sound or audio is not None)
        if not has_sound and audio is None:
            record.message = ("The strip has no sound strip: the backend uses the video's own audio track if it has "
                              "one, else reconstructs from the video only")
        tracked = Tracked(record, submit_kwargs=dict(video=video, audio=audio, options=options))
        tracked.client = Client(address, timeout_s=prefs.timeout_s, retries=prefs.retries)
        # is anyone there? (no retries: an absent backend must be reported quickly)
        tracked.hello = tracked.client.send("hello", {"client": "avface-blender", "protocol_version": P.PROTOCOL_VERSION},
                                            timeout_s=prefs.timeout_s, retries=0)
        tracked.deadline = time.monotonic() + prefs.start_timeout_s
        self.jobs[key] = tracked
        self.ensure_timer()
        return tracked

    def fetch(self, context, key: str) -> Tracked:
        """Attach to a job recorded in an earlier session and import it when done."""
        old = self.jobs[key]
        rec = old.record
        prefs = preferences.get(context)
        rec.state, rec.message = "running", "fetching the job started earlier"
        rec.scene, rec.blend = context.scene.name, bpy.data.filepath
        old.client = Client(rec.address, timeout_s=prefs.timeout_s, retries=prefs.retries)
        old.run = JobRun(old.client, job_id=rec.job_id, out_dir=rec.out_dir)
        old.modal = False
        self.save()
        self.ensure_timer()
        return old

    def cancel(self, key: str) -> None:
        t = self.jobs.get(key)
        if t is None:
            return
        if t.run is not None and not t.run.finished:
            t.run.cancel()
            t.record.message = "cancelling on the backend"
        elif t.run is None and t.record.state in ("starting", "submitting"):
            self._finish(t, "cancelled", "cancelled before the job was submitted")

    def active(self) -> list[Tracked]:
        return [t for t in self.jobs.values() if t.record.state in ("starting", "submitting", "running", "fetching")]

    def ensure_timer(self) -> None:
        if not bpy.app.background and not bpy.app.timers.is_registered(_timer):
            bpy.app.timers.register(_timer, first_interval=TICK_S, persistent=True)

    # -- advancing ----------------------------------------------------------------------------
    def tick(self) -> bool:
        """Advance every active job a little (never blocks); True while any is active."""
        for t in list(self.active()):
            try:
                self._advance(t)
            except Exception as e:  # one job's failure must never stop the timer
                log.exception("job %s", t.record.key)
                self._finish(t, "failed", f"{type(e).__name__}: {e}")
        _redraw()
        return bool(self.active())

    def _advance(self, t: Tracked) -> None:
        rec = t.record
        if rec.state == "starting":
            t.client.poll(0.0)
            if not t.hello.done:
                return
            if t.hello.error is not None:
                if self._autostart(t):
                    return
                self._finish(t, "failed", _unreachable(rec.address, t))
                return
            hello = t.hello.reply.content
            model = t.submit_kwargs["options"].get("model", "default")
            info = (hello.get("models") or {}).get(model)
            if info is not None and not info.get("available", True):
                self._finish(t, "failed", f"The backend cannot use the {model} model: {info.get('reason') or 'missing files'}"
                             + (" (set the FLAME folder in the add-on's preferences)" if model == "flame" else ""))
                return
            t.run = JobRun(t.client, out_dir=rec.out_dir, **t.submit_kwargs)
            rec.state = "submitting"
        run = t.run
        run.step(0.0)
        if run.job_id and rec.job_id is None:
            rec.job_id = run.job_id
            self.save()
        if run.phase in ("running", "fetching") and rec.state != run.phase:
            rec.state = run.phase
            self.save()
        if run.stage:
            rec.stage, rec.fraction = run.stage, float(run.fraction)
        if run.phase == "fetching" and run.fetch_total:
            rec.stage, rec.fraction = "fetching", run.fetch_bytes / run.fetch_total
        if not run.finished:
            return
        if run.phase == "cancelled":
            self._finish(t, "cancelled", "Cancelled")
        elif run.phase == "failed":
            self._finish(t, "failed", _failure(run.error, rec))
        else:
            self._import(t)

    def _import(self, t: Tracked) -> None:
        """The result is on disk. Import it here when nothing else will: in background mode
        (scripts, tests) the timer's context is the only one. With a window, the modal
        operator imports on its next event, where the context is complete; a job whose
        operator has gone (a file was loaded) waits for the panel's Import button."""
        rec = t.record
        meta = t.run.result_meta or {}
        if "audio_present" in meta:  # what the backend really used
            rec.audio_present = bool(meta["audio_present"])
        rec.state, rec.stage, rec.fraction = "fetched", "", 1.0
        self.save()
        if bpy.app.background or not t.modal:
            self.import_job(bpy.context, t)

    def import_job(self, context, t: Tracked) -> None:
        rec = t.record
        scene = bpy.data.scenes.get(rec.scene)
        if scene is None or scene != context.scene or bpy.data.filepath != rec.blend:
            self._finish(t, "done", f"Result ready in {rec.out_dir}: press Import, or File > Import > AVFace result")
            return
        collection = scene.avface.collection
        try:
            # the strip already sits in the scene's range and output size: leave the editor's
            # frame range and resolution alone
            head = importer.import_result(context, Path(rec.out_dir) / "result.npz", first_frame=rec.first_frame,
                                          collection=collection, name=Path(rec.video).stem, set_frame_range=False,
                                          set_resolution=False)
        except io_result.ResultError as e:
            self._finish(t, "failed", f"The backend's result cannot be imported: {e}")
            return
        except Exception as e:
            log.exception("import of %s failed", rec.out_dir)
            self._finish(t, "failed", f"The import failed: {type(e).__name__}: {e}")
            return
        t.imported = [head.mesh_object.name, head.armature_object.name]
        note = "" if rec.audio_present else " (video only: the strip has no sound)"
        if head.video_size is not None:
            note += (f"; the scene renders at another size than the video's {head.video_size[0]}x{head.video_size[1]}:"
                     " set it to that for the camera to match")
        self._finish(t, "imported", f"Imported {head.mesh_object.name}{note}")

    def _finish(self, t: Tracked, state: str, message: str) -> None:
        rec = t.record
        rec.state, rec.message = state, message
        if state != "imported":
            rec.stage = ""
        log.info("job %s: %s: %s", rec.job_id or rec.key, state, message)
        if t.client is not None:
            t.client.close()
            t.client = None
        if rec.job_id is not None:  # a job never submitted leaves nothing to remember
            self.save()

    def _autostart(self, t: Tracked) -> bool:
        """Start a local backend when allowed; True while waiting for it to answer."""
        prefs = preferences.get()
        rec = t.record
        if not (prefs.autostart and P.is_loopback(rec.address)):
            return False
        if t.server is None:
            try:
                t.server = start_backend(prefs.executable, rec.address, prefs.flame_dir, user_dir())
            except OSError as e:
                rec.message = f"cannot start the backend: {e}"
                return False
            rec.message = "starting a local backend"
        if t.server.poll() is not None:
            rec.message = f"the local backend exited with code {t.server.returncode}; see {user_dir() / 'backend.log'}"
            return False
        if time.monotonic() > t.deadline:
            return False
        t.hello = t.client.send("hello", {"client": "avface-blender", "protocol_version": P.PROTOCOL_VERSION},
                                timeout_s=1.0, retries=0)
        return True


def start_backend(executable: str, address: str, flame_dir: str, folder: Path) -> subprocess.Popen:
    """``avface serve --bind ADDRESS`` (or ``PYTHON -m avface serve``) in the background."""
    exe = bpy.path.abspath(executable) if executable else (shutil.which("avface") or "")
    if not exe:
        raise OSError("no avface executable configured and none on PATH")
    name = Path(exe).name.lower()
    cmd = [exe, "-m", "avface"] if name.startswith("python") else [exe]
    cmd += ["serve", "--bind", address]
    if flame_dir:
        cmd += ["--flame-dir", bpy.path.abspath(flame_dir)]
    log_file = open(folder / "backend.log", "ab")
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def _unreachable(address: str, t: Tracked) -> str:
    prefs = preferences.get()
    extra = f" ({t.record.message})" if t.record.message and "backend" in t.record.message else ""
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


MANAGER = JobManager()


def _timer():
    return TICK_S if MANAGER.tick() else None


def _redraw():
    wm = getattr(bpy.context, "window_manager", None)
    if wm is None:
        return
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type in ("SEQUENCE_EDITOR", "VIEW_3D"):
                area.tag_redraw()


# ---------------------------------------------------------------------------------------
# Scene settings, operators, panels
# ---------------------------------------------------------------------------------------
class AVFaceSettings(bpy.types.PropertyGroup):
    model: EnumProperty(name="Face model", items=MODELS, default="default")
    stages: EnumProperty(name="Stages", options={"ENUM_FLAG"}, default={"coarse", "detail"}, items=preferences.STAGES)
    collection: PointerProperty(name="Collection", type=bpy.types.Collection,
                                description="Where the head goes (a new collection when empty)")
    job_key: StringProperty(name="Job", default="")


def _options(context, settings, inputs) -> dict:
    prefs = preferences.get(context)
    options = {"model": settings.model, "frame_start": inputs["frame_start"], "frame_end": inputs["frame_end"],
               "preview": "preview" in settings.stages, "detail": "detail" in settings.stages}
    if settings.model == "flame" and prefs.flame_dir:
        options["flame_dir"] = bpy.path.abspath(prefs.flame_dir)
    return options


class AVFACE_OT_reconstruct(bpy.types.Operator):
    """Reconstruct an animated 3D head from the movie strip and its sound"""

    bl_idname = "avface.reconstruct"
    bl_label = "Reconstruct Face"
    bl_options = {"REGISTER"}

    _key = ""
    _timer = None

    @classmethod
    def poll(cls, context):
        return movie_strip(context.scene) is not None

    def execute(self, context):
        scene = context.scene
        movie = movie_strip(scene)
        if movie is None:
            self.report({"ERROR"}, "Select a movie strip in the Sequencer")
            return {"CANCELLED"}
        inputs = strip_inputs(scene, movie)
        if not inputs["video"].is_file():
            self.report({"ERROR"}, f"The strip's video {inputs['video']} does not exist")
            return {"CANCELLED"}
        settings = scene.avface
        try:
            tracked = MANAGER.start(context, video=inputs["video"], audio=inputs["audio"], has_sound=inputs["has_sound"],
                                    options=_options(context, settings, inputs), first_frame=inputs["first_frame"])
        except ServiceError as e:
            self.report({"ERROR"}, e.message)
            return {"CANCELLED"}
        settings.job_key = self._key = tracked.record.key
        if not inputs["has_sound"]:
            self.report({"WARNING"}, tracked.record.message)
        return {"FINISHED"}

    def invoke(self, context, event):
        result = self.execute(context)
        if "FINISHED" not in result or context.window is None:
            return result
        MANAGER.jobs[self._key].modal = True
        self._timer = context.window_manager.event_timer_add(0.25, window=context.window)
        context.window_manager.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def modal(self, context, event):
        tracked = MANAGER.jobs.get(self._key)
        if event.type == "ESC" and event.value == "PRESS":
            MANAGER.cancel(self._key)
            return {"RUNNING_MODAL"}
        if event.type != "TIMER" or tracked is None:
            return {"PASS_THROUGH"}
        rec = tracked.record
        if rec.state == "fetched":
            MANAGER.import_job(context, tracked)
        if rec.state in ("starting", "submitting", "running", "fetching"):
            return {"PASS_THROUGH"}
        context.window_manager.event_timer_remove(self._timer)
        if rec.state in ("imported", "done"):
            self.report({"INFO"}, rec.message)
            return {"FINISHED"}
        self.report({"ERROR"} if rec.state == "failed" else {"WARNING"}, rec.message)
        return {"CANCELLED"}


class AVFACE_OT_cancel(bpy.types.Operator):
    """Cancel the reconstruction on the backend"""

    bl_idname = "avface.cancel"
    bl_label = "Cancel"

    key: StringProperty(default="")

    def execute(self, context):
        key = self.key or context.scene.avface.job_key
        if key not in MANAGER.jobs:
            self.report({"WARNING"}, "No such job")
            return {"CANCELLED"}
        MANAGER.cancel(key)
        return {"FINISHED"}


class AVFACE_OT_fetch(bpy.types.Operator):
    """Fetch a job started in an earlier session and import its head"""

    bl_idname = "avface.fetch"
    bl_label = "Fetch"

    key: StringProperty()

    def execute(self, context):
        if self.key not in MANAGER.jobs or MANAGER.jobs[self.key].record.job_id is None:
            self.report({"ERROR"}, "No such job")
            return {"CANCELLED"}
        MANAGER.fetch(context, self.key)
        context.scene.avface.job_key = self.key
        return {"FINISHED"}


class AVFACE_OT_import_job(bpy.types.Operator):
    """Import the fetched result of this job into the current scene"""

    bl_idname = "avface.import_job"
    bl_label = "Import"
    bl_options = {"REGISTER", "UNDO"}

    key: StringProperty()

    def execute(self, context):
        t = MANAGER.jobs.get(self.key)
        if t is None or not (Path(t.record.out_dir) / "result.npz").is_file():
            self.report({"ERROR"}, "This job has no fetched result")
            return {"CANCELLED"}
        t.record.scene, t.record.blend = context.scene.name, bpy.data.filepath
        MANAGER.import_job(context, t)
        level = {"imported": "INFO"}.get(t.record.state, "ERROR")
        self.report({level}, t.record.message)
        return {"FINISHED"} if t.record.state == "imported" else {"CANCELLED"}


class AVFACE_OT_forget(bpy.types.Operator):
    """Remove this job from the list (the backend keeps it)"""

    bl_idname = "avface.forget"
    bl_label = "Forget"

    key: StringProperty()

    def execute(self, context):
        MANAGER.jobs.pop(self.key, None)
        MANAGER.save()
        return {"FINISHED"}


def draw_panel(layout, context):
    scene = context.scene
    settings = scene.avface
    movie = movie_strip(scene)
    box = layout.box()
    if movie is None:
        box.label(text="Select a movie strip in the Sequencer", icon="INFO")
    else:
        inputs = strip_inputs(scene, movie)
        box.label(text=f"Strip: {movie.name}", icon="FILE_MOVIE")
        sound = sound_strip(scene, movie)
        if sound is None:
            box.label(text="No sound strip: video only", icon="ERROR")
        else:
            box.label(text=f"Sound: {sound.name}", icon="SOUND")
        box.label(text=f"Frames {inputs['frame_start']}-{inputs['frame_end']} at scene frame {inputs['first_frame']:g}")
    layout.prop(settings, "model")
    if settings.model == "flame" and not preferences.get(context).flame_dir:
        layout.label(text="FLAME folder not set: the backend must have FLAME", icon="ERROR")
    layout.prop(settings, "stages")
    layout.prop(settings, "collection")
    tracked = MANAGER.jobs.get(settings.job_key)
    running = tracked is not None and tracked.record.state in ("starting", "submitting", "running", "fetching")
    row = layout.row()
    row.enabled = movie is not None and not running
    row.operator(AVFACE_OT_reconstruct.bl_idname, icon="PLAY")
    if tracked is not None:
        rec = tracked.record
        if running:
            text = f"{rec.stage or rec.state} {100 * rec.fraction:.0f}%"
            if hasattr(layout, "progress"):
                layout.progress(factor=rec.fraction, type="BAR", text=text)
            else:
                layout.label(text=text)
            layout.operator(AVFACE_OT_cancel.bl_idname, icon="CANCEL")
        if rec.message:
            icon = {"failed": "ERROR", "cancelled": "CANCEL", "imported": "CHECKMARK"}.get(rec.state, "INFO")
            for line in _wrap(rec.message):
                layout.label(text=line, icon=icon)
                icon = "BLANK1"
    ready = [t for t in MANAGER.jobs.values() if t.record.state == "done"]
    for t in ready:
        row = layout.row()
        row.label(text=f"{Path(t.record.video).name}: result ready")
        row.operator(AVFACE_OT_import_job.bl_idname, text="Import").key = t.record.key
    earlier = [t for t in MANAGER.jobs.values() if t.record.state == "detached"]
    if earlier:
        box = layout.box()
        box.label(text="Jobs from earlier sessions")
        for t in earlier:
            row = box.row()
            row.label(text=f"{Path(t.record.video).name} ({t.record.job_id[:8]})")
            row.operator(AVFACE_OT_fetch.bl_idname, text="Fetch").key = t.record.key
            row.operator(AVFACE_OT_forget.bl_idname, text="", icon="X").key = t.record.key


def _wrap(text: str, width: int = 48) -> list[str]:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return lines + ([line] if line else [])


class AVFACE_PT_sequencer(bpy.types.Panel):
    bl_label = "AVFace"
    bl_space_type = "SEQUENCE_EDITOR"
    bl_region_type = "UI"
    bl_category = "AVFace"

    def draw(self, context):
        draw_panel(self.layout, context)


class AVFACE_PT_view3d(bpy.types.Panel):
    bl_label = "AVFace"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "AVFace"

    def draw(self, context):
        draw_panel(self.layout, context)
        mesh, arm = importer.find_head(context)
        if mesh is not None:
            col = self.layout.column(align=True)
            col.operator("avface.export_fbx", icon="EXPORT")
            col.operator("avface.retarget", icon="SHAPEKEY_DATA")


@bpy.app.handlers.persistent
def _on_load(_dummy):
    MANAGER.load()
    if MANAGER.active():
        MANAGER.ensure_timer()


CLASSES = (AVFaceSettings, AVFACE_OT_reconstruct, AVFACE_OT_cancel, AVFACE_OT_fetch, AVFACE_OT_import_job, AVFACE_OT_forget,
           AVFACE_PT_sequencer, AVFACE_PT_view3d)


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.avface = PointerProperty(type=AVFaceSettings)
    bpy.app.handlers.load_post.append(_on_load)
    try:
        MANAGER.load()
    except Exception:  # a damaged jobs.json must not stop the add-on from loading
        log.exception("cannot read the job list")


def unregister():
    if bpy.app.timers.is_registered(_timer):
        bpy.app.timers.unregister(_timer)
    if _on_load in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_on_load)
    del bpy.types.Scene.avface
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
