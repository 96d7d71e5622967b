"""Live Link Face CSV writer: the take format of Epic's Live Link Face app, which Unreal's Live
Link Face importer, Faceit, KeenTools and many small importers read.

The layout is the one the app writes (checked against takes recorded by the app and published
in alexdjulin/LiveLinkFace-CSV-Retarget-For-Motionbuilder, ``anim/*.csv``, and against the
header that the importers in JimWest/PyLiveLinkFace-based Blender add-ons spell out):

    Timecode,BlendShapeCount,EyeBlinkLeft,...,TongueOut,HeadYaw,HeadPitch,HeadRoll,
    LeftEyeYaw,LeftEyePitch,LeftEyeRoll,RightEyeYaw,RightEyePitch,RightEyeRoll

- ``Timecode`` is ``HH:MM:SS:FF.mmm``: SMPTE non-drop-frame time code at the nominal rate (the
  clip's fps rounded), then the sub-frame as a three-digit fraction; the app writes its own
  clock, we write the frame's position in the source video (``meta.source.frame_start`` + t),
  so a row's time code names the video frame it came from;
- ``BlendShapeCount`` is 61: the 52 ARKit curves and the 9 head and eye angles;
- the 52 ARKit curves in the app's order, capitalised (``EyeBlinkLeft``), values in [0, 1] with
  ten decimals as the app writes them;
- head and eye angles in radians (the app's own takes show eye angles of about +-0.2, radians),
  as yaw about the up axis (y), pitch about the ear-to-ear axis (x), roll about the axis out of
  the face (z): R = Ry(yaw) Rx(pitch) Rz(roll) in the result's world frame, which is ARKit's
  face frame too (right-handed, y up, the face looking along +z). The default model has no eye
  joints, so its eye angles are 0.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.spatial.transform import Rotation

from avface.errors import SchemaError
from avface.export._io import atomic_path
from avface.result import Result

log = logging.getLogger(__name__)

SUFFIXES = (".csv",)
#: The 52 ARKit columns as the app names and orders them.
LIVE_LINK_NAMES = (
    "EyeBlinkLeft", "EyeLookDownLeft", "EyeLookInLeft", "EyeLookOutLeft", "EyeLookUpLeft", "EyeSquintLeft",
    "EyeWideLeft", "EyeBlinkRight", "EyeLookDownRight", "EyeLookInRight", "EyeLookOutRight", "EyeLookUpRight",
    "EyeSquintRight", "EyeWideRight", "JawForward", "JawRight", "JawLeft", "JawOpen", "MouthClose", "MouthFunnel",
    "MouthPucker", "MouthRight", "MouthLeft", "MouthSmileLeft", "MouthSmileRight", "MouthFrownLeft",
    "MouthFrownRight", "MouthDimpleLeft", "MouthDimpleRight", "MouthStretchLeft", "MouthStretchRight",
    "MouthRollLower", "MouthRollUpper", "MouthShrugLower", "MouthShrugUpper", "MouthPressLeft", "MouthPressRight",
    "MouthLowerDownLeft", "MouthLowerDownRight", "MouthUpperUpLeft", "MouthUpperUpRight", "BrowDownLeft",
    "BrowDownRight", "BrowInnerUp", "BrowOuterUpLeft", "BrowOuterUpRight", "CheekPuff", "CheekSquintLeft",
    "CheekSquintRight", "NoseSneerLeft", "NoseSneerRight", "TongueOut",
)
assert len(LIVE_LINK_NAMES) == 52
ANGLE_NAMES = ("HeadYaw", "HeadPitch", "HeadRoll", "LeftEyeYaw", "LeftEyePitch", "LeftEyeRoll",
               "RightEyeYaw", "RightEyePitch", "RightEyeRoll")
HEADER = ("Timecode", "BlendShapeCount") + LIVE_LINK_NAMES + ANGLE_NAMES
BLEND_SHAPE_COUNT = len(LIVE_LINK_NAMES) + len(ANGLE_NAMES)  # 61, as the app writes


def arkit_name(live_link_name: str) -> str:
    """``EyeBlinkLeft`` -> ``eyeBlinkLeft`` (ARKit's own spelling, as the result stores it)."""
    return live_link_name[0].lower() + live_link_name[1:]


def nominal_rate(fps: float) -> int:
    """The time code's frame count per second: 25 for 25 fps, 30 for 29.97."""
    return max(1, int(round(fps)))


def timecode(frame: int, fps: float) -> str:
    """``HH:MM:SS:FF.mmm`` of a frame number at `fps` (non-drop-frame)."""
    rate = nominal_rate(fps)
    seconds, ff = divmod(int(frame), rate)
    minutes, ss = divmod(seconds, 60)
    hh, mm = divmod(minutes, 60)
    return f"{hh:02d}:{mm:02d}:{ss:02d}:{ff:02d}.000"


def parse_timecode(text: str, fps: float) -> float:
    """The frame number (with its sub-frame fraction) a ``HH:MM:SS:FF[.mmm]`` time code names."""
    hh, mm, ss, ff = text.split(":")
    return ((int(hh) * 60 + int(mm)) * 60 + int(ss)) * nominal_rate(fps) + float(ff)


def yaw_pitch_roll(rotvecs: np.ndarray) -> np.ndarray:
    """(T, 3) axis-angle -> (T, 3) yaw, pitch, roll in radians with R = Ry(yaw) Rx(pitch) Rz(roll)."""
    rotvecs = np.asarray(rotvecs, np.float64)
    if len(rotvecs) == 0:
        return np.zeros((0, 3))
    return Rotation.from_rotvec(rotvecs).as_euler("YXZ")


def write_livelink_csv(result: Result, path: str | Path, *,
                       progress: Callable[[float], None] | None = None) -> Path:
    """Write the ARKit curves and head/eye angles of `result` as a Live Link Face take. Needs
    no face model: only the curves and the pose go into the file."""
    path = Path(path)
    report = progress or (lambda f: None)
    a, meta = result.arrays, result.meta
    fps, n_frames = float(meta["fps"]), int(meta["n_frames"])
    frame_start = int((meta.get("source") or {}).get("frame_start") or 0)
    index = {str(name): k for k, name in enumerate(a["arkit_names"])}
    missing = [n for n in LIVE_LINK_NAMES if arkit_name(n) not in index]
    if missing:
        raise SchemaError(f"arkit_names lacks {[arkit_name(n) for n in missing]}; a Live Link Face take needs all 52")
    cols = np.array([index[arkit_name(n)] for n in LIVE_LINK_NAMES])
    curves = np.asarray(a["arkit"], np.float64)[:, cols]
    eyes = np.asarray(a["eyes"], np.float64)
    angles = np.concatenate([yaw_pitch_roll(a["global_rot"]), yaw_pitch_roll(eyes[:, :3]),
                             yaw_pitch_roll(eyes[:, 3:])], axis=1)
    step = max(1, n_frames // 20)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(HEADER)
        for t in range(n_frames):
            writer.writerow([timecode(frame_start + t, fps), BLEND_SHAPE_COUNT]
                            + [f"{v:.10f}" for v in curves[t]] + [f"{v:.10f}" for v in angles[t]])
            if t % step == 0:
                report(t / n_frames)
    if not math.isclose(fps, nominal_rate(fps), rel_tol=1e-6):
        log.info("%.3f fps is not a whole rate: time codes count %d frames a second (non-drop-frame)",
                 fps, nominal_rate(fps))
    report(1.0)
    return path
