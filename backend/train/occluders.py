"""Synthetic occluders for training (docs/design.md section 2, step 4): shapes,
textures and motion of this module's own, apart from the benchmark's generator, so the
networks are never measured only on the occluders they were trained on.

An occluder lives in the face's own 2D frame: x right, y up, in inter-ocular units, origin
at the canonical face's centre (between the eyes and the mouth). Over a training window it
drifts, turns and breathes in size. It acts twice:

- on **network inputs** (:func:`occlude_window`): the landmarks under it are the tracker's
  guesses (its prior's mouth, wandering), the mouth's blendshapes drift, the per-region
  confidence is one minus the covered share of each region, as the hand detector sets it,
  and a face mostly covered is lost (not usable). The targets stay the clean ones: that is
  what pasting onto a clean window buys.
- on **pixels** (:func:`paste`): drawn over a frame with a texture, for making occluded
  clips that the real tracker then reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from matplotlib.path import Path as PolygonPath

from avface.core.topology import LEFT_EYE, LIPS, N_MESH_VERTICES, OUTER_EYE_CORNERS, RIGHT_EYE

SHAPES = ("ellipse", "polygon", "hand", "bar")
TEXTURES = ("solid", "skin", "noise", "stripes")
#: Outline points of every occluder shape.
OUTLINE_POINTS = 48


@dataclass(frozen=True)
class OccluderConfig:
    """How often and how training windows are occluded."""

    p_occlude: float = 0.5
    """Chance that a training window gets an occluder."""
    size_range: tuple[float, float] = (0.35, 1.1)
    """Occluder radius, inter-ocular distances."""
    speed_max: float = 0.06
    """Largest drift per frame, inter-ocular distances."""
    turn_max_rad: float = 0.05
    """Largest rotation per frame, radians."""
    lost_cover: float = 0.6
    """A frame whose face is covered more than this is lost by the detector (not usable)."""
    guess_noise: float = 0.01
    """Step of the random walk of a covered landmark's guessed offset, inter-ocular units."""


@dataclass(frozen=True)
class OccluderTrack:
    """One occluder over a window."""

    outlines: np.ndarray
    """(W, K, 2) outline per frame in the face frame, inter-ocular units."""
    shape: str
    texture: str
    colour: np.ndarray
    """(3,) uint8 RGB base colour."""
    seed: int
    """Seeds the texture's pattern."""


@lru_cache(maxsize=1)
def face_points_2d() -> np.ndarray:
    """(468, 2) the canonical face's x, y in inter-ocular units, centred: where the regions
    of the face lie in the occluder's frame."""
    from avface.models.canonical_mesh import load_canonical_mesh

    v = load_canonical_mesh().vertices.astype(np.float64)
    iod = np.linalg.norm(v[OUTER_EYE_CORNERS[0]] - v[OUTER_EYE_CORNERS[1]])
    p = v[:, :2] / iod
    return p - p.mean(0)


def _outline(rng: np.random.Generator, shape: str) -> np.ndarray:
    """(K, 2) unit-size outline of a shape about its centre."""
    a = np.linspace(0, 2 * np.pi, OUTLINE_POINTS, endpoint=False)
    if shape == "ellipse":
        rx, ry = rng.uniform(0.6, 1.0), rng.uniform(0.4, 1.0)
        return np.stack([rx * np.cos(a), ry * np.sin(a)], 1)
    if shape == "polygon":
        n = int(rng.integers(3, 8))
        corners = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = rng.uniform(0.6, 1.0, n)
        pts = np.stack([r * np.cos(corners), r * np.sin(corners)], 1)
        # resample the polygon's edges to K points
        closed = np.concatenate([pts, pts[:1]])
        seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
        s = np.concatenate([[0], np.cumsum(seg)])
        u = np.linspace(0, s[-1], OUTLINE_POINTS, endpoint=False)
        return np.stack([np.interp(u, s, closed[:, 0]), np.interp(u, s, closed[:, 1])], 1)
    if shape == "hand":
        # a palm with four fingers: radius swells at four finger directions on one side
        fingers = rng.uniform(0.3, 0.5)
        r = 0.6 + fingers * np.clip(np.cos(4 * (a - np.pi / 2)), 0, None) ** 4 * (np.sin(a) > 0)
        return np.stack([0.8 * r * np.cos(a), r * np.sin(a)], 1)
    if shape == "bar":
        w = rng.uniform(0.15, 0.35)
        box = np.array([[-1, -w], [1, -w], [1, w], [-1, w]])
        closed = np.concatenate([box, box[:1]])
        s = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(closed, axis=0), axis=1))])
        u = np.linspace(0, s[-1], OUTLINE_POINTS, endpoint=False)
        return np.stack([np.interp(u, s, closed[:, 0]), np.interp(u, s, closed[:, 1])], 1)
    raise ValueError(f"unknown occluder shape {shape!r}; known: {SHAPES}")


