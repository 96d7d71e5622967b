"""FBX round trip and retargeting, inside Blender."""
import bpy
import numpy as np
from bl_common import camera_view_pixels, enable_addon, evaluated_world_vertices, fcurve_values, head_objects, result_pixels

FRAMES = [1, 14, 30]  # set to the imported head's first, middle and last frame by _setup


def _state(mesh_obj, arm_obj, skip_modifier=None):
    """Per frame: shape-key values by name, each bone's world-space deformation matrix
    (independent of how the bone's rest axes are oriented) and the evaluated vertices."""
    scene = bpy.context.scene
    if skip_modifier is not None:
        mesh_obj.modifiers[skip_modifier].show_viewport = False
    out = []
    for frame in FRAMES:
        scene.frame_set(frame)
        keys = {kb.name: kb.value for kb in mesh_obj.data.shape_keys.key_blocks[1:]}
        w = np.array(arm_obj.matrix_world)
        bones = {}
        for pb in arm_obj.pose.bones:
            rest = np.array(pb.bone.matrix_local)
            bones[pb.name] = w @ np.array(pb.matrix) @ np.linalg.inv(rest) @ np.linalg.inv(w)
        out.append((keys, bones, evaluated_world_vertices(mesh_obj, frame)))
    if skip_modifier is not None:
        mesh_obj.modifiers[skip_modifier].show_viewport = True
    return out


