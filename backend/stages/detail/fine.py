"""The fine stage's losses, the carrying of detail across occlusions, and the detail maps of
the result (docs/design.md sections 2 and 5; docs/fine_stage.md).

Losses (AVFace's fine loss without ID-MRF, see docs/fine_stage.md), all in UV space:

    L = photometric + lambda_n * normal + lambda_s * symmetry + lambda_d * |D|_1

- photometric: mean |albedo * shading(n_d) - I| over trusted texels, n_d the normals of the
  detailed surface (:func:`avface.stages.detail.uvspace.detail_normals`);
- normal: mean |Lap(n_d) - Lap(n_s)| with n_s the normals that the frame's shading implies
  (:func:`avface.stages.detail.shading.shading_normals`), the pseudo ground truth that replaces the
  paper's pretrained normal network; Laplacians over the 4-neighbourhood of the texel grid;
- symmetry: mean |D - D(mirror)| over texels whose mirror image is on the face;
- |D|_1: mean |D| over the face, metres.

Texels that are not trusted (hidden, turned away, or occluded according to the visual
confidence) get no photometric and no normal loss: an occluder's edges are not evidence of
detail. Their displacement is then carried from the nearest trusted frames
(:func:`carry_displacement`).

Detail maps: one 16-bit greyscale PNG per frame, ``detail/frame_NNNNNN.png``, row 0 at the
top (v = 1); displacement along the coarse normal in metres is
``(value / 65535 - midlevel) * metres_per_unit`` (:class:`avface.result.DetailEncoding`), as Blender's
Displace modifier reads it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from avface.errors import OutputError, SchemaError
from avface.result import ensure_writable
from avface.result.detail_maps import DETAIL_DIR, DetailEncoding, detail_path
from avface.stages.detail import shading
from avface.stages.detail.shading import render

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FineLossConfig:
    """Weights of the fine loss; the defaults are the paper's (docs/design.md section 2), with D in
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
    mirror: (S, S) long flat texel index (:func:`avface.stages.detail.uvspace.mirror_texels`); mirror_ok:
    (S, S) bool."""
    b = displacement.shape[0]
    flat = displacement.reshape(b, -1)
    mirrored = flat[:, mirror.reshape(-1).clamp_min(0)].view_as(displacement)
    return _masked_mean((displacement - mirrored).abs(), mirror_ok.expand_as(displacement).float())


def displacement_l1(displacement: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """Mean |D| over the covered texels, metres."""
    return _masked_mean(displacement.abs(), covered.expand_as(displacement).float())


@dataclass(frozen=True, eq=False)
class FineLossBatch:
    """A batch of frames as the fine loss reads them, all in UV space."""

    image_uv: torch.Tensor
    """(B, S, S, C) the unwrapped frames, [0, 1]."""
    albedo: torch.Tensor
    """(S, S, C) the clip's albedo."""
    sh: torch.Tensor
    """(B, 9, C) each frame's light."""
    detail_normals: torch.Tensor
    """(B, S, S, 3) the normals of the detailed surface."""
    shading_normals: torch.Tensor
    """(B, S, S, 3) the normals the frames' shading implies (the normal term's target)."""
    displacement: torch.Tensor
    """(B, S, S) D, metres."""
    trust: torch.Tensor
    """(B, S, S) bool or confidence in [0, 1]: visible, facing and not occluded."""


@dataclass(frozen=True, eq=False)
class TexelLayout:
    """The UV layout's texels as the fine loss reads them: the same for every frame."""

    covered: torch.Tensor
    """(S, S) bool texels of the layout."""
    mirror: torch.Tensor
    """(S, S) long flat index of each texel's mirror image
    (:func:`avface.stages.detail.uvspace.mirror_texels`)."""
    mirror_ok: torch.Tensor
    """(S, S) bool: the texel's mirror image is on the face."""


def fine_loss(cfg: FineLossConfig, batch: FineLossBatch, layout: TexelLayout) -> tuple[torch.Tensor, dict[str, float]]:
    """The fine stage's loss for a batch of frames. Returns (total, {term: value}).

    Untrusted texels of ``batch`` (``batch.trust`` below ``cfg.min_trust``) get no
    photometric and no normal loss; D is regularised everywhere on the face
    (``layout.covered``).
    """
    image_uv, albedo, sh = batch.image_uv, batch.albedo, batch.sh
    detail_normals, shading_normals = batch.detail_normals, batch.shading_normals
    displacement, trust = batch.displacement, batch.trust
    covered, mirror, mirror_ok = layout.covered, layout.mirror, layout.mirror_ok
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
    (:func:`avface.stages.detail.uvspace.texel_geometry`), which costs less than holding it at 512^2."""

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
    (:func:`avface.stages.detail.uvspace.confidence_map`), or None to trust every visible texel. Frames are
    processed ``chunk`` at a time, so memory holds one chunk of full frames.
    """
    from avface.stages.detail import uvspace

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