def random_track(rng: np.random.Generator, n_frames: int, config: OccluderConfig = OccluderConfig()) -> OccluderTrack:
    """An occluder that moves over the lower face for ``n_frames`` frames."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    base = _outline(rng, shape) * rng.uniform(*config.size_range)
    mouth = face_points_2d()[list(LIPS)].mean(0)
    # start near the mouth, drift in a random direction, turn and breathe a little
    start = mouth + rng.normal(scale=0.35, size=2)
    velocity = rng.uniform(-config.speed_max, config.speed_max, size=2)
    angle0, turn = rng.uniform(0, 2 * np.pi), rng.uniform(-config.turn_max_rad, config.turn_max_rad)
    t = np.arange(n_frames)
    centre = start + t[:, None] * velocity + 0.05 * np.sin(t[:, None] / 3.0 + rng.uniform(0, 6, 2))
    angle = angle0 + turn * t
    size = 1.0 + 0.1 * np.sin(t / 5.0 + rng.uniform(0, 6))
    c, s = np.cos(angle), np.sin(angle)
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)  # (W, 2, 2)
    # outlines[w, k] = size[w] * rot[w] @ base[k] + centre[w]
    outlines = size[:, None, None] * np.einsum("wij,kj->wki", rot, base) + centre[:, None]
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    if texture == "skin":
        colour = np.array([rng.uniform(150, 240), rng.uniform(100, 190), rng.uniform(80, 160)])
    else:
        colour = rng.uniform(0, 255, 3)
    return OccluderTrack(outlines, shape, texture, colour.astype(np.uint8), int(rng.integers(2**31)))


def region_cover(outlines: np.ndarray, face_points: np.ndarray | None = None) -> np.ndarray:
    """(W, 3) share of the mouth, eyes and whole-face points (face frame) inside each frame's
    outline, as avface.stages.tracking measures a hand's cover. face_points: (W, 468, 2) or None
    for the canonical face."""
    n = len(outlines)
    pts = np.broadcast_to(face_points_2d() if face_points is None else face_points, (n, N_MESH_VERTICES, 2))
    regions = (list(LIPS), list(LEFT_EYE + RIGHT_EYE), slice(None))
    cover = np.zeros((n, 3), np.float32)
    for w in range(n):
        inside = PolygonPath(outlines[w]).contains_points(pts[w])
        for r, ids in enumerate(regions):
            cover[w, r] = inside[ids].mean()
    return cover


def covered_points(outlines: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(W, N) bool: which of the (W, N, 2) or (N, 2) face-frame points each outline covers."""
    n = len(outlines)
    pts = np.broadcast_to(points, (n,) + np.shape(points)[-2:])
    return np.stack([PolygonPath(outlines[w]).contains_points(pts[w]) for w in range(n)])


