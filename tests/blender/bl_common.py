"""Helpers for checks that run inside Blender (see runner.py)."""
import addon_utils
import bpy
import numpy as np

ADDON = "avface_blender"


def drive_jobs(until, timeout_s):
    """What the add-on's timer does, by hand (headless Blender has no event loop): tick its
    job manager until ``until()`` or no job is active."""
    import time

    from avface_blender import reconstruct

    manager = reconstruct.MANAGER
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        active = manager.tick()
        if until() or not active:
            return
        time.sleep(0.05)
    raise AssertionError(f"jobs still active after {timeout_s} s: {[t.record for t in manager.active()]}")


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


def camera_view_pixels(cam, world, width, height) -> np.ndarray:
    """(N, 2) pixels (x right, y down) where Blender's camera object ``cam``, rendering at
    ``width`` x ``height``, shows the (N, 3) world points, which must lie in front of it."""
    import mathutils
    from bpy_extras.object_utils import world_to_camera_view

    scene = bpy.context.scene
    render = scene.render
    render.resolution_x, render.resolution_y, render.resolution_percentage = int(width), int(height), 100
    ndc = np.array([tuple(world_to_camera_view(scene, cam, mathutils.Vector(p))) for p in world])
    assert (ndc[:, 2] > 0).all(), "the head is behind the camera"
    return np.stack([ndc[:, 0] * width, (1.0 - ndc[:, 1]) * height], axis=1)


def result_pixels(world, intrinsics, extrinsic) -> np.ndarray:
    """(N, 2) pixels where a result's camera (OpenCV ``intrinsics`` (3, 3) and world-to-camera
    ``extrinsic`` (4, 4)) puts (N, 3) points of Blender's world."""
    from avface_blender._vendor import axes

    k = np.asarray(intrinsics, np.float64)
    ext = np.asarray(extrinsic, np.float64)
    cam = (np.asarray(world, np.float64) @ axes.WORLD_TO_BLENDER) @ ext[:3, :3].T + ext[:3, 3]  # -> world -> camera
    q = cam @ k.T
    return q[:, :2] / q[:, 2:3]


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


def check_head(result, first_frame, frames):
    """The imported head against the result: topology, keys keyframed on every frame, the
    animated properties, and the vertex errors at ``frames`` (indices into the result) for
    the caller to judge. Source frame 0 sits at scene frame ``first_frame``."""
    from avface_blender import io_result

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
    assert [k.name for k in keys[1:]] == list(head.key_names)  # (identity first when the result has a template)
    scene_frames = np.arange(head.n_frames) + head.source_frame_start + first_frame
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
    bpy.context.scene.frame_set(int(scene_frames[2]))
    assert abs(mesh_obj["jawOpen"] - head.arkit[2, head.arkit_names.index("jawOpen")]) < 1e-5

    report = {"frames": [], "n_frames": head.n_frames, "max_error_m": [], "tolerance_m": [], "n_keys": len(keys) - 1,
              "action_api": "slotted" if bpy.app.version >= (4, 4, 0) else "Action.fcurves",
              "animated_properties": animated, "scene_range": [bpy.context.scene.frame_start, bpy.context.scene.frame_end]}
    expected = io_result.expected_blender_vertices(head, frames)
    # `vertices` is the coarse + lips mesh: the detail maps' Displace modifier (on by default
    # in a reconstruction) is what lies beyond it, checked by bl_addon.import_rich
    from avface_blender import importer

    detail = mesh_obj.modifiers.get(importer.DETAIL_MODIFIER)
    if detail is not None:
        assert head.detail is not None and detail.type == "DISPLACE"
        detail.show_viewport = False
        report["detail_maps"] = len(head.detail.files)
    for i, t in enumerate(frames):
        got = evaluated_world_vertices(mesh_obj, scene_frames[t])
        stored = head.vertices[t].astype(np.float32)
        # the result stores float16 vertices: allow their own rounding (half a float16 step) on top
        f16_half_step = (0.5 * np.spacing(np.abs(stored).astype(np.float16)).astype(np.float64).max()
                         if head.vertices.dtype == np.float16 else 0.0)
        report["frames"].append(int(t))
        report["max_error_m"].append(float(np.abs(got - expected[i]).max()))
        report["tolerance_m"].append(1e-4 + f16_half_step)
    if detail is not None:
        detail.show_viewport = True
    return report




class RecordingLayout:
    """Stands in for a UI layout (headless Blender has none) so that panel draw code runs
    for real: it checks that every drawn property and operator exists and records the text."""

    def __init__(self, lines=None):
        self.lines = [] if lines is None else lines
        self.enabled = True

    def _child(self, *args, **kwargs):
        return RecordingLayout(self.lines)

    row = column = box = split = _child

    def label(self, *, text="", icon="NONE"):
        self.lines.append(text)

    def prop(self, data, name, **kwargs):
        assert name in data.bl_rna.properties, f"{type(data).__name__} has no property {name!r}"
        self.lines.append(f"[{name}]")

    def progress(self, *, factor=0.0, type="BAR", text=""):
        assert 0.0 <= factor <= 1.0, factor
        self.lines.append(f"<{text}>")

    def operator(self, idname, **kwargs):
        module, name = idname.split(".")
        assert hasattr(bpy.types, f"{module.upper()}_OT_{name}"), f"no operator {idname}"
        self.lines.append(f"({idname})")

        class Props:
            pass

        return Props()


def draw_panels():
    """Draw both AVFace panels' contents into a RecordingLayout; returns the lines."""
    from avface_blender import reconstruct

    layout = RecordingLayout()
    reconstruct.draw_panel(layout, bpy.context)
    return layout.lines
