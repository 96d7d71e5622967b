"""The fine stage's shading model (docs/design.md section 3): a per-clip albedo in UV space and
9-coefficient spherical-harmonics lighting per frame, fitted to the unwrapped frames.

Image formation, per texel p, frame t and colour channel c (Lambertian, distant light fixed
to the camera, as DECA models it):

    I[t, p, c] = albedo[p, c] * sum_k Y_k(n[t, p]) * sh[t, k, c]

with n the camera-frame unit normal and Y the first nine real spherical harmonics already
convolved with the clamped cosine (Ramamoorthi and Hanrahan, 2001), so ``sh`` are
irradiance coefficients and ``Y . sh`` is the shading itself. The model is linear in the
albedo for fixed light and in the light for a fixed albedo: the light of a frame is closed-
form least squares given the albedo (:func:`fit_lighting`, also what a held-out frame gets),
and the joint fit eliminates the albedo in closed form and searches the light only.

Albedo and light trade a global scale, fixed here by making the shading average 1 over the
trusted texels of the clip. A texel whose normal never changes over the clip cannot tell its
albedo from its shading; head motion under one light is what separates them, so each
frame's light is tied to the clip's (:func:`fit_shading`). The frames are used as they come
(sRGB values / 255, as DECA does), not linearised.

Maps are channels-last torch tensors, as in :mod:`avface.stages.detail.uvspace`: images (T, S, S, C),
normals (T, S, S, 3), masks (T, S, S) bool or weights in [0, 1].
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

N_SH = 9
# Real SH normalisations times the clamped-cosine convolution A_l (pi, 2 pi / 3, pi / 4).
_A0, _A1, _A2 = math.pi, 2.0 * math.pi / 3.0, math.pi / 4.0
_C0 = _A0 * 0.5 * math.sqrt(1.0 / math.pi)
_C1 = _A1 * math.sqrt(3.0 / (4.0 * math.pi))
_C2 = _A2 * 0.5 * math.sqrt(15.0 / math.pi)
_C20 = _A2 * 0.25 * math.sqrt(5.0 / math.pi)
_C22 = _A2 * 0.25 * math.sqrt(15.0 / math.pi)
SH_RIDGE = 0.0
"""Ridge on the light coefficients of orders 1 and 2 in :func:`fit_lighting`, relative to the
constant term's energy. Off by default: a face shows one hemisphere of normals, so the
coefficients are poorly determined, and even 1e-3 moved the shading of the seen texels by up
to 8 % on the canonical face."""
LIGHT_TIE = 0.01
"""Pull of each frame's light towards the clip's, relative to the frame's data energy: weak,
so an exposure change of a few per cent is followed to within a tenth of itself."""


def sh_basis(n: torch.Tensor) -> torch.Tensor:
    """(..., 9) irradiance basis at unit normals (..., 3): order (1, y, z, x, xy, yz,
    3z^2 - 1, xz, x^2 - y^2), each with its normalisation and cosine-lobe factor."""
    x, y, z = n[..., 0], n[..., 1], n[..., 2]
    return torch.stack([
        torch.full_like(x, _C0), _C1 * y, _C1 * z, _C1 * x,
        _C2 * x * y, _C2 * y * z, _C20 * (3.0 * z * z - 1.0), _C2 * x * z, _C22 * (x * x - y * y),
    ], dim=-1)


def sh_basis_jacobian(n: torch.Tensor) -> torch.Tensor:
    """(..., 9, 3) derivative of :func:`sh_basis` with respect to the normal's components."""
    x, y, z = n[..., 0], n[..., 1], n[..., 2]
    zero = torch.zeros_like(x)
    rows = [
        (zero, zero, zero),
        (zero, torch.full_like(x, _C1), zero),
        (zero, zero, torch.full_like(x, _C1)),
        (torch.full_like(x, _C1), zero, zero),
        (_C2 * y, _C2 * x, zero),
        (zero, _C2 * z, _C2 * y),
        (zero, zero, _C20 * 6.0 * z),
        (_C2 * z, zero, _C2 * x),
        (_C22 * 2.0 * x, -_C22 * 2.0 * y, zero),
    ]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def shading(normals: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
    """(T, S, S, C) irradiance at normals (T, S, S, 3) under light sh (T, 9, C)."""
    # shade[t, i, j, c] = sum_k Y[t, i, j, k] * sh[t, k, c]
    return torch.einsum("tijk,tkc->tijc", sh_basis(normals), sh)


def render(albedo: torch.Tensor, normals: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
    """(T, S, S, C) shaded colour: albedo (S, S, C) times :func:`shading`."""
    return albedo[None] * shading(normals, sh)


@dataclass(frozen=True)
class ShadingFit:
    albedo: torch.Tensor  #: (S, S, C) linear in the frames' intensity units; 0 where never seen
    sh: torch.Tensor  #: (T, 9, C) irradiance coefficients per frame, camera frame
    residual: float  #: mean absolute residual over the weighted texels, image units
    iterations: int


def _weights(mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    if mask.shape != images.shape[:3]:
        raise ValueError(f"expected a {tuple(images.shape[:3])} mask, got {tuple(mask.shape)}")
    return mask.to(images.dtype)


def fit_lighting(images: torch.Tensor, albedo: torch.Tensor, normals: torch.Tensor, mask: torch.Tensor,
                 *, ridge: float = SH_RIDGE, prior: torch.Tensor | None = None, prior_weight: float = 0.0
                 ) -> torch.Tensor:
    """(T, 9, C) least-squares light per frame and channel for a known albedo.

    images: (T, S, S, C); albedo: (S, S, C); normals: (T, S, S, 3); mask: (T, S, S) bool or
    weights. Solves the 9 x 9 normal equations of every frame and channel at once. With
    ``prior`` (9, C) or (T, 9, C), each coefficient is pulled towards it with
    ``prior_weight`` times the constant term's data energy (scale-free).
    """
    w = _weights(mask, images)
    t, c = images.shape[0], images.shape[-1]
    y = sh_basis(normals).reshape(t, -1, N_SH)  # (T, P, 9)
    w = w.reshape(t, -1)  # (T, P)
    a = albedo.reshape(-1, c)  # (P, C)
    img = images.reshape(t, -1, c)  # (T, P, C)
    # design[t, p, c, k] = albedo[p, c] * Y[t, p, k]; gram = sum_p w design^T design, as one
    # batched matrix product per channel (a four-operand einsum was 10x slower at 256^2)
    gram = torch.stack([(y * (w * a[:, k] ** 2)[..., None]).transpose(1, 2) @ y for k in range(c)], dim=1)  # (T, C, 9, 9)
    rhs = torch.einsum("tpk,tpc->tck", y, w[..., None] * a[None] * img)  # (T, C, 9)
    scale = gram.diagonal(dim1=-2, dim2=-1)[..., :1].clamp_min(1e-12)  # (T, C, 1) the constant term's energy
    reg = torch.full((N_SH,), ridge, dtype=images.dtype, device=images.device)
    reg[0] = 0.0  # the ambient term is never pulled towards 0
    reg = scale * reg
    if prior is not None and prior_weight > 0:
        p = prior.expand(images.shape[0], N_SH, images.shape[-1]).permute(0, 2, 1).to(images.dtype)  # (T, C, 9)
        reg = reg + scale * prior_weight
        rhs = rhs + scale * prior_weight * p
    gram = gram + torch.diag_embed(reg + 1e-12 * scale)
    return torch.linalg.solve(gram, rhs[..., None])[..., 0].permute(0, 2, 1)  # (T, 9, C)


def fit_albedo(images: torch.Tensor, normals: torch.Tensor, sh: torch.Tensor, mask: torch.Tensor, *,
               chunk: int = 32) -> torch.Tensor:
    """(S, S, C) least-squares albedo for known light: per texel and channel,
    sum_t w s I / sum_t w s^2 with s the shading; 0 where no frame trusts the texel.
    Accumulated over ``chunk`` frames at a time, so memory does not grow with the clip.
    Differentiable in ``sh`` (the light fit eliminates the albedo through it)."""
    w = _weights(mask, images)
    num = den = 0.0
    for s0 in range(0, images.shape[0], chunk):
        sl = slice(s0, s0 + chunk)
        shade = shading(normals[sl], sh[sl])  # (t, S, S, C)
        ws = w[sl, ..., None] * shade
        num = num + (ws * images[sl]).sum(0)
        den = den + (ws * shade).sum(0)
    return torch.where(den > 1e-12, num / den.clamp_min(1e-12), torch.zeros_like(num))


def fit_shading(images: torch.Tensor, normals: torch.Tensor, mask: torch.Tensor, *, light_tie: float = LIGHT_TIE,
                max_texels: int = 2048, iterations: int = 300, seed: int = 0) -> ShadingFit:
    """Albedo (S, S, C) and light (T, 9, C) jointly.

    images: (T, S, S, C) unwrapped frames, linear intensity; normals: (T, S, S, 3) camera-
    frame unit normals; mask: (T, S, S) trusted texels (visible and not occluded).

    1. The clip's light, shared by all frames, by variable projection: for any light the
       best albedo is closed form (:func:`fit_albedo`), so only the 9 x C light coefficients
       are searched (L-BFGS), on at most ``max_texels`` trusted texels drawn at random.
       Alternating albedo and light steps crawl along the valley where the two trade off;
       eliminating the albedo removes it.
    2. The albedo of every texel, closed form.
    3. Each frame's own light, closed form, tied to step 1's by ``light_tie`` (exposure
       changes, flicker), and the albedo once more.

    Why a shared light first: with a free light per frame, albedo and shading become
    interchangeable (measured on six poses of the canonical face, yaw within 35 degrees,
    under six random lights: coefficients off by 0.6 at a mean square residual of 1e-6),
    while one light shared by a clip of a moving head is recovered to rounding. The split
    stays poorly conditioned all the same: the same clip with 3 % of random exposure change
    per frame, which step 1 cannot model, moved the recovered coefficients by up to 1.0.
    The product albedo x shading, which the photometric loss uses, is well determined
    either way; the light's direction, which the shading-implied normals use, is not, and
    a clip with little head motion says little about it.
    """
    if images.ndim != 4 or normals.shape != images.shape[:3] + (3,):
        raise ValueError(f"expected (T, S, S, C) images and (T, S, S, 3) normals, got {tuple(images.shape)} "
                         f"and {tuple(normals.shape)}")
    w = _weights(mask, images)
    if w.sum() <= 0:
        raise ValueError("no trusted texel in any frame: nothing to fit the shading to")
    t, c = images.shape[0], images.shape[-1]
    seen = (w > 0).any(0)  # (S, S)
    texels = torch.nonzero(seen.reshape(-1))[:, 0]
    if len(texels) > max_texels:
        g = torch.Generator().manual_seed(seed)
        texels = texels[torch.randperm(len(texels), generator=g)[:max_texels].to(texels.device)]
    # the sampled texels, flattened: (T, N, ...) in float64 (the search is tiny, rounding is not)
    flat = lambda x: x.reshape(t, -1, *x.shape[3:])[:, texels].to(torch.float64)  # noqa: E731
    img_s, w_s = flat(images), flat(w)[..., None]  # (T, N, C), (T, N, 1)
    y_s = sh_basis(flat(normals))  # (T, N, 9): fixed during the search, so computed once
    w_sum = w_s.sum() * c
    light = torch.zeros(N_SH, c, dtype=torch.float64, device=images.device)
    light[0] = 1.0 / _C0  # shading 1 everywhere
    light.requires_grad_(True)
    opt = torch.optim.LBFGS([light], lr=1.0, max_iter=iterations, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-14)

    def objective():
        opt.zero_grad()
        shade = y_s @ light  # (T, N, C)
        ws = w_s * shade
        albedo = (ws * img_s).sum(0) / (ws * shade).sum(0).clamp_min(1e-12)  # (N, C), fit_albedo's
        loss = (w_s * (albedo * shade - img_s) ** 2).sum() / w_sum
        loss.backward()
        return loss

    opt.step(objective)
    n_iter = int(opt.state[light].get("n_iter", 0))
    with torch.no_grad():
        frame_light = light.detach().to(images.dtype).expand(t, N_SH, c)
        albedo = fit_albedo(images, normals, frame_light, w)
        sh = fit_lighting(images, albedo, normals, w, prior=frame_light, prior_weight=light_tie)
        albedo = fit_albedo(images, normals, sh, w)
        # gauge: mean shading 1 over the trusted texels, per channel
        chunks = [slice(s0, s0 + 32) for s0 in range(0, t, 32)]
        mean_shade = sum((w[k, ..., None] * shading(normals[k], sh[k])).sum((0, 1, 2)) for k in chunks) / w.sum()
        sh = sh / mean_shade.clamp_min(1e-12)
        albedo = torch.where(seen[..., None], albedo * mean_shade, torch.zeros_like(albedo))
        residual = sum(float((w[k, ..., None] * (render(albedo, normals[k], sh[k]) - images[k]).abs()).sum())
                       for k in chunks) / float(w.sum() * c)
    log.debug("shading fit: %d L-BFGS iterations, mean residual %.4f", n_iter, residual)
    return ShadingFit(albedo, sh, residual, n_iter)


def shading_normals(images: torch.Tensor, albedo: torch.Tensor, sh: torch.Tensor, normals: torch.Tensor,
                    mask: torch.Tensor, *, prior: float = 0.05, iterations: int = 5) -> torch.Tensor:
    """(T, S, S, 3) the normals that the shading implies: per texel, the unit normal that
    best explains the observed colour under the fitted albedo and light, pulled towards the
    starting normal with weight ``prior`` (shading constrains only the normal's component
    along the light's gradient; the prior fixes the rest). The pseudo ground truth of the
    normal loss, in place of the paper's pretrained normal network.

    Gauss-Newton on two tangent-plane coordinates per texel, vectorised over the texels in
    ``mask`` only (the others keep their starting normal), with the 2 x 2 normal equations
    solved in closed form.
    """
    m = mask if mask.dtype == torch.bool else mask > 0
    out = normals.clone()
    t_idx, i_idx, j_idx = torch.nonzero(m, as_tuple=True)
    if len(t_idx) == 0:
        return out
    n0 = F.normalize(normals[m], dim=-1, eps=1e-12)  # (N, 3)
    img = images[m]  # (N, C)
    alb = albedo[i_idx, j_idx]  # (N, C)
    light = sh[t_idx]  # (N, 9, C)
    n = n0
    # a tangent frame per texel: any vector not parallel to n, crossed twice
    helper = torch.where(n0[:, 0:1].abs() < 0.9, n0.new_tensor([1.0, 0.0, 0.0]), n0.new_tensor([0.0, 1.0, 0.0]))
    for _ in range(iterations):
        t1 = F.normalize(torch.cross(n, helper, dim=-1), dim=-1, eps=1e-12)
        t2 = torch.cross(n, t1, dim=-1)
        r = alb * torch.einsum("nk,nkc->nc", sh_basis(n), light) - img  # (N, C) colour residual
        grad = torch.einsum("nkx,nkc->ncx", sh_basis_jacobian(n), light)  # (N, C, 3) d shading / d n
        ja = alb * (grad * t1[:, None]).sum(-1)  # (N, C) Jacobian along t1
        jb = alb * (grad * t2[:, None]).sum(-1)
        h11 = (ja * ja).sum(-1) + prior
        h12 = (ja * jb).sum(-1)
        h22 = (jb * jb).sum(-1) + prior
        # the prior's residual sqrt(prior) (n - n0) . t with Jacobian sqrt(prior) I
        g1 = (ja * r).sum(-1) + prior * ((n - n0) * t1).sum(-1)
        g2 = (jb * r).sum(-1) + prior * ((n - n0) * t2).sum(-1)
        det = (h11 * h22 - h12 * h12).clamp_min(1e-20)
        s1 = -(h22 * g1 - h12 * g2) / det
        s2 = -(h11 * g2 - h12 * g1) / det
        n = F.normalize(n + s1[:, None] * t1 + s2[:, None] * t2, dim=-1, eps=1e-12)
    out[m] = n.to(out.dtype)
    return out
