"""The fine stage's losses, the carrying of detail across occlusions, and the detail maps of
the result (DESIGN.md sections 2.3 and 5; docs/fine_stage.md).

Losses (AVFace's fine loss without ID-MRF, see docs/fine_stage.md), all in UV space:

    L = photometric + lambda_n * normal + lambda_s * symmetry + lambda_d * |D|_1

- photometric: mean |albedo * shading(n_d) - I| over trusted texels, n_d the normals of the
  detailed surface (:func:`avface.uvspace.detail_normals`);
- normal: mean |Lap(n_d) - Lap(n_s)| with n_s the normals that the frame's shading implies
  (:func:`avface.shading.shading_normals`), the pseudo ground truth that replaces the
  paper's pretrained normal network; Laplacians over the 4-neighbourhood of the texel grid;
- symmetry: mean |D - D(mirror)| over texels whose mirror image is on the face;
- |D|_1: mean |D| over the face, metres.

Texels that are not trusted (hidden, turned away, or occluded according to the visual
confidence) get no photometric and no normal loss: an occluder's edges are not evidence of
detail. Their displacement is then carried from the nearest trusted frames
(:func:`carry_displacement`).

Detail maps: one 16-bit greyscale PNG per frame, ``detail/frame_NNNNNN.png``, row 0 at the
top (v = 1); displacement along the coarse normal in metres is
``(value - offset) * metres_per_unit`` (:class:`DetailEncoding`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .errors import OutputError, SchemaError
from . import shading
from .result import ensure_writable
from .shading import render

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FineLossConfig:
    """Weights of the fine loss; the defaults are the paper's (DESIGN.md section 2), with D in
    metres as in DECA, whose detail stage AVFace's follows."""

    w_photo: float = 1.0
    """Photometric term (intensity units, [0, 1])."""
    lambda_n: float = 10.0
    """Laplacian-of-normals term against the shading-implied normals."""
    lambda_s: float = 5e-3
    """Symmetry of D across the face's mirror plane (metres)."""
    lambda_d: float = 5e-3
    """L1 of D (metres)."""
    normal_sigma_texels: float = 2.0
    """Low-pass (Gaussian, texels at 256^2, scaled with the map size) applied before the
    normal term's Laplacian; 0 is the paper's plain Laplacian. The shading-implied normals
    are solved per texel, so their plain Laplacian is mostly noise. Measured on the synthetic
    clip of tests/test_fine_adapt.py (held-out gain / correlation of D with the truth):
    0 -> 0.34 / 0.40, 2 -> 0.40 / 0.55, 4 -> 0.39 / 0.62, 8 -> 0.51 / 0.65, no normal term
    0.57 / 0.64. 2 is the mild choice: its ripples are 17 texels long at 256^2, real
    wrinkles a few texels, which a wider low-pass would not see."""
    min_trust: float = 0.5
    """A texel's confidence must reach this for it to count as trusted; above it the
    confidence weights the texel's photometric and normal terms."""


def _weight(valid: torch.Tensor, min_trust: float) -> torch.Tensor:
    """(B, S, S) float weights from a bool mask or a confidence in [0, 1]."""
    if valid.dtype == torch.bool:
        return valid.float()
    return torch.where(valid >= min_trust, valid, torch.zeros_like(valid))


def _masked_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x * w).sum() / w.sum().clamp_min(1e-12)


def photometric_loss(image_uv: torch.Tensor, albedo: torch.Tensor, sh: torch.Tensor, normals: torch.Tensor,
                     weight: torch.Tensor) -> torch.Tensor:
    """Mean absolute colour residual over weighted texels.

    image_uv: (B, S, S, C); albedo: (S, S, C); sh: (B, 9, C); normals: (B, S, S, 3) (the
    detailed ones); weight: (B, S, S) float."""
    residual = (render(albedo, normals, sh) - image_uv).abs().mean(-1)  # (B, S, S)
    return _masked_mean(residual, weight)


