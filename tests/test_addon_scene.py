"""The add-on's scene logic without Blender: which source frames a movie strip shows
(``footage.source_range``), the user's own file in place of the backend's uploaded copy
(``footage``, ``io_result.source_video``), and the local backend's owners (``local_backend``)
with real processes. Blender's side of the same is in tests/test_addon_scene_blender.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from addon_util import addon_module
from service_util import pid_gone, wait_for

footage = addon_module("footage")
io_result = addon_module("io_result")
local_backend = addon_module("local_backend")


# -- the strip's source frames ------------------------------------------------------------
def _range(offset_start=0, offset_end=0, final_duration=75, fps=25.0, scene_fps=24.0, pictures=75):
    r = footage.source_range(offset_start=offset_start, offset_end=offset_end, final_duration=final_duration,
                             fps=fps, scene_fps=scene_fps, pictures=pictures)
    return r.start, r.end, r.ratio


def test_a_strip_shown_one_picture_per_scene_frame_reads_its_own_frames():
    # strips.new_movie: a 75-picture 25 fps clip in a 24 fps scene spans 75 scene frames
    assert _range() == (0, 75, 1.0)
    assert _range(offset_start=5, final_duration=70) == (5, 75, 1.0)
    assert _range(offset_start=5, offset_end=10, final_duration=60) == (5, 65, 1.0)


def test_a_strip_at_the_movies_own_rate_converts_scene_frames_to_source_frames():
    # the UI's "Adjust Playback Rate": the same clip spans 72 scene frames (Blender truncates 75 * 24 / 25)
    assert _range(final_duration=72) == (0, 75, 25 / 24)
    assert _range(offset_start=5, final_duration=67) == (5, 75, 25 / 24)  # round(5 * 25 / 24) = 5
    assert _range(offset_start=24, offset_end=24, final_duration=24) == (25, 50, 25 / 24)
    # 30 fps footage in a 24 fps scene: 90 pictures over 72 scene frames
    assert _range(final_duration=72, fps=30.0, pictures=90) == (0, 90, 1.25)


def test_source_range_stays_inside_the_clip():
    # a retimed strip (neither reading fits): its pictures spread evenly over its span
    start, end, ratio = _range(final_duration=150, pictures=75)
    assert (start, end) == (0, 75) and ratio == pytest.approx(0.5)
    # handles pulled out past the content (held frames) never ask for frames outside it
    assert _range(offset_start=-5, offset_end=-5, final_duration=85) == (0, 75, 1.0)
    # an unknown picture count: one picture per scene frame
    assert _range(final_duration=70, offset_start=5, pictures=None) == (5, 75, 1.0)


# -- the user's own file, not the backend's uploaded copy ----------------------------------
INTERNAL = "/home/u/.local/share/avface/service/jobs/0123abcd/input/video.mpg"


def test_messages_name_the_users_file():
    user = Path("/work/shots/take 3.MPG")
    files = {"video": user, "audio": None}
    text = f"{INTERNAL} is not a readable video"
    assert footage.user_paths(text, files) == "/work/shots/take 3.MPG is not a readable video"
    bare = "frame range [0, 78) is not inside the clip video.mpg, which has 75 frames"
    assert footage.user_paths(bare, files) == "frame range [0, 78) is not inside the clip take 3.MPG, which has 75 frames"
    # a path the backend read itself is the user's: bare names are left alone then
    assert footage.user_paths(bare, files, bare_names=False) == bare
    # other files and look-alikes are left alone
    other = "cannot read /data/video.mpg.bak or my_video.mpg or /jobs/x/input/audio.mpg"
    assert footage.user_paths(other, files) == other
    audio = footage.user_paths("bad /srv/jobs/j1/input/audio.wav", {"audio": "/a/speech.WAV"})
    assert audio == "bad /a/speech.WAV"


def test_an_uploaded_copy_never_reaches_the_scene(tmp_path):
    assert footage.is_uploaded_copy(INTERNAL) and footage.is_uploaded_copy("C:\\avface\\jobs\\j\\input\\video.mp4")
    assert not footage.is_uploaded_copy("/work/shots/input/video.mp4")
    assert not footage.is_uploaded_copy("/work/jobs/j/input/take.mp4")
    result = tmp_path / "result.npz"
    # without a record of the user's file: the copy is dropped (no backdrop), a user's path kept
    assert io_result.source_video(result, INTERNAL) is None
    assert io_result.source_video(result, "/work/shots/take.mp4") == Path("/work/shots/take.mp4")
    assert io_result.source_video(result, None) is None
    # the add-on records the user's file beside a result it fetched: that wins
    io_result.write_source(tmp_path, "/work/shots/take 3.MPG")
    assert io_result.source_video(result, INTERNAL) == Path("/work/shots/take 3.MPG")
    assert json.loads((tmp_path / io_result.SOURCE_FILE).read_text()) == {"video": "/work/shots/take 3.MPG"}


# -- the local backend: found, shared, stopped by its last owner ----------------------------
ADDRESS = "tcp://127.0.0.1:59999"


def _sleeper(*argv) -> subprocess.Popen:
    """A process that stands in for a backend or a Blender (``serve ADDRESS`` in its command
    line, as the backend's has)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *argv], start_new_session=True)


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_the_last_owner_to_quit_stops_the_backend(tmp_path, procs):
    backend = _sleeper("serve", "--bind", ADDRESS)
    other_blender = _sleeper()
    procs += [backend, other_blender]
    me = 4_000_000  # a process id no process has
    state = local_backend.record_started(tmp_path, backend.pid, ADDRESS, owner=me)
    assert state.owners == [me] and local_backend.find(tmp_path, ADDRESS) == state
    assert local_backend.find(tmp_path, "tcp://127.0.0.1:1") is None  # another address: not ours
    # another Blender uses it too
    assert local_backend.adopt(tmp_path, ADDRESS, owner=other_blender.pid)
    assert local_backend.read(tmp_path).owners == [me, other_blender.pid]
    # the first quits: the other still uses it
    assert local_backend.release(tmp_path, owner=me) is None
    assert backend.poll() is None and local_backend.read(tmp_path).owners == [other_blender.pid]
    # the other crashed (never released): the next Blender to quit is the last owner
    other_blender.kill()
    other_blender.wait(10)
    assert local_backend.release(tmp_path, owner=me, wait_s=10) == backend.pid
    assert backend.wait(10) is not None and local_backend.read(tmp_path) is None


def test_a_backend_started_by_hand_is_never_adopted_nor_stopped(tmp_path, procs):
    by_hand = _sleeper("serve", "--bind", ADDRESS)
    procs.append(by_hand)
    assert not local_backend.adopt(tmp_path, ADDRESS, owner=1)
    assert local_backend.release(tmp_path, owner=1) is None and by_hand.poll() is None
    # a record whose process has gone, or is no backend any more (a reused pid), is cleared
    local_backend.record_started(tmp_path, 4_000_000, ADDRESS, owner=1)
    assert local_backend.find(tmp_path, ADDRESS) is None and local_backend.read(tmp_path) is None
    not_a_backend = _sleeper()
    procs.append(not_a_backend)
    local_backend.record_started(tmp_path, not_a_backend.pid, ADDRESS, owner=1)
    assert local_backend.release(tmp_path, owner=1) is None and not_a_backend.poll() is None
    wait_for(lambda: local_backend.read(tmp_path) is None, timeout_s=1, what="the stale record to go")
    assert not pid_gone(not_a_backend.pid)