def occlude_window(inputs: dict[str, np.ndarray], track: OccluderTrack, rng: np.random.Generator,
                   config: OccluderConfig = OccluderConfig()) -> dict[str, np.ndarray]:
    """The tracker's evidence of a window (W, ...) arrays named as ExpressionNet's inputs,
    as the detector would have reported it with the occluder over the face. Returns new
    arrays; the clean ones (the training targets) are untouched."""
    from avface.models.avnets import LOWER_FACE_LANDMARKS

    out = {k: np.array(v, copy=True) for k, v in inputs.items()}
    n = len(out["usable"])
    ids = list(LOWER_FACE_LANDMARKS)
    # lower-face points move with the mouth: the canonical position plus the frame's offsets
    pts = np.broadcast_to(face_points_2d(), (n, N_MESH_VERTICES, 2)).copy()
    pts[:, ids] += out["landmarks"][..., :2]
    cover = region_cover(track.outlines, pts)  # (W, 3)
    hidden = covered_points(track.outlines, pts[:, ids])  # (W, M)
    # the tracker's guess under the occluder: a pull towards its prior's (neutral) mouth,
    # plus a slow random walk
    pull = rng.uniform(0.2, 1.0)
    walk = np.cumsum(rng.normal(scale=config.guess_noise, size=(n, len(ids), 3)), axis=0)
    guess = (1 - pull) * out["landmarks"] + walk
    out["landmarks"] = np.where(hidden[..., None], guess, out["landmarks"]).astype(np.float32)
    mouth_hidden = cover[:, 0] > 0.3
    if mouth_hidden.any():
        drift = np.clip(out["blendshapes"] * rng.uniform(0.3, 1.0) + rng.normal(scale=0.05, size=out["blendshapes"].shape),
                        0.0, 1.0)
        out["blendshapes"] = np.where(mouth_hidden[:, None], drift, out["blendshapes"]).astype(np.float32)
    usable = out["usable"] > 0
    out["region_conf"] = (np.minimum(out["region_conf"], 1.0 - cover) * usable[:, None]).astype(np.float32)
    lost = cover[:, 2] > config.lost_cover
    out["usable"] = (usable & ~lost).astype(np.float32)
    for key in ("landmarks", "blendshapes", "region_conf"):
        out[key][lost] = 0.0
    return out


# --------------------------------------------------------------------------- pixels


def _texture(track: OccluderTrack, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 fill of the occluder."""
    rng = np.random.default_rng(track.seed)
    base = track.colour.astype(np.float32)
    if track.texture == "solid":
        img = np.broadcast_to(base, (h, w, 3)).copy()
    elif track.texture == "skin":
        img = base + rng.normal(scale=6.0, size=(h, w, 1))
    elif track.texture == "noise":
        import cv2

        noise = cv2.resize(rng.normal(scale=40.0, size=(max(h // 8, 1), max(w // 8, 1), 3)).astype(np.float32), (w, h))
        img = base + noise
    else:  # stripes
        period = rng.uniform(6, 20)
        phase = (np.arange(w)[None, :] + 0.5 * np.arange(h)[:, None]) / period
        img = base * (0.6 + 0.4 * (np.sin(2 * np.pi * phase) > 0))[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def face_to_pixels(face_points_px: np.ndarray) -> tuple[complex, complex]:
    """The 2D similarity z_px = a z_face + b (complex numbers; image y down) that best maps
    the canonical face frame onto a frame's (468, 2) landmark pixels."""
    src = face_points_2d()
    z = src[:, 0] - 1j * src[:, 1]  # the face frame's y is up, the image's down
    p = face_points_px[:N_MESH_VERTICES, 0] + 1j * face_points_px[:N_MESH_VERTICES, 1]
    zm, pm = z.mean(), p.mean()
    a = np.sum((p - pm) * np.conj(z - zm)) / np.sum(np.abs(z - zm) ** 2)
    return complex(a), complex(pm - a * zm)


def paste(frame: np.ndarray, outline_face: np.ndarray, face_points_px: np.ndarray, track: OccluderTrack) -> np.ndarray:
    """Draw the occluder's outline (K, 2, face frame) over an RGB frame (H, W, 3) uint8 whose
    face landmarks are (>=468, 2) pixels. Returns a new frame."""
    import cv2

    a, b = face_to_pixels(face_points_px)
    z = a * (outline_face[:, 0] - 1j * outline_face[:, 1]) + b
    poly = np.round(np.stack([z.real, z.imag], 1)).astype(np.int32)
    mask = np.zeros(frame.shape[:2], np.uint8)
    cv2.fillPoly(mask, [poly], 1)
    mask = cv2.GaussianBlur(mask.astype(np.float32), (3, 3), 0)[..., None]  # soft edge, as a real boundary
    fill = _texture(track, *frame.shape[:2])
    return np.clip(frame * (1 - mask) + fill * mask, 0, 255).astype(np.uint8)