OUTLIER_DEVIATION = 0.25
"""A visible texel departs from the clip's usual appearance when its colour, divided by its
frame's mean face colour (exposure), differs from that texel's median over the clip by more
than this, averaged over R, G, B."""
OUTLIER_MARGIN = 4
"""Frames this close to an outlier frame count as outliers too: an occluder enters and leaves
over a few frames, partly below the share, and the displacement carried over the span comes
from its nearest trusted frames, which must be clean."""
OUTLIER_SHARE = 0.2
"""A frame whose region has more than this share of its visible texels departing is
occluded for the fine stage. On the benchmark's skin-toned hand that the visual confidence
missed (styletalk_feifeili_clip1, seed 0, flagged on 0.31 of its frames) the share was 0.30
or more on 90 % of the hand's frames and at most 0.10 on any other frame, speech included."""


def appearance_outlier_frames(clip: ClipUV, region: torch.Tensor, reference: np.ndarray | None = None, *,
                              deviation: float = OUTLIER_DEVIATION,
                              share: float = OUTLIER_SHARE, margin: int = OUTLIER_MARGIN,
                              chunk: int = 64) -> np.ndarray:
    """(T,) bool: frames whose ``region`` (S, S) bool texels (the lower face) look unlike the
    same texels on the rest of the clip: the fine stage's own occlusion evidence. A hand the
    tracker's evidence missed is still not the face it covers, and in UV space every frame
    shows the same skin at the same texel, whatever the pose. Medians are over the frames
    where each texel is visible (trust > 0), so turned-away texels count for nothing; the
    flags are widened by ``margin`` frames each way. ``reference`` (T,) bool: the frames the
    medians are taken over (those the visual confidence trusts), all when None or fewer
    than 3. A median is only the face's own look when most of its frames show the face: when
    more than half of the reference frames would be flagged, no frame is; and an occluder the
    visual confidence misses on most of the clip is the median's look, so the clean frames
    are then the ones flagged (a limit of this evidence: they are carried, not engraved)."""
    region = region.to(clip.trust.device).bool()
    n = clip.image.shape[0]
    if n < 3 or not region.any():
        return np.zeros(n, bool)
    covered = region[None]
    # each frame's colour normalised by its mean over the visible region (exposure, light)
    vis = (clip.trust > 0) & covered
    img = clip.image[:, region].float() / 255.0  # (T, N, 3)
    v = vis[:, region]  # (T, N)
    mean = (img * v[..., None]).sum(1) / v.sum(1, keepdim=True).clamp_min(1)  # (T, 3)
    norm = img / mean[:, None, :].clamp_min(1e-3)
    norm = torch.where(v[..., None], norm, torch.full_like(norm, float("nan")))
    ref = torch.ones(n, dtype=torch.bool, device=norm.device)
    if reference is not None and int(np.sum(reference)) >= 3:
        ref = torch.as_tensor(np.asarray(reference, bool), device=norm.device)
    med = norm[ref].nanmedian(dim=0).values  # (N, 3)
    out = np.zeros(n, bool)
    for s0 in range(0, n, chunk):
        dev = (norm[s0:s0 + chunk] - med).abs().mean(-1)  # (B, N), NaN where not visible
        seen = v[s0:s0 + chunk]
        far = (dev > deviation) & seen
        frac = far.sum(1).float() / seen.sum(1).clamp_min(1).float()
        out[s0:s0 + chunk] = ((frac > share) & (seen.sum(1) > 0)).cpu().numpy()
    if out[ref.cpu().numpy()].mean() > 0.5:
        log.warning("the lower face looks unlike itself on most of the clip's frames: no appearance outliers")
        return np.zeros(n, bool)
    if margin > 0 and out.any():
        from scipy.ndimage import binary_dilation

        out = binary_dilation(out, np.ones(2 * margin + 1, bool))
    return out


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
    from avface.stages.detail import uvspace

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

def write_detail_maps(out_dir, displacement: np.ndarray, encoding: DetailEncoding) -> list[Path]:
    """Write (T, S, S) displacement maps (metres) as ``out_dir/detail/frame_NNNNNN.png``,
    16-bit greyscale through OpenCV's PNG writer (already a dependency; it writes uint16
    arrays as 16-bit PNG). Returns the paths."""
    d = np.asarray(displacement)
    if d.ndim != 3 or d.shape[1:] != (encoding.map_size, encoding.map_size):
        raise ValueError(f"expected (T, {encoding.map_size}, {encoding.map_size}) displacement maps, got {d.shape}")
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
    if values.shape != (encoding.map_size, encoding.map_size):
        raise SchemaError(f"{path}: expected {encoding.map_size} x {encoding.map_size} texels, got {values.shape}")
    return encoding.decode(values)
