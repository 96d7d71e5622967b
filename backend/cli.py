"""The `avface` command line."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from avface import __version__
from avface.config import MODELS
from avface.core.progress import StageBars
from avface.errors import AVFaceError

log = logging.getLogger("avface")


def _options_from_args(args):
    from avface.config import ReconstructOptions

    overrides = dict(
        model=args.model, flame_dir=args.flame_dir, audio=args.audio, transcript=args.transcript,
        device=args.device, frame_start=args.start, frame_end=args.end, preview=args.preview or None,
        write_vertices=False if args.no_vertices else None, fov_deg=args.fov, cache_dir=args.cache_dir,
        networks_checkpoint="none" if args.no_networks else args.networks, detail=args.detail,
        threads=args.threads,
    )
    if args.config:
        return ReconstructOptions.from_yaml(Path(args.config), **overrides)
    return ReconstructOptions.from_dict({k: v for k, v in overrides.items() if v is not None})


def cmd_reconstruct(args) -> int:
    from avface.pipeline import reconstruct
    from avface.result import load_result, summary

    options = _options_from_args(args)
    out = Path(args.output)
    bars = StageBars(not args.quiet)
    t0 = time.perf_counter()

    def head_ready(path: Path) -> None:
        if options.detail:  # the head can be imported now; the detail maps follow
            bars.close()
            print(f"head written: {path} after {time.perf_counter() - t0:.1f} s (importable now; "
                  f"the detail maps follow into {out / 'detail'})", file=sys.stderr, flush=True)

    try:
        path = reconstruct(Path(args.video), out, options, progress=bars, on_head=head_ready)
    finally:
        bars.close()
    print(summary(load_result(path)))
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s" + (f" and {out / 'preview.mp4'}" if options.preview else ""))
    return 0


def cmd_inspect(args) -> int:
    from avface.result import load_result, summary

    print(summary(load_result(Path(args.result))))
    return 0


def cmd_demo(args) -> int:
    from avface.demo import run_demo

    return run_demo(Path(args.output), seed=args.seed, duration_s=args.duration, preview=not args.no_preview,
                    progress=StageBars(not args.quiet))


def cmd_models(args) -> int:
    from avface.models.registry import available_models

    models = available_models(args.flame_dir)
    for name, st in models.items():
        print(f"{name:8s} {'available' if st['available'] else 'not available'}" + (f": {st['reason']}" if st["reason"] else ""))
    if args.check:
        from avface.core.assets import FACE_LANDMARKER, HAND_LANDMARKER, locate

        for asset in (FACE_LANDMARKER, HAND_LANDMARKER):
            print(f"{asset.name:22s} ok ({locate(asset)})")
    return 0


def cmd_train(args) -> int:
    from avface.train.__main__ import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avface", description="Audio-visual 4D face reconstruction for Blender (AVFace).")
    p.add_argument("--version", action="version", version=f"avface {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("reconstruct", help="reconstruct a talking face from a video and its speech")
    r.add_argument("video", help="the video file (its own audio track is used unless --audio is given)")
    r.add_argument("-o", "--output", default="out", help="output folder (default: ./out)")
    r.add_argument("--model", choices=MODELS, default=None,
                   help="face model: default (the embedded canonical face), ict (the ICT Face Model Light, "
                        "a whole head with ARKit shapes), flame")
    r.add_argument("--flame-dir", help="folder with FLAME's generic_model.pkl or flame2023.pkl and mediapipe_landmark_embedding.npz")
    r.add_argument("--audio", help="a separate audio file (wav, mp3, or any media file with audio)")
    r.add_argument("--transcript", help="a text file with what is said: forced alignment instead of phone recognition")
    r.add_argument("--device", choices=("cpu", "cuda"), default=None)
    r.add_argument("--start", type=int, help="first frame (default 0)")
    r.add_argument("--end", type=int, help="frame after the last one (default: the end)")
    r.add_argument("--preview", action="store_true", help="also write preview.mp4, the mesh over the frames with the audio")
    r.add_argument("--no-vertices", action="store_true", help="do not store the per-frame mesh in result.npz")
    r.add_argument("--fov", type=float, help="vertical field of view of the camera in degrees "
                   "(default: estimated from the clip)")
    r.add_argument("--config", help="YAML file of options (command-line flags override it)")
    r.add_argument("--cache-dir", help="tracking cache folder (default ~/.cache/avface)")
    r.add_argument("--networks", metavar="CKPT", help="the AVFace networks' checkpoint: audio fills the occluded "
                   "mouth and the lips are refined (default: the one that ships; a file `avface train` wrote)")
    r.add_argument("--no-networks", action="store_true", help="video only: no networks stage")
    r.add_argument("--detail", action=argparse.BooleanOptionalAction, default=None,
                   help="run the fine stage: one 16-bit displacement map per frame in OUT/detail (default: on; "
                        "--no-detail saves about 5x the tracking's time on a CPU; see docs/fine_stage.md)")
    r.add_argument("--threads", type=int, help="torch threads for the stages (default: one per core, or OMP_NUM_THREADS); OpenMP's "
                   "threads sleep while they wait, so a busy machine slows the job in proportion")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_reconstruct)

    i = sub.add_parser("inspect", help="validate a result.npz and print a summary")
    i.add_argument("result")
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("demo", help="make a synthetic talking-face clip with ground truth, reconstruct it, print the 3D error")
    d.add_argument("-o", "--output", default="out/demo")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--duration", type=float, default=6.0, help="seconds of speech")
    d.add_argument("--no-preview", action="store_true")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("models", help="list the face models this backend can run")
    m.add_argument("--flame-dir")
    m.add_argument("--check", action="store_true", help="also verify the pretrained MediaPipe files (exit 5 if damaged)")
    m.set_defaults(func=cmd_models)

    from avface.train.__main__ import add_arguments as add_train_arguments

    t = sub.add_parser("train", help="train the AVFace networks on folders of talking-face videos (or prepared clips)",
                       description="Train the AVFace networks; resumes from CKPT's last save (docs/networks.md).")
    add_train_arguments(t)
    t.set_defaults(func=cmd_train)

    from avface.bench import cli as bench_cli
    from avface.export import cli as export_cli
    from avface.service import cli as service_cli

    service_cli.register(sub)
    bench_cli.register(sub)
    export_cli.register(sub)
    return p


def main(argv=None) -> int:
    # MediaPipe's native code logs through glog; keep its start-up chatter off the terminal.
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    # a long-running server's log needs times; one-shot commands keep it short
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if args.command == "serve" else "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except AVFaceError as e:
        print(f"avface: error [{e.code}]: {e}", file=sys.stderr)
        if e.detail and args.verbose:
            print(e.detail, file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("avface: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
