"""Build the animated head in Blender from :class:`io_result.HeadData`: a thin layer of bulk
``bpy`` calls over the arrays (the layout and why it reproduces the result's vertices are in
``io_result``'s docstring).

Everything created is tracked; if any step fails, it is all removed again, so a failed import
leaves nothing half-built in the scene.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import bpy
import mathutils
import numpy as np

from . import io_result
from ._vendor import axes
from .anim import Channels

log = logging.getLogger(__name__)

BONE_LENGTH_M = 0.03
HEAD_PROPERTY = "avface_head"
"""Custom property on the mesh and armature objects: the result file they came from."""
ROLE_PROPERTY = "avface_role"
DETAIL_MODIFIER = "AVFace detail"
ARMATURE_MODIFIER = "AVFace armature"
UV_LAYER = "UVMap"
SKIN_GROUP = "skin"
"""Vertex group of the skin's vertices (results with materials): the detail maps' Displace
modifier acts on it only (:func:`io_result.skin_weights_for_detail`)."""
MATERIAL_PROPERTY = "avface_material"
"""Custom property on each material made for a part of the head: its name in the result's
``material_names`` (the detail maps go into the ``skin`` one)."""
DETAIL_NODE_PREFIX = "AVFace detail"

#: Principled BSDF settings of the head's parts (colours linear): name -> input values, plus
#: ``alpha`` for a see-through part (its material is dithered in EEVEE; Cycles reads the alpha).
MATERIAL_LOOKS = {
    "skin": {"Base Color": (0.65, 0.40, 0.30), "Roughness": 0.45, "Subsurface Weight": 0.1,
             "Subsurface Scale": 0.003},
    "mouth": {"Base Color": (0.25, 0.03, 0.04), "Roughness": 0.5},
    "teeth": {"Base Color": (0.80, 0.76, 0.65), "Roughness": 0.25},
    "sclera": {"Base Color": (0.85, 0.83, 0.80), "Roughness": 0.15},
    "iris": {"Base Color": (0.12, 0.06, 0.03), "Roughness": 0.15},
    "eye_wet": {"Base Color": (1.0, 1.0, 1.0), "Roughness": 0.05, "alpha": 0.0},
    "lashes": {"Base Color": (0.015, 0.010, 0.008), "Roughness": 0.6},
}
DEFAULT_LOOK = {"Base Color": (0.5, 0.5, 0.5), "Roughness": 0.5}


CAMERA_ROLE = "camera"
VIDEO_SIZE_PROPERTY = "avface_video_size"
"""Custom property on the camera object: the video's (width, height), at which it matches."""
CLIP_START_M, CLIP_END_M = axes.CAMERA_CLIP_M


@dataclass
class ImportedHead:
    mesh_object: object
    armature_object: object
    collection: object
    frames: np.ndarray
    created: list = field(default_factory=list)
    camera_object: object = None
    """The camera that sees the head as the video's camera saw the face (None: not made)."""
    video_clip: object = None
    """The source video as a movie clip, behind the head in that camera's view (None: the
    video was not found where the result says it was read from)."""
    video_size: tuple | None = None
    """(width, height) of the video when the scene renders at another size, which the
    camera needs to match (the resolution was left as it was)."""


class _Created:
    """Remembers each ID created, to remove them all if the import fails."""

    def __init__(self):
        self.ids: list = []

    def add(self, id_data):
        self.ids.append(id_data)
        return id_data

    def remove_all(self) -> None:
        for id_data in reversed(self.ids):
            try:
                collection = _DATA_COLLECTIONS.get(type(id_data).__name__)
                if collection is None:
                    continue
                getattr(bpy.data, collection).remove(id_data)
            except (ReferenceError, AttributeError, RuntimeError):  # already removed with its owner
                pass
        self.ids.clear()


_DATA_COLLECTIONS = {"Object": "objects", "Mesh": "meshes", "Armature": "armatures", "Action": "actions",
                     "Image": "images", "ImageTexture": "textures", "Material": "materials",
                     "Collection": "collections", "Key": "shape_keys", "Camera": "cameras",
                     "MovieClip": "movieclips"}


