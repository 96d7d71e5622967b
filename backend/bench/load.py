"""How a reconstruction slows when the machine is busy, as an animator's computer is:
``python -m avface.bench.load CLIPS_DIR --clip ID -o OUT [avface reconstruct flags]``.

The same job (``avface reconstruct``, tracking not cached) runs once on a quiet machine and
once with each count of busy processes asked for (pure-Python loops in subprocesses, started
before the job and stopped after it). Each stage's seconds come from the job's own
``timings.json``; the table gives each load's seconds and their ratio to the quiet run. A
fair share of the CPU costs at most ``(cores + busy) / cores`` (2x with both of 2 cores
busy); thread pools that spin while they wait cost far more.

Wall times are noisy: the figures are for reading, never for a test to assert on.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSY_LOOP = "while True:\n    pass\n"


def _find_clip(folder: Path, clip_id: str | None):
    from avface.core.clips import discover_clips
    from avface.errors import InputError

    clips = discover_clips(folder)
    if not clips:
        raise InputError(f"{folder} has no clips")
    if clip_id is None:  # the longest: where the wait matters
        from avface import media

        return max(clips, key=lambda c: media.probe(c.video).n_frames)
    for c in clips:
        if c.id == clip_id:
            return c
    raise InputError(f"no clip {clip_id!r} in {folder}; it has {', '.join(c.id for c in clips)}")


def run_job(clip, out_dir: Path, busy: int, extra: list[str]) -> dict:
    """One ``avface reconstruct`` of ``clip`` into ``out_dir`` with ``busy`` loops running
    beside it: {"wall": s, "stages": {stage: s}, "tracker": s}."""
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
    try:
        cache = tempfile.mkdtemp(prefix="avface-load-cache-")  # tracking is part of the wait
        cmd = [sys.executable, "-m", "avface", "reconstruct", str(clip.video), "-o", str(out_dir), "-q",
               "--cache-dir", cache, *(["--audio", str(clip.audio)] if clip.audio else []), *extra]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
    finally:
        for p in loops:
            p.kill()
            p.wait()
    timings = json.loads((out_dir / "timings.json").read_text())
    return {"wall": wall, "stages": timings["stage_seconds"], "tracker": timings.get("tracker_seconds")}


def table(runs: dict[int, dict]) -> str:
    """Markdown: each stage's seconds per load and the ratio to the quiet run."""
    loads = sorted(runs)
    quiet = runs[loads[0]]
    stages = [s for s in quiet["stages"] if quiet["stages"][s] >= 0.05]
    head = "| stage | " + " | ".join(f"{n} busy (s)" + ("" if n == loads[0] else " | ratio") for n in loads) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(loads) - 1)]
    for name, get in [(s, lambda r, s=s: r["stages"].get(s, 0.0)) for s in stages] + [("whole job", lambda r: r["wall"])]:
        cells = []
        for n in loads:
            v = get(runs[n])
            cells.append(f"{v:.1f}" + ("" if n == loads[0] else f" | {v / max(get(quiet), 1e-9):.2f}x"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m avface.bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("clips_dir", help="folder of clips, found as `avface bench` finds them")
    p.add_argument("--clip", help="the clip's id (default: the longest)")
    p.add_argument("-o", "--output", default="load_out")
    p.add_argument("--busy", type=int, nargs="+", default=[1, 2], help="busy-process counts besides quiet (default 1 2)")
    args, extra = p.parse_known_args(argv)  # any other flag goes to `avface reconstruct` (--no-detail, ...)
    clip = _find_clip(Path(args.clips_dir), args.clip)
    out = Path(args.output)
    runs = {}
    for n in [0, *args.busy]:
        print(f"load: {clip.id} with {n} busy process(es) on {os.cpu_count()} cores ...", flush=True)
        runs[n] = run_job(clip, out / f"busy{n}", n, extra)
        print(f"load: {runs[n]['wall']:.1f} s", flush=True)
    report = table(runs)
    (out / "load.json").write_text(json.dumps({"clip": clip.id, "cores": os.cpu_count(), "extra": extra,
                                               "runs": runs}, indent=1))
    (out / "load.md").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
