"""Live Link Face CSV read back by the csv module: the app's columns with their exact names,
one row per frame, time codes at the clip's rate, values equal to the result's arkit array."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from export_util import export_cases  # noqa: F401 - the session fixture
from scipy.spatial.transform import Rotation

from avface.export import export_result
from avface.export.livelink import LIVE_LINK_NAMES, parse_timecode, timecode
from avface.result import load_result, write_result

#: The header of takes the Live Link Face app writes (as in the app's own recordings,
#: e.g. alexdjulin/LiveLinkFace-CSV-Retarget-For-Motionbuilder anim/S07-001.csv).
APP_HEADER = (
    "Timecode,BlendShapeCount,EyeBlinkLeft,EyeLookDownLeft,EyeLookInLeft,EyeLookOutLeft,EyeLookUpLeft,"
    "EyeSquintLeft,EyeWideLeft,EyeBlinkRight,EyeLookDownRight,EyeLookInRight,EyeLookOutRight,EyeLookUpRight,"
    "EyeSquintRight,EyeWideRight,JawForward,JawRight,JawLeft,JawOpen,MouthClose,MouthFunnel,MouthPucker,"
    "MouthRight,MouthLeft,MouthSmileLeft,MouthSmileRight,MouthFrownLeft,MouthFrownRight,MouthDimpleLeft,"
    "MouthDimpleRight,MouthStretchLeft,MouthStretchRight,MouthRollLower,MouthRollUpper,MouthShrugLower,"
    "MouthShrugUpper,MouthPressLeft,MouthPressRight,MouthLowerDownLeft,MouthLowerDownRight,MouthUpperUpLeft,"
    "MouthUpperUpRight,BrowDownLeft,BrowDownRight,BrowInnerUp,BrowOuterUpLeft,BrowOuterUpRight,CheekPuff,"
    "CheekSquintLeft,CheekSquintRight,NoseSneerLeft,NoseSneerRight,TongueOut,HeadYaw,HeadPitch,HeadRoll,"
    "LeftEyeYaw,LeftEyePitch,LeftEyeRoll,RightEyeYaw,RightEyePitch,RightEyeRoll").split(",")


def _read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.mark.parametrize("case", ["default", "flame"])
def test_csv_layout_rows_and_values(export_cases, case, tmp_path):
    c = export_cases[case]
    res = load_result(c.result_path)
    # a FLAME result needs no FLAME files for the curves: no flame_dir given
    path = export_result(c.result_path, ["livelink-csv"], tmp_path / "take.csv")["livelink-csv"]
    rows = _read(path)
    assert rows[0] == APP_HEADER
    arkit_cols = [h for h in rows[0][2:] if h in LIVE_LINK_NAMES]
    assert len(arkit_cols) == 52 == len(set(arkit_cols))
    body = rows[1:]
    assert len(body) == res.meta["n_frames"]
    assert all(len(r) == len(APP_HEADER) and r[1] == "61" for r in body)
    fps = res.meta["fps"]
    frames = [parse_timecode(r[0], fps) for r in body]
    assert frames == list(range(len(body)))  # one row per frame at the clip's rate, from frame 0
    # one row against the result's arrays, by name
    t = len(body) // 2
    names = [str(n) for n in res["arkit_names"]]
    for col, name in enumerate(rows[0]):
        if name in LIVE_LINK_NAMES:
            want = res["arkit"][t, names.index(name[0].lower() + name[1:])]
            assert float(body[t][col]) == pytest.approx(float(want), abs=1e-9), name
    yaw, pitch, roll = (float(body[t][rows[0].index(k)]) for k in ("HeadYaw", "HeadPitch", "HeadRoll"))
    want = Rotation.from_rotvec(res["global_rot"][t].astype(np.float64)).as_matrix()
    got = Rotation.from_euler("YXZ", [yaw, pitch, roll]).as_matrix()  # R = Ry(yaw) Rx(pitch) Rz(roll)
    np.testing.assert_allclose(got, want, atol=1e-8)


def test_timecodes_follow_the_source_frame_and_rate(export_cases, tmp_path):
    res = load_result(export_cases["default"].result_path)
    meta = {**res.meta, "fps": 30.0, "source": {**res.meta["source"], "frame_start": 58}}
    src = write_result(tmp_path / "r" / "result.npz", res.arrays, meta)
    rows = _read(export_result(src, ["livelink-csv"], tmp_path / "t.csv")["livelink-csv"])
    assert [r[0] for r in rows[1:4]] == ["00:00:01:28.000", "00:00:01:29.000", "00:00:02:00.000"]
    assert timecode(25 * 61, 25.0) == "00:01:01:00.000"
    assert parse_timecode("00:01:01:00.000", 25.0) == 25 * 61
