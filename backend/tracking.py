"""Visual front end: MediaPipe FaceLandmarker (and HandLandmarker for hands over the face)
in VIDEO mode, streamed frame by frame, cached per clip by content hash.

Landmarks are stored in pixels: x, y in the frame, z as MediaPipe's relative depth scaled
by the frame width (MediaPipe gives z "roughly on the scale of x"), so the (x, y, z) triple
is a weak-perspective 3D point in pixel units.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import contextlib
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import media
from .assets import FACE_LANDMARKER, HAND_LANDMARKER, locate
from .config import TrackingConfig
from .errors import ModelFileError

log = logging.getLogger(__name__)

N_LANDMARKS = 478
N_BLENDSHAPES = 52
N_HAND_LANDMARKS = 21
MAX_HANDS = 2
#: Bumped whenever what is cached changes meaning.
TRACKER_VERSION = 2
#: Regions whose hand cover is measured: MediaPipe landmark ids per region.
REGIONS = ("mouth", "eyes", "face")


@dataclass
class Tracking:
    """Per-frame tracker output for frames [frame_start, frame_start + T)."""

    landmarks: np.ndarray  #: (T, 478, 3) float32 pixels; NaN where no face
    blendshapes: np.ndarray  #: (T, 52) float32 in [0, 1]; NaN where no face
    blendshape_names: tuple  #: (52,) MediaPipe category names ("_neutral", "browDownLeft", ...)
    transforms: np.ndarray  #: (T, 4, 4) MediaPipe facial transformation (canonical cm -> camera cm, y up)
    detected: np.ndarray  #: (T,) bool
    hands: np.ndarray  #: (T, 2, 21, 2) float32 pixels; NaN where no hand
    hand_cover: np.ndarray  #: (T, 3) fraction of the mouth / eyes / face landmarks under a hand
    colors: np.ndarray  #: (T, 468, 3) uint8 RGB of the (lightly blurred) frame at each landmark; 0 where no face
    fps: float
    width: int
    height: int
    frame_start: int
    seconds: float = 0.0  #: wall time the tracker took (0 when read from cache)

    @property
    def n_frames(self) -> int:
        return int(self.landmarks.shape[0])

    def save(self, path: Path) -> None:
        arrays = {k: v for k, v in dataclasses.asdict(self).items() if isinstance(v, np.ndarray)}
        meta = {k: v for k, v in dataclasses.asdict(self).items() if not isinstance(v, np.ndarray)}
        meta["blendshape_names"] = list(self.blendshape_names)
        # a unique temporary name: two workers tracking the same clip must not share one
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.npz")
        np.savez_compressed(tmp, meta=json.dumps(meta), **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Tracking":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in z.files if k != "meta"}
        meta["blendshape_names"] = tuple(meta["blendshape_names"])
        return cls(**arrays, **meta)


def default_cache_dir() -> Path:
    return Path(os.environ.get("AVFACE_CACHE_DIR", Path.home() / ".cache" / "avface")) / "tracking"


def sample_colors(frame: np.ndarray, points: np.ndarray, radius_px: int = 2) -> np.ndarray:
    """(N, 3) uint8 mean colour of a small box around each 2D point (N, 2) of an RGB frame:
    the appearance evidence for occlusion (a hand or an object over the mouth changes the
    colour under the lip and chin landmarks even when the tracker keeps drawing a mouth)."""
    import cv2

    h, w = frame.shape[:2]
    k = 2 * radius_px + 1
    blurred = cv2.blur(frame, (k, k))
    xy = np.clip(np.round(np.nan_to_num(points)).astype(int), 0, [w - 1, h - 1])
    return blurred[xy[:, 1], xy[:, 0]]


def _region_ids() -> dict[str, np.ndarray]:
    from avface.topology import LEFT_EYE, LIPS, RIGHT_EYE

    return {"mouth": np.asarray(LIPS), "eyes": np.asarray(LEFT_EYE + RIGHT_EYE), "face": np.arange(468)}


def _cover_fraction(points: np.ndarray, hulls: list[np.ndarray]) -> float:
    """Fraction of 2D points (N, 2) inside any of the convex hulls."""
    import cv2

    if not hulls:
        return 0.0
    inside = np.zeros(len(points), bool)
    for hull in hulls:
        h = hull.astype(np.float32).reshape(-1, 1, 2)
        inside |= np.array([cv2.pointPolygonTest(h, (float(x), float(y)), False) >= 0 for x, y in points])
    return float(inside.mean())


def _hand_hulls(hand_pts: np.ndarray, margin_px: float) -> list[np.ndarray]:
    import cv2

    hulls = []
    for pts in hand_pts:
        if np.isnan(pts).any():
            continue
        hull = cv2.convexHull(pts.astype(np.float32)).reshape(-1, 2)
        c = hull.mean(0)
        d = hull - c
        n = np.linalg.norm(d, axis=1, keepdims=True) + 1e-6
        hulls.append(c + d * (1 + margin_px / n))  # grow outwards by margin_px
    return hulls


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence file descriptor 2 for a moment: MediaPipe's native graph prints start-up
    chatter (absl warnings about delegates and feedback tensors) that no flag turns off and
    that buries the progress bars. Python-level errors still raise as usual."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded interpreters): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _Landmarkers:
    """The MediaPipe task objects for one clip (VIDEO mode needs increasing timestamps)."""

    def __init__(self, cfg: TrackingConfig):
        try:
            import mediapipe as mp
            from mediapipe.tasks.python import BaseOptions, vision
        except ImportError as e:  # pragma: no cover - mediapipe is a hard dependency
            raise ModelFileError(f"mediapipe is not installed ({e}); run `make setup`") from e
        self.mp = mp
        face_opts = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(locate(FACE_LANDMARKER))),
            running_mode=vision.RunningMode.VIDEO,
            num_faces=1,
            min_face_detection_confidence=cfg.min_detection_confidence,
            min_face_presence_confidence=cfg.min_presence_confidence,
            min_tracking_confidence=cfg.min_tracking_confidence,
            output_face_blendshapes=True,
            output_facial_transformation_matrixes=True,
        )
        self.face = vision.FaceLandmarker.create_from_options(face_opts)
        self.hand = None
        if cfg.hands:
            hand_opts = vision.HandLandmarkerOptions(
                base_options=BaseOptions(model_asset_path=str(locate(HAND_LANDMARKER))),
                running_mode=vision.RunningMode.VIDEO,
                num_hands=MAX_HANDS,
            )
            self.hand = vision.HandLandmarker.create_from_options(hand_opts)

    def close(self) -> None:
        self.face.close()
        if self.hand is not None:
            self.hand.close()


def track(
    info: "media.VideoInfo",
    start: int = 0,
    end: int | None = None,
    *,
    config: TrackingConfig = TrackingConfig(),
    cache_dir: Path | None = None,
    progress: Callable[[float, str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Tracking:
    """Track frames [start, end) of a probed video. A second call on the same file content,
    range and options reads the cache instead of running MediaPipe again."""
    start, end = info.frame_range(start, end)
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    key = media.content_hash(
        info.path, extra=json.dumps([TRACKER_VERSION, start, end, round(info.fps, 6), dataclasses.asdict(config)])
    )
    cache_file = cache_dir / f"{key[:32]}.npz"
    if cache_file.is_file():
        try:
            cached = Tracking.load(cache_file)
            log.info("tracking read from cache %s", cache_file)
            if progress:
                progress(1.0, "tracking (cached)")
            cached.seconds = 0.0
            return cached
        except Exception as e:  # a damaged cache entry is rebuilt, never trusted
            log.warning("ignoring unreadable tracking cache %s: %s", cache_file, e)

    import time

    t0 = time.perf_counter()
    n = end - start
    w, h = info.width, info.height
    lmk = np.full((n, N_LANDMARKS, 3), np.nan, np.float32)
    bs = np.full((n, N_BLENDSHAPES), np.nan, np.float32)
    tf = np.tile(np.eye(4, dtype=np.float32), (n, 1, 1))
    det = np.zeros(n, bool)
    hands = np.full((n, MAX_HANDS, N_HAND_LANDMARKS, 2), np.nan, np.float32)
    cover = np.zeros((n, len(REGIONS)), np.float32)
    colors = np.zeros((n, 468, 3), np.uint8)
    names: tuple = ()
    regions = _region_ids()
    with quiet_native_stderr():
        lm = _Landmarkers(config)
    mp = lm.mp
    i = -1
    try:
        for i, frame in enumerate(media.iter_frames(info, start, end)):
            if i >= n:
                break
            if should_cancel is not None and should_cancel():
                from .errors import CancelledError

                raise CancelledError("cancelled during tracking")
            image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(frame))
            ts_ms = int(round((start + i) * 1000.0 / info.fps))
            if i == 0:  # the graphs finish starting on the first frame, with more chatter
                with quiet_native_stderr():
                    res = lm.face.detect_for_video(image, ts_ms)
                    hres = lm.hand.detect_for_video(image, ts_ms) if lm.hand is not None else None
            else:
                res = lm.face.detect_for_video(image, ts_ms)
                hres = lm.hand.detect_for_video(image, ts_ms) if lm.hand is not None else None
            if res.face_landmarks:
                pts = res.face_landmarks[0]
                lmk[i] = [(p.x * w, p.y * h, p.z * w) for p in pts]
                det[i] = True
                if res.face_blendshapes:
                    cats = res.face_blendshapes[0]
                    bs[i] = [c.score for c in cats]
                    if not names:
                        names = tuple(c.category_name for c in cats)
                colors[i] = sample_colors(frame, lmk[i, :468, :2])
                if res.facial_transformation_matrixes:
                    tf[i] = np.asarray(res.facial_transformation_matrixes[0], np.float32)
            if hres is not None:
                for k, hand in enumerate(hres.hand_landmarks[:MAX_HANDS]):
                    hands[i, k] = [(p.x * w, p.y * h) for p in hand]
                if det[i] and hres.hand_landmarks:
                    face_w = float(np.ptp(lmk[i, :468, 0]))
                    hulls = _hand_hulls(hands[i], config.hand_margin * face_w)
                    for r, region in enumerate(REGIONS):
                        cover[i, r] = _cover_fraction(lmk[i, regions[region], :2], hulls)
            if progress and (i % 10 == 0 or i == n - 1):
                progress((i + 1) / n, f"frame {i + 1}/{n}")
    finally:
        lm.close()
    got = i + 1
    if got < n:
        # the container promised more frames than ffmpeg delivered: keep what decoded
        log.warning("video delivered %d of %d expected frames; the rest are treated as missing", got, n)
    if not names:
        names = _BLENDSHAPE_NAMES
    out = Tracking(lmk[:got], bs[:got], names, tf[:got], det[:got], hands[:got], cover[:got], colors[:got],
                   float(info.fps), w, h, start, time.perf_counter() - t0)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        out.save(cache_file)
    except OSError as e:  # caching is an optimisation; a read-only home must not fail the job
        log.warning("could not write tracking cache %s: %s", cache_file, e)
    return out


#: MediaPipe's blendshape categories in output order (used when no face gave names).
_BLENDSHAPE_NAMES = (
    "_neutral", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight", "eyeBlinkLeft", "eyeBlinkRight", "eyeLookDownLeft",
    "eyeLookDownRight", "eyeLookInLeft", "eyeLookInRight", "eyeLookOutLeft", "eyeLookOutRight", "eyeLookUpLeft",
    "eyeLookUpRight", "eyeSquintLeft", "eyeSquintRight", "eyeWideLeft", "eyeWideRight", "jawForward", "jawLeft",
    "jawOpen", "jawRight", "mouthClose", "mouthDimpleLeft", "mouthDimpleRight", "mouthFrownLeft",
    "mouthFrownRight", "mouthFunnel", "mouthLeft", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthPressLeft",
    "mouthPressRight", "mouthPucker", "mouthRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower",
    "mouthShrugUpper", "mouthSmileLeft", "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight",
    "mouthUpperUpLeft", "mouthUpperUpRight", "noseSneerLeft", "noseSneerRight",
)