def import_result(context, path: str | Path, *, first_frame: float | None = None, collection=None,
                  name: str | None = None, set_frame_range: bool = True, match_camera: bool = True,
                  set_resolution: bool = True, make_camera_active: bool = True) -> ImportedHead:
    """Import ``path`` into ``collection`` (a new one under the scene's by default).

    ``first_frame``: the scene frame of source frame 0 (for a movie strip its ``frame_start``);
    default the scene's start frame minus the result's first source frame, so the result
    starts at the scene's start. ``match_camera``: also make the video's camera, with the
    source video behind the head in its view; ``make_camera_active``: make it the scene's
    camera (the previous one stays in the scene; without this, only when the scene has none);
    ``set_resolution``: set the scene's render resolution to the video's, which the match
    needs. Raises :class:`io_result.ResultError` before creating anything when the file is not
    a usable result.
    """
    head = io_result.read_result(path)
    scene = context.scene
    scene_fps = scene.render.fps / scene.render.fps_base
    if first_frame is None:
        first_frame = scene.frame_start - head.source_frame_start * scene_fps / head.fps
    frames = io_result.scene_frames(head.n_frames, fps=head.fps, scene_fps=scene_fps, first_frame=first_frame,
                                    source_frame_start=head.source_frame_start)
    created = _Created()
    try:
        imported = _build(context, head, frames, created, collection, name or Path(path).parent.name or "AVFace")
        if match_camera and head.camera is not None:
            source_zero = frames[0] - head.source_frame_start * scene_fps / head.fps
            imported.camera_object, imported.video_clip = _camera(head, source_zero, scene_fps, created,
                                                                  imported.collection, imported.mesh_object.name)
    except Exception:
        created.remove_all()
        raise
    if set_frame_range:
        scene.frame_start = int(np.floor(frames[0]))
        scene.frame_end = int(np.ceil(frames[-1]))
    if imported.camera_object is not None:
        render = scene.render
        size = (head.camera.width, head.camera.height)
        if set_resolution:
            set_video_resolution(render, size)
        elif (render.resolution_x, render.resolution_y) != size or render.pixel_aspect_x != render.pixel_aspect_y:
            imported.video_size = size
            log.warning("%s: the scene renders at %dx%d, the video is %dx%d: the camera matches the video "
                        "at the video's resolution", path, render.resolution_x, render.resolution_y, *size)
        if make_camera_active or scene.camera is None:
            scene.camera = imported.camera_object
    imported.created = created.ids
    return imported


def _build(context, head: io_result.HeadData, frames: np.ndarray, created: _Created, collection, name: str) -> ImportedHead:
    scene = context.scene
    if collection is None:
        collection = created.add(bpy.data.collections.new(f"AVFace {name}"))
        scene.collection.children.link(collection)

    arm_obj = _armature(context, head, created, collection, name)
    mesh_obj = _mesh(head, created, collection, name)
    mesh_obj.parent = arm_obj
    mesh_obj.matrix_parent_inverse.identity()
    _skin(head, mesh_obj, arm_obj)
    _skin_group(head, mesh_obj)
    _shape_keys(head, mesh_obj)
    _correctives(head, mesh_obj, arm_obj)
    _animate(head, frames, mesh_obj, arm_obj, created)
    if head.detail is not None:
        _detail(head, frames, scene.render.fps / scene.render.fps_base, mesh_obj, created, name)
    for obj in (mesh_obj, arm_obj):
        obj[HEAD_PROPERTY] = str(head.path)
    mesh_obj[ROLE_PROPERTY] = "mesh"
    arm_obj[ROLE_PROPERTY] = "armature"
    mesh_obj["avface_model"] = head.model
    return ImportedHead(mesh_obj, arm_obj, collection, frames)


