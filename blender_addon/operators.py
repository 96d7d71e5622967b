"""File > Import > AVFace result, Export FBX and Retarget to selected."""
from __future__ import annotations

import logging

import bpy
import numpy as np
from bpy.props import BoolProperty, IntProperty, StringProperty
from bpy_extras.io_utils import ExportHelper, ImportHelper

from . import anim, arkit_match, importer, io_result, preferences

log = logging.getLogger(__name__)

#: One baked take, no per-NLA-strip or per-action takes, no leaf bones, modifiers not applied
#: (an applied modifier, the Displace included, makes the FBX exporter drop every shape key).
FBX_SETTINGS = dict(
    use_selection=True, object_types={"ARMATURE", "MESH"}, use_mesh_modifiers=False, add_leaf_bones=False,
    bake_anim=True, bake_anim_use_all_bones=True, bake_anim_use_nla_strips=False, bake_anim_use_all_actions=False,
    bake_anim_force_startend_keying=True, bake_anim_step=1.0, bake_anim_simplify_factor=0.0,
    use_armature_deform_only=False, primary_bone_axis="Y", secondary_bone_axis="X", axis_forward="-Z", axis_up="Y",
    apply_unit_scale=True, apply_scale_options="FBX_SCALE_NONE", mesh_smooth_type="FACE",
)


class AVFACE_OT_import_result(bpy.types.Operator, ImportHelper):
    """Import an AVFace result (result.npz from `avface reconstruct`) as an animated head"""

    bl_idname = "import_scene.avface_result"
    bl_label = "Import AVFace Result"
    bl_options = {"REGISTER", "UNDO"}

    filename_ext = ".npz"
    filter_glob: StringProperty(default="*.npz", options={"HIDDEN"})
    use_scene_start: BoolProperty(
        name="Start at the scene's start", default=True,
        description="Put the result's first frame at the scene's start frame (else at Frame)")
    frame: IntProperty(name="Frame", default=1, description="Scene frame of the result's first frame")
    set_frame_range: BoolProperty(name="Set the scene's frame range", default=True)
    match_camera: BoolProperty(
        name="Match the video's camera", default=True,
        description="Make the camera the video was shot with, the video behind the head in its view, "
                    "and set the render resolution to the video's")
    make_camera_active: BoolProperty(
        name="Make it the scene's camera", default=True,
        description="The video's camera becomes the scene's active camera (the previous camera is kept). "
                    "Its default is the add-on's preference")

    def invoke(self, context, event):
        self.make_camera_active = preferences.get(context).make_camera_active
        return ImportHelper.invoke(self, context, event)

    def execute(self, context):
        try:
            first = None
            if not self.use_scene_start:
                # the result's first source frame goes to `frame`
                meta, _ = io_result.load_arrays(self.filepath)
                scene_fps = context.scene.render.fps / context.scene.render.fps_base
                start = int((meta.get("source") or {}).get("frame_start") or 0)
                first = self.frame - start * scene_fps / float(meta["fps"])
            head = importer.import_result(context, self.filepath, first_frame=first,
                                          set_frame_range=self.set_frame_range, match_camera=self.match_camera,
                                          set_resolution=self.match_camera,
                                          make_camera_active=self.make_camera_active)
        except io_result.ResultError as e:
            self.report({"ERROR"}, str(e))
            return {"CANCELLED"}
        except Exception as e:  # the edge of the operator: report, never a traceback dialog
            log.exception("import of %s failed", self.filepath)
            self.report({"ERROR"}, f"Import failed: {e}")
            return {"CANCELLED"}
        _select_only(context, [head.mesh_object, head.armature_object], active=head.mesh_object)
        camera = ""
        if head.camera_object is not None:
            camera = f"; camera {head.camera_object.name}" + ("" if head.video_clip is not None else
                                                             " (the source video was not found: no backdrop)")
        self.report({"INFO"}, f"Imported {head.mesh_object.name}: {len(head.frames)} frames "
                              f"at scene frames {head.frames[0]:g}-{head.frames[-1]:g}{camera}")
        return {"FINISHED"}


