"""Time `avface export` on a long result: 1,500 frames (a minute at 25 fps), 50 expression
keys and 16 lip keys, for the default model (468 vertices) and a FLAME-sized synthetic FLAME
(about 5,000 vertices, 5 joints, pose correctives); each format is exported on its own, so
each figure includes building the rig from the result, as a user's run does.

    .venv/bin/python scripts/bench_export.py [--frames 1500] [--out DIR]

The results are made with the real model code and assemble.result_arrays (tests/export_util.py);
the FLAME model is a synthetic one in FLAME's file layout (tests/flame_fixture.py).
Prints one line per model and format: seconds, file size.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from export_util import default_result, flame_result  # noqa: E402
from flame_fixture import write_synthetic_flame  # noqa: E402

from avface.export import FORMATS, export_result  # noqa: E402
from avface.export.rig import rig_from_result  # noqa: E402
from avface.result import load_result  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=1500)
    p.add_argument("--expressions", type=int, default=50)
    p.add_argument("--lips", type=int, default=16)
    p.add_argument("--out", type=Path, help="keep the results and files here (default: a temporary "
                                            "folder, removed at the end)")
    args = p.parse_args(argv)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        return _run(args, args.out)
    # The files of one run take about 225 MB: never leave them behind in /tmp.
    with tempfile.TemporaryDirectory(prefix="avface-bench-export-") as tmp:
        return _run(args, Path(tmp))


def _run(args, root: Path) -> int:
    flame_dir = root / "flame"
    write_synthetic_flame(flame_dir, n_vertices=5000)
    t0 = time.perf_counter()
    results = {
        "default": (default_result(root / "default", n_frames=args.frames, n_expr=args.expressions,
                                   n_lip=args.lips, fps=25.0), None),
        "flame": (flame_result(root / "flame_result", flame_dir, n_frames=args.frames, n_shape=100,
                               n_expr=args.expressions, n_lip=args.lips, fps=25.0), flame_dir),
    }
    print(f"built the results in {time.perf_counter() - t0:.1f} s ({args.frames} frames, "
          f"{args.expressions} expression and {args.lips} lip keys)")
    for model, (path, fdir) in results.items():
        res = load_result(path)
        t = time.perf_counter()
        rig = rig_from_result(res, path, flame_dir=fdir)
        print(f"{model:8s} rig          {time.perf_counter() - t:6.2f} s  ({rig.n_vertices} vertices, "
              f"{len(rig.shape_names)} shapes, {len(rig.joint_names)} joints)")
        for fmt in FORMATS:
            t = time.perf_counter()
            out = export_result(path, [fmt], root / "files" / model, flame_dir=fdir)[fmt]
            print(f"{model:8s} {fmt:12s} {time.perf_counter() - t:6.2f} s  {out.stat().st_size / 1e6:7.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
