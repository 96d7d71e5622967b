"""The add-on in real Blenders (bpy 5.0.1 and 4.2 LTS from PyPI): registration, import of a
result from the real pipeline, FBX round trip, retargeting."""
from __future__ import annotations

import numpy as np
import pytest
from addon_util import damaged_copy, demo_clip, flame_like_result, flame_result, offcentre_result, real_result, result_meta, rich_result  # noqa: F401 (fixtures)
from blender_harness import blender, staged_addon  # noqa: F401 (fixtures)
from export_util import WORLD_F32

pytestmark = [pytest.mark.blender, pytest.mark.slow]

CHECK_FRAMES = [0, 13, 29]


def test_registers_and_unregisters(blender):
    info = blender.run("bl_addon.py", "register_cycle")
    assert info["version"].startswith(blender.version.rsplit(".", 1)[0])


def test_import_matches_result_vertices(blender, real_result):
    report = blender.run("bl_addon.py", "import_and_check", result=str(real_result), frames=CHECK_FRAMES)
    assert report["action_api"] == ("slotted" if blender.major_minor >= (4, 4) else "Action.fcurves")
    for t, err, tol in zip(report["frames"], report["max_error_m"], report["tolerance_m"]):
        assert err <= tol, f"frame {t}: vertices differ by up to {err:.3g} m (tolerance {tol:.3g} m)"
    assert len(report["animated_properties"]) == 52 + 3
    # a default reconstruction has detail maps: they come in as the Displace modifier
    assert report.get("detail_maps") == report["n_frames"], report.get("detail_maps")


def test_camera_puts_the_head_on_the_video_pixels(blender, real_result, offcentre_result):
    """Looking through the imported camera, every vertex of the head lands where the result's
    intrinsics project it (so on the face in the video), with the video behind it."""
    meta = result_meta(real_result)
    video_frames = int(meta["source"]["frame_end"]) - int(meta["source"]["frame_start"])
    report = blender.run("bl_addon.py", "camera_match", result=str(real_result), frames=[0, 17],
                         video_frames=video_frames)
    for t, cam_px, stored_px in zip(report["frames"], report["max_px_camera"], report["max_px_stored"]):
        assert cam_px < 0.01, f"frame {t}: Blender's camera projects {cam_px:.3g} px away from the intrinsics"
        assert stored_px < 0.5, f"frame {t}: the head lands {stored_px:.3g} px off the result's own vertices"
    assert report["clip_size"] == [meta["width"], meta["height"]]
    assert report["clip_frames"] == video_frames and report["clip_frame_start"] == 1
    # another camera: a longer lens, an off-centre principal point, a wide frame, no video
    off = blender.run("bl_addon.py", "camera_match", result=str(offcentre_result), frames=[0, 17])
    assert off["size"] == [meta["width"] + 96, meta["height"]] and off["backdrop"] == 0
    # the focal length in pixels is 1.3x (the lens in mm is fitted to the wider frame)
    assert off["lens_mm"] * off["size"][0] == pytest.approx(1.3 * report["lens_mm"] * report["size"][0], rel=1e-5)
    assert abs(off["shift"][0]) > 0.02 and abs(off["shift"][1]) > 0.02  # 11 px left of the centre, 21 px above
    for t, cam_px in zip(off["frames"], off["max_px_camera"]):
        assert cam_px < 0.01, f"frame {t}: {cam_px:.3g} px off with an off-centre principal point"


@pytest.mark.parametrize("scene_fps", [30, 24])
def test_video_and_maps_keep_time_at_another_scene_rate(blender, rich_result, scene_fps):
    """The head's keys are retimed to the scene's rate; Blender plays a movie clip and an
    image sequence one picture per scene frame. At 30 fps (and 24) the 25 fps video behind the
    head and the detail maps on it must still show, on each scene frame, the picture nearest
    in time, not drift by a frame every few frames."""
    report = blender.run("bl_addon.py", "retimed_sources", result=str(rich_result), scene_fps=scene_fps)
    assert report["clip_fps"] == pytest.approx(25.0)
    video = np.array(report["video"], np.float64)  # scene frame, source time, picture shown
    inside = (video[:, 1] >= -0.5) & (video[:, 1] <= report["clip_frames"] - 0.5)
    assert inside.sum() >= 25
    off = np.abs(video[inside, 2] - video[inside, 1])
    assert off.max() <= 0.5 + 1e-6, f"the video shows a picture {off.max():.2f} frames from the scene's time"
    # one picture per scene frame from the start would have drifted out of that tolerance
    naive = np.abs((video[inside, 0] - video[0, 0]) - video[inside, 1])
    assert naive.max() > 1.0
    assert report["material_follows"], "the material's image sequence shows another map than the modifier's"
    maps = np.array(report["maps"], np.float64)  # scene frame, map time, map shown, its error, next best
    assert len(maps) >= 25
    assert (maps[:, 3] < 0.1 * maps[:, 4]).all(), "a frame's displacement matches no single map"
    n_maps = int(result_meta(rich_result)["n_frames"])
    want = np.clip(np.floor(maps[:, 1] + 0.5), 0, n_maps - 1)
    assert np.array_equal(maps[:, 2], want), np.stack([maps[:, 0], maps[:, 1], maps[:, 2]], 1)[maps[:, 2] != want]


def test_import_lip_keys_and_detail_maps(blender, rich_result):
    report = blender.run("bl_addon.py", "import_rich", result=str(rich_result))
    assert len(report["lip_keys"]) == 3


