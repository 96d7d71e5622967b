"""The ICT Face Model Light's whole head in real Blender (tests/test_addon_ict_blender.py), all
in one session: the import (parts, materials, the skin group, ARKit-named keys on the
template with the identity key, bones), the detail maps on the skin only, the head first and
its maps after, retargeting onto an ARKit rig, and an FBX round trip through Blender's own
exporter and importer."""
import time

import bpy
import numpy as np
from bl_common import check_head, enable_addon, evaluated_world_vertices, fcurve_values, head_objects

FIRST_FRAME = 1
FPS = 25


def _scene():
    scene = bpy.context.scene
    scene.render.fps, scene.render.fps_base = FPS, 1.0
    scene.frame_start = FIRST_FRAME
    return scene


def _key_values(key, names, frame):
    bpy.context.scene.frame_set(int(frame))
    return np.array([key.key_blocks[n].value for n in names], np.float64)


def _material_report(mesh_obj):
    out = {}
    for mat in mesh_obj.data.materials:
        bsdf = next(n for n in mat.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
        out[mat.name] = {
            "part": mat.get("avface_material"),
            "color": [round(c, 4) for c in bsdf.inputs["Base Color"].default_value[:3]],
            "alpha": bsdf.inputs["Alpha"].default_value,
            "render_method": mat.surface_render_method,
            "transparent_shadow": mat.use_transparent_shadow,
            "detail_nodes": sorted(n.name for n in mat.node_tree.nodes if n.name.startswith("AVFace detail")),
        }
    return out


def _positions(obj, vertex_ids, scene_frames):
    """(frames, len(vertex_ids), 3) evaluated world positions."""
    return [evaluated_world_vertices(obj, f)[vertex_ids].tolist() for f in scene_frames]


def ict_head(result, head_only, lips, frames, fbx_path, vertex_ids):
    """``result``: an ICT result with detail maps; ``head_only``: the same without its maps (the
    head a job imports first); ``lips``: one with a lip basis; ``frames``: result frames to
    check; ``vertex_ids``: vertices whose evaluated positions are reported (a tooth's, the
    eyeballs')."""
    from avface_blender import importer, io_result, operators
    from avface_blender._vendor.result.arkit_names import ARKIT_NAMES, arkit_sources

    z = np.load(result)
    expression, names = z["expression"], [str(n) for n in z["expression_names"]]
    enable_addon()
    _scene()
    t0 = time.perf_counter()
    assert bpy.ops.import_scene.avface_result(filepath=result) == {"FINISHED"}
    report = {"import_s": time.perf_counter() - t0, "version": bpy.app.version_string}
    mesh_obj, arm_obj = head_objects()
    mesh = mesh_obj.data
    scene_frames = [FIRST_FRAME + t for t in frames]

    # the whole head: every part, one material each
    report["n_vertices"] = len(mesh.vertices)
    material_index = np.empty(len(mesh.polygons), np.int32)
    mesh.polygons.foreach_get("material_index", material_index)
    report["material_counts"] = np.bincount(material_index, minlength=len(mesh.materials)).tolist()
    report["materials"] = _material_report(mesh_obj)
    report["material_names"] = [m.name for m in mesh.materials]

    # the skin group: membership and weights
    group = mesh_obj.vertex_groups[importer.SKIN_GROUP]
    weights = np.full(len(mesh.vertices), -1.0)
    for v in mesh.vertices:  # (a test's readback; the importer adds the group in two bulk calls)
        for g in v.groups:
            if g.group == group.index:
                weights[v.index] = g.weight
    report["skin_members"] = np.flatnonzero(weights >= 0).tolist()
    report["skin_full"] = np.flatnonzero(weights == 1.0).tolist()
    report["groups"] = [g.name for g in mesh_obj.vertex_groups]

    # shape keys: Basis (the template), identity at 1, the 53 ARKit shapes keyed with the weights
    key = mesh.shape_keys
    report["keys"] = [kb.name for kb in key.key_blocks]
    identity = key.key_blocks["identity"]
    report["identity"] = {"value": identity.value,
                          "animated": any('"identity"' in fc.data_path for fc in _fcurves(key))}
    basis = np.empty(3 * len(mesh.vertices), np.float32)
    key.key_blocks["Basis"].data.foreach_get("co", basis)
    report["basis_is_template"] = float(np.abs(basis.reshape(-1, 3) - z["vertices_template"]).max())
    report["key_error"] = [float(np.abs(_key_values(key, names, f) - expression[t]).max())
                           for t, f in zip(frames, scene_frames)]

    # the posed head against the result's vertices (topology, keys, curves: bl_common.check_head)
    check = check_head(result, first_frame=float(FIRST_FRAME), frames=frames)
    report["vertex_error_m"], report["vertex_tolerance_m"] = check["max_error_m"], check["tolerance_m"]
    report["animated_properties"] = len(check["animated_properties"])

    # bones: root and the eyes, keyed from global_rot and eyes
    report["bones"] = {b.name: (b.parent.name if b.parent else None) for b in arm_obj.data.bones}
    head = io_result.read_result(result)
    eye_error = 0.0
    for j, bone in enumerate(head.joint_names):
        for i in range(4):
            co = fcurve_values(arm_obj, f'pose.bones["{bone}"].rotation_quaternion', i)
            eye_error = max(eye_error, float(np.abs(co[:, 1] - head.bone_quaternions[:, j, i]).max()))
    report["bone_key_error"] = eye_error
    report["head_positions"] = _positions(mesh_obj, vertex_ids, scene_frames)

    # the detail maps displace the skin only
    mod = mesh_obj.modifiers[importer.DETAIL_MODIFIER]
    report["detail_vertex_group"] = mod.vertex_group
    middle = scene_frames[len(scene_frames) // 2]
    with_maps = evaluated_world_vertices(mesh_obj, middle)
    mod.show_viewport = False
    without = evaluated_world_vertices(mesh_obj, middle)
    mod.show_viewport = True
    moved = np.linalg.norm(with_maps - without, axis=1)
    report["displaced"] = np.flatnonzero(moved > 1e-9).tolist()
    report["max_displacement_m"] = float(moved.max())

    # retargeting onto a rig with ARKit's 52 names: the curves are the keys, mapped by name
    bpy.ops.mesh.primitive_cube_add()
    target = bpy.context.active_object
    target.name = "ARKit rig"
    target.shape_key_add(name="Basis", from_mix=False)
    for n in ARKIT_NAMES:
        target.shape_key_add(name=n, from_mix=False)
    matched, unmatched = operators.retarget(mesh_obj, target)
    report["retarget"] = {"matched": len(matched), "unmatched": unmatched,
                          "identity": all(k == v for k, v in matched.items())}
    retarget_error = 0.0
    for arkit, sources in zip(ARKIT_NAMES, arkit_sources(names)):
        got = fcurve_values(target.data.shape_keys, f'key_blocks["{arkit}"].value')[:, 1]
        want = (np.mean([fcurve_values(key, f'key_blocks["{names[i]}"].value')[:, 1] for i in sources], axis=0)
                if sources else np.zeros_like(got))
        retarget_error = max(retarget_error, float(np.abs(got - want).max()))
    report["retarget_error"] = retarget_error
    report["tongue_out_max"] = float(np.abs(fcurve_values(target.data.shape_keys,
                                                          'key_blocks["tongueOut"].value')[:, 1]).max())
    bpy.data.objects.remove(target)

    # export with the add-on's FBX export (Blender's own exporter)
    for obj in bpy.context.view_layer.objects:
        obj.select_set(obj in (mesh_obj, arm_obj))
    bpy.context.view_layer.objects.active = mesh_obj
    t0 = time.perf_counter()
    assert bpy.ops.avface.export_fbx(filepath=fbx_path) == {"FINISHED"}
    report["export_s"] = time.perf_counter() - t0

    # the head first (a job's head, without maps), its detail maps attached after
    bpy.ops.wm.read_factory_settings(use_empty=True)
    enable_addon()
    _scene()
    assert bpy.ops.import_scene.avface_result(filepath=head_only) == {"FINISHED"}
    first, _ = head_objects()
    before = {"modifiers": [m.type for m in first.modifiers], "materials": len(first.data.materials)}
    added = importer.attach_detail(bpy.context, first, result, first_frame=float(FIRST_FRAME))
    attached = first.modifiers[importer.DETAIL_MODIFIER]
    report["head_first"] = {
        "before": before, "added": added, "modifiers": [m.type for m in first.modifiers],
        "materials": len(first.data.materials), "vertex_group": attached.vertex_group,
        "skin_nodes": _material_report(first)[importer.skin_material(first).name]["detail_nodes"],
        "same_displacement_m": float(np.abs(evaluated_world_vertices(first, middle) - with_maps).max()),
    }

    # lip offsets: keys after the ARKit shapes, on the template like them
    bpy.ops.wm.read_factory_settings(use_empty=True)
    enable_addon()
    _scene()
    assert bpy.ops.import_scene.avface_result(filepath=lips) == {"FINISHED"}
    lip_obj, _ = head_objects()
    check = check_head(lips, first_frame=float(FIRST_FRAME), frames=frames)
    lip_keys = [kb for kb in lip_obj.data.shape_keys.key_blocks if kb.name.startswith("lip_")]
    with_lips = evaluated_world_vertices(lip_obj, middle)
    for kb in lip_keys:
        kb.mute = True
    without_lips = evaluated_world_vertices(lip_obj, middle)
    report["lips"] = {"keys": [kb.name for kb in lip_obj.data.shape_keys.key_blocks],
                      "vertex_error_m": check["max_error_m"],
                      "lip_motion_m": float(np.abs(with_lips - without_lips).max())}

    # Blender's FBX importer: ARKit-named morph targets with their animation, the eye bones,
    # the rigid parts following the head
    bpy.ops.wm.read_factory_settings(use_empty=True)
    enable_addon()
    _scene()
    t0 = time.perf_counter()
    assert bpy.ops.import_scene.fbx(filepath=fbx_path, anim_offset=0.0) == {"FINISHED"}
    report["fbx_import_s"] = time.perf_counter() - t0
    meshes = [o for o in bpy.data.objects if o.type == "MESH"]
    arms = [o for o in bpy.data.objects if o.type == "ARMATURE"]
    assert len(meshes) == 1 and len(arms) == 1, [o.name for o in bpy.data.objects]
    fbx_mesh, fbx_arm = meshes[0], arms[0]
    fbx_key = fbx_mesh.data.shape_keys
    report["fbx"] = {
        "n_vertices": len(fbx_mesh.data.vertices),
        "keys": [kb.name for kb in fbx_key.key_blocks],
        "identity_values": [float(_key_values(fbx_key, ["identity"], f)[0]) for f in scene_frames],
        "key_error": [float(np.abs(_key_values(fbx_key, names, f) - expression[t]).max())
                      for t, f in zip(frames, scene_frames)],
        "bones": sorted(b.name for b in fbx_arm.data.bones),
        "materials": sorted(m.name for m in fbx_mesh.data.materials),
        "positions": _positions(fbx_mesh, vertex_ids, scene_frames),
    }
    return report


def _fcurves(id_data):
    from avface_blender import anim

    return anim.fcurves_of(id_data)
