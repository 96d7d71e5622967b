"""The 52 ARKit blendshape names, spelled and ordered as ARKit spells them.

Pure Python with no imports, so that the Blender add-on vendors this very file (see
``build_addon.py``) instead of keeping a copy of the list.
"""

#: ARKit's ARFaceAnchor.BlendShapeLocation names, in Apple's documented order.
ARKIT_NAMES = (
    "eyeBlinkLeft", "eyeLookDownLeft", "eyeLookInLeft", "eyeLookOutLeft", "eyeLookUpLeft", "eyeSquintLeft",
    "eyeWideLeft", "eyeBlinkRight", "eyeLookDownRight", "eyeLookInRight", "eyeLookOutRight", "eyeLookUpRight",
    "eyeSquintRight", "eyeWideRight", "jawForward", "jawLeft", "jawRight", "jawOpen", "mouthClose",
    "mouthFunnel", "mouthPucker", "mouthLeft", "mouthRight", "mouthSmileLeft", "mouthSmileRight",
    "mouthFrownLeft", "mouthFrownRight", "mouthDimpleLeft", "mouthDimpleRight", "mouthStretchLeft",
    "mouthStretchRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
    "mouthPressLeft", "mouthPressRight", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthUpperUpLeft",
    "mouthUpperUpRight", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight", "noseSneerLeft", "noseSneerRight", "tongueOut",
)
assert len(ARKIT_NAMES) == 52


def apple_spelling(name):
    """A shape's name in Apple's spelling: ICT's side suffixes ``_L`` / ``_R`` become ``Left`` /
    ``Right`` (``eyeBlink_L`` -> ``eyeBlinkLeft``); the split pairs keep their side
    (``browInnerUp_L`` -> ``browInnerUpLeft``, which ARKit's single ``browInnerUp`` averages)."""
    if name.endswith("_L"):
        return name[:-2] + "Left"
    if name.endswith("_R"):
        return name[:-2] + "Right"
    return name


def arkit_sources(shape_names):
    """For each of the 52 ARKit names, the indices of ``shape_names`` (in Apple's spelling)
    whose mean is its curve: one shape, both halves of a split pair (``browInnerUpLeft`` and
    ``browInnerUpRight`` -> ``browInnerUp``), or none (``tongueOut`` on a model without it)."""
    index = {n: i for i, n in enumerate(shape_names)}
    out = []
    for name in ARKIT_NAMES:
        if name in index:
            out.append((index[name],))
        else:
            out.append(tuple(index[n] for n in (name + "Left", name + "Right") if n in index))
    return out
