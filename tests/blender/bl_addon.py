"""Checks of the add-on inside Blender, called by tests/test_addon_blender.py."""
import bpy
import numpy as np

from bl_common import enable_addon, evaluated_world_vertices, fcurve_values, head_objects

OPERATORS = ("import_scene.avface_result", "avface.export_fbx", "avface.retarget")


def _has_op(idname):
    mod, name = idname.split(".")
    return hasattr(getattr(bpy.ops, mod), name) and getattr(getattr(bpy.ops, mod), name).idname() != ""


def register_cycle():
    import addon_utils

    enable_addon()
    have = {op: hasattr(bpy.types, _rna(op)) for op in OPERATORS}
    assert all(have.values()), have
    prefs = bpy.context.preferences.addons["avface_blender"].preferences
    assert prefs.address.startswith("tcp://")
    addon_utils.disable("avface_blender", default_set=True)
    gone = {op: not hasattr(bpy.types, _rna(op)) for op in OPERATORS}
    assert all(gone.values()), gone
    enable_addon()  # and again: registration leaves nothing behind that blocks a second one
    return {"version": bpy.app.version_string}


def _rna(idname):
    mod, name = idname.split(".")
    return f"{mod.upper()}_OT_{name}"


def import_and_check(result, frames):
    """Import through the operator; check topology, keys, properties; return the vertex errors
    at ``frames`` (indices into the result) against the result's vertices."""
    from avface_blender import io_result

    enable_addon()
    scene = bpy.context.scene
    scene.frame_start = 1
    scene.render.fps, scene.render.fps_base = 25, 1.0  # the demo clip's rate: one key per scene frame
    out = bpy.ops.import_scene.avface_result(filepath=result)
    assert out == {"FINISHED"}, out
    head = io_result.read_result(result)
    mesh_obj, arm_obj = head_objects()
    mesh = mesh_obj.data
    assert len(mesh.vertices) == len(head.vertices_neutral)
    assert len(mesh.polygons) == len(head.faces)
    loops = np.empty(3 * len(head.faces), np.int32)
    mesh.loops.foreach_get("vertex_index", loops)
    assert np.array_equal(loops.reshape(-1, 3), head.faces), "faces differ from the result's"
    assert mesh.uv_layers.active is not None
    keys = mesh.shape_keys.key_blocks
    assert keys[0].name == "Basis"
    assert [k.name for k in keys[1:]] == list(head.shape_key_names)
    scene_frames = np.arange(head.n_frames) + 1.0
    for k, name in enumerate(head.shape_key_names):
        co = fcurve_values(mesh.shape_keys, f'key_blocks["{name}"].value')
        assert np.allclose(co[:, 0], scene_frames) and np.allclose(co[:, 1], head.shape_key_values[:, k], atol=1e-6), name
    for j, bone in enumerate(head.joint_names):
        co = fcurve_values(arm_obj, f'pose.bones["{bone}"].rotation_quaternion', 0)
        assert len(co) == head.n_frames
    animated = []
    for name in head.arkit_names + tuple(head.confidence):
        co = fcurve_values(mesh_obj, f'["{name}"]')
        assert len(co) == head.n_frames, name
        animated.append(name)
    occ = fcurve_values(mesh_obj, '["avface_occluded"]')
    assert np.array_equal(occ[:, 1] > 0.5, head.confidence["avface_occluded"] > 0.5)
    # the animated property takes the keyed value at a frame
    bpy.context.scene.frame_set(3)
    assert abs(mesh_obj["jawOpen"] - head.arkit[2, head.arkit_names.index("jawOpen")]) < 1e-5

    report = {"frames": [], "max_error_m": [], "tolerance_m": [], "n_keys": len(keys) - 1,
              "action_api": "slotted" if bpy.app.version >= (4, 4, 0) else "Action.fcurves",
              "animated_properties": animated, "scene_range": [bpy.context.scene.frame_start, bpy.context.scene.frame_end]}
    expected = io_result.expected_blender_vertices(head, frames)
    for i, t in enumerate(frames):
        got = evaluated_world_vertices(mesh_obj, scene_frames[t])
        stored = head.vertices[t].astype(np.float32)
        # the result stores float16 vertices: allow their own rounding (half a float16 step) on top
        f16_half_step = 0.5 * np.spacing(np.abs(stored).astype(np.float16)).astype(np.float64).max()
        report["frames"].append(int(t))
        report["max_error_m"].append(float(np.abs(got - expected[i]).max()))
        report["tolerance_m"].append(1e-4 + f16_half_step)
    return report


