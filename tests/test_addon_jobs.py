"""The add-on's job manager (``avface_blender.jobs``) without Blender: a fake host stands in
for ``bpy`` (preferences, user folder, scene, import), and a real ``avface serve`` subprocess
with the fake pipeline (tests/fake_pipeline.py) runs the jobs. The timer is :meth:`tick`
called by hand, as the headless Blender checks do."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from addon_util import addon_module
from fake_pipeline import expected_frames
from service_util import ServerProcess, fake_clip

jobs = addon_module("jobs")
io_result = addon_module("io_result")

DRIVE_TIMEOUT_S = 30.0


class FakeHost(jobs.Host):
    """Blender as the manager sees it: one scene in one file, imports that read the result."""

    def __init__(self, folder: Path, address: str, **prefs):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.preferences = SimpleNamespace(address=address, timeout_s=2.0, retries=2, start_timeout_s=5.0,
                                           autostart=False, executable="", flame_dir="")
        vars(self.preferences).update(prefs)
        self.ctx = SimpleNamespace(scene=SimpleNamespace(name="Scene"))
        self.blend = "/work/shot.blend"
        self.is_background = True
        self.timer_requests = self.redraws = 0
        self.imports: list[tuple[str, np.ndarray]] = []
        self.import_error: Exception | None = None
        self.video_size = None
        self.backend = None
        self.attached: list[tuple] = []  # (job key, head's mesh name, detail state of the result, its maps)
        self.with_detail: set[str] = set()  # heads that have their maps
        self.deleted: set[str] = set()  # heads the user deleted

    def user_dir(self):
        return self.folder

    def prefs(self, context=None):
        return self.preferences

    def context(self):
        return self.ctx

    def online_access(self):
        return False

    def background(self):
        return self.is_background

    def blend_path(self):
        return self.blend

    def ensure_timer(self):
        self.timer_requests += 1

    def redraw(self):
        self.redraws += 1

    def import_scene(self, context, rec):
        same = rec.scene == context.scene.name and rec.blend == self.blend
        return context.scene if same else None

    def import_result(self, context, rec, scene):
        if self.import_error is not None:
            raise self.import_error
        with np.load(Path(rec.out_dir) / "result.npz") as z:
            self.imports.append((rec.key, z["frames"].copy()))
        name = Path(rec.video).stem
        return SimpleNamespace(mesh_object=SimpleNamespace(name=name), armature_object=SimpleNamespace(name=name + "_rig"),
                               video_size=self.video_size)

    def attach_detail(self, context, rec):
        name = rec.head[0]
        if name in self.deleted:
            return None
        meta = _meta(Path(rec.out_dir) / "result.npz")
        maps = sorted(p.name for p in (Path(rec.out_dir) / "detail").iterdir())
        self.attached.append((rec.key, name, meta["detail"]["state"], maps))
        added = name not in self.with_detail
        self.with_detail.add(name)
        return name, added

    def start_backend(self, executable, address, flame_dir, folder):
        if isinstance(self.backend, Exception):
            raise self.backend
        return self.backend(address) if callable(self.backend) else self.backend


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProcess(tmp_path_factory.mktemp("jobs-service"), workers=2).start()
    yield s
    s.stop()


@pytest.fixture
def host(server, tmp_path):
    return FakeHost(tmp_path / "user", server.address)


def drive(manager, until=lambda: False, timeout_s: float = DRIVE_TIMEOUT_S, watch=None):
    """The add-on's timer by hand: tick until ``until()`` or no job is active."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        active = manager.tick()
        if watch is not None:
            watch()
        if until() or not active:
            return
        time.sleep(0.02)
    raise AssertionError(f"jobs still active after {timeout_s} s: {[t.record for t in manager.active()]}")


def _meta(path: Path) -> dict:
    with np.load(path) as z:
        return json.loads(str(z["meta"]))


def persisted(host) -> dict:
    """jobs.json as the manager wrote it, by key."""
    data = json.loads((host.folder / jobs.JOBS_FILE).read_text())
    return {raw["key"]: raw for raw in data["jobs"]}


def start(manager, host, video: Path, **kw):
    kw = {"audio": None, "has_sound": True, "options": {}, "first_frame": 12.0, **kw}
    return manager.start(host.ctx, video=video, **kw)


