"""``python -m avface.train DIR|CLIP.npz ... -o CKPT``: train the networks on folders of
talking-face videos (prepared into training clips first, see avface.train.prepare) and on
prepared training clips. Under ``torchrun --nproc-per-node N`` it trains data-parallel.

This is the entry the checkpoint errors point to; ``avface train`` is to be registered on it
(issue 8)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from avface.errors import AVFaceError

from .data import load_clip
from .loop import TrainConfig, train


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m avface.train", description=__doc__.splitlines()[0])
    ap.add_argument("clips", nargs="+", help="folders of videos (a manifest.json, or videos with their audio) "
                    "and/or prepared training clips (.npz)")
    ap.add_argument("--prepared-dir", default=None,
                    help="where folders' training clips go (default: CKPT's stem + '.clips' beside it)")
    ap.add_argument("-o", "--out", required=True, help="checkpoint to write")
    defaults = TrainConfig()
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument("--batch", type=int, default=defaults.batch, help="windows per step over all processes")
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--optimizer", default=defaults.optimizer, choices=("adam", "sgd"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch's choice)")
    ap.add_argument("--save-every", type=int, default=defaults.save_every, help="steps between saves")
    ap.add_argument("--no-resume", action="store_true", help="start afresh even if a previous run's state is there")
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = dataclasses.replace(defaults, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                                 optimizer=args.optimizer, save_every=args.save_every)
    log = logging.getLogger("avface.train")
    try:
        from pathlib import Path

        from .loop import _distributed

        _, world = _distributed()
        out = Path(args.out)
        prepared = Path(args.prepared_dir) if args.prepared_dir else out.with_name(out.stem + ".clips")
        folders = [Path(p) for p in args.clips if Path(p).is_dir()]
        paths: list[Path] = [Path(p) for p in args.clips if not Path(p).is_dir()]
        if folders and rank == 0:  # one process tracks; the others wait for its files
            from .prepare import prepare_folder

            for folder in folders:
                prepare_folder(folder, prepared, progress=lambda i, n, cid: log.info("preparing %d/%d: %s", i + 1, n, cid))
        if world > 1:
            import torch.distributed

            torch.distributed.barrier()
        if folders:
            paths += sorted(prepared.glob("*.npz"))
        clips = [load_clip(p) for p in paths]
        train(clips, args.out, config, device=args.device, resume=not args.no_resume,
              progress=lambda step, losses: log.info("step %d: loss %.4f", step, losses["total"])
              if step % 10 == 0 or step == config.steps - 1 else None)
    except AVFaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
