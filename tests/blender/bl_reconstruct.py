"""Reconstruct face against a real backend (started by the pytest side): the operator, the
job manager's timer loop driven by hand (headless Blender has no event loop), and the
failure paths. Each check returns what the pytest side asserts on."""
import os
import signal
import time

import bpy
from bl_common import drive_jobs, check_head, draw_panels, enable_addon

STRIP_START = 10
DRIVE_TIMEOUT_S = 480


def _manager():
    from avface_blender import reconstruct

    return reconstruct.MANAGER


def _setup(address, video, sound=None, timeout_s=2.0, retries=2, autostart=False):
    enable_addon()
    prefs = bpy.context.preferences.addons["avface_blender"].preferences
    prefs.address, prefs.timeout_s, prefs.retries, prefs.autostart = address, timeout_s, retries, autostart
    scene = bpy.context.scene
    scene.render.fps, scene.render.fps_base = 25, 1.0
    ed = scene.sequence_editor_create()
    strips = ed.strips if hasattr(ed, "strips") else ed.sequences
    movie = strips.new_movie("clip", video, channel=2, frame_start=STRIP_START)
    global SOUND_STRIP
    SOUND_STRIP = False
    if sound is not None:
        try:
            strips.new_sound("speech", sound, channel=1, frame_start=STRIP_START)
            SOUND_STRIP = True
        except RuntimeError as e:
            # the bpy 4.2 wheel is built without Audaspace: no sound strips at all; the job
            # then takes the video's own audio track
            if "Audaspace" not in str(e):
                raise
    ed.active_strip = movie
    return movie


SOUND_STRIP = False


def _counts():
    return {c: len(getattr(bpy.data, c)) for c in ("objects", "meshes", "armatures", "actions", "images")}


def _drive(until, timeout_s=DRIVE_TIMEOUT_S):
    drive_jobs(until, timeout_s)


def _record():
    key = bpy.context.scene.avface.job_key
    return _manager().jobs[key].record


def _reconstruct():
    out = bpy.ops.avface.reconstruct()
    assert out == {"FINISHED"}, out
    return _record()


def end_to_end(address, video, sound, frames, trim_start=0):
    movie = _setup(address, video, sound)
    # a trimmed strip: only the frames it shows are reconstructed, and they land where it shows them
    movie.frame_offset_start = trim_start
    shot = bpy.data.objects.new("Shot camera", bpy.data.cameras.new("Shot camera"))
    bpy.context.scene.collection.objects.link(shot)
    bpy.context.scene.camera = shot
    before = _counts()
    panel = {"before": draw_panels()}
    rec = _reconstruct()
    stages, running = [], []

    def watch():
        if rec.stage and (not stages or stages[-1] != rec.stage):
            stages.append(rec.stage)
            panel.setdefault("running", draw_panels())
        if rec.state == "running" and rec.stage:
            running.append([rec.stage, rec.message])
        return False

    _drive(watch)
    assert rec.state == "imported", (rec.state, rec.message)
    assert _counts()["objects"] == before["objects"] + 3  # head, rig and the video's camera
    cams = [o for o in bpy.data.objects if o.get("avface_role") == "camera"]
    # the video's camera is the scene's now; the animator's own camera is still there
    assert len(cams) == 1 and bpy.context.scene.camera == cams[0] and shot.name in bpy.context.scene.objects
    # the strip's video behind the head in the camera's view, its frame 0 where the strip's is
    clip = cams[0].data.background_images[0].clip
    report = check_head(os.path.join(rec.out_dir, "result.npz"), first_frame=STRIP_START, frames=frames)
    report.update(stages=stages, message=rec.message, job_id=rec.job_id, audio_present=rec.audio_present,
                  sound_strip=SOUND_STRIP, first_key_frame=float(_first_key(rec)), running=running,
                  backdrop=bpy.path.abspath(clip.filepath), backdrop_start=clip.frame_start,
                  bad_range=_bad_range(video))
    panel["after"] = draw_panels()
    report["panel"] = panel
    return report


def _bad_range(video):
    """A job asking for frames the clip does not have: the backend's message on it, as the
    add-on shows it."""
    from pathlib import Path

    tracked = _manager().start(bpy.context, video=Path(video), audio=None, has_sound=True,
                               options={"frame_start": 0, "frame_end": 999}, first_frame=1.0)
    _drive(lambda: False, timeout_s=120)
    assert tracked.record.state == "failed", (tracked.record.state, tracked.record.message)
    return {"message": tracked.record.message, "uploaded": not tracked.run.path_mode}