def test_states_are_spelled_once():
    assert jobs.ACTIVE == {"starting", "submitting", "running", "fetching"}
    assert jobs.IN_FLIGHT == jobs.ACTIVE | {"detailing"}
    assert jobs.UNFINISHED == jobs.IN_FLIGHT | {"fetched"}
    assert jobs.JobRecord("k", "a", "v", "s", "b", 1.0, "o").state == jobs.STARTING
    source = (Path(jobs.__file__).parent / "reconstruct.py").read_text()
    for state in ("starting", "submitting", "running", "fetching", "fetched", "done", "imported", "failed",
                  "cancelled", "detached", "detailing"):
        assert f'"{state}"' not in source, f"reconstruct.py spells the state {state!r} itself"
    assert "import bpy" not in (Path(jobs.__file__)).read_text()


def test_submit_progress_and_import(server, host, tmp_path):
    """A job from start to the head in the scene, the progress on the way, and jobs.json at
    each step."""
    spec = {"stages": ["decode", "track", "fit"], "steps": 4, "step_s": 0.05, "seed": 3}
    clip = fake_clip(server.work / "in", "submit.json", **spec)
    manager = jobs.JobManager(host)
    tracked = start(manager, host, clip, has_sound=False)
    rec = tracked.record
    assert rec.state == jobs.STARTING and rec.job_id is None and host.timer_requests == 1
    assert rec.message.startswith("The strip has no sound strip") and rec.audio_present is False
    assert not (host.folder / jobs.JOBS_FILE).exists()  # nothing to remember before the job exists
    states, stages, saved_running = [rec.state], [], {}

    def watch():
        if not states or states[-1] != rec.state:
            states.append(rec.state)
        if rec.stage and (not stages or stages[-1] != rec.stage):
            stages.append(rec.stage)
        if rec.state == jobs.RUNNING and not saved_running:
            saved_running.update(persisted(host)[rec.key])

    drive(manager, watch=watch)
    assert rec.state == jobs.IMPORTED, (rec.state, rec.message)
    assert rec.message == "Imported submit (video only: the strip has no sound)"
    assert tracked.imported == ["submit", "submit_rig"] and tracked.client is None
    # the states it went through, in order (a tick may pass one unseen, never running)
    order = [jobs.STARTING, jobs.SUBMITTING, jobs.RUNNING, jobs.FETCHING, jobs.FETCHED, jobs.IMPORTED]
    assert states[0] == jobs.STARTING and states[-1] == jobs.IMPORTED and jobs.RUNNING in states, states
    assert states == sorted(states, key=order.index), states
    assert {"decode", "track", "fit"} <= set(stages), stages
    assert rec.fraction == 1.0 and rec.stage == ""
    # what was imported is what the backend computed for this clip
    [(key, frames)] = host.imports
    assert key == rec.key and np.array_equal(frames, expected_frames(spec))
    # jobs.json: running (with the job id) while it ran, imported at the end
    assert saved_running["state"] == jobs.RUNNING and saved_running["job_id"] == rec.job_id
    saved = persisted(host)[rec.key]
    assert saved["state"] == jobs.IMPORTED and saved["job_id"] == rec.job_id and saved["first_frame"] == 12.0
    assert saved["scene"] == "Scene" and saved["blend"] == "/work/shot.blend" and saved["video"] == str(clip)
    assert Path(saved["out_dir"]) == host.folder / "results" / rec.key
    assert server.client().status(rec.job_id)["state"] == "done"
    assert host.redraws > 0 and manager.active() == [] and manager.tick() is False


def test_backend_failure_and_unavailable_model(server, host):
    clip = fake_clip(server.work / "in", "noface.json", stages=["decode"], fail="no_face")
    manager = jobs.JobManager(host)
    rec = start(manager, host, clip).record
    flame = start(manager, host, clip, options={"model": "flame"}).record
    drive(manager)
    assert rec.state == jobs.FAILED
    assert rec.message == "The backend reports no_face: fake: no face was detected in any frame"
    assert flame.state == jobs.FAILED and flame.job_id is None
    assert flame.message == ("The backend cannot use the flame model: fake pipeline: no FLAME files "
                             "(set the FLAME folder in the add-on's preferences)")
    assert set(persisted(host)) == {rec.key}  # the job never submitted is not remembered
    assert persisted(host)[rec.key]["state"] == jobs.FAILED


