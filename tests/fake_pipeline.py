"""A controllable stand-in for ``avface.pipeline``, for the service tests only.

Selected in worker processes by ``AVFACE_PIPELINE=fake_pipeline`` (with this folder on
PYTHONPATH; see tests/service_util.py). The "video" is a JSON file that says how the job
behaves, so that the kill, cancel, restart and load tests get jobs that are slow, fail or
crash exactly when they need to::

    {"stages": ["decode", "track", "fit"], "steps": 4, "step_s": 0.01,
     "gate": "/tmp/x/go",            # wait in stage "wait" until this file exists
     "fail": "no_face" | "bad_media" | "exception" | "crash" | "crash_once",
     "marker": "/tmp/x/crashed",     # crash_once: crash only while this file is absent
     "ignore_term": true,            # ignore SIGTERM (cancel must escalate to SIGKILL)
     "hang_s": 30,                   # after the stages, sleep this long without any progress
     "head": true,                   # write the head first (meta.detail.state "pending") and report it
     "head_state": "off",            # ... with this meta.detail.state instead
     "result": "/x/result.npz",      # write this real result (its detail/ maps after the head) instead
     "n_detail": 3, "seed": 7}

A file that is not such JSON raises MediaError, as a corrupt video would.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np

from avface.config import ReconstructOptions  # noqa: F401  (the worker reads the options schema from here)
from avface.errors import MediaError, NoFaceError, SchemaError

GATE_TIMEOUT_S = 120.0


def available_models(flame_dir=None) -> dict:
    return {"default": {"available": True},
            "flame": {"available": False, "reason": "fake pipeline: no FLAME files"}}


def expected_frames(spec: dict) -> np.ndarray:
    """What a job with this spec writes as ``frames`` (the tests check it)."""
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    return rng.standard_normal((8, 3)).astype(np.float32)


def reconstruct(video, out_dir, options, *, progress=None, should_cancel=None, on_head=None) -> Path:
    raw = Path(video).read_bytes()
    try:
        spec = json.loads(raw)
        assert isinstance(spec, dict)
    except (ValueError, AssertionError, UnicodeDecodeError) as e:
        raise MediaError(f"{video} is not a readable video", detail=str(e)) from e
    progress = progress or (lambda *a: None)
    if spec.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fail = spec.get("fail")
    if fail == "bad_media":
        raise MediaError("fake: the video stream is truncated", detail="ffmpeg: moov atom not found")
    steps, step_s = int(spec.get("steps", 4)), float(spec.get("step_s", 0.01))
    for stage in spec.get("stages", ["decode", "track", "fit"]):
        for k in range(steps + 1):
            progress(stage, k / steps, f"{stage} {k}/{steps}")
            if k < steps:
                time.sleep(step_s)
        if stage == "decode" and fail == "no_face":
            raise NoFaceError("fake: no face was detected in any frame")
    if spec.get("head"):  # the head first, as the real pipeline writes it before the fine stage
        on_head(_write_result(Path(out_dir), spec, raw, options, detail=spec.get("head_state", "pending")))
    if spec.get("hang_s"):
        time.sleep(float(spec["hang_s"]))  # alive, silent: what the server's hang watchdog is for
    if spec.get("gate"):
        end = time.monotonic() + GATE_TIMEOUT_S
        while not Path(spec["gate"]).exists() and time.monotonic() < end:
            progress("wait", 0.5, "waiting for the gate")
            time.sleep(0.02)
        progress("wait", 1.0, "gate open")
    if fail == "exception":
        raise RuntimeError("fake: CUDA out of memory")
    if fail == "crash" or (fail == "crash_once" and not Path(spec["marker"]).exists()):
        if fail == "crash_once":
            Path(spec["marker"]).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    out_dir = Path(out_dir)
    if spec.get("result"):
        return _write_real(out_dir, spec, detail="complete")
    (out_dir / "detail").mkdir(parents=True, exist_ok=True)
    for i in range(int(spec.get("n_detail", 3))):
        (out_dir / "detail" / f"{i:06d}.png").write_bytes(hashlib.sha256(raw + bytes([i])).digest() * 100)
    return _write_result(out_dir, spec, raw, options, detail="complete")


def _write_result(out_dir: Path, spec: dict, raw: bytes, options, *, detail: str) -> Path:
    if spec.get("result"):
        return _write_real(out_dir, spec, detail=detail)
    out_dir.mkdir(parents=True, exist_ok=True)
    audio_sha = hashlib.sha256(Path(options.audio).read_bytes()).hexdigest() if options.audio else ""
    meta = {"schema_version": "fake-1", "video_sha256": hashlib.sha256(raw).hexdigest(), "audio_sha256": audio_sha,
            "options": {"model": options.model, "device": options.device, "preview": options.preview},
            "detail": {"state": detail}}
    np.savez(out_dir / "result.npz", meta=np.array(json.dumps(meta)), frames=expected_frames(spec))
    (out_dir / "config.yaml").write_text(f"model: {options.model}\n")
    return out_dir / "result.npz"


def _write_real(out_dir: Path, spec: dict, *, detail: str) -> Path:
    """spec["result"], a real result with detail maps: its head (no maps, ``meta.detail.state``
    ``detail``), or with ``detail`` "complete" the whole of it, maps included."""
    import shutil

    from avface.result import load_result, write_result

    src = Path(spec["result"])
    res = load_result(src)
    meta = {k: v for k, v in res.meta.items() if k != "conventions"}
    if detail == "complete":
        shutil.copytree(src.parent / meta["detail"].get("folder", "detail"), out_dir / "detail", dirs_exist_ok=True)
        meta["detail"] = dict(meta["detail"], state="complete")
    else:
        meta["detail"] = {"n_maps": 0, "folder": "detail", "map_size": 0, "metres_per_unit": 0.0, "format": "png16",
                          "state": detail}
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_result(out_dir / "result.npz", dict(res.arrays), meta)


def validate(path) -> dict:
    with np.load(path) as z:
        if "meta" not in z:
            raise SchemaError(f"{path}: not a fake result")
        if "frames" not in z:  # a real result (spec "result")
            from avface.result import validate as validate_real

            return validate_real(Path(path))
        return json.loads(str(z["meta"]))
