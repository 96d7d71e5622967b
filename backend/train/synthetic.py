"""A redistributable training corpus: synthetic talking faces (avface.synth) with many
identities, varied speech, head motion and, on some clips, a hand over the mouth, written as
a folder with a ``manifest.json`` that ``python -m avface.train`` (and the benchmark) read.

The default checkpoint is to be trained on such a corpus (docs/networks.md): every identity, voice
line and motion comes from a seed, so one command reproduces it, and nothing in it derives
from clips the project may not redistribute.

    python -m avface.train.synthetic -o out/synth-corpus --clips 200
    python -m avface.train out/synth-corpus -o networks.pt
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

#: Word pools for random sentences (our own lists): varied phones, lip rounding, closures.
_SUBJECTS = ("the old man", "my brother", "a small boy", "her mother", "the teacher", "every farmer", "our pilot",
             "the quiet girl", "a tall woman", "the brave cook", "my uncle Bob", "the happy baker")
_VERBS = ("bought", "moved", "found", "pushed", "wished for", "painted", "carried", "shouted at", "fixed", "looked at",
          "threw", "chose", "forgot", "opened", "washed", "measured")
_OBJECTS = ("a blue boat", "the cheap watch", "five purple pens", "a huge orange moon", "the rough wooden fence",
            "two shiny shoes", "a bowl of soup", "the thick yellow rope", "my father's map", "seven plump peaches",
            "the broken zipper", "a jar of jam", "the woolly sheep", "some fresh fish")
_ENDINGS = ("before noon", "at the zoo", "in the garage", "by the river", "with great joy", "this morning",
            "under the bridge", "after lunch", "all week", "near the window", "without a word", "on Thursday")
_INTERJECTIONS = ("Oh!", "Well,", "Wow!", "Hmm,", "Look,", "Yes,", "No,", "Okay,")
#: A word of English speech takes about this long at espeak's default rate, s.
_SECONDS_PER_WORD = 0.38


def random_text(rng: np.random.Generator, duration_s: float) -> str:
    """Random sentences that about fill ``duration_s`` of speech (the synthesiser cuts what
    does not fit at a word boundary)."""
    words_wanted = max(int(duration_s / _SECONDS_PER_WORD), 2)
    sentences: list[str] = []
    n_words = 0
    while n_words < words_wanted:
        parts = [str(rng.choice(_SUBJECTS)), str(rng.choice(_VERBS)), str(rng.choice(_OBJECTS))]
        if rng.random() < 0.5:
            parts.append(str(rng.choice(_ENDINGS)))
        if rng.random() < 0.25:
            parts.insert(0, str(rng.choice(_INTERJECTIONS)))
        sentence = " ".join(parts)
        sentence = sentence[0].upper() + sentence[1:]
        sentences.append(sentence + ("?" if rng.random() < 0.2 else "."))
        n_words += len(sentence.split())
    return " ".join(sentences)


def make_corpus(out_dir: str | Path, n_clips: int, *, seed: int = 0, duration_s: float = 6.0, size: int = 256,
                p_hand: float = 0.5, detail: bool = False, progress: Callable[[int, int], None] | None = None) -> Path:
    """Render ``n_clips`` synthetic clips into ``out_dir`` (clips already there are kept) and
    write its ``manifest.json``; returns the manifest's path. ``detail``: the faces have skin
    detail (folds, wrinkles; :mod:`avface.synth.wrinkles`) and each clip its height maps, the
    corpus of the fine stage's generic network (:mod:`avface.train.fine_generic`)."""
    from avface.synth import make_demo_clip

    if n_clips < 1:
        raise ValueError(f"expected at least one clip, got {n_clips}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n_clips):
        clip_seed = seed * 1_000_003 + i
        rng = np.random.default_rng([seed, i])
        clip_dir = out_dir / f"synth_{clip_seed:07d}"
        video = clip_dir / "demo.mp4"
        hand = bool(rng.random() < p_hand)
        text = random_text(rng, duration_s)
        if not video.is_file():
            make_demo_clip(clip_dir, seed=clip_seed, duration_s=duration_s, size=size, text=text, occluder=hand,
                           detail=detail)
        entries.append({"id": clip_dir.name, "video": f"{clip_dir.name}/demo.mp4", "audio_in_container": True,
                        "fps": 25, "resolution": f"{size}x{size}", "content": "synthetic talking face (avface.synth)",
                        "text": text, "hand_over_mouth": hand, "seed": clip_seed,
                        "ground_truth": f"{clip_dir.name}/demo_gt.npz", "skin_detail": detail})
        if progress:
            progress(i + 1, n_clips)
    manifest = out_dir / "manifest.json"
    manifest.write_text(json.dumps({"description": f"synthetic training corpus, seed {seed}, made by avface.train.synthetic",
                                    "clips": entries}, indent=1))
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m avface.train.synthetic", description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", required=True, help="corpus folder")
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per clip")
    ap.add_argument("--size", type=int, default=256, help="frame width and height, pixels")
    ap.add_argument("--detail", action="store_true", help="skin detail (folds, wrinkles) and its height maps")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    make_corpus(args.out, args.clips, seed=args.seed, duration_s=args.duration, size=args.size, detail=args.detail,
                progress=lambda i, n: log.info("clip %d/%d", i, n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