def test_backend_not_reachable(tmp_path):
    host = FakeHost(tmp_path / "user", "tcp://127.0.0.1:9", timeout_s=0.3, retries=0)
    manager = jobs.JobManager(host)
    rec = start(manager, host, tmp_path / "clip.mp4").record
    drive(manager, timeout_s=10)
    assert rec.state == jobs.FAILED
    assert rec.message == ("The AVFace backend is not reachable at tcp://127.0.0.1:9: switch on 'Start a local "
                           "backend automatically' in the add-on's preferences, or run `avface serve`")
    assert not (host.folder / jobs.JOBS_FILE).exists()
    # autostart on, but the backend cannot be started / exits at once: said so, with the hint
    host.preferences.autostart = True
    host.backend = OSError("no avface executable configured and none on PATH")
    rec = start(manager, host, tmp_path / "clip.mp4").record
    drive(manager, timeout_s=10)
    assert rec.state == jobs.FAILED
    assert rec.message == ("The AVFace backend is not reachable at tcp://127.0.0.1:9 (cannot start the backend: no "
                           "avface executable configured and none on PATH): check the avface executable in the "
                           "add-on's preferences")
    host.backend = SimpleNamespace(poll=lambda: 3, returncode=3)
    rec = start(manager, host, tmp_path / "clip.mp4").record
    drive(manager, timeout_s=10)
    assert rec.message == (f"The AVFace backend is not reachable at tcp://127.0.0.1:9 (the local backend exited with "
                           f"code 3; see {host.folder / 'backend.log'}): check the avface executable in the add-on's "
                           f"preferences")
    # a remote backend with Blender's online access off: refused before any connection
    host.preferences.address = "tcp://192.0.2.1:5555"
    with pytest.raises(jobs.ServiceError, match="online access is off"):
        start(manager, host, tmp_path / "clip.mp4")
    assert len(manager.jobs) == 3


def test_cancel_on_the_backend_and_before_submitting(server, host, tmp_path):
    clip = fake_clip(server.work / "in", "cancel.json", stages=["decode"], gate=str(tmp_path / "never"))
    manager = jobs.JobManager(host)
    rec = start(manager, host, clip).record
    drive(manager, until=lambda: rec.state == jobs.RUNNING and rec.stage == "wait")
    manager.cancel(rec.key)
    assert rec.message == "cancelling on the backend" and rec.state == jobs.RUNNING
    drive(manager)
    assert rec.state == jobs.CANCELLED and rec.message == "Cancelled"
    assert persisted(host)[rec.key]["state"] == jobs.CANCELLED
    assert server.client().status(rec.job_id)["state"] == "cancelled"
    assert host.imports == []
    # before the backend has answered: nothing reaches it, nothing is remembered
    early = start(manager, host, clip).record
    manager.cancel(early.key)
    assert early.state == jobs.CANCELLED and early.message == "cancelled before the job was submitted"
    assert manager.jobs[early.key].client is None and set(persisted(host)) == {rec.key}
    manager.cancel("no such key")  # ignored


@contextlib.contextmanager
def doomed_backend(host, tmp_path):
    """A backend of the test's own, which it kills: the host's preferences point at it, with
    short timeouts; stopped at the end whatever happened."""
    work = tmp_path / "doomed"
    work.mkdir()
    doomed = ServerProcess(work).start()
    try:
        host.preferences.address, host.preferences.timeout_s, host.preferences.retries = doomed.address, 0.5, 1
        yield doomed
    finally:
        doomed.stop()


def test_lost_backend(host, tmp_path):
    with doomed_backend(host, tmp_path) as doomed:
        clip = fake_clip(doomed.work / "in", "lost.json", stages=["decode"], gate=str(tmp_path / "never"))
        manager = jobs.JobManager(host)
        rec = start(manager, host, clip).record
        drive(manager, until=lambda: rec.state == jobs.RUNNING and rec.stage == "wait")
        doomed.kill()
        drive(manager)
    assert rec.state == jobs.FAILED, (rec.state, rec.message)
    assert rec.message.startswith(f"Lost the AVFace backend at {doomed.address} during the job (")
    assert rec.message.endswith(f"the job {rec.job_id} can be fetched again from the panel once the backend is back")
    saved = persisted(host)[rec.key]
    assert saved["state"] == jobs.FAILED and saved["message"] == rec.message and saved["job_id"] == rec.job_id


