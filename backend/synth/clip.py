"""The rendered clip's record (:class:`SynthClip`) and its ground-truth file (``demo_gt.npz``)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avface.errors import InputError

GT_FORMAT = "avface-synth-gt/1"

VIDEO_NAME = "demo.mp4"
WAV_NAME = "demo.wav"
GT_NAME = "demo_gt.npz"


@dataclass(frozen=True, eq=False)
class SynthClip:
    """A rendered demo clip and its ground truth (see the :mod:`avface.synth` docstring for conventions)."""

    video_path: Path
    wav_path: Path
    gt_path: Path
    fps: float
    n_frames: int
    width: int
    height: int
    gt_vertices: np.ndarray
    """(T, 468, 3) float32 metres, OpenCV camera frame; vertex i is MediaPipe landmark i."""
    K: np.ndarray
    """(3, 3) float64 intrinsics in continuous pixel coordinates."""
    occluded: np.ndarray
    """(T,) bool: the hand covers at least OCCLUDED_MIN_FRACTION of the lips."""
    occlusion_fraction: np.ndarray
    """(T,) float32: fraction of the lips' projected area under the hand."""
    occluder_span_s: tuple[float, float] | None
    """When the hand is in the frame, seconds; None without an occluder."""
    phonemes: list[tuple[str, float, float]]
    """(espeak phoneme, start_s, end_s) on the clip's time line."""
    words: list[tuple[str, float, float]]
    text: str
    seed: int
    neutral_vertices: np.ndarray
    """(468, 3) float32: the clip's identity in the model frame (y up), before pose."""
    expression_names: tuple[str, ...]
    expression_basis: np.ndarray
    """(E, 468, 3) float32 displacement fields in the model frame."""
    expression: np.ndarray
    """(T, E) float32 coefficients."""
    jaw_pose: np.ndarray
    """(T, 3) float32 axis-angle of the jaw joint."""
    global_orient: np.ndarray
    """(T, 3) float32 axis-angle of the head about the model's root joint (model frame)."""
    transl: np.ndarray
    """(T, 3) float32 metres, model frame."""
    model_to_camera: np.ndarray
    """(4, 4) float64: camera-frame point = model_to_camera @ posed model point."""

    @property
    def duration_s(self) -> float:
        return self.n_frames / self.fps

    def project(self, vertices: np.ndarray | None = None) -> np.ndarray:
        """(T, 468, 2) pixel positions of ``vertices`` (default: the ground truth) through K."""
        v = self.gt_vertices if vertices is None else np.asarray(vertices)
        uvw = v @ self.K.T
        return (uvw[..., :2] / uvw[..., 2:3]).astype(np.float32)


def save_gt(clip: SynthClip, audio_offset_s: float) -> None:
    meta = dict(format=GT_FORMAT, fps=clip.fps, n_frames=clip.n_frames, width=clip.width, height=clip.height,
                text=clip.text, seed=clip.seed, audio_offset_s=audio_offset_s,
                occluder_span_s=list(clip.occluder_span_s) if clip.occluder_span_s else None,
                phonemes=clip.phonemes, words=clip.words, expression_names=list(clip.expression_names),
                video=clip.video_path.name, wav=clip.wav_path.name,
                conventions="vertices: metres, OpenCV camera frame (x right, y down, z forward); pixels: continuous "
                            "(pixel i spans [i, i+1)); model frame: y up, z towards the viewer")
    tmp = clip.gt_path.with_name(clip.gt_path.stem + ".partial.npz")
    np.savez_compressed(
        tmp, meta=json.dumps(meta, allow_nan=False), gt_vertices=clip.gt_vertices, K=clip.K, occluded=clip.occluded,
        occlusion_fraction=clip.occlusion_fraction, neutral_vertices=clip.neutral_vertices,
        expression_basis=clip.expression_basis, expression=clip.expression, jaw_pose=clip.jaw_pose,
        global_orient=clip.global_orient, transl=clip.transl, model_to_camera=clip.model_to_camera,
    )
    tmp.replace(clip.gt_path)


def load_demo_gt(path) -> SynthClip:
    """Read ``demo_gt.npz`` (or the folder holding it) back into a :class:`SynthClip`; the
    video and wav paths point beside it."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / GT_NAME
    if not path.is_file():
        raise InputError(f"no synthetic clip ground truth at {path} (make one with make_demo_clip)")
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != GT_FORMAT:
            raise InputError(f"{path} is not a synthetic clip's ground truth ({GT_FORMAT}), format {meta.get('format')!r}")
        arrays = {k: z[k] for k in z.files if k != "meta"}
    span = meta["occluder_span_s"]
    return SynthClip(
        video_path=path.parent / meta["video"], wav_path=path.parent / meta["wav"], gt_path=path, fps=float(meta["fps"]),
        n_frames=int(meta["n_frames"]), width=int(meta["width"]), height=int(meta["height"]),
        gt_vertices=arrays["gt_vertices"], K=arrays["K"], occluded=arrays["occluded"].astype(bool),
        occlusion_fraction=arrays["occlusion_fraction"], occluder_span_s=tuple(span) if span else None,
        phonemes=[tuple(p) for p in meta["phonemes"]], words=[tuple(w) for w in meta["words"]], text=meta["text"],
        seed=int(meta["seed"]), neutral_vertices=arrays["neutral_vertices"],
        expression_names=tuple(meta["expression_names"]), expression_basis=arrays["expression_basis"],
        expression=arrays["expression"], jaw_pose=arrays["jaw_pose"], global_orient=arrays["global_orient"],
        transl=arrays["transl"], model_to_camera=arrays["model_to_camera"],
    )