def _first_key(rec):
    from bl_common import fcurve_values, head_objects

    mesh_obj, _ = head_objects()
    return fcurve_values(mesh_obj, '["jawOpen"]')[0, 0]


def not_running(address, video, sound):
    _setup(address, video, sound, timeout_s=1.0, retries=0)
    before = _counts()
    rec = _reconstruct()
    _drive(lambda: False, timeout_s=30)
    assert rec.state == "failed", (rec.state, rec.message)
    assert _counts() == before
    return {"message": rec.message}


def no_sound(address, video, frames):
    _setup(address, video, None)
    rec = _reconstruct()
    first_message = rec.message
    _drive(lambda: False)
    assert rec.state == "imported", (rec.state, rec.message)
    report = check_head(os.path.join(rec.out_dir, "result.npz"), first_frame=STRIP_START, frames=frames)
    report.update(first_message=first_message, message=rec.message, audio_present=rec.audio_present)
    return report


def cancel(address, video, sound):
    from avface_blender._vendor.client import Client

    _setup(address, video, sound)
    before = _counts()
    rec = _reconstruct()
    _drive(lambda: rec.state == "running" and rec.stage not in ("", "probe"))
    assert rec.state == "running", (rec.state, rec.message)
    assert bpy.ops.avface.cancel() == {"FINISHED"}
    _drive(lambda: False, timeout_s=60)
    assert rec.state == "cancelled", (rec.state, rec.message)
    assert _counts() == before
    with Client(address, timeout_s=5.0) as client:
        server_state = client.status(rec.job_id)["state"]
    return {"message": rec.message, "server_state": server_state}


def backend_dies(address, video, sound, server_pid):
    _setup(address, video, sound, timeout_s=1.0, retries=1)
    before = _counts()
    rec = _reconstruct()
    _drive(lambda: rec.state == "running" and rec.stage not in ("", "probe"))
    os.kill(server_pid, signal.SIGKILL)
    _drive(lambda: False, timeout_s=60)
    assert rec.state == "failed", (rec.state, rec.message)
    assert _counts() == before
    return {"message": rec.message, "job_id": rec.job_id}


def start_and_quit(address, video, sound):
    """Session one: start a job and quit while it runs."""
    _setup(address, video, sound)
    rec = _reconstruct()
    _drive(lambda: rec.job_id is not None and rec.state == "running")
    assert rec.job_id is not None
    return {"job_id": rec.job_id, "key": rec.key}


def fetch_earlier(address, key, frames):
    """Session two: the job appears in the panel's list and can be fetched and imported."""
    enable_addon()
    prefs = bpy.context.preferences.addons["avface_blender"].preferences
    prefs.address = address
    scene = bpy.context.scene
    scene.render.fps, scene.render.fps_base = 25, 1.0
    manager = _manager()
    assert key in manager.jobs, list(manager.jobs)
    rec = manager.jobs[key].record
    assert rec.state == "detached", rec.state
    listed = draw_panels()
    assert "Jobs from earlier sessions" in listed and "(avface.fetch)" in listed, listed
    assert bpy.ops.avface.fetch(key=key) == {"FINISHED"}
    _drive(lambda: False)
    assert rec.state == "imported", (rec.state, rec.message)
    return check_head(os.path.join(rec.out_dir, "result.npz"), first_frame=rec.first_frame, frames=frames)


def fetch_corrupt(address, job_id, video):
    """A job whose result on the backend is damaged: a readable failure and nothing built."""
    from avface_blender import reconstruct

    enable_addon()
    prefs = bpy.context.preferences.addons["avface_blender"].preferences
    prefs.address, prefs.timeout_s = address, 2.0
    manager = _manager()
    out = reconstruct.user_dir() / "results" / job_id
    manager.jobs[job_id] = reconstruct.Tracked(reconstruct.JobRecord(
        key=job_id, address=address, video=video, scene=bpy.context.scene.name, blend=bpy.data.filepath,
        first_frame=1.0, out_dir=str(out), job_id=job_id, state="detached"))
    before = _counts()
    assert bpy.ops.avface.fetch(key=job_id) == {"FINISHED"}
    rec = manager.jobs[job_id].record
    _drive(lambda: False, timeout_s=60)
    assert rec.state == "failed", (rec.state, rec.message)
    assert _counts() == before
    return {"message": rec.message}