def _select_only(context, objects, active=None):
    for obj in context.view_layer.objects:
        obj.select_set(False)
    for obj in objects:
        obj.select_set(True)
    if active is not None:
        context.view_layer.objects.active = active


class AVFACE_OT_export_fbx(bpy.types.Operator, ExportHelper):
    """Export the active AVFace head (mesh, armature, shape-key and bone animation) and the video's camera to FBX"""

    bl_idname = "avface.export_fbx"
    bl_label = "Export AVFace Head to FBX"
    bl_options = {"REGISTER"}

    filename_ext = ".fbx"
    filter_glob: StringProperty(default="*.fbx", options={"HIDDEN"})
    include_camera: BoolProperty(
        name="Include the video's camera", default=True,
        description="Also export the camera the video was shot with (imported with the head), so that the "
                    "head sits on the footage in the other tool too")

    @classmethod
    def poll(cls, context):
        mesh, arm = importer.find_head(context)
        return mesh is not None and arm is not None

    def execute(self, context):
        mesh, arm = importer.find_head(context)
        if mesh is None or arm is None:
            self.report({"ERROR"}, "Select an imported AVFace head (its mesh or its armature)")
            return {"CANCELLED"}
        camera = importer.find_camera(mesh) if self.include_camera else None
        try:
            note = export_fbx(context, mesh, arm, self.filepath, camera=camera)
        except Exception as e:
            log.exception("FBX export failed")
            self.report({"ERROR"}, f"FBX export failed: {e}")
            return {"CANCELLED"}
        if note:
            self.report({"WARNING"}, f"Exported {mesh.name} to {self.filepath}; {note}")
        else:
            with_camera = f" with {camera.name}" if camera is not None else ""
            self.report({"INFO"}, f"Exported {mesh.name}{with_camera} to {self.filepath}")
        return {"FINISHED"}


def export_fbx(context, mesh, arm, filepath: str, camera=None) -> str:
    """Export ``mesh`` and ``arm`` (and ``camera``, the video's) with :data:`FBX_SETTINGS`; the
    selection and the render settings are restored after. Returns a note for the user, empty
    when everything asked for went out.

    Blender's FBX exporter writes a camera's film aspect from the scene's render resolution, so
    the export runs at the video's size, at which the camera matches the video. It exports the
    selection, and a hidden object cannot be selected: a hidden head is an error, a hidden
    camera is left out with a note."""
    if not hasattr(bpy.ops.export_scene, "fbx"):
        import addon_utils

        addon_utils.enable("io_scene_fbx", default_set=True)
    view_layer = context.view_layer
    selected = [o for o in view_layer.objects if o.select_get()]
    active = view_layer.objects.active
    render = context.scene.render
    saved = (render.resolution_x, render.resolution_y, render.resolution_percentage,
             render.pixel_aspect_x, render.pixel_aspect_y)
    settings = dict(FBX_SETTINGS)
    note = ""
    try:
        _select_only(context, [o for o in (mesh, arm, camera) if o is not None], active=mesh)
        hidden = [o.name for o in (mesh, arm) if not o.select_get()]
        if hidden:
            raise RuntimeError(f"{' and '.join(hidden)} cannot be selected (hidden, or not selectable in the "
                               f"viewport): unhide them and export again")
        if camera is not None and not camera.select_get():
            note = f"{camera.name} is hidden, so it was left out: unhide it to export it with the head"
            camera = None
        if camera is not None:
            settings["object_types"] = FBX_SETTINGS["object_types"] | {"CAMERA"}
            size = camera.get(importer.VIDEO_SIZE_PROPERTY)
            if size is None:
                note = (f"{camera.name} does not record its video's size (an older import): it went out at the "
                        f"scene's resolution, at which it matches only if that is the video's")
            else:
                importer.set_video_resolution(render, size)
        result = bpy.ops.export_scene.fbx(filepath=str(filepath), **settings)
        if "FINISHED" not in result:
            raise RuntimeError(f"the FBX exporter returned {result}")
    finally:
        (render.resolution_x, render.resolution_y, render.resolution_percentage,
         render.pixel_aspect_x, render.pixel_aspect_y) = saved
        _select_only(context, selected, active=active)
    return note


