"""The scene an animator meets, in real Blenders (bpy 5.0.1 and 4.2 LTS): a new scene's
stages come from the preferences, a movie strip at another rate than the scene's is read as
the frames it has, the video's camera becomes the scene's camera on import (the previous one
kept), and Set Up Render makes F12 render the head over the video instead of the Sequencer's
plain video. The pure parts are in tests/test_addon_scene.py."""
from __future__ import annotations

import pytest
from addon_util import demo_clip, real_result  # noqa: F401 (fixtures)
from blender_harness import blender, isolated_home, staged_addon  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.blender, pytest.mark.slow]


def test_new_scene_stages_and_a_strip_at_another_rate(blender, demo_clip, tmp_path):
    """The demo clip: 30 pictures at 25 fps, added by a script to a 24 fps scene, so shown one
    picture per scene frame over 30 scene frames. Read as 25/24 more source frames per scene
    frame, it asked for frames 0-31 of 30, and the backend refused the job (bad_input)."""
    report = blender.run("bl_scene.py", "stages_and_strip", env=isolated_home(tmp_path), video=str(demo_clip.video_path))
    assert report["new_scene_stages"] == ["coarse", "preview"]  # the preference, not coarse + detail
    assert report["chosen_stages"] == ["coarse"]
    assert report["other_scene_stages"] == ["coarse", "detail"]
    assert report["strip"]["fps"] == pytest.approx(25.0) and report["strip"]["final_duration"] == 30
    assert report["options"] == {"frame_start": 0, "frame_end": 30, "detail": False, "preview": True}
    assert report["trimmed"] == [5, 30]
    assert report["panel_unread"] == ["Frames: reading the clip's length"]  # a draw does not load the clip
    assert report["panel"] == ["Clip frames 0-29 of 30, from scene frame 10"]
    assert report["panel_trimmed"] == ["Clip frames 5-29 of 30, from scene frame 15"]
    assert report["movieclips"] == 0


def test_video_camera_and_render_over_the_video(blender, demo_clip, real_result, tmp_path):
    report = blender.run("bl_scene.py", "camera_and_render", env=isolated_home(tmp_path), video=str(demo_clip.video_path),
                         result=str(real_result), work=str(tmp_path))
    # the import option off keeps the scene's camera; on (the default), the video's camera is active
    assert report["camera_with_option_off"] == "Shot camera"
    assert report["camera_role"] == "camera" and report["camera"] != "Shot camera"
    assert report["shot_camera_kept"]
    # a scene with strips and the Sequencer on: the panel says what F12 renders and offers the set-up
    assert "F12 renders the Sequencer's strips (the plain video), not the head" in report["hint"]
    assert "(avface.setup_render)" in report["hint"]
    assert "F12 renders" not in report["hint_after"] and "(avface.setup_render)" not in report["hint_after"]
    assert report["settings"] == {"use_sequencer": False, "film_transparent": True, "camera": report["camera"],
                                  "resolution": report["size"], "view_transform": "Standard"}
    assert report["clip_is_the_backdrop"]
    comp = report["compositor"]
    links = {tuple(link[:2]) for link in comp["links"]}
    assert {("CompositorNodeMovieClip", "CompositorNodeScale"), ("CompositorNodeScale", "CompositorNodeAlphaOver"),
            ("CompositorNodeRLayers", "CompositorNodeAlphaOver")} <= links, comp
    assert comp["output"] == ("NodeGroupOutput" if blender.major_minor >= (5, 0) else "CompositorNodeComposite")
    # F12: the video where the head is not (opaque, as the plain video's render), the head where it is
    assert report["video_border_spread"] > 0.01, "the video's border is one flat colour: nothing to compare"
    assert report["border_diff"] < 0.03 and report["border_alpha"] > 0.99, report
    assert report["centre_diff"] > 0.05, report
