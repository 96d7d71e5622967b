"""Shared fixtures. Tests make their own small inputs; those that need the real clips in
../shared/data skip with a reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AVFACE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real talking-face clips; skips the test when it is not beside the repo."""
    if not (SHARED_DATA / "manifest.json").is_file():
        pytest.skip(f"real clips not found at {SHARED_DATA} (set AVFACE_SHARED_DATA or place ../shared beside the repository)")
    return SHARED_DATA


def assert_close(actual, expected, *, atol: float = 0.0, rtol: float = 1e-6, what: str = "value") -> None:
    """np.allclose with a message that says where and by how much the arrays differ."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} != expected {e.shape}")
    err = np.abs(a - e)
    tol = atol + rtol * np.abs(e)
    bad = err > tol
    if bad.any():
        idx = np.unravel_index(int(np.argmax(err - tol)), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.size} elements out of tolerance; worst at index {idx}: "
            f"got {a[idx]!r}, expected {e[idx]!r} (|diff| {err[idx]:.3g} > tol {tol[idx]:.3g})"
        )


@pytest.fixture(scope="module")
def torch_one_thread():
    """torch on one thread for a test module, restored afterwards. The network tests work on small
    tensors, where two threads on a loaded two-core machine are many times slower than one
    (measured 20x for a 6 x 2048 x 9 product under a load of 8), and the cores are shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
