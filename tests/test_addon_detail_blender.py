"""The head first, the detail after, in real Blenders (bpy 5.0.1 and 4.2 LTS), against a real
`avface serve` running the fake pipeline (tests/fake_pipeline.py) on a real result with detail
maps: it reports the head, then waits at a gate before the maps. The job manager and the
importer are the add-on's; the pure parts are in tests/test_addon_jobs.py."""
from __future__ import annotations

import pytest
from addon_util import CLIP_SIZE_PX, DETAIL_METRES_PER_UNIT, demo_clip, real_result, result_meta, rich_result  # noqa: F401 (fixtures)
from blender_harness import blender, isolated_home, staged_addon  # noqa: F401 (fixtures)
from service_util import ServerProcess, fake_clip

pytestmark = [pytest.mark.blender, pytest.mark.slow]

SCENE_FPS = 30  # not the result's 25: the maps' image sequence is retimed, its offsets keyed


@pytest.fixture
def server(tmp_path):
    s = ServerProcess(tmp_path / "service", workers=2)
    s.work.mkdir()
    s.start()
    yield s
    s.stop()


def test_the_head_comes_first_and_the_detail_goes_onto_it(blender, server, rich_result, tmp_path):
    gate = tmp_path / "gate"
    spec = {"stages": ["decode"], "steps": 2, "step_s": 0.02, "head": True, "result": str(rich_result)}
    clip = fake_clip(server.work / "in", "detail.json", gate=str(gate), **spec)
    cancel_clip = fake_clip(server.work / "in", "cancel.json", gate=str(tmp_path / "never"), **spec)
    report = blender.run("bl_detail.py", "head_then_detail", env=isolated_home(tmp_path), address=server.address,
                         clip=str(clip), cancel_clip=str(cancel_clip), gate=str(gate), scene_fps=SCENE_FPS)
    n_maps = int(result_meta(rich_result)["n_frames"])

    # step one: the head is in the scene while its detail is pending, without the maps
    head = report["head"]
    assert head["name"] == "detail head"
    assert head["modifiers"] == ["ARMATURE"] and head["materials"] == 0 and head["images"] == 0
    assert f"Head imported in {head['head_s']:.0f} s: detail head; its detail maps follow" in head["messages"]
    assert head["messages"][-1] == "wait: waiting for the gate"  # then the message follows the job's stage
    assert f"Head imported in {head['head_s']:.0f} s (detail head)" in head["panel"], head["panel"]
    assert any(line.startswith("<detail: wait ") for line in head["panel"]), head["panel"]
    assert "(avface.cancel)" in head["panel"]

    # step two: the maps went onto that same head, and nothing the animator did meanwhile moved
    detail = report["detail"]
    assert detail["same_object"] and detail["n_heads"] == 1
    # (with the head's note: the scene renders at the default 1920x1080, not the video's size)
    assert detail["message"] == (f"Imported detail head: the head in {detail['head_s']:.0f} s, its detail maps in "
                                 f"{detail['detail_s']:.0f} s; the scene renders at another size than the video's "
                                 f"{CLIP_SIZE_PX}x{CLIP_SIZE_PX}: set it to that for the camera to match")
    assert detail["detail_s"] >= detail["head_s"]
    setup = detail["setup"]
    assert setup["modifiers"] == ["ARMATURE", "DISPLACE"] and detail["materials"] == 1
    assert setup["same_image"] and setup["material_output"]
    assert setup["image"][1:] == ["SEQUENCE", "Non-Color"] and "/detail/" in setup["image"][0]
    assert setup["modifier"][0] == pytest.approx(DETAIL_METRES_PER_UNIT)
    assert detail["kept"], "the head's animation changed when its detail was added"
    assert detail["user_key"] == [[17.0, pytest.approx(0.77, abs=1e-6)]]
    assert detail["user_location"] == [[17.0, 0.25]]
    assert detail["frame"] == 17 and detail["active"] == "Animator's empty"
    assert detail["selected"] == ["Animator's empty"]
    assert "Imported detail head" in " ".join(detail["panel"])
    # the image sequence shows the maps as a one-step import of the whole result does (retimed to 30 fps)
    one_step = report["one_step"]
    assert setup["texture_keys"] and setup["texture_user"][1] > n_maps  # the 30 fps path: keyed offsets
    for part in ("modifiers", "modifier", "texture_user", "material_user", "texture_keys", "material_keys", "image",
                 "displacement"):
        assert setup[part] == one_step[part], (part, setup[part], one_step[part])
    # fetched again: nothing added twice
    assert report["again"] is False and report["after_again"] == [["ARMATURE", "DISPLACE"], 1]

    # a job cancelled during its detail: cancelled on the backend, its head kept without maps
    cancelled = report["cancelled"]
    assert cancelled["state"] == "cancelled"
    assert cancelled["message"] == "Detail cancelled: the head cancel head is kept without detail maps"
    assert cancelled["exists"] and cancelled["modifiers"] == ["ARMATURE"] and cancelled["materials"] == 0
    assert server.client().status(cancelled["job_id"])["state"] == "cancelled"
