"""The ``bench`` subcommand: ``avface bench CLIPS_DIR -o OUT_DIR [--methods ...] [--seed N]``.

``avface.cli`` calls :func:`register`; ``python -m avface.bench`` runs it on its own.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _methods_arg(values: list[str] | None) -> tuple[str, ...] | None:
    """--methods a b, --methods a,b or both."""
    if not values:
        return None
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    return tuple(out) or None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("clips_dir", help="folder of talking-face clips (a manifest.json there pairs videos with separate audio)")
    p.add_argument("-o", "--output", default="bench_out", help="output folder (default ./bench_out)")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help="methods to compare (default: every registered one; coarse_video always runs)")
    p.add_argument("--seed", type=int, default=0, help="seeds the occlusions and the synthetic clips (default 0)")
    p.add_argument("--clips", nargs="+", metavar="ID", help="only these clip ids of the folder")
    p.add_argument("--synth", type=int, default=3, help="synthetic clips with ground truth (default 3; 0 for none)")
    p.add_argument("--synth-seconds", type=float, default=4.0, help="length of each synthetic clip (default 4 s)")
    p.add_argument("--no-plots", action="store_true", help="metrics.json and report.md only")
    p.add_argument("--no-strip", action="store_true", help="skip the side-by-side strip video")
    p.add_argument("--cache-dir", help="tracking and variant cache (default OUT/cache)")
    p.add_argument("--fov", type=float, metavar="DEG", help="every clip's vertical field of view "
                   "(default: each clip's own estimate, as reconstruct makes it)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first, so the methods it registers can run (repeatable)")
    p.add_argument("--networks", metavar="CKPT", help="networks checkpoint for the audio-visual methods "
                   "(sets AVFACE_BENCH_NETWORKS; default: the one that ships; `none` leaves them out)")
    p.add_argument("--list-methods", action="store_true", help="print the registered methods and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def cmd_bench(args) -> int:
    from avface.bench.harness import BenchConfig, run_bench
    from avface.bench.methods import available_methods, load_plugins
    from avface.bench.report import main_table

    if args.networks:
        named = args.networks in ("default", "none")
        os.environ["AVFACE_BENCH_NETWORKS"] = args.networks if named else str(Path(args.networks).resolve())
    if args.list_methods:
        load_plugins(tuple(args.plugin))
        for name, m in available_methods().items():
            print(f"{name:14s} {m.description} [{', '.join(m.stages)}]")
        return 0
    if not args.quiet:
        logging.getLogger("avface.bench").setLevel(logging.INFO)
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = BenchConfig(seed=args.seed, methods=_methods_arg(args.methods),
                      clip_ids=_methods_arg(args.clips), synth_clips=max(0, args.synth),
                      synth_duration_s=args.synth_seconds, plots=not args.no_plots, strip=not args.no_strip,
                      fov_deg=args.fov,
                      cache_dir=args.cache_dir, plugins=tuple(args.plugin))
    out = Path(args.output)
    t0 = time.perf_counter()
    doc = run_bench(Path(args.clips_dir), out, cfg,
                    progress=None if args.quiet else (lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True)))
    print("\n".join(main_table(doc)))
    print(f"wrote {out / 'metrics.json'}, {out / 'report.md'} and {out / 'plots'} in {time.perf_counter() - t0:.0f} s "
          f"(CPU {doc['run']['cpu_s']:.0f} s)")
    return 0


def register(subparsers) -> None:
    """Add ``bench`` to ``avface``'s argparse subparsers."""
    p = subparsers.add_parser("bench", help="measure accuracy, occlusion robustness, stability and speed of every method",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
