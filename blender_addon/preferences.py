"""Add-on preferences (Edit > Preferences > Add-ons > AVFace)."""
from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, StringProperty

from ._vendor import protocol

#: The stages the backend can be asked for (the networks and the lips always run when the
#: backend has its checkpoint; the detail maps are asked for). Each has its bit (an enum
#: flag's value), which the scene's setting stores.
STAGES = (
    ("coarse", "Coarse", "Head pose, expression, jaw and lips from video and speech (always run)", 1),
    ("detail", "Detail maps", "Per-frame UV displacement maps on the skin material and a Displace modifier "
                              "(the fine stage: about 5x the tracking's time on a CPU)", 2),
    ("preview", "Preview", "Also render a preview video on the backend", 4),
)
STAGE_BITS = {item[0]: item[3] for item in STAGES}
DEFAULT_STAGES = {"coarse", "detail"}


class AVFACE_AP_preferences(bpy.types.AddonPreferences):
    # extensions: the preferences are found by the package name Blender gives the add-on
    bl_idname = __package__

    address: StringProperty(
        name="Backend address", default=protocol.DEFAULT_ADDRESS,
        description="ZeroMQ address of the AVFace backend (tcp://host:port)")
    autostart: BoolProperty(
        name="Start a local backend automatically", default=False,
        description="When no backend answers on a loopback address, start `avface serve` there")
    executable: StringProperty(
        name="avface or Python", subtype="FILE_PATH", default="",
        description="The `avface` executable, or a Python interpreter that has the avface package")
    timeout_s: FloatProperty(
        name="Request timeout", default=5.0, min=0.5, max=600.0, unit="TIME_ABSOLUTE",
        description="Seconds to wait for each answer before retrying")
    retries: bpy.props.IntProperty(name="Retries", default=3, min=0, max=20,
                                   description="How often a request is sent again before giving up")
    start_timeout_s: FloatProperty(
        name="Backend start timeout", default=60.0, min=1.0, max=600.0, unit="TIME_ABSOLUTE",
        description="Seconds to wait for an automatically started backend")
    flame_dir: StringProperty(
        name="FLAME folder", subtype="DIR_PATH", default="",
        description="Folder with generic_model.pkl or flame2023.pkl and mediapipe_landmark_embedding.npz")
    default_stages: EnumProperty(
        name="Default stages", items=STAGES, options={"ENUM_FLAG"}, default=DEFAULT_STAGES,
        description="Stages a scene's reconstruction runs until they are changed in its AVFace panel")
    make_camera_active: BoolProperty(
        name="Make the video's camera the scene's camera", default=True,
        description="On import, the camera the video was shot with becomes the scene's active camera "
                    "(the previous camera is kept)")

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "address")
        row = layout.row()
        row.prop(self, "autostart")
        sub = layout.row()
        sub.enabled = self.autostart
        sub.prop(self, "executable")
        col = layout.column(align=True)
        col.prop(self, "timeout_s")
        col.prop(self, "retries")
        col.prop(self, "start_timeout_s")
        layout.prop(self, "flame_dir")
        layout.prop(self, "default_stages")
        layout.prop(self, "make_camera_active")


def get(context=None):
    context = context or bpy.context
    return context.preferences.addons[__package__].preferences


def default_stage_bits() -> int:
    """The preference "Default stages" as enum-flag bits (its default when the add-on's
    preferences cannot be read)."""
    try:
        stages = set(get().default_stages)
    except (KeyError, AttributeError):
        stages = DEFAULT_STAGES
    return sum(STAGE_BITS[s] for s in stages if s in STAGE_BITS)


def register():
    bpy.utils.register_class(AVFACE_AP_preferences)


def unregister():
    bpy.utils.unregister_class(AVFACE_AP_preferences)
