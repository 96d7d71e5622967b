"""Rendering the head over the video.

Blender's F12 renders the Sequencer's output instead of the 3D scene whenever the scene has
strips and Post Processing > Sequencer is on: a scene that holds the movie strip the head
came from renders the plain video. And a camera's background images never render. So
:func:`setup_render` (the panel's **Set Up Render**) makes F12 render the head over the video:
the Sequencer off, the video's camera active at the video's size, the film transparent, and a
compositor that lays the render over the video's movie clip (the one behind the head in the
camera's view, with its timing), fitted to the render size, under the Standard view transform
so that the footage keeps its colours. Blender 5.0 keeps the compositor in a node group
(``scene.compositing_node_group``, a Group Output); 4.2 in ``scene.node_tree`` (a Composite
node).
"""
from __future__ import annotations

import bpy

from . import importer

TREE_NAME = "AVFace over video"
CLIP_NODE = "AVFace video"
FIT_NODE = "AVFace fit"
OVER_NODE = "AVFace over video"


def renders_sequencer(scene) -> bool:
    """F12 renders the Sequencer, not the 3D scene: it is on and the scene has strips."""
    ed = scene.sequence_editor
    if ed is None or not scene.render.use_sequencer:
        return False
    strips = getattr(ed, "strips_all", None)
    if strips is None:
        strips = ed.sequences_all
    return any(not s.mute for s in strips)


def video_camera(context):
    """The video's camera of the active head, else the scene's camera when it is one, else the
    scene's only AVFace camera; None when there is none."""
    mesh, _ = importer.find_head(context)
    camera = importer.find_camera(mesh)
    if camera is not None:
        return camera
    scene = context.scene
    if scene.camera is not None and scene.camera.get(importer.ROLE_PROPERTY) == importer.CAMERA_ROLE:
        return scene.camera
    cameras = [o for o in scene.objects if o.get(importer.ROLE_PROPERTY) == importer.CAMERA_ROLE]
    return cameras[0] if len(cameras) == 1 else None


def backdrop_clip(camera):
    """The movie clip behind the head in ``camera``'s view, or None."""
    for bg in camera.data.background_images:
        if bg.source == "MOVIE_CLIP" and bg.clip is not None:
            return bg.clip
    return None


def setup_render(scene, camera) -> str:
    """Make ``scene`` render the head over the video through ``camera``; returns what was set,
    for the user."""
    render = scene.render
    render.use_sequencer = False
    render.film_transparent = True
    render.use_compositing = True
    scene.camera = camera
    size = camera.get(importer.VIDEO_SIZE_PROPERTY)
    if size is not None:
        importer.set_video_resolution(render, size)
    clip = backdrop_clip(camera)
    if clip is None:
        return (f"F12 now renders the head through {camera.name} on a transparent film; its video was not found, "
                f"so nothing is composited behind it")
    scene.view_settings.view_transform = "Standard"
    _composite_over(scene, clip)
    return (f"F12 now renders the head over {clip.name} through {camera.name}: Sequencer off, transparent film, "
            f"compositor '{OVER_NODE}', Standard view transform")


def _composite_over(scene, clip) -> None:
    """The compositor: render layers over the movie clip fitted to the render size (nodes
    found by name when set up before, so running it again changes nothing)."""
    tree, output = _compositor(scene)
    nodes, links = tree.nodes, tree.links
    layers = next((n for n in nodes if n.bl_idname == "CompositorNodeRLayers"), None) or nodes.new("CompositorNodeRLayers")
    layers.scene = scene
    movie = _node(nodes, "CompositorNodeMovieClip", CLIP_NODE)
    movie.clip = clip
    fit = _node(nodes, "CompositorNodeScale", FIT_NODE)
    over = _node(nodes, "CompositorNodeAlphaOver", OVER_NODE)
    if "Type" in fit.inputs:  # 5.0: menu sockets
        fit.inputs["Type"].default_value = "Render Size"
        fit.inputs["Frame Type"].default_value = "Fit"
        background, foreground = over.inputs["Background"], over.inputs["Foreground"]
    else:
        fit.space, fit.frame_method = "RENDER_SIZE", "FIT"
        background, foreground = over.inputs[1], over.inputs[2]
    for socket in (fit.inputs[0], background, foreground, output):
        for link in list(socket.links):
            links.remove(link)
    links.new(movie.outputs["Image"], fit.inputs[0])
    links.new(fit.outputs["Image"], background)
    links.new(layers.outputs["Image"], foreground)
    links.new(over.outputs["Image"], output)
    movie.location, fit.location, over.location = (-400, -250), (-200, -250), (0, 0)
    layers.location = (-400, 100)


def _compositor(scene):
    """(the scene's compositor node tree, made if need be; the socket its image goes out by)."""
    if hasattr(scene, "compositing_node_group"):  # Blender 5.0 and later
        tree = scene.compositing_node_group
        if tree is None:
            tree = bpy.data.node_groups.new(TREE_NAME, "CompositorNodeTree")
            scene.compositing_node_group = tree
        if not any(getattr(item, "in_out", "") == "OUTPUT" for item in tree.interface.items_tree):
            tree.interface.new_socket("Image", in_out="OUTPUT", socket_type="NodeSocketColor")
        output = next((n for n in tree.nodes if n.bl_idname == "NodeGroupOutput"), None) or tree.nodes.new("NodeGroupOutput")
        output.location = (250, 0)
        return tree, output.inputs[0]
    scene.use_nodes = True
    tree = scene.node_tree
    output = next((n for n in tree.nodes if n.bl_idname == "CompositorNodeComposite"), None)
    if output is None:
        output = tree.nodes.new("CompositorNodeComposite")
    output.location = (250, 0)
    return tree, output.inputs["Image"]


def _node(nodes, kind: str, name: str):
    node = nodes.get(name)
    if node is None or node.bl_idname != kind:
        node = nodes.new(kind)
        node.name = node.label = name
    return node


class AVFACE_OT_setup_render(bpy.types.Operator):
    """Render the head over the video with F12: turn the Sequencer off, make the video's camera active at the video's
    size, make the film transparent and composite the render over the video's movie clip"""

    bl_idname = "avface.setup_render"
    bl_label = "Set Up Render"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        camera = video_camera(context)
        if camera is None:
            self.report({"ERROR"}, "No AVFace camera in this scene: reconstruct or import a head first "
                                   "(with 'Match the video's camera'), or select its head")
            return {"CANCELLED"}
        self.report({"INFO"}, setup_render(context.scene, camera))
        return {"FINISHED"}


def register():
    bpy.utils.register_class(AVFACE_OT_setup_render)


def unregister():
    bpy.utils.unregister_class(AVFACE_OT_setup_render)
