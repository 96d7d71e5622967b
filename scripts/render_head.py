"""Render an imported AVFace head at three frames, side by side, headlessly (Cycles on the
CPU), for the README. Run it with a bpy venv's Python on any result:

    .venv/bin/avface demo -o out/demo --no-preview          # makes out/demo/result.npz
    .venv/bin/python build_addon.py --stage-only
    .venv-bpy/5.0.1/bin/python scripts/render_head.py out/demo/result.npz docs/images/addon_head.png

``--through-camera`` renders instead through the camera the add-on imports (the video's own,
``io_result.camera_settings``) at the video's resolution, and lays the head, half
transparent, over the video's frame (read with the imageio-ffmpeg binary of ``.venv``):
what an animator sees through that camera, the match at a glance::

    .venv-bpy/5.0.1/bin/python scripts/render_head.py out/demo/result.npz docs/images/addon_camera.png --through-camera
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--size", type=int, default=256, help="pixels per frame (square)")
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--frames", type=int, nargs=3, help="three result frames (default: spread over the clip)")
    parser.add_argument("--through-camera", action="store_true",
                        help="render through the imported video camera, over the video's frames")
    parser.add_argument("--opacity", type=float, default=0.45, help="the head's opacity over the video")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "build" / "addon"))
    import addon_utils
    import bpy  # first: addon_utils is on the path only once bpy is loaded
    import mathutils

    bpy.ops.wm.read_factory_settings(use_empty=True)
    addon_utils.enable("avface_blender", default_set=True)
    from avface_blender import importer, io_result

    scene = bpy.context.scene
    head = io_result.read_result(args.result)
    scene.render.fps, scene.render.fps_base = int(round(head.fps)), 1.0
    imported = importer.import_result(bpy.context, args.result, first_frame=1.0)
    mesh_obj = imported.mesh_object
    for poly in mesh_obj.data.polygons:
        poly.use_smooth = True
    if not mesh_obj.data.materials:
        mat = bpy.data.materials.new("skin")
        mat.use_nodes = True
        bsdf = mat.node_tree.nodes["Principled BSDF"]
        bsdf.inputs["Base Color"].default_value = (0.8, 0.6, 0.5, 1.0)
        bsdf.inputs["Roughness"].default_value = 0.55
        mesh_obj.data.materials.append(mat)

    frames = args.frames or [0, head.n_frames // 2, head.n_frames - 1]
    scene_frames = [int(round(f)) for f in imported.frames[frames]]
    # frame the head: centre and size from the evaluated mesh over the chosen frames
    points = []
    for f in scene_frames:
        scene.frame_set(f)
        ob = mesh_obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
        m = ob.to_mesh()
        co = np.empty(3 * len(m.vertices))
        m.vertices.foreach_get("co", co)
        world = np.array(ob.matrix_world)
        points.append(co.reshape(-1, 3) @ world[:3, :3].T + world[:3, 3])
        ob.to_mesh_clear()
    points = np.concatenate(points)
    centre = (points.min(0) + points.max(0)) / 2
    extent = float(np.max(points.max(0) - points.min(0)))

    if args.through_camera:
        return _through_camera(args, head, imported, scene_frames, frames)
    cam_data = bpy.data.cameras.new("camera")
    cam_data.type = "ORTHO"
    cam_data.ortho_scale = extent * 1.15
    cam = bpy.data.objects.new("camera", cam_data)
    scene.collection.objects.link(cam)
    # the face looks along -y in Blender: the camera stands on -y looking along +y
    cam.location = mathutils.Vector((centre[0], centre[1] - 1.0, centre[2]))
    cam.rotation_euler = (np.pi / 2, 0.0, 0.0)
    scene.camera = cam
    for name, rot, energy in (("key", (1.1, 0.0, -0.5), 3.0), ("fill", (1.3, 0.0, 0.8), 1.0)):
        light = bpy.data.objects.new(name, bpy.data.lights.new(name, "SUN"))
        light.data.energy = energy
        light.rotation_euler = rot
        scene.collection.objects.link(light)
    world = bpy.data.worlds.new("world")
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (0.05, 0.05, 0.06, 1.0)
    scene.world = world

    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = args.samples
    scene.render.resolution_x = scene.render.resolution_y = args.size
    scene.render.resolution_percentage = 100
    scene.render.image_settings.file_format = "PNG"

    tiles = []
    with tempfile.TemporaryDirectory() as tmp:
        for f in scene_frames:
            scene.frame_set(f)
            scene.render.filepath = str(Path(tmp) / f"frame{f:04d}.png")
            bpy.ops.render.render(write_still=True)
            img = bpy.data.images.load(scene.render.filepath)
            px = np.empty(args.size * args.size * 4, np.float32)
            img.pixels.foreach_get(px)
            tiles.append(px.reshape(args.size, args.size, 4))
            bpy.data.images.remove(img)
    _save_png(np.concatenate(tiles, axis=1), args.output)  # (H, 3W, 4), rows from the bottom as Blender stores them
    print(f"rendered result frames {frames} (scene frames {scene_frames}) to {args.output}")
    return 0


def _save_png(pixels: np.ndarray, path: Path) -> None:
    """Write (H, W, 4) float RGBA, rows from the bottom (Blender's order), as a PNG."""
    import bpy

    out = bpy.data.images.new("strip", width=pixels.shape[1], height=pixels.shape[0], alpha=True)
    out.pixels.foreach_set(pixels.astype(np.float32).ravel())
    path.parent.mkdir(parents=True, exist_ok=True)
    out.filepath_raw = str(path)
    out.file_format = "PNG"
    out.save()


def _video_frame(video: Path, index: int, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) float RGB of frame ``index``, rows from the top, by ffmpeg (imageio-ffmpeg's binary)."""
    import subprocess

    binaries = sorted((ROOT / ".venv").glob("lib/python3*/site-packages/imageio_ffmpeg/binaries/ffmpeg*"))
    if not binaries:
        raise SystemExit("no ffmpeg: run `make setup` first (imageio-ffmpeg in .venv)")
    w, h = size
    raw = subprocess.run([str(binaries[0]), "-v", "error", "-i", str(video), "-vf", f"select=eq(n\\,{index}),scale={w}:{h}",
                          "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw[: w * h * 3], np.uint8).reshape(h, w, 3).astype(np.float32) / 255.0


def _through_camera(args, head, imported, scene_frames, frames) -> int:
    import bpy

    scene = bpy.context.scene
    if imported.video_clip is None:  # the importer found no camera or no video to put behind it
        raise SystemExit(f"{args.result}: no camera or no source video to render over")
    scene.camera = imported.camera_object
    # the video's frame size, scaled down to --size pixels high when it is larger
    scale = min(1.0, args.size / head.camera.height)
    w, h = int(round(head.camera.width * scale)), int(round(head.camera.height * scale))
    scene.render.engine = "BLENDER_WORKBENCH"
    scene.display.shading.light = "STUDIO"
    scene.display.shading.color_type = "SINGLE"
    scene.display.shading.single_color = (0.25, 0.9, 0.45)  # a colour the skin never has
    scene.render.film_transparent = True
    scene.render.resolution_x, scene.render.resolution_y = w, h  # the same aspect: the camera still matches
    scene.render.resolution_percentage = 100
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA"
    tiles = []
    with tempfile.TemporaryDirectory() as tmp:
        for f, t in zip(scene_frames, frames):
            scene.frame_set(f)
            scene.render.filepath = str(Path(tmp) / f"frame{f:04d}.png")
            bpy.ops.render.render(write_still=True)
            img = bpy.data.images.load(scene.render.filepath)
            px = np.empty(w * h * 4, np.float32)
            img.pixels.foreach_get(px)
            bpy.data.images.remove(img)
            render = px.reshape(h, w, 4)[::-1]  # rows from the top
            video = _video_frame(head.video_path, head.source_frame_start + t, (w, h))
            alpha = args.opacity * render[..., 3:4]
            tiles.append(np.concatenate([video * (1 - alpha) + render[..., :3] * alpha, np.ones((h, w, 1))], axis=2))
    _save_png(np.concatenate(tiles, axis=1)[::-1], args.output)  # back to Blender's rows from the bottom
    print(f"rendered result frames {frames} through the video's camera over the video to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