def test_restart_finds_the_job_and_fetches_it(server, host, tmp_path):
    """Blender closes while the job runs; the next session's manager lists it from jobs.json
    and fetches it into the scene it is in then."""
    gate = tmp_path / "gate"
    spec = {"stages": ["decode"], "gate": str(gate), "seed": 11}
    clip = fake_clip(server.work / "in", "restart.json", **spec)
    first = jobs.JobManager(host)
    tracked = start(first, host, clip)
    rec = tracked.record
    drive(first, until=lambda: rec.state == jobs.RUNNING and rec.stage == "wait")
    tracked.client.close()  # Blender quits
    assert persisted(host)[rec.key]["state"] == jobs.RUNNING
    gate.touch()
    server.wait_state(server.client(), rec.job_id, "done")

    host.ctx = SimpleNamespace(scene=SimpleNamespace(name="Shot 2"))
    host.blend = "/work/other.blend"
    second = jobs.JobManager(host)
    second.load()
    again = second.jobs[rec.key].record
    assert again is not rec and again.job_id == rec.job_id and again.out_dir == rec.out_dir
    assert again.state == jobs.DETACHED and again.message == "started in an earlier session; fetch it to import"
    assert second.active() == []
    second.fetch(host.ctx, rec.key)
    assert again.state == jobs.RUNNING and again.message == "fetching the job started earlier"
    assert (again.scene, again.blend) == ("Shot 2", "/work/other.blend")
    assert persisted(host)[rec.key]["state"] == jobs.RUNNING
    drive(second)
    assert again.state == jobs.IMPORTED, (again.state, again.message)
    assert again.message == "Imported restart"
    [(key, frames)] = host.imports
    assert key == rec.key and np.array_equal(frames, expected_frames(spec))
    assert persisted(host)[rec.key]["state"] == jobs.IMPORTED


def test_import_waits_for_the_operator_or_the_import_button(server, host):
    """With a window and a modal operator watching, the timer stops at fetched; the import
    then goes to the right scene only, and a damaged result fails readably."""
    clip = fake_clip(server.work / "in", "modal.json", stages=["decode"])
    host.is_background = False
    manager = jobs.JobManager(host)
    tracked = start(manager, host, clip)
    tracked.modal = True
    rec = tracked.record
    drive(manager)
    assert rec.state == jobs.FETCHED and host.imports == [] and manager.active() == []
    assert persisted(host)[rec.key]["state"] == jobs.FETCHED
    host.ctx = SimpleNamespace(scene=SimpleNamespace(name="Another scene"))
    manager.import_job(host.ctx, tracked)
    assert rec.state == jobs.DONE
    assert rec.message == f"Result ready in {rec.out_dir}: press Import, or File > Import > AVFace result"
    host.ctx = SimpleNamespace(scene=SimpleNamespace(name="Scene"))
    host.import_error = io_result.ResultError("not a readable AVFace result")
    manager.import_job(host.ctx, tracked)
    assert rec.state == jobs.FAILED and rec.message == "The backend's result cannot be imported: not a readable AVFace result"
    host.import_error = KeyError("jawOpen")
    manager.import_job(host.ctx, tracked)
    assert rec.message == "The import failed: KeyError: 'jawOpen'"
    host.import_error, host.video_size = None, (640, 360)
    manager.import_job(host.ctx, tracked)
    assert rec.state == jobs.IMPORTED and rec.message == (
        "Imported modal; the scene renders at another size than the video's 640x360: set it to that for the "
        "camera to match")
    assert persisted(host)[rec.key]["state"] == jobs.IMPORTED


def test_load_marks_unfinished_jobs_and_skips_bad_records(tmp_path):
    host = FakeHost(tmp_path / "user", "tcp://127.0.0.1:9")
    manager = jobs.JobManager(host)
    manager.load()  # no file yet
    assert manager.jobs == {}
    base = {"address": "tcp://127.0.0.1:5555", "video": "/v.mp4", "scene": "Scene", "blend": "", "first_frame": 1.0,
            "out_dir": "/out", "job_id": "j"}
    records = [dict(base, key=f"k-{s}", state=s) for s in ("submitting", "running", "fetching", "fetched", "done",
                                                         "imported", "failed", "cancelled", "detached", "detailing")]
    records.append(dict(base, key="k-future", state="running", colour="blue"))  # unknown field: skipped
    (host.folder / jobs.JOBS_FILE).write_text(json.dumps({"jobs": records}))
    manager.load()
    states = {k: t.record.state for k, t in manager.jobs.items()}
    assert states == {"k-submitting": "detached", "k-running": "detached", "k-fetching": "detached",
                      "k-fetched": "detached", "k-done": "done", "k-imported": "imported", "k-failed": "failed",
                      "k-cancelled": "cancelled", "k-detached": "detached", "k-detailing": "detached"}
    # loading again keeps the jobs it has; a damaged file changes nothing
    manager.jobs["k-done"].record.message = "kept"
    manager.load()
    assert manager.jobs["k-done"].record.message == "kept"
    (host.folder / jobs.JOBS_FILE).write_text("{not json")
    manager.load()
    assert len(manager.jobs) == 10
    manager.save()
    assert json.loads((host.folder / jobs.JOBS_FILE).read_text())["jobs"][0] == dict(
        base, key="k-submitting", state="detached", message="started in an earlier session; fetch it to import",
        stage="", fraction=0.0, audio_present=True, created=manager.jobs["k-submitting"].record.created, head=[],
        detail="", head_s=None, detail_s=None)


