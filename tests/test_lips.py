"""Lip offsets into the result contract's PCA (backend/lips.py)."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close

from avface.stages.lips import lip_pca


def test_low_rank_offsets_are_exact_and_silence_stays_zero():
    rng = np.random.default_rng(0)
    modes = rng.normal(scale=1e-3, size=(3, 40, 3))
    coeffs = rng.normal(size=(100, 3))
    coeffs[:30] = 0.0  # silence
    offsets = np.einsum("tk,kld->tld", coeffs, modes)
    pca = lip_pca(offsets)
    assert pca.basis.shape[1:] == (40, 3) and pca.basis.shape[0] == 3
    assert pca.residual_m < 1e-9 and pca.explained > 0.999999
    rebuilt = np.einsum("tk,kld->tld", pca.coeffs, pca.basis)
    assert_close(rebuilt, offsets, atol=1e-9, rtol=0, what="rebuilt offsets")
    assert np.abs(pca.coeffs[:30]).max() < 1e-9  # uncentred: silent frames have no coefficients


def test_at_most_16_components_and_the_residual_is_reported():
    offsets = np.random.default_rng(1).normal(scale=1e-3, size=(60, 40, 3))
    pca = lip_pca(offsets)
    assert pca.basis.shape == (16, 40, 3) and pca.coeffs.shape == (60, 16)
    rebuilt = np.einsum("tk,kld->tld", pca.coeffs, pca.basis)
    rms = np.sqrt(((rebuilt - offsets) ** 2).sum() / (60 * 40))
    assert abs(rms - pca.residual_m) < 1e-9 and pca.residual_m > 0 and pca.explained < 1


def test_no_offsets_no_components():
    pca = lip_pca(np.zeros((10, 40, 3)))
    assert pca.basis.shape == (0, 40, 3) and pca.coeffs.shape == (10, 0) and pca.residual_m == 0
    with pytest.raises(ValueError, match="lip offsets"):
        lip_pca(np.zeros((10, 40)))