def _camera(head, source_zero: float, scene_fps: float, created, collection, name):
    """(camera object, movie clip or None): the video's camera, and the video behind the head
    in its view, its frame 0 at scene frame ``source_zero``, retimed to ``scene_fps``."""
    settings = head.camera
    data = created.add(bpy.data.cameras.new(f"{name} camera"))
    data.type = "PERSP"
    data.sensor_fit = "HORIZONTAL"
    data.sensor_width = settings.sensor_width_mm
    data.lens_unit = "MILLIMETERS"
    data.lens = settings.lens_mm
    data.shift_x, data.shift_y = settings.shift_x, settings.shift_y
    data.clip_start, data.clip_end = CLIP_START_M, CLIP_END_M
    obj = created.add(bpy.data.objects.new(f"{name} camera", data))
    collection.objects.link(obj)
    obj.matrix_world = mathutils.Matrix(settings.matrix_world.tolist())
    obj[HEAD_PROPERTY] = str(head.path)
    obj[ROLE_PROPERTY] = CAMERA_ROLE
    obj[VIDEO_SIZE_PROPERTY] = [int(settings.width), int(settings.height)]
    clip = None
    video = head.video_path
    if video is not None and video.is_file():
        try:
            clip = created.add(bpy.data.movieclips.load(str(video), check_existing=False))
        except RuntimeError as e:  # a video Blender cannot read: the camera still matches
            log.warning("%s: the video %s cannot be shown behind the head: %s", head.path, video, e)
    elif video is not None:
        log.info("%s: the video %s is not there; the camera is made without it", head.path, video)
    if clip is not None:
        # keyed over the result's frames and a second either side, not a whole long video
        margin = int(np.ceil(head.fps))
        span = (head.source_frame_start - margin, head.source_frame_start + head.n_frames - 1 + margin)
        timing = io_result.retime(source_zero, fps=head.fps, scene_fps=scene_fps,
                                  n_pictures=max(int(clip.frame_duration), 1), span=span)
        if timing is None:
            clip.frame_start = int(round(source_zero))
        else:  # the scene's rate is not the video's: pick the picture nearest in time on each frame
            # a clip shows picture (scene frame - frame_start) at each scene frame
            starts = timing.scene - timing.index
            clip.frame_start = int(starts[0])
            keys = Channels(clip, f"{clip.name} timing")
            created.add(keys.action)
            keys.curve("frame_start", timing.scene, starts, interpolation="CONSTANT")
        bg = data.background_images.new()
        bg.source = "MOVIE_CLIP"
        bg.clip = clip
        bg.frame_method = "FIT"
        bg.alpha = 1.0
        data.show_background_images = True
    return obj, clip


def _armature(context, head, created, collection, name):
    arm = created.add(bpy.data.armatures.new(f"{name} rig"))
    obj = created.add(bpy.data.objects.new(f"{name} rig", arm))
    collection.objects.link(obj)
    obj.matrix_world = mathutils.Matrix(head.object_matrix.tolist())  # rows (a plain list would be read as columns)
    obj.rotation_mode = "QUATERNION"
    # Edit bones need edit mode on the active object.
    view_layer = context.view_layer
    previous = view_layer.objects.active
    if context.mode != "OBJECT" and previous is not None:
        bpy.ops.object.mode_set(mode="OBJECT")
    view_layer.objects.active = obj
    bpy.ops.object.mode_set(mode="EDIT")
    try:
        bones = []
        for j, joint in enumerate(head.joint_names):
            eb = arm.edit_bones.new(joint)
            eb.head = head.joints_rest[j].tolist()
            # along +y with no roll: the bone's rest axes are the model's axes
            eb.tail = (head.joints_rest[j] + np.array([0.0, BONE_LENGTH_M, 0.0])).tolist()
            eb.roll = 0.0
            bones.append(eb)
        for j, parent in enumerate(head.joint_parents):
            if parent >= 0:
                bones[j].parent = bones[int(parent)]
                bones[j].use_connect = False
    finally:
        bpy.ops.object.mode_set(mode="OBJECT")
        view_layer.objects.active = previous if previous is not None else obj
    for pb in obj.pose.bones:
        pb.rotation_mode = "QUATERNION"
    return obj


def _mesh(head, created, collection, name):
    mesh = created.add(bpy.data.meshes.new(f"{name} head"))
    v, f = len(head.vertices_neutral), len(head.faces)
    mesh.vertices.add(v)
    mesh.loops.add(3 * f)
    mesh.polygons.add(f)
    mesh.vertices.foreach_set("co", head.vertices_basis.ravel())
    mesh.loops.foreach_set("vertex_index", head.faces.ravel())
    mesh.polygons.foreach_set("loop_start", np.arange(0, 3 * f, 3, dtype=np.int32))
    # (Blender 4.0+ derives each polygon's size from the next loop_start)
    uv = mesh.uv_layers.new(name=UV_LAYER)
    uv.data.foreach_set("uv", head.uv_loops)
    if head.face_material is not None:
        for material_name in head.material_names:
            mesh.materials.append(_part_material(material_name, created))
        mesh.polygons.foreach_set("material_index", head.face_material)
    mesh.update()
    if mesh.validate(verbose=False):
        log.warning("%s: Blender corrected invalid geometry in the result's mesh", head.path)
    obj = created.add(bpy.data.objects.new(f"{name} head", mesh))
    collection.objects.link(obj)
    return obj