def test_damaged_result_is_refused_and_leaves_nothing(blender, real_result, tmp_path):
    bad = damaged_copy(real_result, tmp_path / "cut")
    report = blender.run("bl_addon.py", "import_refused", result=str(bad), expect="not a readable AVFace result")
    assert str(bad) in report["message"]


def test_fbx_round_trip_keeps_shape_key_and_bone_animation(blender, rich_result, tmp_path):
    report = blender.run("bl_fbx.py", "fbx_round_trip", result=str(rich_result), fbx_path=str(tmp_path / "head.fbx"))
    assert report["has_displace"], "the head should carry its Displace modifier into the export"
    assert report["n_keys"][0] == report["n_keys"][1] > 0
    assert report["key_motion"] > 0.05 and report["vertex_motion_m"] > 1e-3, "the round trip lost the animation"
    for frame, key_err, bone_err, vert_err in zip(report["frames"], report["key_error"], report["bone_error"],
                                                  report["vertex_error_m"]):
        assert key_err < 1e-3, f"frame {frame}: shape-key values differ by {key_err:.3g}"
        assert bone_err < 1e-4, f"frame {frame}: bone transforms differ by {bone_err:.3g}"
        assert vert_err < 1e-4, f"frame {frame}: vertices differ by {vert_err:.3g} m"
    # the video's camera went along, at the video's size although the scene rendered at 1920x1080
    assert report["n_cameras"] == 1
    for frame, px in zip(report["frames"], report["camera_px"]):
        assert px < 0.01, f"frame {frame}: through the FBX's camera the head is {px:.3g} px off the video's"


def test_fbx_export_says_when_it_leaves_the_camera_out(blender, real_result, tmp_path):
    report = blender.run("bl_fbx.py", "fbx_hidden_camera", result=str(real_result), fbx_path=str(tmp_path / "head.fbx"))
    assert "hidden" in report["note"] and "left out" in report["note"], report["note"]
    assert report["types"] == ["ARMATURE", "MESH"], report["types"]
    assert "cannot be selected" in report["hidden_head"] and "unhide" in report["hidden_head"], report["hidden_head"]


def test_retarget_to_arkit_named_keys(blender, real_result):
    report = blender.run("bl_fbx.py", "retarget", result=str(real_result))
    assert report["matched"] == {"eyeBlink_L": "eyeBlinkLeft", "EyeBlinkRight": "eyeBlinkRight", "jawOpen": "jawOpen",
                                 "EyeClosedLeft": "eyeBlinkLeft", "mouth_smile_left": "mouthSmileLeft"}
    assert report["unmatched"] == ["myCustomSmirk", "Blink"]


def test_flame_joints_become_a_keyed_armature(blender, flame_like_result):
    report = blender.run("bl_addon.py", "flame_armature", result=str(flame_like_result), frames=[0, 4, 9])
    for t, err, tol in zip(report["frames"], report["max_error_m"], report["tolerance_m"]):
        assert err <= tol, f"frame {t}: vertices differ by up to {err:.3g} m (tolerance {tol:.3g} m)"


def test_flame_joints_follow_the_expression(blender, flame_result):
    """A real FLAME result: its joints are regressed from the shaped mesh, so they move with
    the expression, and the bones must move with them (a joint shift times a rotation)."""
    report = blender.run("bl_addon.py", "flame_armature", result=str(flame_result), frames=[0, 5, 9],
                         world_f32=str(flame_result.parent / WORLD_F32))
    off = [f"frame {t}: {err:.3g} m (tolerance {tol:.3g} m)"
           for t, err, tol in zip(report["frames"], report["max_error_m"], report["tolerance_m"]) if err > tol]
    assert not off, "vertices differ from the result's: " + "; ".join(off)
    assert report["located_bones"] == ["global", "neck", "jaw", "left_eye", "right_eye"]
    # below float16: against the model's own float32 mesh, only Blender's float32 sums remain
    for t, err in zip(report["frames"], report["max_error_f32_m"]):
        assert err < 1e-5, f"frame {t}: {err:.3g} m off the model's float32 mesh"


def test_fbx_bakes_the_driven_pose_correctives(blender, flame_like_result, tmp_path):
    report = blender.run("bl_fbx.py", "fbx_round_trip", result=str(flame_like_result), fbx_path=str(tmp_path / "flame.fbx"))
    assert report["n_keys"] == [40, 40]  # 4 expression keys + 36 correctives, baked from their drivers
    assert report["vertex_motion_m"] > 1e-3
    for frame, key_err, vert_err in zip(report["frames"], report["key_error"], report["vertex_error_m"]):
        assert key_err < 1e-3 and vert_err < 1e-4, (frame, key_err, vert_err)


def test_fbx_keeps_the_flame_bones_moving_with_the_expression(blender, flame_result, tmp_path):
    report = blender.run("bl_fbx.py", "fbx_round_trip", result=str(flame_result), fbx_path=str(tmp_path / "flame.fbx"))
    assert report["vertex_motion_m"] > 1e-3
    for frame, key_err, bone_err, vert_err in zip(report["frames"], report["key_error"], report["bone_error"],
                                                  report["vertex_error_m"]):
        assert key_err < 1e-3 and bone_err < 1e-4 and vert_err < 1e-4, (frame, key_err, bone_err, vert_err)
