"""The generic fine-stage network: the detail network trained on a corpus of synthetic clips
with skin detail (``avface.synth`` with ``detail=True``: folds and wrinkles that deepen with
the expressions that make them), the same way per-clip adaptation trains it
(:func:`avface.stages.detail.adapt.adapt_clip`: photometric, normal, symmetry and size terms on
trusted texels, no ground truth), and added to a networks checkpoint as its ``fine`` part.
Per-clip adaptation then starts from it instead of from random weights
(docs/fine_stage.md, "The generic start").

    python -m avface.train.synthetic -o out/detail-corpus --clips 24 --seed 2 --size 512 --duration 4 --detail
    python -m avface.train.fine_generic out/detail-corpus --networks models/weights/avface_networks.pt \\
        -o models/weights/avface_networks.pt

Geometry comes from the clips' ground truth (the exact mesh that was drawn, in the camera
frame): the corpus teaches what shading detail looks like on a known surface. Frames while
the hand is in view are not trusted, as the visual confidence would not trust them. The
audio channel is the checkpoint's own audio embedding f_a of the clip's speech, so the
network learns with the channel it will see at inference.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FineCorpusConfig:
    """Options of the generic fine-stage training."""

    map_size: int = 256
    """UV map side (the CPU's default)."""
    rounds: int = 3
    """Passes over the corpus; each pass trains ``steps_per_clip`` steps on every clip, in a
    seeded order."""
    steps_per_clip: int = 20
    batch: int = 2
    lr: float = 1e-3
    seed: int = 0
    height_weight: float = 0.0
    """Weight of the supervised term mean |D - H| / 1 mm over trusted texels, H the corpus's
    true height (``demo_detail.npz``), added to the self-supervised losses; 0: those alone."""


@dataclass(eq=False)
class DetailTrainingClip:
    """One corpus clip, unwrapped and ready to train on."""

    id: str
    uv: object  #: :class:`avface.stages.detail.fine.ClipUV`
    vertices: torch.Tensor  #: (T, V, 3) camera frame (ground truth)
    audio: torch.Tensor | None  #: (T, 64) f_a, None without speech
    height: np.ndarray | None  #: (T, S, S) ground-truth height, metres (``with_height``)
    shading_fit: tuple | None = None  #: (albedo, sh) after the first visit


def speech_embedding(networks, wave: np.ndarray, n_frames: int, fps: float) -> np.ndarray:
    """(T, 64) float32 f_a of a speech wave (16 kHz), as the networks stage computes it."""
    from avface import media
    from avface.stages import audio as audio_mod
    from avface.stages.networks.evidence import normalise_mel

    feats = audio_mod.extract_features(wave, media.SAMPLE_RATE_HZ, n_frames, fps)
    phones = torch.as_tensor(np.asarray(feats.phones, np.float32))
    mel = torch.as_tensor(normalise_mel(feats.mel))
    with torch.no_grad():
        return networks.expression.eval().audio(phones, mel).numpy().astype(np.float32)


def load_detail_clip(clip_dir: Path, model, raster, networks=None, *, with_height: bool = False) -> DetailTrainingClip:
    """A synthetic clip folder (``demo.mp4``, ``demo_gt.npz``) unwrapped against its
    ground-truth mesh; networks: whose audio encoder gives the audio channel (None:
    silence); with_height: also each frame's true height from ``demo_detail.npz`` (for
    measuring, not for training: 26 MB a 100-frame clip at 256^2)."""
    from avface import media
    from avface.stages.detail.fine import ClipUV, unwrap_clip
    from avface.synth.clip import load_demo_gt
    from avface.synth.generate import DETAIL_GT_NAME

    gt = load_demo_gt(clip_dir)
    n = gt.n_frames
    verts = torch.as_tensor(gt.gt_vertices, dtype=torch.float32)
    info = media.probe(gt.video_path)
    clip = unwrap_clip(media.iter_frames(info, 0, n), verts, np.asarray(model.faces), raster, gt.K)
    if gt.occluder_span_s is not None:  # the hand's frames, whole, as the visual confidence would
        t = np.arange(n) / gt.fps
        a, b = gt.occluder_span_s
        hand = torch.as_tensor((t >= a - 0.2) & (t <= b + 0.2))
        clip = ClipUV(clip.image, torch.where(hand[:, None, None], torch.zeros_like(clip.trust), clip.trust))
    audio = None
    if networks is not None:
        audio = torch.as_tensor(speech_embedding(networks, media.read_audio(gt.wav_path), n, gt.fps))
    height = None
    detail_path = Path(clip_dir) / DETAIL_GT_NAME
    if with_height:
        if not detail_path.is_file():
            raise ValueError(f"{clip_dir} has no {DETAIL_GT_NAME}: render it with make_demo_clip(detail=True)")
        d = np.load(detail_path)
        static, dynamic = d["static"], d["dynamic"]
        if static.shape[0] != raster.size:
            raise ValueError(f"{detail_path} holds {static.shape[0]}^2 height maps, the raster is {raster.size}^2")
        height = static[None] + np.einsum("te,ehw->thw", gt.expression, dynamic)
    return DetailTrainingClip(Path(clip_dir).name, clip, verts, audio, height)


def _height_term(height: np.ndarray, weight: float):
    """extra_loss for adapt_clip: weight x mean |D - H| in millimetres over trusted texels."""
    from avface.stages.detail.fine import FineLossConfig

    min_trust = FineLossConfig().min_trust

    def term(idx, d, trust):
        h = torch.as_tensor(height[np.asarray(idx)], dtype=d.dtype, device=d.device)
        w = (trust >= min_trust).to(d.dtype)
        return weight * ((d - h).abs() * w).sum() / w.sum().clamp_min(1.0) / 1e-3

    return term


def train_generic_fine(clips: list[DetailTrainingClip], model, raster, config: FineCorpusConfig = FineCorpusConfig(), *,
                       progress: Callable[[int, int, dict], None] | None = None):
    """Train one detail network over the clips; returns (DetailNet, history)."""
    from avface.models.fine import DetailNet, FineNetConfig
    from avface.stages.detail import uvspace
    from avface.stages.detail.adapt import AdaptInputs, FineAdaptConfig, adapt_clip
    from avface.stages.detail.run import symmetric_rest

    if not clips:
        raise ValueError("no training clip")
    if config.height_weight > 0:
        missing = [c.id for c in clips if c.height is None]
        if missing:  # before any work: a missing height is not a height of zero
            raise ValueError(f"{', '.join(missing)} has no true height (load_detail_clip(with_height=True)) "
                             f"for height_weight")
    faces = np.asarray(model.faces)
    mirror = uvspace.mirror_texels(raster, faces, symmetric_rest(model))
    net = DetailNet(FineNetConfig(), seed=config.seed)
    rng = np.random.default_rng(config.seed)
    history: list[dict] = []
    total = config.rounds * len(clips)
    done = 0
    for r in range(config.rounds):
        for i in rng.permutation(len(clips)):
            c = clips[i]
            # frame_weight off: the recipe the shipped checkpoint's fine part was trained with
            cfg = FineAdaptConfig(steps=config.steps_per_clip, batch=config.batch, lr=config.lr, holdout_stride=0,
                                  seed=int(rng.integers(1 << 31)), net=net.cfg, frame_weight=False)
            extra = _height_term(c.height, config.height_weight) if config.height_weight > 0 else None
            res = adapt_clip(AdaptInputs(c.uv, c.vertices, faces, raster, c.audio, mirror), cfg, net=net,
                             shading_fit=c.shading_fit, predict=False, extra_loss=extra)
            c.shading_fit = (res.albedo, res.sh)
            done += 1
            rec = {"round": r, "clip": c.id, "loss_first": res.losses[0] if res.losses else None,
                   "loss_last": float(np.mean(res.losses[-5:])) if res.losses else None}
            history.append(rec)
            if progress is not None:
                progress(done, total, rec)
    net.eval()
    return net, history


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m avface.train.fine_generic", description=__doc__.splitlines()[0])
    ap.add_argument("corpus", help="a synthetic corpus folder (python -m avface.train.synthetic --detail)")
    ap.add_argument("--networks", required=True, help="the networks checkpoint to add the fine part to")
    ap.add_argument("-o", "--out", required=True, help="checkpoint to write (may be --networks itself)")
    ap.add_argument("--rounds", type=int, default=FineCorpusConfig.rounds)
    ap.add_argument("--steps-per-clip", type=int, default=FineCorpusConfig.steps_per_clip)
    ap.add_argument("--seed", type=int, default=FineCorpusConfig.seed)
    ap.add_argument("--height-weight", type=float, default=FineCorpusConfig.height_weight,
                    help="weight of the supervision by the corpus's true height (0: self-supervised only)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("avface.stages.detail.adapt").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from avface.errors import AVFaceError
    from avface.models.canonical import CanonicalModel
    from avface.models.checkpoint import file_sha256, load_checkpoint, save_checkpoint
    from avface.stages.detail import uvspace

    config = FineCorpusConfig(rounds=args.rounds, steps_per_clip=args.steps_per_clip, seed=args.seed,
                              height_weight=args.height_weight)
    try:
        ckpt = load_checkpoint(args.networks)
    except AVFaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    manifest = json.loads((Path(args.corpus) / "manifest.json").read_text())
    model = CanonicalModel()  # the synthetic faces' topology and UVs
    raster = uvspace.rasterise_uv(model.uv, model.uv_faces, config.map_size)
    t0 = time.perf_counter()
    clips = []
    for k, entry in enumerate(manifest["clips"]):
        clips.append(load_detail_clip(Path(args.corpus) / entry["id"], model, raster, ckpt.networks,
                                      with_height=config.height_weight > 0))
        log.info("unwrapped %d/%d: %s", k + 1, len(manifest["clips"]), entry["id"])
    net, history = train_generic_fine(
        clips, model, raster, config,
        progress=lambda i, n, rec: log.info("%d/%d %s: loss %.4f -> %.4f", i, n, rec["clip"], rec["loss_first"],
                                             rec["loss_last"]))
    ckpt.networks.fine = net
    meta = dict(ckpt.meta)
    meta["fine"] = {"corpus": manifest.get("description", str(args.corpus)), "clips": len(clips),
                    "config": dataclasses.asdict(config), "seconds": round(time.perf_counter() - t0, 1),
                    "final_loss": float(np.mean([h["loss_last"] for h in history[-len(clips):]]))}
    save_checkpoint(args.out, ckpt.networks, meta)
    print(f"wrote {args.out} with a fine-stage part ({len(clips)} clips, {len(history)} visits, "
          f"{time.perf_counter() - t0:.0f} s); sha256 {file_sha256(Path(args.out))}, {Path(args.out).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
