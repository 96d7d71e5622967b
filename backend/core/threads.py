"""The job's thread pools, sized and configured so that a busy machine slows a job in
proportion to the CPU the other work takes, not ten times.

Three pools run a job's arithmetic on the CPU:

- torch's intra-op pool (OpenMP, GNU libgomp in the PyPI builds), which also runs oneDNN's
  convolutions and MKL's matrix products;
- OpenBLAS's, under numpy and scipy;
- MediaPipe's (the tracker's TFLite interpreter), which has no setting in its Python API.

By default OpenMP's threads spin for a while after each parallel region, waiting for the
next one. On a quiet machine that saves a wake-up; when another process wants the cores, a
spinning thread takes the time slice the working thread needed, and every barrier waits for
a thread that is not running. ``python -m avface.bench.load`` on this project's 2-core
machine, the 20-second clip, the default job:

- spinning (``OMP_WAIT_POLICY=ACTIVE``): 110 s quiet, 339 s beside two busy processes (3.1x;
  the fine stage 3.4x, the networks 5x);
- sleeping (``PASSIVE``): 143 s quiet, 180 s beside one busy process (1.26x), 237 s beside two
  (1.66x; no stage over 2.3x), where a fair share of the CPU costs 2x.

Sleeping costs about a quarter more on a quiet machine (each of the fine stage's many small
parallel regions wakes its threads again), and saves a third as soon as anything else runs,
as it does on an animator's computer; so avface sleeps. The policy is read once, when
libgomp loads (on ``import torch``), so :func:`configure_process` runs on ``import avface``,
before any stage imports torch; a value the user set in the environment is kept
(``OMP_WAIT_POLICY=ACTIVE`` for a machine that runs nothing else).

The number of intra-op threads stays what the process has (torch's default of one per core, or
``OMP_NUM_THREADS``) unless the job asks for another (``ReconstructOptions.threads``, ``avface
serve --threads``, which shares the cores between concurrent jobs): the same count gives the same
arithmetic, so results do not change with the machine's load.
"""
from __future__ import annotations

import contextlib
import os

WAIT_POLICY = "PASSIVE"
"""OpenMP's wait policy for every avface process (unless the environment sets another)."""


OPENBLAS_THREADS = "1"
"""numpy's and scipy's BLAS pool (OpenBLAS, not torch's): one thread. Its threads spin while
they wait whatever OpenMP's policy says, and the coarse fit's many small matrix products gain
nothing from a second one: 20-s clip beside two busy processes, the fit stage took 4.3x and
3.3x its quiet time in two runs with OpenBLAS's default pool, 1.7x and 1.5x with one thread,
the same 3.5-4 s when quiet."""


def configure_process() -> None:
    """Set OpenMP's wait policy before torch (and libgomp) load, and OpenBLAS's pool before
    numpy loads; a value the user set in the environment is left as it is."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", OPENBLAS_THREADS)


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask, as a container or ``taskset``
    limits it), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def job_threads(threads: int, workers: int) -> int:
    """The torch threads each of ``workers`` concurrent jobs runs with: ``threads`` when set,
    else this machine's cores shared evenly (at least 1 each), so that a server's own jobs
    never oversubscribe the cores."""
    if threads > 0:
        return threads
    return max(1, cpu_count() // max(1, workers))


@contextlib.contextmanager
def job_pool(threads: int = 0):
    """Run a job's stages with ``threads`` torch intra-op threads (capped at the cores), and
    give the count back afterwards; 0 keeps what the process has (torch's default of one per
    core, or ``OMP_NUM_THREADS``, or what the caller set). Yields the record for the result's
    ``meta.threads``."""
    import torch

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        from avface.errors import InputError

        raise InputError(f"threads must be 0 (one per core) or a positive count, not {threads!r}")
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(min(threads, cpu_count()))
    try:
        yield record()
    finally:
        torch.set_num_threads(before)


SMALL_STAGES = ("camera", "networks", "lips")
"""Stages whose tensors are small (a few hundred landmarks, short sequences): on one thread
they take the same time on a quiet machine and keep it better beside busy processes (20-s
clip, two busy processes: camera 3.4x -> 2.2x its quiet time, networks 2.9x -> 1.7x), since
a second thread only adds hand-offs that wait for a core."""


@contextlib.contextmanager
def single_thread(device: str = "cpu"):
    """One torch intra-op thread inside the block (on the CPU), the count before after it."""
    import torch

    before = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def record() -> dict:
    """What the job's thread pools are: torch's intra-op count, OpenMP's wait policy
    as the process's environment had it, the cores available, and MediaPipe's pool
    (not configurable: the tracker runs on its own threads)."""
    import torch

    return {
        "torch_intra_op": int(torch.get_num_threads()),
        "cores": cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(libgomp default: spins, then sleeps)"),
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "(one per core)"),
        "mediapipe": "its own pool (no setting in its Python API)",
        "single_threaded": [*SMALL_STAGES, "the fit's optimiser steps"],
    }
