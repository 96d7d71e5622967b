"""The scene an animator works in, checked in real Blender (tests/test_addon_scene_blender.py):
a new scene's stages, a movie strip at another rate than the scene's, the video's camera on
import, and rendering the head over the video with F12."""
import bpy
import numpy as np
from bl_common import draw_panels, enable_addon

STRIP_START = 10


def _prefs():
    return bpy.context.preferences.addons["avface_blender"].preferences


def _movie_strip(scene, video):
    ed = scene.sequence_editor_create()
    strips = ed.strips if hasattr(ed, "strips") else ed.sequences
    movie = strips.new_movie("clip", video, channel=2, frame_start=STRIP_START)  # one picture per scene frame
    ed.active_strip = movie
    return movie


def _panel_line(prefix):
    return [line for line in draw_panels() if line.startswith(prefix)]


def stages_and_strip(video):
    """A new scene starts with the preference's stages; a 25 fps clip added by a script to a
    24 fps scene is read as the frames it has, trimmed or not."""
    from avface_blender import reconstruct

    enable_addon()
    _prefs().default_stages = {"coarse", "preview"}
    scene = bpy.data.scenes.new("Shot")
    bpy.context.window.scene = scene
    report = {"new_scene_stages": sorted(scene.avface.stages)}
    scene.avface.stages = {"coarse"}  # chosen in the scene: kept whatever the preference says next
    _prefs().default_stages = {"coarse", "detail"}
    report["chosen_stages"] = sorted(scene.avface.stages)
    report["other_scene_stages"] = sorted(bpy.data.scenes.new("Shot 2").avface.stages)
    scene.avface.stages = {"coarse", "preview"}

    scene.render.fps, scene.render.fps_base = 24, 1.0
    movie = _movie_strip(scene, video)
    report["strip"] = {"fps": movie.fps, "frame_duration": movie.frame_duration,
                       "final_duration": movie.frame_final_duration}
    report["panel_unread"] = _panel_line("Frames") + _panel_line("Clip frames")
    inputs = reconstruct.strip_inputs(scene, movie)
    options = reconstruct._options(bpy.context, scene.avface, inputs)
    report["options"] = {k: options[k] for k in ("frame_start", "frame_end", "detail", "preview")}
    report["panel"] = _panel_line("Clip frames")
    movie.frame_offset_start = 5
    trimmed = reconstruct.strip_inputs(scene, movie)
    report["trimmed"] = [trimmed["frame_start"], trimmed["frame_end"]]
    report["panel_trimmed"] = _panel_line("Clip frames")
    report["movieclips"] = len(bpy.data.movieclips)  # the clip read for its length is gone again
    return report


def _render(scene, path):
    scene.render.filepath = path
    bpy.ops.render.render(write_still=True)
    image = bpy.data.images.load(path, check_existing=False)
    pixels = np.array(image.pixels[:], np.float32).reshape(image.size[1], image.size[0], image.channels)
    bpy.data.images.remove(image)
    return pixels


def camera_and_render(video, result, work):
    """Import with the option off, then on (the default): the video's camera becomes the
    scene's, the previous one stays. Then F12 in a scene holding the movie strip renders the
    plain video; the panel says so, and after Set Up Render F12 renders the head over it."""
    from avface_blender import render_setup

    enable_addon()
    scene = bpy.context.scene
    scene.render.fps, scene.render.fps_base = 25, 1.0  # the clip's rate: the strip and the backdrop agree
    scene.frame_start = STRIP_START
    _movie_strip(scene, video)
    shot = bpy.data.objects.new("Shot camera", bpy.data.cameras.new("Shot camera"))
    scene.collection.objects.link(shot)
    scene.camera = shot
    report = {}
    assert bpy.ops.import_scene.avface_result(filepath=result, make_camera_active=False) == {"FINISHED"}
    report["camera_with_option_off"] = scene.camera.name
    assert bpy.ops.import_scene.avface_result(filepath=result) == {"FINISHED"}
    report["camera"] = scene.camera.name
    report["camera_role"] = scene.camera.get("avface_role")
    report["shot_camera_kept"] = shot.name in scene.objects
    report["hint"] = " ".join(draw_panels())

    scene.render.engine = "CYCLES"
    scene.cycles.samples, scene.cycles.use_denoising, scene.cycles.device = 1, False, "CPU"
    scene.render.dither_intensity = 0.0
    scene.view_settings.view_transform = "Standard"  # as the set-up will: the two renders compare
    scene.frame_set(STRIP_START + 5)
    before = _render(scene, f"{work}/before.png")
    assert bpy.ops.avface.setup_render() == {"FINISHED"}
    render = scene.render
    report["settings"] = {"use_sequencer": render.use_sequencer, "film_transparent": render.film_transparent,
                          "camera": scene.camera.name, "resolution": [render.resolution_x, render.resolution_y],
                          "view_transform": scene.view_settings.view_transform}
    report["compositor"] = _compositor_links(scene)
    clip = render_setup.backdrop_clip(scene.camera)
    report["clip_is_the_backdrop"] = report["compositor"]["clip"] == clip.name
    report["hint_after"] = " ".join(draw_panels())
    after = _render(scene, f"{work}/after.png")
    report.update(_compare(before, after))
    return report


def _compositor_links(scene):
    from avface_blender import render_setup

    tree = scene.compositing_node_group if hasattr(scene, "compositing_node_group") else scene.node_tree
    over = tree.nodes[render_setup.OVER_NODE]
    links = {(link.from_node.bl_idname, link.to_node.bl_idname, link.to_socket.identifier) for link in tree.links}
    out = next(link.to_node.bl_idname for link in tree.links if link.from_node == over)
    return {"links": sorted(map(list, links)), "output": out,
            "clip": tree.nodes[render_setup.CLIP_NODE].clip.name, "over_inputs": [s.identifier for s in over.inputs]}


def _compare(before, after):
    """Where the head is not (the frame's border), the render over the video is the video; on
    the head it is not."""
    h, w = before.shape[:2]
    border = np.zeros((h, w), bool)
    border[: h // 8], border[-h // 8:], border[:, : w // 8], border[:, -w // 8:] = True, True, True, True
    centre = np.zeros((h, w), bool)
    centre[3 * h // 8: 5 * h // 8, 3 * w // 8: 5 * w // 8] = True
    diff = np.abs(after[..., :3] - before[..., :3]).max(axis=-1)
    return {"size": [w, h], "border_diff": float(np.percentile(diff[border], 99)),
            "border_alpha": float(after[..., 3][border].min()), "centre_diff": float(diff[centre].mean()),
            "video_border_spread": float(before[..., :3][border].std())}
