"""Blender's own importers read what ``avface export`` writes (README, "Export to other tools"): glTF through
``import_scene.gltf`` and USD through ``wm.usd_import``, both with their shape-key animation.
Run inside Blender by runner.py; no AVFace add-on involved."""
import bpy
import numpy as np
from bl_common import camera_view_pixels, evaluated_world_vertices, result_pixels


def _animated_mesh():
    meshes = [o for o in bpy.data.objects if o.type == "MESH" and o.data.shape_keys is not None]
    assert len(meshes) == 1, f"expected one mesh with shape keys, got {[o.name for o in bpy.data.objects]}"
    return meshes[0]


def _first_key_frame(obj) -> float:
    """The scene frame of the animation's first key: where the result's frame 0 landed."""
    firsts = []
    for id_data in (obj.data.shape_keys, obj.parent):
        ad = getattr(id_data, "animation_data", None) if id_data is not None else None
        if ad is None or ad.action is None:
            continue
        from avface_blender import anim  # the add-on's one reader of both action APIs

        for fc in anim.fcurves_of(id_data):
            if len(fc.keyframe_points):
                firsts.append(fc.keyframe_points[0].co.x)
    assert firsts, f"{obj.name} has no animation"
    return min(firsts)


def _compare(obj, expected_path, frames, vertex_ids=None):
    """Max distance (m) at each of ``frames`` between the evaluated mesh and the expected
    Blender-frame vertices (T, V, 3); ``vertex_ids`` maps the imported vertices to the result's."""
    expected = np.load(expected_path)
    first = _first_key_frame(obj)
    errors = []
    for t in frames:
        got = evaluated_world_vertices(obj, first + t)
        want = expected[t] if vertex_ids is None else expected[t][vertex_ids]
        assert got.shape == want.shape, (got.shape, want.shape)
        errors.append(float(np.abs(got - want).max()))
    return errors, first


def _camera_errors(obj, first, frames, camera):
    """Looking through the imported camera at the video's size: the largest distance (pixels)
    at each of ``frames`` between where Blender puts each evaluated vertex and where the
    result's intrinsics and extrinsic put the same vertex."""
    cams = [o for o in bpy.data.objects if o.type == "CAMERA"]
    assert len(cams) == 1, f"expected the video's camera, got {[o.name for o in cams]}"
    errors = []
    for t in frames:
        world = evaluated_world_vertices(obj, first + t)
        got = camera_view_pixels(cams[0], world, camera["width"], camera["height"])
        errors.append(float(np.abs(got - result_pixels(world, camera["intrinsics"], camera["extrinsic"])).max()))
    data = cams[0].data
    return {"camera_px": errors, "lens_mm": data.lens, "sensor_mm": data.sensor_width, "sensor_fit": data.sensor_fit}


def import_gltf(path, expected, frames, fps, camera=None):
    bpy.context.scene.render.fps = int(round(fps))
    bpy.ops.import_scene.gltf(filepath=path)
    obj = _animated_mesh()
    names = [k.name for k in obj.data.shape_keys.key_blocks]
    attr = obj.data.attributes.get("_AVFACE_VERTEX_ID")
    if attr is None:
        raise AssertionError(f"the importer dropped _AVFACE_VERTEX_ID; attributes: {list(obj.data.attributes.keys())}")
    ids = np.empty(len(obj.data.vertices), np.int32 if attr.data_type == "INT" else np.float32)
    attr.data.foreach_get("value", ids)
    errors, first = _compare(obj, expected, frames, ids.astype(np.int64))
    report = {"errors": errors, "shape_keys": names, "first_frame": first, "n_vertices": len(obj.data.vertices)}
    if camera is not None:
        report.update(_camera_errors(obj, first, frames, camera))
    return report


def import_usd(path, expected, frames, fps, camera=None):
    bpy.context.scene.render.fps = int(round(fps))
    bpy.ops.wm.usd_import(filepath=path)
    obj = _animated_mesh()
    names = [k.name for k in obj.data.shape_keys.key_blocks]
    errors, first = _compare(obj, expected, frames)
    report = {"errors": errors, "shape_keys": names, "first_frame": first, "n_vertices": len(obj.data.vertices),
              "scene_fps": bpy.context.scene.render.fps}
    if camera is not None:
        report.update(_camera_errors(obj, first, frames, camera))
    return report

