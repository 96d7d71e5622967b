"""Checks of the add-on inside Blender, called by tests/test_addon_blender.py."""
import bpy
import numpy as np
from bl_common import camera_view_pixels, check_head, enable_addon, evaluated_world_vertices, fcurve_values, head_objects, result_pixels

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

    enable_addon()
    scene = bpy.context.scene
    scene.frame_start = 1
    scene.render.fps, scene.render.fps_base = 25, 1.0  # the demo clip's rate: one key per scene frame
    out = bpy.ops.import_scene.avface_result(filepath=result)
    assert out == {"FINISHED"}, out
    return check_head(result, first_frame=1.0, frames=frames)


def import_rich(result):
    """A result with a lip basis and detail maps: lip keys, material and Displace modifier."""
    from avface_blender import importer, io_result

    enable_addon()
    scene = bpy.context.scene
    # at the video's rate, one map per scene frame from the start (retimed_sources checks other rates)
    scene.render.fps, scene.render.fps_base = 25, 1.0
    out = bpy.ops.import_scene.avface_result(filepath=result)
    assert out == {"FINISHED"}, out
    head = io_result.read_result(result)
    assert head.fps == 25.0
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


def flame_armature(result, frames, world_f32=None):
    """FLAME's five joints become bones with FLAME's parents, each keyed per frame, and the
    skinned, posed mesh matches vertices made by the backend's own skinning. With
    ``world_f32`` (a .npy of the model's float32 world-frame mesh, (T, V, 3)), the report also
    has the errors against it, far below the float16 rounding of the stored ``vertices``."""
    from avface_blender import io_result
    from avface_blender._vendor import axes

    report = import_and_check(result, frames)
    head = io_result.read_result(result)
    mesh_obj, arm_obj = head_objects()
    bones = arm_obj.data.bones
    assert [b.name for b in bones] == list(head.joint_names), [b.name for b in bones]
    parents = {b.name: (b.parent.name if b.parent else None) for b in bones}
    assert parents == {"global": None, "neck": "global", "jaw": "neck", "left_eye": "neck", "right_eye": "neck"}, parents
    assert sorted(g.name for g in mesh_obj.vertex_groups) == sorted(head.joint_names)
    for bone in head.joint_names:
        for i in range(4):
            co = fcurve_values(arm_obj, f'pose.bones["{bone}"].rotation_quaternion', i)
            assert len(co) == head.n_frames
    # 36 correctives, each driven by its bone's quaternion
    correctives = [k for k in mesh_obj.data.shape_keys.key_blocks if k.name.startswith("pose_")]
    assert len(correctives) == 36, len(correctives)
    drivers = {d.data_path: d for d in mesh_obj.data.shape_keys.animation_data.drivers}
    for kb in correctives:
        d = drivers[f'key_blocks["{kb.name}"].value'].driver
        assert d.is_valid and d.is_simple_expression, (kb.name, d.expression)
    report["bones"] = parents
    report["located_bones"] = [head.joint_names[j] for j in head.located_joints]
    for j in head.located_joints:
        co = fcurve_values(arm_obj, f'pose.bones["{head.joint_names[j]}"].location', 2)
        assert len(co) == head.n_frames and np.allclose(co[:, 1], head.bone_locations[:, j, 2], atol=1e-7)
    if world_f32 is not None:
        want = axes.world_to_blender(np.load(world_f32)[frames].astype(np.float64))
        report["max_error_f32_m"] = [float(np.abs(evaluated_world_vertices(mesh_obj, 1 + t) - want[i]).max())
                                     for i, t in enumerate(frames)]
    return report