def _free_address() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def test_unreachable_without_sound_says_one_thing(tmp_path):
    """No sound strip and no backend, default preferences: the message is about the backend
    only (the no-sound note, which mentions the backend too, is not pasted into it)."""
    host = FakeHost(tmp_path / "user", "tcp://127.0.0.1:9", timeout_s=0.3, retries=0)
    manager = jobs.JobManager(host)
    rec = start(manager, host, tmp_path / "clip.mp4", has_sound=False).record
    assert rec.message.startswith("The strip has no sound strip")
    drive(manager, timeout_s=10)
    assert rec.state == jobs.FAILED
    assert rec.message == ("The AVFace backend is not reachable at tcp://127.0.0.1:9: switch on 'Start a local "
                           "backend automatically' in the add-on's preferences, or run `avface serve`")


def test_messages_name_the_users_file_not_the_uploaded_copy(server, host, tmp_path):
    """Footage outside the server's roots is uploaded; the backend's error then names its copy
    (jobs/<id>/input/video.mp4): the add-on's message names the user's file."""
    footage_dir = tmp_path / "footage outside the roots"
    footage_dir.mkdir()
    video = footage_dir / "Take 3.MP4"
    video.write_bytes(b"not a video at all")
    manager = jobs.JobManager(host)
    tracked = start(manager, host, video)
    rec = tracked.record
    messages = []
    drive(manager, watch=lambda: messages.append(rec.message))
    assert tracked.run.path_mode is False  # it was uploaded
    assert rec.state == jobs.FAILED
    assert rec.message == f"The backend reports bad_media: {video} is not a readable video", rec.message
    assert not any("input/video" in m for m in messages), messages
    assert any(m.startswith("uploading the footage") for m in messages), messages


def test_a_finished_upload_records_the_users_video_beside_the_result(server, host, tmp_path):
    clip = fake_clip(tmp_path / "elsewhere", "upload.json", stages=["decode"], seed=2)
    manager = jobs.JobManager(host)
    tracked = start(manager, host, clip)
    drive(manager)
    rec = tracked.record
    assert rec.state == jobs.IMPORTED and tracked.run.path_mode is False, (rec.state, rec.message)
    assert io_result.source_video(Path(rec.out_dir) / "result.npz", "/srv/jobs/x/input/video.json") == clip


def _serve_at(work: Path, started: list):
    """A host's start_backend that really starts `avface serve` (the fake pipeline) at the address."""
    def start_backend(address):
        s = ServerProcess(work, args=("--bind", address)).start()
        started.append(s)
        return s.proc
    return start_backend


def test_autostarted_backend_messages_follow_the_stages_and_the_backend_is_shared(tmp_path):
    """Autostart: the message says the backend is starting, then follows the job's stages from
    its progress reports (never "starting a local backend" to the end). The backend is recorded
    as this Blender's, found again instead of a second start, and stopped by its last owner."""
    local_backend = addon_module("local_backend")
    address = _free_address()
    started = []
    host = FakeHost(tmp_path / "user", address, autostart=True, timeout_s=1.0, retries=0, start_timeout_s=30.0)
    host.backend = _serve_at(tmp_path / "backend", started)
    (tmp_path / "backend").mkdir()
    try:
        manager = jobs.JobManager(host)
        spec = {"stages": ["decode", "track", "fit"], "steps": 4, "step_s": 0.05}
        rec = start(manager, host, fake_clip(tmp_path / "backend" / "in", "auto.json", **spec)).record
        seen = []
        drive(manager, watch=lambda: seen.append((rec.state, rec.stage, rec.message)))
        assert rec.state == jobs.IMPORTED, (rec.state, rec.message)
        assert len(started) == 1
        messages = [m for _, _, m in seen]
        assert "starting a local backend" in messages
        running = [(stage, m) for state, stage, m in seen if state == jobs.RUNNING and stage]
        assert running and all(m.startswith(f"{stage}: ") for stage, m in running), running
        assert {m.split(":")[0] for _, m in running} >= {"decode", "track", "fit"}, running
        state = local_backend.read(host.folder)
        assert state.pid == started[0].proc.pid and state.address == address

        # another job, the backend now answering: used as it is, no second start
        host.backend = OSError("a second backend must not be started")
        again = start(manager, host, fake_clip(tmp_path / "backend" / "in", "again.json", stages=["decode"])).record
        drive(manager)
        assert again.state == jobs.IMPORTED, (again.state, again.message)
        # the last owner (this process) quits: the backend stops
        assert local_backend.release(host.folder, wait_s=15) == started[0].proc.pid
        assert started[0].proc.poll() is not None
    finally:
        for s in started:
            s.stop()


