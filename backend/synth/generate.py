"""Putting a clip together: validate the arguments, build the face, speech, animation,
scene and hand from one seed, render the frames and write the files."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from avface.errors import InputError, OutputError
from avface.synth.animation import Animation, animate
from avface.synth.camera import intrinsics, model_to_camera
from avface.synth.clip import GT_NAME, VIDEO_NAME, WAV_NAME, SynthClip, save_gt
from avface.synth.common import linear_to_srgb
from avface.synth.face import EXPRESSION_NAMES, Face, build_face
from avface.synth.occluder import OCCLUDED_MIN_FRACTION, Hand, draw_hand, make_hand, occluder_span
from avface.synth.renderer import SUPERSAMPLE
from avface.synth.scene import Scene
from avface.synth.speech import AUDIO_RATE_HZ, default_text, place_speech
from avface.synth.wrinkles import Wrinkles, make_wrinkles

#: The skin detail's ground truth beside a clip rendered with ``detail=True``.
DETAIL_GT_NAME = "demo_detail.npz"
DETAIL_GT_SIZE = 256
"""Side of the ground-truth height maps in ``demo_detail.npz`` (the fine stage's CPU map size)."""

log = logging.getLogger(__name__)


def _render_frames(scene: Scene, anim: Animation, verts_cam: np.ndarray, fps: float,
                  hand: Hand | None, timings: list | None = None,
                  coverage: np.ndarray | None = None, wrinkles: Wrinkles | None = None) -> Iterator[np.ndarray]:
    """Yield (H, W, 3) uint8 RGB frames; fills ``coverage[t]`` with the fraction of the lips
    under the hand and appends per-frame render seconds to ``timings``; ``wrinkles`` shades
    the face's skin detail."""
    from avface.core.topology import LIPS_LOWER_OUTER, LIPS_UPPER_OUTER

    r = scene.renderer
    s = r.s
    lip_ring = np.asarray(LIPS_UPPER_OUTER + LIPS_LOWER_OUTER[::-1])
    for k in range(len(verts_cam)):
        t0 = time.perf_counter()
        v = verts_cam[k]
        bump = None if wrinkles is None else wrinkles.gradient(anim.expression[k])
        img = r.render(scene.layers(k, anim, v, tangents=bump is not None), scene.background, scene.face.texture,
                       scene.eye, scene.light, bump=bump)
        if hand is not None:
            xy = r.project(v.astype(np.float64))
            mouth = xy[lip_ring].mean(0)
            face_w = float(np.linalg.norm(xy[454] - xy[234]))
            drawn = draw_hand(img, hand, k, k / fps, mouth, face_w)
            if drawn is not None and coverage is not None:
                # the hand's cover of the lips' projected area, at the render's resolution
                lips = np.zeros(img.shape[:2], np.uint8)
                cv2.fillPoly(lips, [np.round((xy[lip_ring] - 0.5) * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
                area = float(lips.sum())
                roi, mask = drawn
                coverage[k] = float((mask * lips[roi]).sum()) / area if area > 0 else 0.0
        small = cv2.resize(img, (r.w // s, r.h // s), interpolation=cv2.INTER_AREA) if s > 1 else img
        frame = (np.clip(linear_to_srgb(small), 0, 1) * 255.0 + 0.5).astype(np.uint8)
        if timings is not None:
            timings.append(time.perf_counter() - t0)
        yield frame


def _ground_truth(scene: Scene, anim: Animation) -> np.ndarray:
    """(T, 468, 3) float32 camera-frame vertices through the canonical model."""
    import torch

    from avface.models.base import FaceParams

    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    n = len(anim.expression)
    params = FaceParams.zeros(n, 0, anim.expression.shape[1])
    params = FaceParams(params.betas, t(anim.expression), t(anim.global_orient), params.neck_pose, t(anim.jaw_pose),
                        params.leye_pose, params.reye_pose, t(anim.transl))
    with torch.no_grad():
        v = scene.model.forward(params).vertices.numpy().astype(np.float64)
    m = scene.m2c
    return (v @ m[:3, :3].T + m[:3, 3]).astype(np.float32)


@dataclass
class _Prepared:
    """Everything a clip needs before its frames are drawn."""

    n_frames: int
    text: str
    wave: np.ndarray  # (N,) float32 at AUDIO_RATE_HZ
    phonemes: list
    words: list
    audio_offset_s: float
    face: Face
    K: np.ndarray
    m2c: np.ndarray
    scene: Scene
    anim: Animation
    span: tuple[float, float] | None
    hand: Hand | None
    gt: np.ndarray  # (T, 468, 3) camera frame


def _prepare(seed: int, duration_s: float, fps: float, size: int, text: str | None, occluder: bool,
             occluder_span_s, supersample: int) -> _Prepared:
    from avface.synth.tts import synthesise

    if not (isinstance(size, (int, np.integer)) and 64 <= size <= 4096 and size % 2 == 0):
        # even, because H.264 in yuv420p needs even frame sizes
        raise InputError(f"size must be an even number of pixels in [64, 4096], got {size!r}")
    if not (isinstance(supersample, (int, np.integer)) and 1 <= supersample <= 4):
        raise InputError(f"supersample must be an integer in [1, 4], got {supersample!r}")
    if not (fps > 0 and math.isfinite(fps)):
        raise InputError(f"fps must be positive, got {fps!r}")
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise InputError(f"duration_s must be positive, got {duration_s!r}")
    n_frames = int(round(duration_s * fps))
    if n_frames < 1:
        raise InputError(f"a {duration_s} s clip at {fps} fps has no frames")
    duration_s = n_frames / fps
    rng = np.random.default_rng(seed)
    spoken = text if text is not None else default_text(duration_s)
    speech = synthesise(spoken)
    wave, phonemes, words, offset = place_speech(speech, duration_s)

    face = build_face(rng)
    K = intrinsics(size, size)
    m2c = model_to_camera(face.neutral, K, size)
    scene = Scene(rng, face, K, m2c, size, size, supersample)
    anim = animate(phonemes, n_frames, fps, rng)
    span = None
    hand = None
    if occluder:
        if occluder_span_s is not None:
            a, b = (float(x) for x in occluder_span_s)
            if not 0 <= a < b:
                raise InputError(f"occluder_span_s must be (start, end) with 0 <= start < end, got {occluder_span_s!r}")
            span = (a, b)
        else:
            span = occluder_span(rng, phonemes, duration_s)
        hand = make_hand(rng, span, n_frames, fps, face.skin)
    gt = _ground_truth(scene, anim)
    return _Prepared(n_frames, spoken, wave, phonemes, words, offset, face, K, m2c, scene, anim, span, hand, gt)


def make_demo_clip(out_dir, *, seed: int = 0, duration_s: float = 6.0, fps: float = 25, size: int = 512,
                   text: str | None = None, occluder: bool = True,
                   occluder_span_s: tuple[float, float] | None = None,
                   supersample: int = SUPERSAMPLE, detail: bool = False) -> SynthClip:
    """Render the synthetic talking-face clip into ``out_dir``: ``demo.mp4`` (H.264 video
    with the speech as AAC), ``demo.wav`` (16 kHz mono) and ``demo_gt.npz`` (ground truth,
    read back with :func:`load_demo_gt`). Same arguments, same clip: the ground truth and
    the frames depend only on them.

    ``text`` defaults to English sentences that fill the clip; speech starts after
    LEAD_SILENCE_S. With ``occluder`` a hand slides over the mouth for OCCLUDER_SPAN_S
    (seeded, while someone speaks) or over ``occluder_span_s``. With ``detail`` the skin has
    folds and wrinkles (:mod:`.wrinkles`, from a random stream of their own: nothing else in
    the clip changes) and ``demo_detail.npz`` holds their height maps at DETAIL_GT_SIZE^2:
    ``static`` (S, S) and ``dynamic`` (E, S, S) metres, height = static + expression @ dynamic.
    """
    from avface import media

    out_dir = Path(out_dir).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder {out_dir}: {e.strerror or e}") from e
    t_start = time.perf_counter()
    p = _prepare(seed, duration_s, fps, size, text, occluder, occluder_span_s, supersample)
    wav_path = media.write_wav(out_dir / WAV_NAME, p.wave, AUDIO_RATE_HZ)
    coverage = np.zeros(p.n_frames, np.float32)
    timings: list[float] = []
    wrinkles = None
    if detail:
        wrinkles = make_wrinkles(np.random.default_rng([int(seed), 7]), p.face.uv, len(EXPRESSION_NAMES),
                                 EXPRESSION_NAMES)
        static, dynamic = wrinkles.resized(DETAIL_GT_SIZE)
        np.savez_compressed(out_dir / DETAIL_GT_NAME, static=static.astype(np.float32),
                            dynamic=dynamic.astype(np.float32), expression_names=np.array(EXPRESSION_NAMES))
    elif (out_dir / DETAIL_GT_NAME).exists():
        (out_dir / DETAIL_GT_NAME).unlink()
    frames = _render_frames(p.scene, p.anim, p.gt, fps, p.hand, timings, coverage, wrinkles)
    video_path = media.write_video(frames, out_dir / VIDEO_NAME, fps, audio=wav_path)
    occluded = coverage >= OCCLUDED_MIN_FRACTION
    clip = SynthClip(
        video_path=Path(video_path), wav_path=Path(wav_path), gt_path=out_dir / GT_NAME, fps=float(fps),
        n_frames=p.n_frames, width=size, height=size, gt_vertices=p.gt, K=p.K, occluded=occluded,
        occlusion_fraction=coverage, occluder_span_s=p.span, phonemes=p.phonemes, words=p.words, text=p.text,
        seed=int(seed), neutral_vertices=p.face.neutral, expression_names=EXPRESSION_NAMES,
        expression_basis=p.face.basis, expression=p.anim.expression, jaw_pose=p.anim.jaw_pose,
        global_orient=p.anim.global_orient, transl=p.anim.transl, model_to_camera=p.m2c,
    )
    save_gt(clip, p.audio_offset_s)
    log.info("demo clip: %d frames %dx%d in %.1f s (render %.1f ms/frame), %d occluded, text %r", p.n_frames, size,
             size, time.perf_counter() - t_start, 1e3 * float(np.mean(timings)) if timings else 0.0,
             int(occluded.sum()), p.text)
    return clip
