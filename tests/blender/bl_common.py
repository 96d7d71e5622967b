"""Helpers for checks that run inside Blender (see runner.py)."""
import addon_utils
import bpy
import numpy as np

ADDON = "avface_blender"


def enable_addon():
    module = addon_utils.enable(ADDON, default_set=True, handle_error=_raise)
    if module is None or ADDON not in bpy.context.preferences.addons:
        raise AssertionError(f"{ADDON} did not enable")
    return module


def _raise(exc):
    raise exc


def evaluated_world_vertices(obj, frame) -> np.ndarray:
    """(V, 3) world positions of ``obj``'s evaluated mesh (modifiers, shape keys, armature) at ``frame``."""
    scene = bpy.context.scene
    scene.frame_set(int(frame), subframe=float(frame) - int(frame))
    depsgraph = bpy.context.evaluated_depsgraph_get()
    ob = obj.evaluated_get(depsgraph)
    mesh = ob.to_mesh()
    try:
        co = np.empty(3 * len(mesh.vertices), np.float64)
        mesh.vertices.foreach_get("co", co)
        co = co.reshape(-1, 3)
        m = np.array(ob.matrix_world, np.float64)
    finally:
        ob.to_mesh_clear()
    return co @ m[:3, :3].T + m[:3, 3]


def head_objects():
    meshes = [o for o in bpy.data.objects if o.get("avface_role") == "mesh"]
    arms = [o for o in bpy.data.objects if o.get("avface_role") == "armature"]
    assert len(meshes) == 1 and len(arms) == 1, (meshes, arms)
    return meshes[0], arms[0]


def fcurve_values(id_data, data_path, index=0):
    from avface_blender import anim

    for fc in anim.fcurves_of(id_data):
        if fc.data_path == data_path and fc.array_index == index:
            co = np.empty(2 * len(fc.keyframe_points), np.float64)
            fc.keyframe_points.foreach_get("co", co)
            return co.reshape(-1, 2)
    raise AssertionError(f"{id_data.name} has no F-curve {data_path}[{index}]")