def laplacian(x: torch.Tensor, covered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """4-neighbour Laplacian of maps x (B, S, S, C). covered: (B, S, S) bool. Returns
    (Lap x (B, S, S, C), defined (B, S, S) bool: the texel and its four neighbours are covered)."""
    pad = F.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate").permute(0, 2, 3, 1)
    lap = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:] - 4.0 * x
    c = F.pad(covered.float(), (1, 1, 1, 1))  # (B, S + 2, S + 2), 0 outside the map
    defined = (c[:, 1:-1, 1:-1] * c[:, :-2, 1:-1] * c[:, 2:, 1:-1] * c[:, 1:-1, :-2] * c[:, 1:-1, 2:]) > 0
    return lap, defined


def masked_gaussian(x: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian low-pass of maps x (B, S, S, C) over mask (B, S, S) only (normalised
    convolution: the empty background does not pull values to 0 at the borders); 0 outside."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    r = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    b, s, _, c = x.shape
    m = mask.to(x.dtype)

    def sep(t):  # (N, 1, S, S)
        t = F.conv2d(t, g.view(1, 1, 1, -1), padding=(0, radius))
        return F.conv2d(t, g.view(1, 1, -1, 1), padding=(radius, 0))

    num = sep((x * m[..., None]).permute(0, 3, 1, 2).reshape(b * c, 1, s, s)).view(b, c, s, s).permute(0, 2, 3, 1)
    den = sep(m[:, None])[:, 0]
    return num / den.clamp_min(1e-6)[..., None] * m[..., None]


def normal_loss(normals: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
    """Mean |Lap(normals) - Lap(target)| (summed over x, y, z) where the weight of the texel
    and of its four neighbours is positive. normals, target: (B, S, S, 3); weight (B, S, S).
    With ``sigma`` > 0 (texels), a Laplacian of Gaussian: the difference is low-passed over
    the weighted texels first, so per-texel noise in the target does not dominate."""
    diff = masked_gaussian(normals - target, weight > 0, sigma)
    lap, defined = laplacian(diff, weight > 0)
    return _masked_mean(lap.abs().sum(-1), weight * defined)


def symmetry_loss(displacement: torch.Tensor, mirror: torch.Tensor, mirror_ok: torch.Tensor) -> torch.Tensor:
    """Mean |D - D(mirror)| over texels whose mirror is on the face. displacement: (B, S, S);
    mirror: (S, S) long flat texel index (:func:`avface.uvspace.mirror_texels`); mirror_ok:
    (S, S) bool."""
    b = displacement.shape[0]
    flat = displacement.reshape(b, -1)
    mirrored = flat[:, mirror.reshape(-1).clamp_min(0)].view_as(displacement)
    return _masked_mean((displacement - mirrored).abs(), mirror_ok.expand_as(displacement).float())


def displacement_l1(displacement: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """Mean |D| over the covered texels, metres."""
    return _masked_mean(displacement.abs(), covered.expand_as(displacement).float())


def fine_loss(cfg: FineLossConfig, *, image_uv: torch.Tensor, albedo: torch.Tensor, sh: torch.Tensor,
              detail_normals: torch.Tensor, shading_normals: torch.Tensor, displacement: torch.Tensor,
              trust: torch.Tensor, covered: torch.Tensor, mirror: torch.Tensor, mirror_ok: torch.Tensor
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """The fine stage's loss for a batch of frames. Returns (total, {term: value}).

    trust: (B, S, S) bool or confidence in [0, 1]: visible, facing and not occluded;
    covered: (S, S) bool texels of the layout. Untrusted texels get no photometric and no
    normal loss; D is regularised everywhere on the face.
    """
    w = _weight(trust, cfg.min_trust) * covered.float()
    terms = {
        "photometric": photometric_loss(image_uv, albedo, sh, detail_normals, w),
        "normal": normal_loss(detail_normals, shading_normals, w,
                              cfg.normal_sigma_texels * displacement.shape[-1] / 256.0),
        "symmetry": symmetry_loss(displacement, mirror, mirror_ok),
        "l1": displacement_l1(displacement, covered),
    }
    total = (cfg.w_photo * terms["photometric"] + cfg.lambda_n * terms["normal"]
             + cfg.lambda_s * terms["symmetry"] + cfg.lambda_d * terms["l1"])
    return total, {k: float(v.detach()) for k, v in terms.items()}


def carry_displacement(displacement: np.ndarray, trusted: np.ndarray) -> np.ndarray:
    """(T, S, S) displacement with every untrusted texel taken from its nearest trusted frames:
    linear in time between the trusted frames before and after, the nearest one at the ends
    of the clip, unchanged for a texel that no frame trusts. Vectorised over texels.

    displacement: (T, S, S) metres; trusted: (T, S, S) bool.
    """
    d = np.asarray(displacement, np.float64)
    ok = np.asarray(trusted, bool)
    if d.shape != ok.shape or d.ndim != 3:
        raise ValueError(f"expected matching (T, S, S) maps, got {d.shape} and {ok.shape}")
    t = np.arange(d.shape[0])[:, None, None]
    # index of the last trusted frame at or before t, and of the first at or after t (-1 / T if none)
    prev = np.maximum.accumulate(np.where(ok, t, -1), axis=0)
    nxt = np.minimum.accumulate(np.where(ok, t, d.shape[0])[::-1], axis=0)[::-1]
    has_prev, has_next = prev >= 0, nxt < d.shape[0]
    d_prev = np.take_along_axis(d, np.clip(prev, 0, None), axis=0)
    d_next = np.take_along_axis(d, np.clip(nxt, None, d.shape[0] - 1), axis=0)
    span = np.maximum(nxt - prev, 1)
    a = np.clip((t - prev) / span, 0.0, 1.0)
    between = (1 - a) * d_prev + a * d_next
    carried = np.where(has_prev & has_next, between, np.where(has_prev, d_prev, np.where(has_next, d_next, d)))
    return np.where(ok, d, carried).astype(np.asarray(displacement).dtype)


# --------------------------------------------------------------------------- a clip in UV space


@dataclass(frozen=True, eq=False)
class ClipUV:
    """A clip's frames unwrapped into UV space, with how far each texel is trusted. The
    geometry (V_c, N_c) is not stored: it is recomputed from the vertices per batch
    (:func:`avface.uvspace.texel_geometry`), which costs less than holding it at 512^2."""

    image: torch.Tensor  #: (T, S, S, 3) uint8, the unwrapped frames (RGB)
    trust: torch.Tensor  #: (T, S, S) float32 in [0, 1]: visible x confidence; 0 = no evidence

    def frames(self, index) -> torch.Tensor:
        """(B, S, S, 3) float32 in [0, 1] of the frames at ``index``."""
        return self.image[index].float() / 255.0


def unwrap_clip(frames, vertices: torch.Tensor, faces, raster, intrinsics, *, confidence: torch.Tensor | None = None,
                chunk: int = 16, occlusion_test: bool = True) -> ClipUV:
    """Unwrap every frame of a clip into UV space.

    frames: an iterable of (H, W, 3) uint8 RGB frames (a decoder's stream, or an array
    (T, H, W, 3)); vertices: (T, V, 3) camera-frame coarse (+ lips) vertices, the result's
    ``vertices``; intrinsics: (3, 3); confidence: (T, S, S) per-texel visual confidence
    (:func:`avface.uvspace.confidence_map`), or None to trust every visible texel. Frames are
    processed ``chunk`` at a time, so memory holds one chunk of full frames.
    """
    from . import uvspace

    k = torch.as_tensor(np.asarray(intrinsics), dtype=torch.float32, device=vertices.device)
    covered = uvspace.texel_mask(raster, vertices.device)
    images, trusts = [], []
    buffer: list[np.ndarray] = []
    start = 0

    def flush():
        nonlocal start
        batch = torch.as_tensor(np.stack(buffer), device=vertices.device)  # (B, H, W, 3) uint8
        b = batch.shape[0]
        if start + b > vertices.shape[0]:
            raise ValueError(f"more frames than vertex sets ({vertices.shape[0]}): the mesh must cover every frame")
        v = vertices[start:start + b].float()
        points, normals = uvspace.texel_geometry(raster, faces, v)
        unwrapped, _ = uvspace.unwrap(batch.permute(0, 3, 1, 2).float(), points, k)
        vis = uvspace.visibility(points, normals, k, tuple(batch.shape[1:3]), covered, occlusion_test=occlusion_test)
        trust = vis.float()
        if confidence is not None:
            trust = trust * confidence[start:start + b].to(trust)
        images.append(unwrapped.round().clamp(0, 255).to(torch.uint8))
        trusts.append(trust)
        start += b
        buffer.clear()

    for frame in frames:
        f = np.asarray(frame)
        if f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8:
            raise ValueError(f"expected (H, W, 3) uint8 RGB frames, got {f.dtype} {f.shape}")
        buffer.append(f)
        if len(buffer) == chunk:
            flush()
    if buffer:
        flush()
    if start != vertices.shape[0]:
        raise ValueError(f"got {start} frames for {vertices.shape[0]} vertex sets")
    return ClipUV(torch.cat(images), torch.cat(trusts))


def photo_residual(image_uv: torch.Tensor, albedo: torch.Tensor, sh: torch.Tensor, normals: torch.Tensor,
                   weight: torch.Tensor) -> float:
    """Mean absolute photometric residual over weighted texels, in 8-bit intensity units
    (the benchmark's ``photo_residual_coarse`` with the coarse normals, ``_detail`` with the
    detailed ones). Shapes as :func:`photometric_loss`."""
    with torch.no_grad():
        return 255.0 * float(photometric_loss(image_uv, albedo, sh, normals, weight.float()))


def detail_occluder_ratio(d_occluded: np.ndarray, d_clean: np.ndarray, frames, region: np.ndarray) -> float:
    """The benchmark's ``detail_occluder_ratio``: mean |D| over ``region`` (S, S) bool (the
    mouth's texels) on ``frames`` of the occluded variant of a clip, divided by the same on
    the same frames of the clean clip. 1 means the occluder left no imprint; the issue asks
    for at most 1.3. d_occluded, d_clean: (T, S, S) metres."""
    frames = np.asarray(frames, int)
    if len(frames) == 0 or not np.asarray(region, bool).any():
        raise ValueError("detail_occluder_ratio needs at least one frame and one region texel")
    occ = np.abs(np.asarray(d_occluded)[frames][:, region]).mean()
    clean = np.abs(np.asarray(d_clean)[frames][:, region]).mean()
    return float(occ / clean) if clean > 0 else (1.0 if occ == 0 else math.inf)


PREVIEW_ALBEDO = 0.75
"""Grey of the shaded preview surface."""


def preview_light() -> torch.Tensor:
    """(9, 1) a key light from the upper left and in front (camera frame), for previews."""
    sh = torch.zeros(9, 1)
    sh[0], sh[1], sh[2], sh[3] = 0.8, -0.35, -0.55, -0.3
    return sh


def shaded_detail_panel(vertices: torch.Tensor, faces, raster, intrinsics, image_size: tuple[int, int],
                        displacement: torch.Tensor | None = None) -> np.ndarray:
    """(H, W, 3) uint8: the surface drawn grey under :func:`preview_light`, with the detail's
    normals when ``displacement`` (S, S) metres is given, the coarse ones otherwise: the
    preview's second panel and the report's before/after pictures. vertices: (V, 3) camera
    frame; the background is black."""
    from . import uvspace

    v = vertices[None].float()
    points, normals = uvspace.texel_geometry(raster, faces, v)
    covered = uvspace.texel_mask(raster, v.device)
    k = torch.as_tensor(np.asarray(intrinsics), dtype=torch.float32, device=v.device)
    vis = uvspace.visibility(points, normals, k, image_size, covered)  # coarse: one silhouette for both panels
    if displacement is not None:
        normals = uvspace.detail_normals(points, normals, displacement[None].to(points), covered)
    grey = PREVIEW_ALBEDO * shading.shading(normals, preview_light().to(v.device)[None])  # (1, S, S, 1)
    image, _ = uvspace.splat(grey.expand(-1, -1, -1, 3), points, k, image_size, vis)
    return (image[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


# --------------------------------------------------------------------------- detail maps

DETAIL_DIR = "detail"
DETAIL_FORMAT = "png16"
_PNG_MAX = 65535


@dataclass(frozen=True)
class DetailEncoding:
    """How a 16-bit PNG value maps to a displacement: D = (value - offset) * metres_per_unit,
    along the coarse mesh's normal (V_d = V_c + D * N_c). Written as ``meta["detail"]``."""

    size: int  #: maps are size x size texels over the model's UV layout, row 0 at v = 1
    metres_per_unit: float
    offset: int  #: the value of zero displacement
    format: str = DETAIL_FORMAT
    n_frames: int = 0

    @classmethod
    def for_range(cls, size: int, max_displacement_m: float, n_frames: int = 0) -> "DetailEncoding":
        """Symmetric range +-max_displacement_m over the whole 16 bits, zero at 32768."""
        if max_displacement_m <= 0:
            raise ValueError(f"max_displacement_m must be positive, got {max_displacement_m}")
        return cls(int(size), float(max_displacement_m) / 32767.0, 32768, DETAIL_FORMAT, int(n_frames))

    def to_meta(self) -> dict:
        """meta.detail, with what Blender's Displace modifier needs: with the image as its
        texture (values read as value / 65535), midlevel and strength reproduce D in metres."""
        return {**asdict(self), "dir": DETAIL_DIR, "pattern": "frame_{:06d}.png",
                "blender_midlevel": self.offset / _PNG_MAX, "blender_strength": self.metres_per_unit * _PNG_MAX}

    @classmethod
    def from_meta(cls, meta: dict) -> "DetailEncoding":
        try:
            return cls(int(meta["size"]), float(meta["metres_per_unit"]), int(meta["offset"]), str(meta["format"]),
                       int(meta.get("n_frames", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise SchemaError(f"meta.detail is incomplete or malformed ({e}); expected size, metres_per_unit, "
                              f"offset and format") from e

    def encode(self, displacement: np.ndarray) -> np.ndarray:
        """(S, S) metres -> (S, S) uint16 (clipped to the range)."""
        v = np.rint(np.asarray(displacement, np.float64) / self.metres_per_unit) + self.offset
        return np.clip(v, 0, _PNG_MAX).astype(np.uint16)

    def decode(self, values: np.ndarray) -> np.ndarray:
        """(S, S) uint16 -> (S, S) float32 metres."""
        return ((np.asarray(values, np.float64) - self.offset) * self.metres_per_unit).astype(np.float32)


def detail_path(out_dir, frame: int) -> Path:
    return Path(out_dir) / DETAIL_DIR / f"frame_{frame:06d}.png"


def write_detail_maps(out_dir, displacement: np.ndarray, encoding: DetailEncoding) -> list[Path]:
    """Write (T, S, S) displacement maps (metres) as ``out_dir/detail/frame_NNNNNN.png``,
    16-bit greyscale through OpenCV's PNG writer (already a dependency; it writes uint16
    arrays as 16-bit PNG). Returns the paths."""
    d = np.asarray(displacement)
    if d.ndim != 3 or d.shape[1:] != (encoding.size, encoding.size):
        raise ValueError(f"expected (T, {encoding.size}, {encoding.size}) displacement maps, got {d.shape}")
    folder = Path(out_dir) / DETAIL_DIR
    ensure_writable(folder, "the detail-map folder")
    paths = []
    for t in range(d.shape[0]):
        p = detail_path(out_dir, t)
        if not cv2.imwrite(str(p), encoding.encode(d[t])):
            raise OutputError(f"could not write {p}; check free space and permissions")
        paths.append(p)
    return paths


def read_detail_map(path, encoding: DetailEncoding) -> np.ndarray:
    """(S, S) float32 metres from one 16-bit PNG; refuses anything else."""
    values = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if values is None:
        raise SchemaError(f"{path}: not a readable PNG")
    if values.dtype != np.uint16 or values.ndim != 2:
        raise SchemaError(f"{path}: expected a 16-bit greyscale PNG, got {values.dtype} with shape {values.shape}")
    if values.shape != (encoding.size, encoding.size):
        raise SchemaError(f"{path}: expected {encoding.size} x {encoding.size} texels, got {values.shape}")
    return encoding.decode(values)


def check_detail_maps(out_dir, encoding: DetailEncoding, n_frames: int) -> None:
    """Validate ``out_dir/detail``: one map per frame, no more, each 16-bit at the stated size."""
    folder = Path(out_dir) / DETAIL_DIR
    found = sorted(folder.glob("frame_*.png")) if folder.is_dir() else []
    expected = [detail_path(out_dir, t) for t in range(n_frames)]
    if [p.name for p in found] != [p.name for p in expected]:
        missing = sorted({p.name for p in expected} - {p.name for p in found})
        extra = sorted({p.name for p in found} - {p.name for p in expected})
        raise SchemaError(f"{folder}: expected {n_frames} maps frame_000000.png..; missing {missing[:5]}, "
                          f"unexpected {extra[:5]}")
    for p in expected:
        read_detail_map(p, encoding)
