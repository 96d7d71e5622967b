"""Visual front end: MediaPipe FaceLandmarker (and HandLandmarker for hands over the face)
in VIDEO mode, streamed frame by frame, cached per clip by content hash.

Landmarks are stored in pixels: x, y in the frame, z as MediaPipe's relative depth scaled
by the frame width (MediaPipe gives z "roughly on the scale of x"), so the (x, y, z) triple
is a weak-perspective 3D point in pixel units.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from avface import media
from avface.config import TrackingConfig
from avface.core.assets import FACE_LANDMARKER, HAND_LANDMARKER, locate
from avface.errors import ModelFileError

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
    from avface.core.topology import LEFT_EYE, LIPS, RIGHT_EYE

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

    def detect(self, frame: np.ndarray, ts_ms: int, *, quiet: bool = False, hands: bool = True):
        """(face result, hand result or None) of one RGB frame at ``ts_ms``. ``quiet`` keeps
        the native chatter off the terminal: the graphs finish starting on the first frame."""
        image = self.mp.Image(image_format=self.mp.ImageFormat.SRGB, data=np.ascontiguousarray(frame))
        with quiet_native_stderr() if quiet else contextlib.nullcontext():
            res = self.face.detect_for_video(image, ts_ms)
            hres = self.hand.detect_for_video(image, ts_ms) if self.hand is not None and hands else None
        return res, hres

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
    cached = _read_cache(cache_file, progress)
    if cached is not None:
        return cached

    import time

    t0 = time.perf_counter()
    n = end - start
    buf = _Buffers.empty(n)
    regions = _region_ids()
    with quiet_native_stderr():
        lm = _Landmarkers(config)
    i = -1
    try:
        for i, frame in enumerate(media.iter_frames(info, start, end)):
            if i >= n:
                break
            if should_cancel is not None and should_cancel():
                from avface.errors import CancelledError

                raise CancelledError("cancelled during tracking")
            hands_now = i % max(config.hand_stride, 1) == 0
            res, hres = lm.detect(frame, int(round((start + i) * 1000.0 / info.fps)), quiet=i == 0, hands=hands_now)
            buf.store_face(i, res, frame, info.width, info.height)
            buf.store_hands(i, hres, info.width, info.height, regions, config.hand_margin)
            if progress and (i % 10 == 0 or i == n - 1):
                progress((i + 1) / n, f"frame {i + 1}/{n}")
    finally:
        lm.close()
    got = i + 1
    if got < n:
        # the container promised more frames than ffmpeg delivered: keep what decoded
        log.warning("video delivered %d of %d expected frames; the rest are treated as missing", got, n)
    if config.hands and config.hand_stride > 1:
        buf.fill_skipped_cover(got, config.hand_stride)
    out = buf.tracking(got, float(info.fps), info.width, info.height, start, time.perf_counter() - t0)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        out.save(cache_file)
    except OSError as e:  # caching is an optimisation; a read-only home must not fail the job
        log.warning("could not write tracking cache %s: %s", cache_file, e)
    return out


def _read_cache(cache_file: Path, progress) -> Tracking | None:
    if not cache_file.is_file():
        return None
    try:
        cached = Tracking.load(cache_file)
    except Exception as e:  # a damaged cache entry is rebuilt, never trusted
        log.warning("ignoring unreadable tracking cache %s: %s", cache_file, e)
        return None
    log.info("tracking read from cache %s", cache_file)
    if progress:
        progress(1.0, "tracking (cached)")
    cached.seconds = 0.0
    return cached


@dataclass
class _Buffers:
    """The per-frame arrays of a Tracking while the landmarkers fill them."""

    lmk: np.ndarray
    bs: np.ndarray
    tf: np.ndarray
    det: np.ndarray
    hands: np.ndarray
    cover: np.ndarray
    colors: np.ndarray
    names: tuple = ()

    @classmethod
    def empty(cls, n: int) -> "_Buffers":
        return cls(np.full((n, N_LANDMARKS, 3), np.nan, np.float32), np.full((n, N_BLENDSHAPES), np.nan, np.float32),
                   np.tile(np.eye(4, dtype=np.float32), (n, 1, 1)), np.zeros(n, bool),
                   np.full((n, MAX_HANDS, N_HAND_LANDMARKS, 2), np.nan, np.float32),
                   np.zeros((n, len(REGIONS)), np.float32), np.zeros((n, 468, 3), np.uint8))

    def store_face(self, i: int, res, frame: np.ndarray, w: int, h: int) -> None:
        if not res.face_landmarks:
            return
        self.lmk[i] = [(p.x * w, p.y * h, p.z * w) for p in res.face_landmarks[0]]
        self.det[i] = True
        if res.face_blendshapes:
            cats = res.face_blendshapes[0]
            self.bs[i] = [c.score for c in cats]
            if not self.names:
                self.names = tuple(c.category_name for c in cats)
        self.colors[i] = sample_colors(frame, self.lmk[i, :468, :2])
        if res.facial_transformation_matrixes:
            self.tf[i] = np.asarray(res.facial_transformation_matrixes[0], np.float32)

    def store_hands(self, i: int, hres, w: int, h: int, regions: dict[str, np.ndarray], hand_margin: float) -> None:
        if hres is None:
            return
        for k, hand in enumerate(hres.hand_landmarks[:MAX_HANDS]):
            self.hands[i, k] = [(p.x * w, p.y * h) for p in hand]
        if self.det[i] and hres.hand_landmarks:
            face_w = float(np.ptp(self.lmk[i, :468, 0]))
            hulls = _hand_hulls(self.hands[i], hand_margin * face_w)
            for r, region in enumerate(REGIONS):
                self.cover[i, r] = _cover_fraction(self.lmk[i, regions[region], :2], hulls)

    def fill_skipped_cover(self, got: int, stride: int) -> None:
        """Hand cover of the frames the hand landmarker skipped: the larger of the two tracked
        frames around each (a hand moves in and out over several frames; the larger keeps recall)."""
        tracked = np.arange(0, got, stride)
        for i in range(got):
            if i % stride:
                before = tracked[tracked < i][-1]
                after = tracked[tracked > i]
                around = self.cover[[before, after[0]]] if len(after) else self.cover[[before]]
                self.cover[i] = np.where(self.det[i], around.max(axis=0), 0.0)

    def tracking(self, got: int, fps: float, w: int, h: int, start: int, seconds: float) -> Tracking:
        s = slice(0, got)
        return Tracking(self.lmk[s], self.bs[s], self.names or _BLENDSHAPE_NAMES, self.tf[s], self.det[s],
                        self.hands[s], self.cover[s], self.colors[s], fps, w, h, start, seconds)


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