def test_a_recorded_backend_that_has_not_answered_yet_is_waited_for(tmp_path):
    """The backend the add-on started (here or in another Blender) still starting: waited for,
    never a second one started beside it."""
    import subprocess
    import sys

    local_backend = addon_module("local_backend")
    address = _free_address()
    starting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "serve", "--bind", address])
    try:
        host = FakeHost(tmp_path / "user", address, autostart=True, timeout_s=0.3, retries=0, start_timeout_s=1.5)
        host.backend = OSError("a second backend must not be started")
        local_backend.record_started(host.folder, starting.pid, address, owner=starting.pid)
        manager = jobs.JobManager(host)
        rec = start(manager, host, tmp_path / "clip.mp4").record
        messages = []
        drive(manager, watch=lambda: messages.append(rec.message))
        assert f"waiting for the local backend (process {starting.pid}) to answer" in messages
        assert rec.state == jobs.FAILED
        assert rec.message.startswith(f"The AVFace backend is not reachable at {address} (the local backend started "
                                      f"earlier (process {starting.pid}) did not answer in time)"), rec.message
        assert starting.poll() is None
    finally:
        starting.kill()
        starting.wait(10)


def test_a_job_outlives_the_backend_stopped_when_blender_quit(tmp_path):
    """Blender quits while its job runs on the backend it started: the backend stops with it
    (the job goes back to the backend's queue). The next session fetches the job: the backend
    is started again, runs the job and the head is imported."""
    local_backend = addon_module("local_backend")
    address = _free_address()
    started = []
    (tmp_path / "backend").mkdir()
    host = FakeHost(tmp_path / "user", address, autostart=True, timeout_s=1.0, retries=0, start_timeout_s=30.0)
    host.backend = _serve_at(tmp_path / "backend", started)
    gate = tmp_path / "gate"
    spec = {"stages": ["decode"], "gate": str(gate), "seed": 4}
    try:
        first = jobs.JobManager(host)
        tracked = start(first, host, fake_clip(tmp_path / "backend" / "in", "outlive.json", **spec))
        rec = tracked.record
        drive(first, until=lambda: rec.state == jobs.RUNNING and rec.stage == "wait")
        tracked.client.close()  # Blender quits ...
        assert local_backend.release(host.folder, wait_s=15) == started[0].proc.pid  # ... and its backend stops
        assert started[0].proc.poll() is not None
        gate.touch()

        second = jobs.JobManager(host)
        second.load()
        assert second.jobs[rec.key].record.state == jobs.DETACHED
        again = second.fetch(host.ctx, rec.key).record
        drive(second)
        assert again.state == jobs.IMPORTED, (again.state, again.message)
        assert len(started) == 2 and local_backend.read(host.folder).pid == started[1].proc.pid
        [(key, frames)] = host.imports
        assert key == rec.key and np.array_equal(frames, expected_frames(spec))
    finally:
        for s in started:
            s.stop()


def test_fetch_with_no_backend_keeps_the_job_to_fetch_later(tmp_path):
    host = FakeHost(tmp_path / "user", "tcp://127.0.0.1:9", timeout_s=0.3, retries=0)
    base = {"address": "tcp://127.0.0.1:9", "video": "/v.mp4", "scene": "Scene", "blend": "", "first_frame": 1.0,
            "out_dir": str(tmp_path / "out"), "job_id": "j1", "key": "j1", "state": "running"}
    (host.folder / jobs.JOBS_FILE).write_text(json.dumps({"jobs": [base]}))
    manager = jobs.JobManager(host)
    manager.load()
    rec = manager.fetch(host.ctx, "j1").record
    drive(manager, timeout_s=10)
    assert rec.state == jobs.DETACHED and rec.message.startswith("The AVFace backend is not reachable"), rec.message
    assert persisted(host)["j1"]["state"] == jobs.DETACHED


# -- the head first, the detail after ------------------------------------------------------------
HEAD_SPEC = {"stages": ["decode", "track"], "steps": 2, "step_s": 0.02, "head": True, "n_detail": 2}


def _head_job(manager, host, server, name: str, **spec):
    """A job whose fake pipeline reports its head, then waits at ``spec["gate"]`` (if any)
    before its detail maps: driven until the head is imported and the detail run follows the
    job's wait."""
    clip = fake_clip(server.work / "in", f"{name}.json", **{**HEAD_SPEC, **spec})
    tracked = start(manager, host, clip)
    rec = tracked.record
    seen = []
    drive(manager, until=lambda: rec.state == jobs.DETAILING and rec.stage == "wait",
          watch=lambda: seen.append((rec.state, rec.message)))
    assert rec.state == jobs.DETAILING, (rec.state, rec.message)
    return tracked, seen