def _part_material(part: str, created):
    """A material for one part of the head (``skin``, ``teeth``, ...): a Principled BSDF with
    :data:`MATERIAL_LOOKS`; a see-through part (``eye_wet``) has alpha 0, dithered in EEVEE and
    with transparent shadows, so that the eye behind it shows in EEVEE and Cycles alike."""
    mat = created.add(bpy.data.materials.new(f"AVFace {part}"))
    mat[MATERIAL_PROPERTY] = part
    mat.use_nodes = True
    look = dict(MATERIAL_LOOKS.get(part, DEFAULT_LOOK))
    alpha = look.pop("alpha", 1.0)
    nodes = mat.node_tree.nodes
    bsdf = next((n for n in nodes if n.type == "BSDF_PRINCIPLED"), None)
    if bsdf is None:  # a material made without the default node tree
        bsdf = nodes.new("ShaderNodeBsdfPrincipled")
        output = next((n for n in nodes if n.type == "OUTPUT_MATERIAL"), None) or nodes.new("ShaderNodeOutputMaterial")
        mat.node_tree.links.new(bsdf.outputs["BSDF"], output.inputs["Surface"])
    for socket, value in look.items():
        if socket in bsdf.inputs:  # (input names of Blender 4.0 and later)
            bsdf.inputs[socket].default_value = (*value, 1.0) if socket == "Base Color" else value
    bsdf.inputs["Alpha"].default_value = alpha
    color = look.get("Base Color", DEFAULT_LOOK["Base Color"])
    mat.diffuse_color = (*color, alpha)  # the viewport's solid view
    mat.roughness = float(look.get("Roughness", 0.5))
    if alpha < 1.0:
        # EEVEE (4.2+) dithers the alpha, depth-sorted with the opaque parts, and lets light
        # through to the shadows; Cycles reads the alpha as it is
        mat.surface_render_method = "DITHERED"
        mat.use_transparent_shadow = True
    return mat


def _skin(head, mesh_obj, arm_obj):
    weights = head.skin_weights
    for j, joint in enumerate(head.joint_names):
        group = mesh_obj.vertex_groups.new(name=joint)
        w = weights[:, j]
        # one add() per distinct weight: a rigid region is a single call
        nonzero = np.nonzero(w > 0)[0]
        values, inverse = np.unique(w[nonzero], return_inverse=True)
        for k, value in enumerate(values):
            group.add(nonzero[inverse == k].tolist(), float(value), "REPLACE")
    mod = mesh_obj.modifiers.new(ARMATURE_MODIFIER, "ARMATURE")
    mod.object = arm_obj
    mod.use_vertex_groups = True
    mod.use_bone_envelopes = False


def _skin_group(head, mesh_obj):
    """The vertex group :data:`SKIN_GROUP` (results with materials), which the detail maps'
    Displace modifier is limited to."""
    skin = io_result.skin_weights_for_detail(head)
    if skin is None:
        return
    ids, weights = skin
    group = mesh_obj.vertex_groups.new(name=SKIN_GROUP)
    for value in (1.0, 0.0):
        group.add(ids[weights == value].tolist(), value, "REPLACE")


def _shape_keys(head, mesh_obj):
    mesh_obj.shape_key_add(name="Basis", from_mix=False)
    basis = head.vertices_basis
    identity = head.identity_offset
    if identity is not None:
        # the clip's identity on the model's template, at 1 and not animated
        kb = mesh_obj.shape_key_add(name=io_result.IDENTITY_KEY, from_mix=False)
        kb.data.foreach_set("co", head.vertices_neutral.ravel())
        kb.slider_min, kb.slider_max = 0.0, 1.0
        kb.value = 1.0
    ranges = head.shape_key_ranges
    for k, (name, offset) in enumerate(zip(head.shape_key_names, head.shape_key_offsets)):
        kb = mesh_obj.shape_key_add(name=name, from_mix=False)
        kb.data.foreach_set("co", (basis + offset).ravel())
        lo, hi = (-1.0, 1.0) if ranges is None else (float(ranges[k, 0]), float(ranges[k, 1]))
        kb.slider_min, kb.slider_max = lo, hi
    key = mesh_obj.data.shape_keys
    key.use_relative = True
    key.name = f"{mesh_obj.name} keys"


