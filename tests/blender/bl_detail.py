"""The head first, the detail after, in real Blender (tests/test_addon_detail_blender.py): a
job whose (fake) backend reports the head, then waits at a gate before the detail maps. The
head is imported while the detail is pending, the animator works on it, and the maps then go
onto that same head, as a one-step import would have made them; a second job cancelled during
its detail keeps its head."""
import os
from pathlib import Path

import bpy
import numpy as np
from bl_common import drive_jobs, draw_panels, enable_addon

FIRST_FRAME = 10
USER_FRAME = 17
USER_VALUE = 0.77
DRIVE_TIMEOUT_S = 120


def _manager():
    from avface_blender import reconstruct

    return reconstruct.MANAGER


def _drive(until, timeout_s=DRIVE_TIMEOUT_S):
    drive_jobs(until, timeout_s)


def _start(clip):
    tracked = _manager().start(bpy.context, video=Path(clip), audio=None, has_sound=True, options={},
                               first_frame=FIRST_FRAME)
    rec = tracked.record
    bpy.context.scene.avface.job_key = rec.key  # as the operator does: the panel shows this job
    seen = []
    _drive(lambda: seen.append(rec.message) or (rec.state == "detailing" and rec.stage == "wait"))
    assert rec.state == "detailing", (rec.state, rec.message)
    return rec, seen


def _keys(id_data):
    """{(data path, index): [[frame, value], ...]} of the F-curves animating ``id_data``."""
    from avface_blender import anim

    out = {}
    for fc in anim.fcurves_of(id_data):
        co = np.empty(2 * len(fc.keyframe_points), np.float64)
        fc.keyframe_points.foreach_get("co", co)
        out[f"{fc.data_path}[{fc.array_index}]"] = co.reshape(-1, 2).round(6).tolist()
    return out


def _detail_setup(mesh_obj):
    """Everything the detail maps are on ``mesh_obj``: the Displace modifier, its texture and
    the material's image node, their image users' timing and its keys, the image."""
    from avface_blender import importer

    mod = mesh_obj.modifiers[importer.DETAIL_MODIFIER]
    mat = mesh_obj.data.materials[0]
    node = mat.node_tree.nodes["AVFace detail"]
    disp = next(n for n in mat.node_tree.nodes if n.type == "DISPLACEMENT")

    def user(u):
        return [u.frame_start, u.frame_duration, u.frame_offset, u.use_cyclic, u.use_auto_refresh]

    image = node.image
    return {
        "modifiers": [m.type for m in mesh_obj.modifiers],
        "modifier": [mod.strength, mod.mid_level, mod.direction, mod.texture_coords, mod.uv_layer],
        "texture_user": user(mod.texture.image_user), "material_user": user(node.image_user),
        "texture_keys": _keys(mod.texture), "material_keys": _keys(mat.node_tree),
        "same_image": mod.texture.image == image,
        "image": [bpy.path.abspath(image.filepath), image.source, image.colorspace_settings.name],
        "displacement": [disp.inputs["Midlevel"].default_value, disp.inputs["Scale"].default_value],
        "material_output": any(link.to_node.type == "OUTPUT_MATERIAL" and link.to_socket.name == "Displacement"
                               for link in mat.node_tree.links),
    }


def head_then_detail(address, clip, cancel_clip, gate, scene_fps):
    from avface_blender import importer

    enable_addon()
    prefs = bpy.context.preferences.addons["avface_blender"].preferences
    prefs.address, prefs.timeout_s, prefs.retries = address, 2.0, 2
    scene = bpy.context.scene
    scene.render.fps, scene.render.fps_base = scene_fps, 1.0  # not the result's 25: the maps are retimed
    report = {}

    # -- step one: the head, while the detail is pending ----------------------------------------
    rec, seen = _start(clip)
    mesh_obj = bpy.data.objects[rec.head[0]]
    arm_obj = bpy.data.objects[rec.head[1]]
    pointer = mesh_obj.as_pointer()
    report["head"] = {"name": mesh_obj.name, "modifiers": [m.type for m in mesh_obj.modifiers],
                      "materials": len(mesh_obj.data.materials), "head_s": rec.head_s, "messages": seen,
                      "panel": draw_panels(), "images": len(bpy.data.images)}

    # the animator works on the head meanwhile: keys of their own, another active object, another frame
    scene.frame_set(USER_FRAME)
    key = mesh_obj.data.shape_keys.key_blocks["expression_00"]
    key.value = USER_VALUE
    assert key.keyframe_insert("value", frame=USER_FRAME)
    mesh_obj.location.z = 0.25
    assert mesh_obj.keyframe_insert("location", index=2, frame=USER_FRAME)
    empty = bpy.data.objects.new("Animator's empty", None)
    scene.collection.objects.link(empty)
    for obj in scene.objects:
        obj.select_set(False)
    empty.select_set(True)
    bpy.context.view_layer.objects.active = empty
    before = {"shape_keys": _keys(mesh_obj.data.shape_keys), "object": _keys(mesh_obj), "bones": _keys(arm_obj)}

    # -- step two: the detail maps onto that head --------------------------------------------------
    Path(gate).touch()
    _drive(lambda: False)
    assert rec.state == "imported", (rec.state, rec.message)
    meshes = [o for o in bpy.data.objects if o.get("avface_role") == "mesh"]
    report["detail"] = {
        "message": rec.message, "head_s": rec.head_s, "detail_s": rec.detail_s, "n_heads": len(meshes),
        "same_object": bpy.data.objects.get(rec.head[0]) is not None and mesh_obj.as_pointer() == pointer,
        "materials": len(mesh_obj.data.materials), "setup": _detail_setup(mesh_obj),
        "frame": scene.frame_current, "active": bpy.context.view_layer.objects.active.name,
        "selected": sorted(o.name for o in scene.objects if o.select_get()),
        "kept": before == {"shape_keys": _keys(mesh_obj.data.shape_keys), "object": _keys(mesh_obj),
                           "bones": _keys(arm_obj)},
        "user_key": [k for k in before["shape_keys"]['key_blocks["expression_00"].value[0]'] if k[0] == USER_FRAME],
        "user_location": before["object"].get("location[2]"),
        "panel": draw_panels(),
    }
    # fetched again: the maps are not added twice
    result = os.path.join(rec.out_dir, "result.npz")
    report["again"] = importer.attach_detail(bpy.context, mesh_obj, result, first_frame=FIRST_FRAME)
    report["after_again"] = [[m.type for m in mesh_obj.modifiers], len(mesh_obj.data.materials)]

    # the whole result imported in one step, at the same place: the same detail set-up
    whole = importer.import_result(bpy.context, result, first_frame=FIRST_FRAME, name="one step",
                                   set_frame_range=False, set_resolution=False, make_camera_active=False)
    report["one_step"] = _detail_setup(whole.mesh_object)

    # -- a second job, cancelled during its detail: its head stays, without maps -----------------
    second, _ = _start(cancel_clip)
    assert bpy.ops.avface.cancel(key=second.key) == {"FINISHED"}
    _drive(lambda: False, timeout_s=60)
    head = bpy.data.objects.get(second.head[0])
    report["cancelled"] = {"state": second.state, "message": second.message, "job_id": second.job_id,
                           "exists": head is not None,
                           "modifiers": [m.type for m in head.modifiers] if head is not None else None,
                           "materials": len(head.data.materials) if head is not None else None}
    return report
