"""The job's thread pools (avface.core.threads): OpenMP's threads sleep while they wait in
every avface process, a job runs with the threads it asks for and gives them back, the
service shares the cores between its workers, and the result records what was used."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from avface.core import threads
from avface.errors import InputError

PROBE = "import os, avface, torch; torch.ones(2) @ torch.ones(2); print(os.environ.get('OMP_WAIT_POLICY'))"


def _probe(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_openmp_threads_sleep_unless_the_user_says_otherwise():
    assert _probe({}) == "PASSIVE"
    assert _probe({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"


def test_numpys_blas_pool_is_one_thread_unless_the_user_says_otherwise():
    """OpenBLAS reads its count when numpy loads: ``import avface`` must come first and set it."""
    probe = "import sys, os, avface; print('numpy' in sys.modules, os.environ.get('OPENBLAS_NUM_THREADS'))"

    def run(extra):
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
        env.update(extra)
        return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                              check=True).stdout.split()

    assert run({}) == ["False", "1"]
    assert run({"OPENBLAS_NUM_THREADS": "2"}) == ["False", "2"]


def test_a_job_runs_with_its_threads_and_gives_them_back():
    before = torch.get_num_threads()
    with threads.job_pool(1) as rec:
        assert torch.get_num_threads() == 1 and rec["torch_intra_op"] == 1
        assert rec["cores"] == threads.cpu_count() and rec["omp_wait_policy"]
    assert torch.get_num_threads() == before
    with threads.job_pool(0) as rec:  # 0: what the process has
        assert rec["torch_intra_op"] == before
    with threads.job_pool(10_000) as rec:  # never more than the cores
        assert rec["torch_intra_op"] == threads.cpu_count()
    assert torch.get_num_threads() == before


def test_the_small_stages_run_on_one_thread_and_give_the_pool_back():
    """Camera, networks and lips: small tensors, one thread (the record names them); a CUDA
    job's CPU pool is left alone; an error inside still gives the pool back."""
    if threads.cpu_count() < 2:
        pytest.skip("needs two cores to tell one thread from the pool")
    with threads.job_pool(2) as rec:
        assert set(threads.SMALL_STAGES) <= set(rec["single_threaded"])
        with threads.single_thread("cpu"):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with threads.single_thread("cuda"):
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), threads.single_thread("cpu"):
            raise RuntimeError("a stage failed")
        assert torch.get_num_threads() == 2


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_a_bad_thread_count_is_refused_with_its_code(bad):
    with pytest.raises(InputError) as e:
        with threads.job_pool(bad):
            pass
    assert e.value.code == "bad_input" and "threads" in str(e.value)


def test_the_service_shares_the_cores_between_its_workers():
    cores = threads.cpu_count()
    assert threads.job_threads(0, 1) == cores
    assert threads.job_threads(0, 2) == max(1, cores // 2)
    assert threads.job_threads(0, 64) == 1
    assert threads.job_threads(3, 2) == 3


def test_serve_help_says_how_jobs_use_the_threads():
    out = subprocess.run([sys.executable, "-m", "avface", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--threads" in out and "OMP_WAIT_POLICY=PASSIVE" in " ".join(out.split())