def _correctives(head, mesh_obj, arm_obj):
    """Pose correctives as shape keys driven by the bones: each key's value is one entry of
    (R - I) of its joint's rotation, computed from the bone's quaternion, so the correction
    follows the bones however an animator poses them."""
    for corr in head.correctives:
        kb = mesh_obj.shape_key_add(name=corr.name, from_mix=False)
        kb.data.foreach_set("co", (head.vertices_basis + corr.offsets).ravel())
        kb.slider_min, kb.slider_max = -2.0, 2.0  # entries of R - I lie in [-2, 2]
        driver = kb.driver_add("value").driver
        driver.type = "SCRIPTED"
        for i, name in enumerate("wxyz"):
            var = driver.variables.new()
            var.name = name
            var.type = "SINGLE_PROP"
            var.targets[0].id_type = "OBJECT"
            var.targets[0].id = arm_obj
            var.targets[0].data_path = f'pose.bones["{corr.joint}"].rotation_quaternion[{i}]'
        driver.expression = corr.expression


def _animate(head, frames, mesh_obj, arm_obj, created):
    if head.shape_key_names:
        keys = Channels(mesh_obj.data.shape_keys, f"{mesh_obj.name} shape keys")
        created.add(keys.action)
        for k, name in enumerate(head.shape_key_names):
            keys.curve(f'key_blocks["{name}"].value', frames, head.shape_key_values[:, k])

    bones = Channels(arm_obj, f"{arm_obj.name} pose")
    created.add(bones.action)
    for j, joint in enumerate(head.joint_names):
        for i in range(4):
            bones.curve(f'pose.bones["{joint}"].rotation_quaternion', frames, head.bone_quaternions[:, j, i], index=i)
    for j in head.located_joints:
        for i in range(3):
            bones.curve(f'pose.bones["{head.joint_names[j]}"].location', frames, head.bone_locations[:, j, i], index=i)

    # ARKit curves and confidence as animated custom properties with their exact names
    props = Channels(mesh_obj, f"{mesh_obj.name} curves")
    created.add(props.action)
    for k, name in enumerate(head.arkit_names):
        _float_property(mesh_obj, name, 0.0, 1.0, "ARKit blendshape weight")
        props.curve(f'["{name}"]', frames, head.arkit[:, k])
    descriptions = {"avface_visual_conf": "How well the camera saw the face (0-1)",
                    "avface_occluded": "1 where the face was hidden or undetected and audio carried the mouth",
                    "avface_speech_activity": "Speech activity (0-1)"}
    for name, values in head.confidence.items():
        _float_property(mesh_obj, name, 0.0, 1.0, descriptions.get(name, ""))
        props.curve(f'["{name}"]', frames, values, interpolation="CONSTANT" if name == "avface_occluded" else "LINEAR")


def _float_property(obj, name: str, lo: float, hi: float, description: str) -> None:
    obj[name] = 0.0
    ui = obj.id_properties_ui(name)
    ui.update(min=lo, max=hi, soft_min=lo, soft_max=hi, description=description)