def _setup(result):
    enable_addon()
    scene = bpy.context.scene
    scene.render.fps, scene.render.fps_base = 25, 1.0
    scene.frame_start = 1
    assert bpy.ops.import_scene.avface_result(filepath=result) == {"FINISHED"}
    first, last = scene.frame_start, scene.frame_end
    FRAMES[:] = [first, (first + last) // 2, last]
    return head_objects()


def fbx_round_trip(result, fbx_path):
    from avface_blender import importer

    mesh_obj, arm_obj = _setup(result)
    has_displace = importer.DETAIL_MODIFIER in mesh_obj.modifiers
    # the FBX holds no modifiers, so compare against the head without its displacement
    before = _state(mesh_obj, arm_obj, skip_modifier=importer.DETAIL_MODIFIER if has_displace else None)
    has_camera = importer.find_camera(mesh_obj) is not None
    # the animator renders at another size: the camera must still go out at the video's
    render = bpy.context.scene.render
    render.resolution_x, render.resolution_y = 1920, 1080
    render.resolution_percentage, render.pixel_aspect_x = 50, 2.0
    assert bpy.ops.avface.export_fbx(filepath=fbx_path) == {"FINISHED"}
    assert (render.resolution_x, render.resolution_y, render.resolution_percentage, render.pixel_aspect_x) == \
        (1920, 1080, 50, 2.0), "the export left the render settings changed"
    if has_displace:
        assert mesh_obj.modifiers[importer.DETAIL_MODIFIER].show_viewport, "the export left the Displace switched off"

    bpy.ops.wm.read_factory_settings(use_empty=True)
    enable_addon()
    scene = bpy.context.scene
    scene.render.fps, scene.render.fps_base = 25, 1.0
    # Blender's FBX importer shifts keys by anim_offset (default 1 frame); the file's times are
    # the exported scene frames, so read them as they are
    assert bpy.ops.import_scene.fbx(filepath=fbx_path, anim_offset=0.0) == {"FINISHED"}
    meshes = [o for o in bpy.data.objects if o.type == "MESH"]
    arms = [o for o in bpy.data.objects if o.type == "ARMATURE"]
    assert len(meshes) == 1 and len(arms) == 1, ([o.name for o in bpy.data.objects])
    mesh2, arm2 = meshes[0], arms[0]
    assert mesh2.data.shape_keys is not None, "the FBX lost the shape keys"
    after = _state(mesh2, arm2)
    report = {"has_displace": has_displace, "frames": list(FRAMES), "key_error": [], "bone_error": [], "vertex_error_m": [],
              "n_keys": [len(before[0][0]), len(after[0][0])], "bones": [sorted(before[0][1]), sorted(after[0][1])]}
    for (k1, b1, v1), (k2, b2, v2) in zip(before, after):
        assert set(k1) == set(k2), (sorted(k1), sorted(k2))
        report["key_error"].append(max(abs(k1[n] - k2[n]) for n in k1))
        assert set(b1) == set(b2), (sorted(b1), sorted(b2))
        report["bone_error"].append(max(float(np.abs(b1[n] - b2[n]).max()) for n in b1))
        report["vertex_error_m"].append(float(np.abs(v1 - v2).max()))
    # the animation must really be there: some key and the jaw move between the frames
    k_first, k_last = after[0][0], after[-1][0]
    report["key_motion"] = max(abs(k_first[n] - k_last[n]) for n in k_first)
    report["vertex_motion_m"] = float(np.abs(after[0][2] - after[-1][2]).max())
    cameras = [o for o in bpy.data.objects if o.type == "CAMERA"]
    report["n_cameras"] = len(cameras)
    if has_camera and len(cameras) == 1:
        report["camera_px"] = _camera_px(result, mesh2, cameras[0])
    return report


def _camera_px(result, mesh_obj, cam):
    """Through the re-imported camera at the video's size: per checked frame, the largest
    distance (pixels) between where Blender puts each evaluated vertex and where the result's
    intrinsics and extrinsic put the same vertex."""
    from avface_blender import io_result

    head = io_result.read_result(result)
    width, height = int(head.meta["width"]), int(head.meta["height"])
    k = np.load(result)["intrinsics"]
    errors = []
    for frame in FRAMES:
        world = evaluated_world_vertices(mesh_obj, frame)
        got = camera_view_pixels(cam, world, width, height)
        errors.append(float(np.abs(got - result_pixels(world, k, head.extrinsics[0])).max()))
    return errors


def fbx_hidden_camera(result, fbx_path):
    """A hidden camera cannot be selected, so the exporter would drop it: the export says so
    and goes on with the head; a hidden head is an error that says what to do."""
    from avface_blender import importer, operators

    mesh_obj, arm_obj = _setup(result)
    camera = importer.find_camera(mesh_obj)
    assert camera is not None
    camera.hide_set(True)
    note = operators.export_fbx(bpy.context, mesh_obj, arm_obj, fbx_path, camera=camera)
    mesh_obj.hide_set(True)
    try:
        operators.export_fbx(bpy.context, mesh_obj, arm_obj, fbx_path + ".2.fbx", camera=None)
    except RuntimeError as e:
        hidden_head = str(e)
    else:
        raise AssertionError("a hidden head was exported")
    bpy.ops.wm.read_factory_settings(use_empty=True)
    enable_addon()
    assert bpy.ops.import_scene.fbx(filepath=fbx_path, anim_offset=0.0) == {"FINISHED"}
    types = sorted(o.type for o in bpy.data.objects)
    return {"note": note, "hidden_head": hidden_head, "types": types}


def retarget(result):
    from avface_blender import operators

    mesh_obj, arm_obj = _setup(result)
    # a target rig whose keys follow ARKit names in several spellings, plus keys that match nothing
    bpy.ops.mesh.primitive_cube_add()
    target = bpy.context.active_object
    target.name = "Target"
    names = ["Basis", "eyeBlink_L", "EyeBlinkRight", "jawOpen", "EyeClosedLeft", "mouth_smile_left", "myCustomSmirk", "Blink"]
    for n in names:
        target.shape_key_add(name=n, from_mix=False)
    for obj in bpy.context.view_layer.objects:
        obj.select_set(obj in (mesh_obj, target))
    bpy.context.view_layer.objects.active = mesh_obj
    assert bpy.ops.avface.retarget() == {"FINISHED"}
    key = target.data.shape_keys
    expected = {"eyeBlink_L": "eyeBlinkLeft", "EyeBlinkRight": "eyeBlinkRight", "jawOpen": "jawOpen",
                "EyeClosedLeft": "eyeBlinkLeft", "mouth_smile_left": "mouthSmileLeft"}
    for name, arkit in expected.items():
        target_co = fcurve_values(key, f'key_blocks["{name}"].value')
        source_co = fcurve_values(mesh_obj, f'["{arkit}"]')
        assert np.allclose(target_co, source_co, atol=1e-6), name
    for name in ("myCustomSmirk", "Blink"):
        try:
            fcurve_values(key, f'key_blocks["{name}"].value')
        except AssertionError:
            continue
        raise AssertionError(f"{name} should not have been keyed")
    # the keys follow the curves when played
    bpy.context.scene.frame_set(7)
    assert abs(key.key_blocks["jawOpen"].value - mesh_obj["jawOpen"]) < 1e-5
    # and the report names what matched and what did not
    matched, unmatched = operators.retarget(mesh_obj, target)
    return {"matched": matched, "unmatched": unmatched}