def test_the_head_is_imported_first_and_the_detail_goes_onto_it(server, host, tmp_path):
    """Reconstruct with the detail stage: the head is imported as soon as the backend has it,
    while the job goes on; when the job ends, its detail maps are added to that same head
    (no second import), and the record has both times."""
    gate = tmp_path / "gate"
    manager = jobs.JobManager(host)
    tracked, seen = _head_job(manager, host, server, "headclip", gate=str(gate), seed=21)
    rec = tracked.record
    # the head is in the scene: imported once, from a result whose detail maps are pending
    [(key, frames)] = host.imports
    assert key == rec.key and np.array_equal(frames, expected_frames({"seed": 21}))
    assert rec.head == tracked.imported == ["headclip", "headclip_rig"]
    assert rec.detail == "pending" and not (Path(rec.out_dir) / "detail").exists()
    assert _meta(Path(rec.out_dir) / "result.npz")["detail"]["state"] == "pending"
    assert rec.head_s is not None and 0 < rec.head_s < DRIVE_TIMEOUT_S and rec.detail_s is None
    head_message = f"Head imported in {rec.head_s:.0f} s: headclip; its detail maps follow"
    assert (jobs.DETAILING, head_message) in seen, seen
    # the job goes on, the manager follows it (its message the job's stage), nothing attached yet
    assert server.client().status(rec.job_id)["state"] == "running"
    assert manager.active() == [tracked] and tracked.client is not None and host.attached == []
    assert rec.message == "wait: waiting for the gate"
    saved = persisted(host)[rec.key]
    assert saved["state"] == jobs.DETAILING and saved["head"] == ["headclip", "headclip_rig"]
    assert saved["head_s"] == rec.head_s and saved["detail"] == "pending"

    gate.touch()
    drive(manager)
    assert rec.state == jobs.IMPORTED, (rec.state, rec.message)
    assert host.attached == [(rec.key, "headclip", "complete", ["000000.png", "000001.png"])]
    assert len(host.imports) == 1  # the detail went onto the head, no second head
    assert rec.detail == "complete" and rec.detail_s >= rec.head_s
    assert rec.message == f"Imported headclip: the head in {rec.head_s:.0f} s, its detail maps in {rec.detail_s:.0f} s"
    assert rec.stage == "" or rec.state == jobs.IMPORTED
    saved = persisted(host)[rec.key]
    assert saved["state"] == jobs.IMPORTED and saved["detail_s"] == rec.detail_s and saved["detail"] == "complete"
    assert tracked.client is None and manager.active() == []


def test_cancel_while_detailing_keeps_the_head(server, host, tmp_path):
    manager = jobs.JobManager(host)
    tracked, _ = _head_job(manager, host, server, "cancelhead", gate=str(tmp_path / "never"), seed=22)
    rec = tracked.record
    manager.cancel(rec.key)
    assert rec.message == "cancelling on the backend"
    drive(manager)
    assert rec.state == jobs.CANCELLED, (rec.state, rec.message)
    assert rec.message == "Detail cancelled: the head cancelhead is kept without detail maps"
    assert server.client().status(rec.job_id)["state"] == "cancelled"
    assert len(host.imports) == 1 and host.attached == [] and rec.head == ["cancelhead", "cancelhead_rig"]
    saved = persisted(host)[rec.key]
    assert saved["state"] == jobs.CANCELLED and saved["head"] == rec.head and saved["detail"] == "cancelled"


def test_a_detail_that_fails_keeps_the_head_and_says_why(server, host):
    manager = jobs.JobManager(host)
    clip = fake_clip(server.work / "in", "failhead.json", **HEAD_SPEC, fail="exception", seed=23)
    tracked = start(manager, host, clip)
    rec = tracked.record
    states = []
    drive(manager, watch=lambda: states.append(rec.state))
    assert jobs.DETAILING in states and rec.state == jobs.FAILED, (states, rec.message)
    assert rec.message.startswith("The detail maps failed (internal: "), rec.message
    assert "CUDA out of memory" in rec.message, rec.message
    assert rec.message.endswith("); the head failhead is kept without them"), rec.message
    assert len(host.imports) == 1 and host.attached == [] and rec.detail == "failed"