class AVFACE_OT_retarget(bpy.types.Operator):
    """Copy the active AVFace head's ARKit curves onto the shape keys of the selected meshes whose keys follow ARKit names"""

    bl_idname = "avface.retarget"
    bl_label = "Retarget to Selected"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        return importer.find_head(context)[0] is not None

    def execute(self, context):
        source, _ = importer.find_head(context)
        if source is None:
            self.report({"ERROR"}, "Make an imported AVFace head the active object")
            return {"CANCELLED"}
        targets = [o for o in context.selected_objects if o is not source and o.type == "MESH"
                   and importer.HEAD_PROPERTY not in o]
        if not targets:
            self.report({"ERROR"}, "Select the meshes to retarget to as well as the AVFace head")
            return {"CANCELLED"}
        lines = []
        for target in targets:
            try:
                matched, unmatched = retarget(source, target)
            except ValueError as e:
                self.report({"WARNING"}, f"{target.name}: {e}")
                continue
            lines.append(f"{target.name}: matched {len(matched)} ({', '.join(sorted(matched)) or 'none'}); "
                         f"unmatched {len(unmatched)} ({', '.join(unmatched) or 'none'})")
        for line in lines:
            self.report({"INFO"}, line)
        return {"FINISHED"} if lines else {"CANCELLED"}


def arkit_curves(source) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(frames (T,), ARKit name -> values (T,)) from the head's animated custom properties."""
    curves = {}
    frames = None
    for fc in anim.fcurves_of(source):
        path = fc.data_path
        if not (path.startswith('["') and path.endswith('"]')):
            continue
        name = path[2:-2]
        if name not in arkit_match.ARKIT_NAMES:
            continue
        co = np.empty(2 * len(fc.keyframe_points), np.float32)
        fc.keyframe_points.foreach_get("co", co)
        co = co.reshape(-1, 2)
        frames = co[:, 0] if frames is None else frames
        curves[name] = co[:, 1]
    return (np.zeros(0) if frames is None else frames), curves


def retarget(source, target) -> tuple[dict[str, str], list[str]]:
    """Key the shape keys of ``target`` whose names stand for ARKit names with the source's
    curves. Returns (matched: key name -> ARKit name, unmatched key names); the Basis (the
    reference key) is not counted. Raises ValueError when the target has no shape keys."""
    key = target.data.shape_keys
    if key is None or len(key.key_blocks) < 2:
        raise ValueError("has no shape keys to retarget to")
    frames, curves = arkit_curves(source)
    if not curves:
        raise ValueError(f"{source.name} has no animated ARKit curves")
    names = [kb.name for kb in key.key_blocks if kb != key.reference_key]
    matched, unmatched = arkit_match.match_names(names, curves.keys())
    if matched:
        channels = anim.Channels(key, f"{target.name} ARKit")
        for name, arkit in matched.items():
            channels.curve(f'key_blocks["{name}"].value', frames, curves[arkit])
    return matched, unmatched


def menu_import(self, context):
    self.layout.operator(AVFACE_OT_import_result.bl_idname, text="AVFace result (.npz)")


CLASSES = (AVFACE_OT_import_result, AVFACE_OT_export_fbx, AVFACE_OT_retarget)


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.TOPBAR_MT_file_import.append(menu_import)


def unregister():
    bpy.types.TOPBAR_MT_file_import.remove(menu_import)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
