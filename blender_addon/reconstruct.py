"""Reconstruct face: the panel (Sequencer and 3D Viewport sidebars), the modal operator and
the job manager that talks to the backend.

Why no thread: the vendored client is a non-blocking state machine (``JobRun.step(0)`` never
waits), so the manager advances every job from a timer on Blender's main thread. No ``bpy``
data is touched anywhere but there, and the UI never waits on the network.

Why a manager apart from the operator: Blender ends modal operators when a file is loaded,
but a job must survive that. The manager (``jobs.JobManager``, without ``bpy``; this module
gives it :class:`BlenderHost`) lives in this module's ``MANAGER``, is driven by a persistent
``bpy.app.timers`` timer, and records every job in ``jobs.json`` under the add-on's user
folder (``bpy.utils.extension_path_user``), so a job started before Blender was closed appears
in the panel again and can be fetched. The modal operator only listens for Esc and reports.

With the detail stage, a job comes in two steps (``jobs.py``): the head is imported as soon as
the backend has it (by the modal operator, which then ends), and the timer adds the detail maps
to that same head when the job ends (``importer.attach_detail``); the panel shows both.
"""
from __future__ import annotations

import atexit
import logging
import shutil
import subprocess
from pathlib import Path

import bpy
from bpy.props import EnumProperty, IntProperty, PointerProperty, StringProperty

from . import footage, importer, jobs, local_backend, preferences, render_setup
from ._vendor.client import ServiceError
from .jobs import (
    ACTIVE,
    CANCELLED,
    DETACHED,
    DETAILING,
    DONE,
    FAILED,
    FETCHED,
    IMPORTED,
    IN_FLIGHT,
    JobManager,
    JobRecord,
    Tracked,  # noqa: F401 (scripts and tests reach the job types through this module)
)

log = logging.getLogger(__name__)

TICK_S = 0.1
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


def strip_inputs(scene, movie, *, load: bool = True) -> dict:
    """Paths and frames to submit for ``movie``: video, audio (a separate sound file or None),
    whether there is sound at all, the source frame range (``footage.source_range``: the
    clip's own picture count, read from the file when its rate is not the scene's; ``load``
    False, as in a panel's draw, only from the cache), the clip's picture count (None while
    unknown) and the scene frame of source frame 0."""
    video = Path(bpy.path.abspath(movie.filepath)).resolve()
    sound = sound_strip(scene, movie)
    audio = None
    if sound is not None:
        sound_path = Path(bpy.path.abspath(sound.sound.filepath)).resolve()
        if sound_path != video:
            audio = sound_path
    scene_fps = scene.render.fps / scene.render.fps_base
    fps = getattr(movie, "fps", 0.0) or scene_fps
    retimed = len(getattr(movie, "retiming_keys", ()) or ()) > 0
    span = movie.frame_final_duration + movie.frame_offset_start + movie.frame_offset_end
    # at the scene's rate, one picture per scene frame either way: the span is the picture count
    pictures = clip_pictures(video, load=load) if retimed or abs(fps - scene_fps) > 1e-3 else int(round(span))
    r = footage.source_range(offset_start=movie.frame_offset_start, offset_end=movie.frame_offset_end,
                             final_duration=movie.frame_final_duration, fps=fps, scene_fps=scene_fps, pictures=pictures)
    return {"video": video, "audio": audio, "has_sound": sound is not None, "frame_start": r.start,
            "frame_end": r.end, "pictures": pictures, "first_frame": float(movie.frame_start)}


#: (path, mtime, size) -> the movie's picture count
_PICTURES: dict[tuple, int] = {}
_COUNTING: set = set()


