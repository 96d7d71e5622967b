"""Match a rig's shape-key names to the 52 ARKit blendshape names. No ``bpy``.

Matching ignores case and separators (``eyeBlink_L``, ``eye_blink_left``, ``EyeBlinkLeft``
all name ``eyeBlinkLeft``), accepts ``_L``/``_R``/``.L``/``Left``/``Right`` sides, and knows the
Unified Expressions (VRChat / VRCFaceTracking) names whose meaning is one ARKit shape, such as
``EyeClosedLeft`` for ``eyeBlinkLeft``.
"""
from __future__ import annotations

import re

from ._vendor.result.arkit_names import ARKIT_NAMES

#: Unified Expressions name -> ARKit name, for the shapes whose meaning is the same.
UNIFIED_EXPRESSIONS = {
    "EyeClosedLeft": "eyeBlinkLeft", "EyeClosedRight": "eyeBlinkRight",
    "EyeSquintLeft": "eyeSquintLeft", "EyeSquintRight": "eyeSquintRight",
    "EyeWideLeft": "eyeWideLeft", "EyeWideRight": "eyeWideRight",
    "JawOpen": "jawOpen", "JawForward": "jawForward", "JawLeft": "jawLeft", "JawRight": "jawRight",
    "MouthClosed": "mouthClose", "LipFunnel": "mouthFunnel", "LipPucker": "mouthPucker",
    "MouthCornerPullLeft": "mouthSmileLeft", "MouthCornerPullRight": "mouthSmileRight",
    "MouthSmileLeft": "mouthSmileLeft", "MouthSmileRight": "mouthSmileRight",
    "MouthFrownLeft": "mouthFrownLeft", "MouthFrownRight": "mouthFrownRight",
    "MouthDimpleLeft": "mouthDimpleLeft", "MouthDimpleRight": "mouthDimpleRight",
    "MouthStretchLeft": "mouthStretchLeft", "MouthStretchRight": "mouthStretchRight",
    "MouthPressLeft": "mouthPressLeft", "MouthPressRight": "mouthPressRight",
    "MouthLowerDownLeft": "mouthLowerDownLeft", "MouthLowerDownRight": "mouthLowerDownRight",
    "MouthUpperUpLeft": "mouthUpperUpLeft", "MouthUpperUpRight": "mouthUpperUpRight",
    "MouthRaiserLower": "mouthShrugLower", "MouthRaiserUpper": "mouthShrugUpper",
    "LipSuckLower": "mouthRollLower", "LipSuckUpper": "mouthRollUpper",
    "BrowLowererLeft": "browDownLeft", "BrowLowererRight": "browDownRight",
    "BrowInnerUp": "browInnerUp", "BrowOuterUpLeft": "browOuterUpLeft", "BrowOuterUpRight": "browOuterUpRight",
    "CheekPuff": "cheekPuff", "CheekSquintLeft": "cheekSquintLeft", "CheekSquintRight": "cheekSquintRight",
    "NoseSneerLeft": "noseSneerLeft", "NoseSneerRight": "noseSneerRight", "TongueOut": "tongueOut",
}

_SEPARATORS = re.compile(r"[\s_.\-:|/]+")


def normalise(name: str) -> str:
    """A key for comparing names: lower case, no separators, sides spelled ``left``/``right``.

    ``eyeBlink_L``, ``eyeBlinkLeft``, ``EyeBlinkLeft``, ``eye_blink_left`` and ``eyeBlink.L``
    all give ``eyeblinkleft``.
    """
    parts = [p for p in _SEPARATORS.split(name.strip()) if p]
    if not parts:
        return ""
    last = parts[-1].lower()
    if last in ("l", "r") and len(parts) > 1:
        parts[-1] = "left" if last == "l" else "right"
    return "".join(parts).lower()


def _canonical() -> dict[str, str]:
    table = {normalise(n): n for n in ARKIT_NAMES}
    for alias, arkit in UNIFIED_EXPRESSIONS.items():
        table.setdefault(normalise(alias), arkit)
    # camel-case sides without a separator: "eyeBlinkL" -> eyeBlinkLeft
    for n in ARKIT_NAMES:
        for side, short in (("Left", "L"), ("Right", "R")):
            if n.endswith(side):
                table.setdefault((n[: -len(side)] + short).lower(), n)
    return table


CANONICAL = _canonical()


def arkit_name(name: str) -> str | None:
    """The ARKit name ``name`` stands for, or None."""
    return CANONICAL.get(normalise(name))


def match_names(target_names, source_names=ARKIT_NAMES) -> tuple[dict[str, str], list[str]]:
    """(matched: target name -> ARKit source name, unmatched target names).

    A target name matches when it stands for an ARKit name that ``source_names`` holds. When
    two target keys stand for the same ARKit name both receive the curve.
    """
    available = set(source_names)
    matched: dict[str, str] = {}
    unmatched: list[str] = []
    for name in target_names:
        arkit = arkit_name(name)
        if arkit is not None and arkit in available:
            matched[name] = arkit
        else:
            unmatched.append(name)
    return matched, unmatched
