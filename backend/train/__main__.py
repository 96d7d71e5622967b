"""``python -m avface.train DIR|CLIP.npz ... -o CKPT`` (also ``avface train``): train the
networks on folders of talking-face videos (prepared into training clips first, see
avface.train.prepare) and on prepared training clips. Under ``torchrun --nproc-per-node N``
it trains data-parallel. It shows a progress bar, writes a loss plot beside the checkpoint
(CKPT's stem + ``.loss.png``) and resumes from its last save."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from avface.errors import AVFaceError

log = logging.getLogger("avface.train")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of a training run, shared by ``python -m avface.train`` and ``avface train``."""
    ap.add_argument("clips", nargs="+", help="folders of videos (a manifest.json, or videos with their audio) "
                    "and/or prepared training clips (.npz)")
    ap.add_argument("--prepared-dir", default=None,
                    help="where folders' training clips go (default: CKPT's stem + '.clips' beside it)")
    ap.add_argument("-o", "--out", required=True, help="checkpoint to write")
    # defaults None: TrainConfig's (read when training starts, so that building the
    # `avface` parser does not import torch)
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps (default 2000)")
    ap.add_argument("--batch", type=int, default=None, help="windows per step over all processes (default 32)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-4, the paper's)")
    ap.add_argument("--seed", type=int, default=None, help="seeds the weights and every sample (default 0)")
    ap.add_argument("--optimizer", default=None, choices=("adam", "sgd"), help="default adam")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch's choice)")
    ap.add_argument("--save-every", type=int, default=None, help="steps between saves (default 100)")
    ap.add_argument("--no-resume", action="store_true", help="start afresh even if a previous run's state is there")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar (log lines every 10 steps instead)")


class StepBar:
    """The training's progress: a tqdm bar over the steps with the latest losses, on stderr
    (rank 0 only), or a log line every 10 steps when quiet."""

    def __init__(self, steps: int, enabled: bool):
        self.steps = steps
        self.enabled = enabled
        self.bar = None

    def __call__(self, step: int, losses: dict) -> None:
        if not self.enabled:
            if step % 10 == 0 or step == self.steps - 1:
                log.info("step %d: loss %.4f", step, losses["total"])
            return
        if self.bar is None:
            from tqdm import tqdm

            # a resumed run starts at its first new step
            self.bar = tqdm(total=self.steps, initial=step, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True)
        self.bar.update(step + 1 - self.bar.n)
        self.bar.set_postfix(loss=f"{losses['total']:.3f}", lmk=f"{losses['landmarks']:.3f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` (from :func:`add_arguments`) say; returns the exit status."""
    rank = int(os.environ.get("RANK", "0"))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from avface.train.data import load_clip
    from avface.train.loop import TrainConfig, plot_path, train

    given = dict(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, optimizer=args.optimizer,
                 save_every=args.save_every)
    config = dataclasses.replace(TrainConfig(), **{k: v for k, v in given.items() if v is not None})
    bar = StepBar(config.steps, enabled=rank == 0 and not args.quiet)
    try:
        from avface.train.loop import _distributed

        _, world = _distributed()
        out = Path(args.out)
        prepared = Path(args.prepared_dir) if args.prepared_dir else out.with_name(out.stem + ".clips")
        folders = [Path(p) for p in args.clips if Path(p).is_dir()]
        paths: list[Path] = [Path(p) for p in args.clips if not Path(p).is_dir()]
        if folders and rank == 0:  # one process tracks; the others wait for its files
            from avface.train.prepare import prepare_folder

            for folder in folders:
                prepare_folder(folder, prepared, progress=lambda i, n, cid: log.info("preparing %d/%d: %s", i + 1, n, cid))
        if world > 1:
            import torch.distributed

            torch.distributed.barrier()
        if folders:
            paths += sorted(prepared.glob("*.npz"))
        clips = [load_clip(p) for p in paths]
        history = train(clips, out, config, device=args.device, resume=not args.no_resume, progress=bar)
    except AVFaceError as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    bar.close()
    if rank == 0:
        last = history[-1] if history else {}
        print(f"wrote {out} ({len(history)} steps, final loss {last.get('total', float('nan')):.4f}) "
              f"and its loss plot {plot_path(out)}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m avface.train", description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
