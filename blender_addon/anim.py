"""Keyframes through the action API of the running Blender, with bulk calls only.

- Blender 4.4 and later: every Action is slotted (5.0 removed ``Action.fcurves``): F-curves
  live in layer -> keyframe strip -> channelbag(slot), and the animated ID's
  ``animation_data.action_slot`` is assigned explicitly.
- Blender 4.2-4.3: ``Action.fcurves``.

Keys are written with ``keyframe_points.add(n)`` then ``foreach_set("co", ...)``, never one
``keyframe_insert`` per frame.
"""
from __future__ import annotations

import bpy
import numpy as np

SLOTTED = bpy.app.version >= (4, 4, 0)

#: Keyframe.interpolation enum values (BEZT_IPO_CONST, BEZT_IPO_LIN, BEZT_IPO_BEZ).
INTERPOLATION = {"CONSTANT": 0, "LINEAR": 1, "BEZIER": 2}


class Channels:
    """The F-curves of one animated ID in a new action."""

    def __init__(self, id_data, action_name: str):
        self.id = id_data
        self.action = bpy.data.actions.new(action_name)
        anim = id_data.animation_data or id_data.animation_data_create()
        if SLOTTED:
            self.slot = self.action.slots.new(id_type=id_data.id_type, name=id_data.name)
            layer = self.action.layers.new("Layer")
            strip = layer.strips.new(type="KEYFRAME")
            self.fcurves = strip.channelbag(self.slot, ensure=True).fcurves
            anim.action = self.action
            anim.action_slot = self.slot
        else:
            self.slot = None
            self.action.id_root = id_data.id_type
            self.fcurves = self.action.fcurves
            anim.action = self.action

    def curve(self, data_path: str, frames: np.ndarray, values: np.ndarray, *, index: int = 0,
              interpolation: str = "BEZIER"):
        """One F-curve keyed at ``frames`` (T,) with ``values`` (T,), in bulk."""
        fc = self.fcurves.new(data_path, index=index)
        n = len(frames)
        co = np.empty((n, 2), np.float32)
        co[:, 0] = frames
        co[:, 1] = values
        points = fc.keyframe_points
        points.add(n)
        points.foreach_set("co", co.ravel())
        if interpolation != "BEZIER":
            points.foreach_set("interpolation", np.full(n, INTERPOLATION[interpolation], np.int32))
        fc.update()
        return fc


def fcurves_of(id_data):
    """The F-curves animating ``id_data`` (its assigned slot's channelbag on 4.4+)."""
    anim = id_data.animation_data
    if anim is None or anim.action is None:
        return []
    action = anim.action
    if not SLOTTED:
        return list(action.fcurves)
    curves = []
    for layer in action.layers:
        for strip in layer.strips:
            bag = strip.channelbag(anim.action_slot) if anim.action_slot is not None else None
            if bag is not None:
                curves += list(bag.fcurves)
    return curves
