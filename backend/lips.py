"""Lip offsets into the result contract (DESIGN.md section 5): ``lip_basis`` (K, L, 3) and
``lip_coeffs`` (T, K), a PCA of the per-frame lip vertex offsets with K <= 16, and the
residual it leaves, for ``meta``.

The basis is not centred: silence has zero offsets and must stay exactly zero (coefficients
0), so the components are the right singular vectors of the offsets themselves, not of their
deviations from a mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_COMPONENTS = 16
#: Keep the fewest components that explain this share of the offsets' energy.
EXPLAINED_ENERGY = 0.999


@dataclass(frozen=True)
class LipPCA:
    basis: np.ndarray
    """(K, L, 3) float32 metres per unit coefficient."""
    coeffs: np.ndarray
    """(T, K) float32."""
    residual_m: float
    """RMS over frames and lip vertices of what the basis leaves out, metres."""
    explained: float
    """Share of the offsets' energy the basis keeps (1 when there are no offsets)."""


def lip_pca(offsets: np.ndarray, *, max_components: int = MAX_COMPONENTS,
            explained_energy: float = EXPLAINED_ENERGY) -> LipPCA:
    """PCA (uncentred) of per-frame lip offsets (T, L, 3), metres."""
    x = np.asarray(offsets, np.float64)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"expected (T, L, 3) lip offsets, got {x.shape}")
    t, n_lips = x.shape[:2]
    flat = x.reshape(t, -1)
    energy = float((flat ** 2).sum())
    if t == 0 or energy == 0.0:
        return LipPCA(np.zeros((0, n_lips, 3), np.float32), np.zeros((t, 0), np.float32), 0.0, 1.0)
    u, sig, vt = np.linalg.svd(flat, full_matrices=False)
    cum = np.cumsum(sig ** 2) / energy
    k = int(min(max_components, np.searchsorted(cum, explained_energy) + 1, len(sig)))
    # flat ~ coeffs @ basis with unit-norm rows of vt scaled so coefficients have unit RMS
    scale = sig[:k] / np.sqrt(t)
    basis = vt[:k] * scale[:, None]
    coeffs = u[:, :k] * np.sqrt(t)
    residual = flat - coeffs @ basis
    return LipPCA(basis.reshape(k, n_lips, 3).astype(np.float32), coeffs.astype(np.float32),
                  float(np.sqrt((residual ** 2).sum() / (t * n_lips))), float(cum[k - 1]))
