"""The ``export`` subcommand: ``avface export RESULT --to usd|gltf|livelink-csv [--to ...] -o OUT``.

``avface.cli`` calls :func:`register`.
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add ``export`` to ``avface``'s argparse subparsers."""
    from avface.export import FORMATS

    p = subparsers.add_parser(
        "export", help="export a result to USD, glTF binary or a Live Link Face CSV",
        description="Export a reconstruction result to interchange formats: " + "; ".join(
            f"{name} ({FORMATS[name][0]}): {FORMATS[name][2]}" for name in FORMATS))
    p.add_argument("result", help="the result.npz to export")
    # no argparse choices: an unknown format gets the project's bad_input error and exit status
    p.add_argument("--to", dest="formats", action="append", metavar="FORMAT", required=True,
                   help=f"{' | '.join(FORMATS)}; repeat or separate with commas for several")
    p.add_argument("-o", "--output", help="a file (one format, with its suffix) or a folder "
                   "(default: the result's folder); files are named after the result's folder")
    p.add_argument("--flame-dir", help="the FLAME folder a FLAME result was made with "
                   "(default: the one in config.yaml beside the result)")
    p.add_argument("--no-check", action="store_true",
                   help="export even when the result's parameters do not give its stored vertices")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from avface.core.progress import StageBars
    from avface.export import export_result

    formats = [f for item in args.formats for f in item.split(",") if f.strip()]
    bars = StageBars(not args.quiet)
    t0 = time.perf_counter()
    try:
        written = export_result(args.result, formats, args.output, flame_dir=args.flame_dir,
                                check=not args.no_check, progress=bars)
    finally:
        bars.close()
    for fmt, path in written.items():
        print(f"{fmt:13s} {path}")
    print(f"exported {args.result} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