def backend_timeout(address, video):
    """A job that hangs on the backend: the server stops it (job_timeout) and the add-on says so.
    The fake pipeline's "video" is a JSON spec, which no movie strip can hold, so the job is
    started through the job manager the operator uses."""
    from pathlib import Path

    _setup_prefs(address)
    before = _counts()
    tracked = _manager().start(bpy.context, video=Path(video), audio=None, has_sound=True, options={},
                               first_frame=1.0)
    rec = tracked.record
    _drive(lambda: False, timeout_s=60)
    assert rec.state == "failed", (rec.state, rec.message)
    assert _counts() == before
    return {"message": rec.message}


def _setup_prefs(address):
    enable_addon()
    prefs = bpy.context.preferences.addons["avface_blender"].preferences
    prefs.address, prefs.timeout_s, prefs.retries = address, 2.0, 2


def autostart(address, video, sound, executable, ready_file, go_file):
    """No backend at the address and autostart on: the add-on starts `python -m avface serve`
    there and the job runs through it, the panel's message following it. Then this Blender
    writes the backend's pid to ``ready_file`` and waits for ``go_file`` before it quits."""
    import json

    from avface_blender import local_backend

    _setup(address, video, sound, timeout_s=2.0, retries=2, autostart=True)
    prefs = bpy.context.preferences.addons["avface_blender"].preferences
    prefs.executable, prefs.start_timeout_s = executable, 120.0
    bpy.context.scene.avface.stages = {"coarse"}  # no detail maps: enough stages to follow, sooner
    rec = _reconstruct()
    tracked = _manager().jobs[rec.key]
    seen = []
    _drive(lambda: seen.append([rec.state, rec.stage, rec.message]) and False)
    pid = tracked.server.pid if tracked.server is not None else None
    assert rec.state == "imported", (rec.state, rec.message)
    assert pid is not None, "the add-on did not start a backend"
    state = local_backend.read(_user_dir())
    with open(ready_file + ".tmp", "w") as f:
        json.dump({"pid": pid}, f)
    os.replace(ready_file + ".tmp", ready_file)
    end = time.monotonic() + DRIVE_TIMEOUT_S
    while not os.path.exists(go_file) and time.monotonic() < end:
        time.sleep(0.1)
    return {"pid": pid, "message": rec.message, "seen": seen, "owners": state.owners, "recorded_pid": state.pid,
            "blender_pid": os.getpid()}


def _user_dir():
    from avface_blender import reconstruct

    return reconstruct.user_dir()


def autostart_reuse(address, video, sound, executable):
    """Another Blender, autostart on, while the first one's backend runs: it uses that backend
    (no second start), becomes one of its owners, runs a job there (cancelled once running)
    and quits."""
    from avface_blender import local_backend

    _setup(address, video, sound, timeout_s=2.0, retries=2, autostart=True)
    prefs = bpy.context.preferences.addons["avface_blender"].preferences
    prefs.executable, prefs.start_timeout_s = executable, 120.0
    rec = _reconstruct()
    tracked = _manager().jobs[rec.key]
    _drive(lambda: rec.state == "running" and rec.job_id is not None)
    assert bpy.ops.avface.cancel() == {"FINISHED"}
    _drive(lambda: False, timeout_s=60)
    assert rec.state == "cancelled", (rec.state, rec.message)
    state = local_backend.read(_user_dir())
    return {"started": tracked.server is not None, "recorded_pid": state.pid, "owners": state.owners,
            "blender_pid": os.getpid()}


def online_access_refused(video):
    """A backend on another machine while Blender's online access is off: refused before any
    connection, with what to do."""
    assert not bpy.app.online_access, "this check needs Blender's online access off (the bpy default)"
    _setup("tcp://192.0.2.1:5555", video)
    try:
        bpy.ops.avface.reconstruct()
    except RuntimeError as e:  # an ERROR report surfaces as RuntimeError in background mode
        return {"message": str(e), "jobs": len(_manager().jobs)}
    raise AssertionError("the operator connected to a remote backend with online access off")