def _detail(head, frames, scene_fps, mesh_obj, created, name):
    """The displacement maps as an image sequence, in the material (for renders) and in a
    Displace modifier (for the viewport and export), map t shown at scene frame ``frames[t]``."""
    detail = head.detail
    first = detail.files[0]
    image = created.add(bpy.data.images.load(str(first), check_existing=False))
    image.source = "SEQUENCE"
    image.name = f"{name} detail"
    image.colorspace_settings.name = "Non-Color"
    digits = "".join(ch for ch in first.stem if ch.isdigit())
    number_of_first = int(digits) if digits else 1

    timing = io_result.retime(float(frames[0]), fps=head.fps, scene_fps=scene_fps, n_pictures=head.n_frames)
    if timing is not None:
        # An image user shows file number clamp(scene frame - frame_start + 1, 0, frame_duration)
        # + frame_offset: key the offset so that each scene frame shows the map nearest in time.
        offsets = number_of_first + timing.index - (timing.scene - timing.scene[0] + 1)

    def set_user(user, owner, path):
        user.use_auto_refresh = True
        user.use_cyclic = False
        if timing is None:
            user.frame_duration = head.n_frames
            user.frame_start = int(round(frames[0]))
            # the file shown at frame_start is numbered 1 + frame_offset
            user.frame_offset = number_of_first - 1
            return
        user.frame_duration = len(timing.scene)
        user.frame_start = int(timing.scene[0])
        user.frame_offset = int(offsets[0])
        keys = Channels(owner, f"{name} detail timing")
        created.add(keys.action)
        keys.curve(f"{path}image_user.frame_offset", timing.scene, offsets, interpolation="CONSTANT")

    mat = skin_material(mesh_obj)
    if mat is None:  # one material for the whole mesh
        mat = created.add(bpy.data.materials.new(f"{name} skin"))
        mat.use_nodes = True
        mesh_obj.data.materials.append(mat)
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    output = next(n for n in nodes if n.type == "OUTPUT_MATERIAL")
    tex = nodes.new("ShaderNodeTexImage")
    tex.name = tex.label = DETAIL_NODE_PREFIX
    tex.image = image
    tex.interpolation = "Linear"
    set_user(tex.image_user, mat.node_tree, f'nodes["{tex.name}"].')
    uvmap = nodes.new("ShaderNodeUVMap")
    uvmap.name = uvmap.label = f"{DETAIL_NODE_PREFIX} UV"
    uvmap.uv_map = UV_LAYER
    links.new(uvmap.outputs["UV"], tex.inputs["Vector"])
    disp = nodes.new("ShaderNodeDisplacement")
    disp.name = disp.label = f"{DETAIL_NODE_PREFIX} displacement"
    disp.inputs["Midlevel"].default_value = detail.midlevel
    disp.inputs["Scale"].default_value = detail.metres_per_unit
    links.new(tex.outputs["Color"], disp.inputs["Height"])
    links.new(disp.outputs["Displacement"], output.inputs["Displacement"])
    if hasattr(mat, "displacement_method"):
        mat.displacement_method = "BOTH"

    texture = created.add(bpy.data.textures.new(f"{name} detail", "IMAGE"))
    texture.image = image
    set_user(texture.image_user, texture, "")
    mod = mesh_obj.modifiers.new(DETAIL_MODIFIER, "DISPLACE")
    mod.texture = texture
    mod.texture_coords = "UV"
    mod.uv_layer = UV_LAYER
    mod.direction = "NORMAL"
    mod.mid_level = detail.midlevel
    mod.strength = detail.metres_per_unit
    if mesh_obj.vertex_groups.get(SKIN_GROUP) is not None:
        mod.vertex_group = SKIN_GROUP  # the skin only, not the eyes, teeth or lashes


def skin_material(mesh_obj):
    """The material made for the skin of a head with parts (:data:`MATERIAL_PROPERTY`), or None."""
    return next((m for m in mesh_obj.data.materials if m is not None and m.get(MATERIAL_PROPERTY) == "skin"), None)


def _remove_detail_nodes(mat) -> None:
    """Take the detail maps' nodes out of ``mat`` again (the caller puts its animation back)."""
    if mat is None or mat.node_tree is None:
        return
    nodes = mat.node_tree.nodes
    for node in [n for n in nodes if n.name.startswith(DETAIL_NODE_PREFIX)]:
        nodes.remove(node)