def import_rich(result):
    """A result with a lip basis and detail maps: lip keys, material and Displace modifier."""
    from avface_blender import importer, io_result

    enable_addon()
    out = bpy.ops.import_scene.avface_result(filepath=result)
    assert out == {"FINISHED"}, out
    head = io_result.read_result(result)
    mesh_obj, arm_obj = head_objects()
    names = [k.name for k in mesh_obj.data.shape_keys.key_blocks]
    lips = [n for n in names if n.startswith("lip_")]
    assert len(lips) == head.n_lip > 0, names
    co = fcurve_values(mesh_obj.data.shape_keys, 'key_blocks["lip_01"].value')
    assert np.allclose(co[:, 1], head.shape_key_values[:, head.n_expression + 1], atol=1e-6)
    mod = mesh_obj.modifiers[importer.DETAIL_MODIFIER]
    assert mod.type == "DISPLACE" and mod.texture is not None
    image = mod.texture.image
    assert image.source == "SEQUENCE" and mod.texture.image_user.frame_duration == head.n_frames
    mat = mesh_obj.data.materials[0]
    tex_nodes = [n for n in mat.node_tree.nodes if n.type == "TEX_IMAGE"]
    assert tex_nodes and tex_nodes[0].image == image
    disp = [n for n in mat.node_tree.nodes if n.type == "DISPLACEMENT"][0]
    assert disp.outputs["Displacement"].links[0].to_node.type == "OUTPUT_MATERIAL"
    assert abs(mod.strength - head.detail.metres_per_unit) < 1e-9
    # modifier order: skin first, then displace along the posed normals
    assert [m.type for m in mesh_obj.modifiers] == ["ARMATURE", "DISPLACE"]
    # the displacement moves vertices, and differently on two frames (a sequence, not a still)
    v1 = evaluated_world_vertices(mesh_obj, 1)
    v5 = evaluated_world_vertices(mesh_obj, 5)
    mod.show_viewport = False
    v1_plain = evaluated_world_vertices(mesh_obj, 1)
    v5_plain = evaluated_world_vertices(mesh_obj, 5)
    mod.show_viewport = True
    d1, d5 = np.abs(v1 - v1_plain).max(), np.abs(v5 - v5_plain).max()
    assert 0 < d1 <= head.detail.metres_per_unit and 0 < d5, (d1, d5)
    assert not np.allclose(v1 - v1_plain, v5 - v5_plain), "the displacement does not change with the frame"
    return {"lip_keys": lips, "image": image.filepath, "displacement_m": [float(d1), float(d5)]}


def import_refused(result, expect):
    """A bad result is refused with a readable message and leaves nothing in the file."""
    enable_addon()
    before = {c: len(getattr(bpy.data, c)) for c in ("objects", "meshes", "armatures", "actions", "collections", "images")}
    try:
        out = bpy.ops.import_scene.avface_result(filepath=result)
    except RuntimeError as e:  # operator errors surface as RuntimeError in background mode
        message = str(e)
    else:
        raise AssertionError(f"the import of a bad result returned {out}")
    after = {c: len(getattr(bpy.data, c)) for c in before}
    assert after == before, (before, after)
    assert expect in message, message
    return {"message": message}