def clip_pictures(path: Path, *, load: bool = True) -> int | None:
    """The movie's own picture count, cached per version of the file; None when unknown (not
    cached and ``load`` False, or a file Blender cannot read). Reading it loads the movie as a
    movie clip for a moment, which a panel's draw may not do: with ``load`` False, the count
    is read on the next timer tick and the panels redrawn."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key in _PICTURES:
        return _PICTURES[key]
    if not load:
        if key not in _COUNTING and not bpy.app.background:  # no timer runs there (as ensure_timer)
            _COUNTING.add(key)
            bpy.app.timers.register(lambda: _count_later(path, key), first_interval=0.0)
        return None
    try:
        clip = bpy.data.movieclips.load(str(path), check_existing=False)
    except RuntimeError as e:
        log.warning("cannot read the picture count of %s: %s", path, e)
        return None
    try:
        _PICTURES[key] = max(int(clip.frame_duration), 1)
    finally:
        bpy.data.movieclips.remove(clip)
    return _PICTURES[key]


def _count_later(path: Path, key: tuple):
    _COUNTING.discard(key)
    clip_pictures(path)
    _redraw()
    return None


# ---------------------------------------------------------------------------------------
# Jobs: the state machine and jobs.json are in jobs.py; this is what it needs from Blender
# ---------------------------------------------------------------------------------------
class BlenderHost(jobs.Host):
    """The job manager's view of Blender (see jobs.Host)."""

    def user_dir(self) -> Path:
        return user_dir()

    def prefs(self, context=None):
        return preferences.get(context)

    def context(self):
        return bpy.context

    def online_access(self) -> bool:
        return bpy.app.online_access

    def background(self) -> bool:
        return bpy.app.background

    def blend_path(self) -> str:
        return bpy.data.filepath

    def ensure_timer(self) -> None:
        if not bpy.app.background and not bpy.app.timers.is_registered(_timer):
            bpy.app.timers.register(_timer, first_interval=TICK_S, persistent=True)

    def redraw(self) -> None:
        _redraw()

    def import_scene(self, context, rec: JobRecord):
        scene = bpy.data.scenes.get(rec.scene)
        if scene is None or scene != context.scene or bpy.data.filepath != rec.blend:
            return None
        return scene

    def import_result(self, context, rec: JobRecord, scene):
        # the strip already sits in the scene's range and output size: leave the editor's
        # frame range and resolution alone
        return importer.import_result(context, Path(rec.out_dir) / "result.npz", first_frame=rec.first_frame,
                                      collection=scene.avface.collection, name=Path(rec.video).stem,
                                      set_frame_range=False, set_resolution=False,
                                      make_camera_active=preferences.get(context).make_camera_active)

    def attach_detail(self, context, rec: JobRecord):
        path = Path(rec.out_dir) / "result.npz"
        mesh_obj = importer.find_result_mesh(rec.head[0] if rec.head else "", path)
        if mesh_obj is None:
            return None
        # the scene it was imported into sets the maps' timing, as it set the head's keys
        scene = bpy.data.scenes.get(rec.scene)
        if scene is None or mesh_obj.name not in scene.objects:
            scene = None
        added = importer.attach_detail(context, mesh_obj, path, first_frame=rec.first_frame,
                                       name=Path(rec.video).stem, scene=scene)
        return mesh_obj.name, added

    def start_backend(self, executable: str, address: str, flame_dir: str, folder: Path) -> subprocess.Popen:
        return start_backend(executable, address, flame_dir, folder)


BACKEND_IDLE_EXIT_S = 1800
"""An auto-started backend exits after this many seconds with no job and no request."""


def start_backend(executable: str, address: str, flame_dir: str, folder: Path) -> subprocess.Popen:
    """``avface serve --bind ADDRESS`` (or ``PYTHON -m avface serve``) in the background."""
    exe = bpy.path.abspath(executable) if executable else (shutil.which("avface") or "")
    if not exe:
        raise OSError("no avface executable configured and none on PATH")
    name = Path(exe).name.lower()
    cmd = [exe, "-m", "avface"] if name.startswith("python") else [exe]
    # the last Blender to quit stops it (local_backend.release); a Blender that crashed cannot,
    # so the backend also ends itself after half an hour with no job and no request
    cmd += ["serve", "--bind", address, "--idle-exit-s", str(BACKEND_IDLE_EXIT_S)]
    if flame_dir:
        cmd += ["--flame-dir", bpy.path.abspath(flame_dir)]
    log_file = open(folder / "backend.log", "ab")
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


MANAGER = JobManager(BlenderHost())


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
def _get_stages(settings) -> int:
    """The scene's stages: the add-on's "Default stages" until they are changed here."""
    chosen = settings.stages_chosen
    return chosen if chosen >= 0 else preferences.default_stage_bits()


def _set_stages(settings, value: int) -> None:
    settings.stages_chosen = value