def camera_match(result, frames, video_frames=None):
    """The imported camera, looked through at the scene's resolution, puts the head's
    evaluated vertices on the pixels where the result's intrinsics put them; with
    ``video_frames``, the source video is behind the head in that view, frame 0 at the head's."""
    from avface_blender import importer, io_result

    enable_addon()
    scene = bpy.context.scene
    scene.frame_start = 1
    # the clip's rate: result frame t is scene frame 1 + t (retimed_sources checks other rates)
    scene.render.fps, scene.render.fps_base = 25, 1.0
    out = bpy.ops.import_scene.avface_result(filepath=result)
    assert out == {"FINISHED"}, out
    head = io_result.read_result(result)
    assert head.fps == 25.0
    mesh_obj, _ = head_objects()
    cams = [o for o in bpy.data.objects if o.get("avface_role") == importer.CAMERA_ROLE]
    assert len(cams) == 1 and cams[0].type == "CAMERA", cams
    cam = cams[0]
    assert scene.camera == cam, "the scene had no camera: the match should become it"
    width, height = int(head.meta["width"]), int(head.meta["height"])
    assert (scene.render.resolution_x, scene.render.resolution_y) == (width, height)
    k = np.asarray(np.load(result)["intrinsics"], np.float64)
    ext = head.extrinsics
    report = {"frames": [], "max_px_camera": [], "max_px_stored": [], "lens_mm": cam.data.lens,
              "shift": [cam.data.shift_x, cam.data.shift_y], "size": [width, height]}
    for t in frames:
        world = evaluated_world_vertices(mesh_obj, 1 + t)
        got = camera_view_pixels(cam, world, width, height)
        # the same vertices into the result's camera frame, then through its intrinsics
        want = result_pixels(world, k, ext[t])
        stored = io_result.project_pixels(head.vertices[t].astype(np.float64), k)
        report["frames"].append(int(t))
        report["max_px_camera"].append(float(np.abs(got - want).max()))
        report["max_px_stored"].append(float(np.abs(got - stored).max()))
    bgs = cam.data.background_images
    report["backdrop"] = len(bgs)
    if video_frames is not None:
        assert cam.data.show_background_images and len(bgs) == 1, len(bgs)
        clip = bgs[0].clip
        assert bgs[0].source == "MOVIE_CLIP" and clip is not None
        report["clip_size"] = list(clip.size)
        report["clip_frames"] = int(clip.frame_duration)
        report["clip_frame_start"] = int(clip.frame_start)
    return report


def _displacement_norms(imported, frame):
    """(V,) how far the detail maps' Displace modifier moves each vertex at scene ``frame``."""
    from avface_blender import importer

    mod = imported.mesh_object.modifiers[importer.DETAIL_MODIFIER]
    mod.show_viewport = False
    plain = evaluated_world_vertices(imported.mesh_object, frame)
    mod.show_viewport = True
    return np.linalg.norm(evaluated_world_vertices(imported.mesh_object, frame) - plain, axis=1)


def retimed_sources(result, scene_fps):
    """In a scene whose rate is not the video's, the video behind the head and the detail maps
    on it show, on each scene frame, the picture nearest in time to that frame, as the head's
    retimed keys do. The maps are identified by what they do: each frame's displacement is
    matched against the displacements of a reference import at the video's own rate."""
    from avface_blender import importer, io_result

    enable_addon()
    head = io_result.read_result(result)
    scene = bpy.context.scene
    scene.frame_start = 1
    # reference: at the video's rate, result frame t is scene frame 1 + t (the static timing)
    scene.render.fps, scene.render.fps_base = int(round(head.fps)), 1.0
    ref = importer.import_result(bpy.context, result, name="reference")
    reference = np.stack([_displacement_norms(ref, 1 + t) for t in range(head.n_frames)])
    for obj in (ref.mesh_object, ref.armature_object):
        obj.hide_viewport = True  # out of the way; its keys do not touch the other head

    scene.render.fps = int(scene_fps)
    imported = importer.import_result(bpy.context, result, name="retimed", first_frame=10.0)
    ratio = head.fps / scene_fps
    source_zero = 10.0  # scene frame of source frame 0 (first_frame)
    clip = imported.video_clip
    assert clip is not None, "the source video was not found"
    report = {"video": [], "maps": [], "material_follows": True}
    texture_user = imported.mesh_object.modifiers[importer.DETAIL_MODIFIER].texture.image_user
    node = next(n for n in imported.mesh_object.data.materials[0].node_tree.nodes if n.type == "TEX_IMAGE")
    last_map_frame = int(np.ceil(imported.frames[-1]))
    for s in range(int(np.floor(imported.frames[0])), last_map_frame + 1):
        scene.frame_set(s)
        # the material's image (for renders) shows the same map as the modifier's (checked below)
        pair = [(u.frame_start, u.frame_duration, u.frame_offset) for u in (texture_user, node.image_user)]
        report["material_follows"] &= pair[0] == pair[1]
        video_time = (s - source_zero) * ratio  # the source frame the scene frame stands for
        report["video"].append([s, video_time, s - clip.frame_start])  # the clip shows picture s - start
        norms = _displacement_norms(imported, s)
        err = np.abs(reference - norms[None]).mean(axis=1)
        shown = int(np.argmin(err))
        second = float(np.partition(err, 1)[1]) if len(err) > 1 else float("inf")
        map_time = video_time - head.source_frame_start
        report["maps"].append([s, map_time, shown, float(err[shown]), second])
    report["clip_fps"] = float(clip.fps)
    report["clip_frames"] = int(clip.frame_duration)
    return report