def attach_detail(context, mesh_obj, result_path: str | Path, *, first_frame: float, name: str | None = None,
                  scene=None) -> bool:
    """Add the detail maps of ``result_path`` (the whole result) to ``mesh_obj``, a head
    imported earlier from that result's head (the same result without its maps): the
    material, the Displace modifier and the image sequence's timing exactly as
    :func:`import_result` makes them, and nothing else. The shape keys, bones, actions and
    any keyframe the animator added, the selection, the active object and the current frame
    stay as they are.

    ``first_frame`` and ``name`` are what the head was imported with (the scene frame of
    source frame 0; the name its data-blocks were named after, by default the mesh object's
    name without " head"); ``scene``: the scene whose frame rate the maps follow (by default
    the first the head is in). Returns False, changing nothing, when the head has its detail
    maps already. Raises :class:`io_result.ResultError` before changing anything when the
    file is not a usable result, has no detail maps, or is not this head's."""
    if mesh_obj.modifiers.get(DETAIL_MODIFIER) is not None:
        return False
    head = io_result.read_result(result_path)
    if head.detail is None:
        raise io_result.ResultError(f"{result_path} has no detail maps")
    if len(mesh_obj.data.vertices) != len(head.vertices_neutral):
        raise io_result.ResultError(f"{mesh_obj.name} has {len(mesh_obj.data.vertices)} vertices, the result's head "
                                    f"{len(head.vertices_neutral)}: it is not the head of {result_path}")
    if scene is None:
        scene = next(iter(mesh_obj.users_scene), None) or context.scene
    scene_fps = scene.render.fps / scene.render.fps_base
    frames = io_result.scene_frames(head.n_frames, fps=head.fps, scene_fps=scene_fps, first_frame=first_frame,
                                    source_frame_start=head.source_frame_start)
    if name is None:
        name = mesh_obj.name[: -len(" head")] if mesh_obj.name.endswith(" head") else mesh_obj.name
    materials = mesh_obj.data.materials
    n_materials = len(materials)
    skin = skin_material(mesh_obj)
    skin_animation = None
    if skin is not None and skin.node_tree.animation_data is not None:
        skin_animation = (skin.node_tree.animation_data.action,
                          getattr(skin.node_tree.animation_data, "action_slot", None))
    created = _Created()
    try:
        _detail(head, frames, scene_fps, mesh_obj, created, name)
    except Exception:  # leave the head as it was
        mod = mesh_obj.modifiers.get(DETAIL_MODIFIER)
        if mod is not None:
            mesh_obj.modifiers.remove(mod)
        while len(materials) > n_materials:
            materials.pop()
        if skin is not None:
            _remove_detail_nodes(skin)
            if skin_animation is None:
                if skin.node_tree.animation_data is not None:
                    skin.node_tree.animation_data_clear()
            else:
                skin.node_tree.animation_data.action = skin_animation[0]
                if skin_animation[1] is not None:
                    skin.node_tree.animation_data.action_slot = skin_animation[1]
        created.remove_all()
        raise
    return True


def find_result_mesh(name: str, result_path: str | Path):
    """The head's mesh object imported from ``result_path``: the object called ``name`` if it
    is that, else any mesh that came from that file (renamed meanwhile); None when none is
    in a scene any more."""
    path = Path(result_path)

    def from_result(obj) -> bool:
        return (obj is not None and obj.get(ROLE_PROPERTY) == "mesh" and HEAD_PROPERTY in obj
                and Path(str(obj[HEAD_PROPERTY])) == path and len(obj.users_scene) > 0)

    obj = bpy.data.objects.get(name) if name else None
    if from_result(obj):
        return obj
    return next((o for o in bpy.data.objects if from_result(o)), None)


def find_head(context):
    """(mesh object, armature object) of the AVFace head the active or a selected object
    belongs to, or (None, None)."""
    candidates = [context.active_object, *getattr(context, "selected_objects", [])]
    for obj in candidates:
        if obj is None or HEAD_PROPERTY not in obj:
            continue
        if obj.get(ROLE_PROPERTY) == "mesh":
            return obj, obj.parent
        if obj.get(ROLE_PROPERTY) == "armature":
            mesh = next((c for c in obj.children if c.get(ROLE_PROPERTY) == "mesh"), None)
            return mesh, obj
    return None, None


def set_video_resolution(render, size) -> None:
    """Render at the video's (width, height), full size, square pixels: the settings at which
    the imported camera matches the video."""
    render.resolution_x, render.resolution_y = int(size[0]), int(size[1])
    render.resolution_percentage = 100
    render.pixel_aspect_x = render.pixel_aspect_y = 1.0


def find_camera(mesh_obj):
    """The video's camera imported with ``mesh_obj``'s head (same result, same collection), or None."""
    if mesh_obj is None or HEAD_PROPERTY not in mesh_obj:
        return None
    for collection in mesh_obj.users_collection:
        for obj in collection.objects:
            if obj.get(ROLE_PROPERTY) == CAMERA_ROLE and obj.get(HEAD_PROPERTY) == mesh_obj[HEAD_PROPERTY]:
                return obj
    return None