class AVFaceSettings(bpy.types.PropertyGroup):
    model: EnumProperty(name="Face model", items=MODELS, default="default")
    stages: EnumProperty(name="Stages", options={"ENUM_FLAG"}, items=preferences.STAGES, get=_get_stages,
                         set=_set_stages, description="Stages this scene's reconstruction runs (its default: "
                                                      "the add-on's preference 'Default stages')")
    stages_chosen: IntProperty(default=-1, options={"HIDDEN"},
                               description="The stages chosen in this scene (bits), -1 until they are chosen")
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
        if rec.state == FETCHED:
            MANAGER.import_job(context, tracked)
        if rec.state in ACTIVE:
            return {"PASS_THROUGH"}
        context.window_manager.event_timer_remove(self._timer)
        if rec.state in (IMPORTED, DONE, DETAILING):  # detailing: the head is in, the timer adds its detail
            self.report({"INFO"}, rec.message)
            return {"FINISHED"}
        self.report({"ERROR"} if rec.state == FAILED else {"WARNING"}, rec.message)
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
    """Fetch a job started in an earlier session and import its head, or add its detail maps to the head imported earlier"""

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
        ok = t.record.state in (IMPORTED, DETAILING)
        self.report({"INFO" if ok else "ERROR"}, t.record.message)
        return {"FINISHED"} if ok else {"CANCELLED"}


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
    _draw_strip(layout.box(), scene, movie)
    layout.prop(settings, "model")
    if settings.model == "flame" and not preferences.get(context).flame_dir:
        layout.label(text="FLAME folder not set: the backend must have FLAME", icon="ERROR")
    layout.prop(settings, "stages")
    layout.prop(settings, "collection")
    tracked = MANAGER.jobs.get(settings.job_key)
    running = tracked is not None and tracked.record.state in IN_FLIGHT
    row = layout.row()
    row.enabled = movie is not None and not running
    row.operator(AVFACE_OT_reconstruct.bl_idname, icon="PLAY")
    if tracked is not None:
        rec = tracked.record
        if running:
            text = f"{rec.stage or rec.state} {100 * rec.fraction:.0f}%"
            if rec.state == DETAILING:  # the first step is done: say so, and the second one's progress
                took = f" in {rec.head_s:.0f} s" if rec.head_s is not None else ""
                layout.label(text=f"Head imported{took} ({rec.head[0] if rec.head else '?'})", icon="CHECKMARK")
                text = f"detail: {rec.stage or 'waiting'} {100 * rec.fraction:.0f}%"
            if hasattr(layout, "progress"):
                layout.progress(factor=rec.fraction, type="BAR", text=text)
            else:
                layout.label(text=text)
            layout.operator(AVFACE_OT_cancel.bl_idname, icon="CANCEL")
        if rec.message:
            icon = {FAILED: "ERROR", CANCELLED: "CANCEL", IMPORTED: "CHECKMARK"}.get(rec.state, "INFO")
            for line in _wrap(rec.message):
                layout.label(text=line, icon=icon)
                icon = "BLANK1"
    _draw_render_hint(layout, context)
    ready = [t for t in MANAGER.jobs.values() if t.record.state == DONE]
    for t in ready:
        row = layout.row()
        row.label(text=f"{Path(t.record.video).name}: result ready")
        row.operator(AVFACE_OT_import_job.bl_idname, text="Import").key = t.record.key
    earlier = [t for t in MANAGER.jobs.values() if t.record.state == DETACHED]
    if earlier:
        box = layout.box()
        box.label(text="Jobs from earlier sessions")
        for t in earlier:
            row = box.row()
            detail_for = f": detail for {t.record.head[0]}" if t.record.head else ""
            row.label(text=f"{Path(t.record.video).name} ({t.record.job_id[:8]}){detail_for}")
            row.operator(AVFACE_OT_fetch.bl_idname, text="Fetch").key = t.record.key
            row.operator(AVFACE_OT_forget.bl_idname, text="", icon="X").key = t.record.key


def _draw_strip(box, scene, movie) -> None:
    if movie is None:
        box.label(text="Select a movie strip in the Sequencer", icon="INFO")
        return
    inputs = strip_inputs(scene, movie, load=False)
    box.label(text=f"Strip: {movie.name}", icon="FILE_MOVIE")
    sound = sound_strip(scene, movie)
    if sound is None:
        box.label(text="No sound strip: video only", icon="ERROR")
    else:
        box.label(text=f"Sound: {sound.name}", icon="SOUND")
    if inputs["pictures"] is None:
        box.label(text="Frames: reading the clip's length")
        return
    box.label(text=f"Clip frames {inputs['frame_start']}-{inputs['frame_end'] - 1} of {inputs['pictures']}, "
                   f"from scene frame {movie.frame_final_start}")


RENDER_HINT = ("F12 renders the Sequencer's strips (the plain video), not the head. To render the head over the video, "
               "press Set Up Render (Sequencer off, transparent film, the compositor puts the render over the video), "
               "or render the head in a scene without strips")


def _draw_render_hint(layout, context) -> None:
    """Where the scene's F12 would render the plain video: say so, and offer the set-up."""
    if not render_setup.renders_sequencer(context.scene):
        return
    box = layout.box()
    icon = "INFO"
    for line in _wrap(RENDER_HINT):
        box.label(text=line, icon=icon)
        icon = "BLANK1"
    row = box.row()
    row.enabled = render_setup.video_camera(context) is not None
    row.operator(render_setup.AVFACE_OT_setup_render.bl_idname, icon="RENDER_STILL")


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


_AT_EXIT = False


def _release_backend(folder: Path) -> None:
    """At Blender's exit: this Blender stops using the local backend the add-on started, and
    stops it when no other Blender uses it (``local_backend.release``)."""
    try:
        local_backend.release(folder)
    except Exception:  # never in the way of quitting
        log.exception("cannot stop the local backend")


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.avface = PointerProperty(type=AVFaceSettings)
    global _AT_EXIT
    if not _AT_EXIT:  # once per session (disabling the add-on keeps it: its backend must still stop)
        try:  # the folder now: at exit, bpy may be gone
            atexit.register(_release_backend, user_dir())
            _AT_EXIT = True
        except OSError:
            log.exception("no user folder: a local backend the add-on starts will not stop with Blender")
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