def test_without_the_detail_stage_it_is_one_step(server, host, tmp_path):
    """Submitted without the detail stage: the whole result in one import, as before. A head
    that says its detail is off or skipped is the whole result too: imported, and done."""
    manager = jobs.JobManager(host)
    clip = fake_clip(server.work / "in", "nodetail.json", **HEAD_SPEC, seed=24)
    tracked = start(manager, host, clip, options={"detail": False})
    rec = tracked.record
    states = []
    drive(manager, watch=lambda: states.append(rec.state))
    assert rec.state == jobs.IMPORTED and rec.message == "Imported nodetail", (rec.state, rec.message)
    assert jobs.DETAILING not in states and server.client().status(rec.job_id)["state"] == "done"
    assert tracked.run.head is False and rec.head_s is None and host.attached == []

    gate = tmp_path / "gate"
    for state, note in (("off", ""), ("skipped", " without detail maps: no frame had a trusted face texel to "
                                                  "learn them from")):
        clip = fake_clip(server.work / "in", f"head-{state}.json", **HEAD_SPEC, head_state=state, gate=str(gate))
        tracked = start(manager, host, clip)
        rec = tracked.record
        drive(manager)
        assert rec.state == jobs.IMPORTED and rec.message == f"Imported head-{state}{note}", (rec.state, rec.message)
        assert tracked.run.head is True and rec.detail == state and tracked.client is None
    assert len(host.imports) == 3 and host.attached == []
    gate.touch()


def test_a_detailing_job_outlives_blender_and_fetch_adds_the_detail_to_its_head(server, host, tmp_path):
    """Blender closes while the detail is made: the next session lists the job, and Fetch
    adds the detail to the head imported in the first session (by its name) instead of
    importing a second head. Fetching again adds nothing twice."""
    gate = tmp_path / "gate"
    first = jobs.JobManager(host)
    tracked, _ = _head_job(first, host, server, "outlive", gate=str(gate), seed=25)
    rec = tracked.record
    tracked.client.close()  # Blender quits
    gate.touch()
    server.wait_state(server.client(), rec.job_id, "done")

    second = jobs.JobManager(host)
    second.load()
    again = second.jobs[rec.key].record
    assert again.state == jobs.DETACHED and again.head == ["outlive", "outlive_rig"]
    assert again.message == "started in an earlier session; fetch it to add its detail maps to outlive"
    assert again.head_s == rec.head_s
    second.fetch(host.ctx, rec.key)
    assert again.state == jobs.DETAILING and again.message == "fetching the detail maps of outlive"
    drive(second)
    assert again.state == jobs.IMPORTED, (again.state, again.message)
    assert len(host.imports) == 1  # the first session's head only
    assert host.attached == [(rec.key, "outlive", "complete", ["000000.png", "000001.png"])]
    assert again.message.startswith("Imported outlive: the head in ")
    # fetched once more: the head has its maps already (and the time they took stays as it was)
    detail_s = again.detail_s
    second.fetch(host.ctx, rec.key)
    drive(second)
    assert again.state == jobs.IMPORTED and again.message == "outlive has its detail maps already", again.message
    assert len(host.imports) == 1 and again.detail_s == detail_s


def test_a_head_deleted_before_its_detail_leaves_the_result_to_import(server, host, tmp_path):
    gate = tmp_path / "gate"
    manager = jobs.JobManager(host)
    tracked, _ = _head_job(manager, host, server, "deleted", gate=str(gate), seed=26)
    rec = tracked.record
    host.deleted.add("deleted")
    gate.touch()
    drive(manager)
    assert rec.state == jobs.DONE, (rec.state, rec.message)
    assert rec.message == (f"The head deleted is no longer in the scene, so its detail maps were not added; the whole "
                           f"result is in {rec.out_dir}: press Import, or File > Import > AVFace result")
    assert host.attached == [] and (Path(rec.out_dir) / "detail" / "000001.png").is_file()
    # the panel's Import button imports the whole result, in one step
    manager.import_job(host.ctx, tracked)
    assert rec.state == jobs.IMPORTED and rec.message == "Imported deleted" and len(host.imports) == 2


def test_backend_lost_while_detailing_keeps_the_job_to_fetch(host, tmp_path):
    with doomed_backend(host, tmp_path) as doomed:
        manager = jobs.JobManager(host)
        tracked, _ = _head_job(manager, host, doomed, "lostdetail", gate=str(tmp_path / "never"), seed=27)
        doomed.kill()
        drive(manager)
    rec = tracked.record
    assert rec.state == jobs.DETACHED, (rec.state, rec.message)
    assert rec.message.startswith(f"Lost the AVFace backend at {doomed.address} during the detail maps (")
    assert rec.message.endswith("fetch the job from the panel once the backend is back to add them to lostdetail")
    assert persisted(host)[rec.key]["state"] == jobs.DETACHED and rec.head == ["lostdetail", "lostdetail_rig"]
