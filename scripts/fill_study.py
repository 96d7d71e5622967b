"""How far can the fill of hidden mouths go on real clips? A study (docs/networks.md), not a benchmark.

    .venv/bin/python scripts/fill_study.py ../shared/data --seed 0 [--cache-dir /tmp/bench_cache]

For every real clip of the folder, it takes the benchmark's own occluded variants (the same
seeded plans and cached videos as ``avface bench --seed S --cache-dir DIR``) and the
camera that the benchmark estimates on the clean clip. On the frames the confidence
distrusts, it fills the tracker's lower-face offsets (the networks' evidence) in several
ways, and scores each fill against the clean clip's tracker on the occluded frames. The
score is the mean lip-landmark error in inter-ocular units, summed over clips and given as
a ratio to the straight line (``interp``). No fit runs, so the figures are the fill's own,
before the fit (which took the shipped fill's 0.87 / 0.89 / 0.90 to the benchmark's
0.85 / 0.81 / 0.86, seed 0).

Rows:

* ``shipped``: :func:`avface.stages.networks.readout.adapt_fill`, what ``reconstruct`` does;
* ``raw features`` and ``f_a + raw``: the same choice on hidden spans, with the readout's
  input replaced by (or joined with) plain speech features: log-mel in 20 bands x 4 times,
  the 16 windows' energy, and the phones in 4 times;
* ``mean of candidates``: no choice, the mean of every candidate fill;
* ``best per clip (oracle)``: the candidate closest to the answer, chosen knowing it, which
  is the ceiling of choosing among these candidates;
* ``true span mean`` and ``line through the clean ends``: not fills but floors. The first
  holds each span at its true mean; the second draws the line between the clean clip's own
  values at the span's ends, so it measures what the variant's ends cost.

The last column is the worst clip's ratio. Printing needs no plots; it takes about a minute
when the benchmark's caches are warm (tracking of every variant is cached).
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

ROWS = ("shipped", "raw features", "f_a + raw", "mean of candidates", "best per clip (oracle)", "true span mean",
        "line through the clean ends")
VARIANTS = ("hand", "object", "audio_only")


def raw_speech_features(expression: dict) -> np.ndarray:
    """(T, F) plain speech features per frame: log-mel in 20 bands x 4 times, the energy of
    the 16 windows, the phones in 4 times."""
    mel = expression["mel"].numpy().astype(np.float64)  # (T, 16, 80)
    phones = expression["phones"].numpy().astype(np.float64)  # (T, 16, P)
    t = len(mel)
    bands = mel.reshape(t, 4, 4, 20, 4).mean(axis=(2, 4)).reshape(t, -1)
    energy = np.log(np.exp(mel).sum(-1) + 1e-6)
    return np.concatenate([bands, energy, phones.reshape(t, 4, 4, -1).mean(2).reshape(t, -1)], axis=1)


def study_variant(obs, ref, trusted, occ, f_a, raw, network) -> dict[str, float]:
    """Mean lip error on ``occ`` of every row (and interp), inter-ocular units. ``network``
    is the generic networks' fill with given frames hidden, a candidate as in reconstruct."""
    import dataclasses

    from avface.stages.networks import readout

    cfg = readout.ReadoutConfig()
    stacked = dataclasses.replace(cfg, context=(0,))  # for features that carry their context already
    lip = readout.LIP_ROWS

    def err(x):
        x = np.where(trusted[:, None, None], obs, x)
        return float(np.linalg.norm(x[occ][:, lip] - ref[occ][:, lip], axis=-1).mean())

    out = {"interp": err(readout.linear_fill(obs, trusted))}
    out["shipped"] = err(readout.adapt_fill(obs, trusted, f_a, network, cfg)[0])
    raw_ctx = readout.stack_context(raw, (-4, 0, 4))
    fa_ctx = readout.stack_context(f_a, cfg.context)
    out["raw features"] = err(readout.adapt_fill(obs, trusted, raw_ctx, network, stacked)[0])
    out["f_a + raw"] = err(readout.adapt_fill(obs, trusted, np.concatenate([fa_ctx, raw_ctx], 1), network, stacked)[0])
    candidates = readout._candidates(obs, trusted, fa_ctx, network(np.zeros_like(trusted)), cfg)
    out["mean of candidates"] = err(np.mean(list(candidates.values()), axis=0))
    out["best per clip (oracle)"] = min(err(c) for c in candidates.values())
    from avface.bench.metrics import runs

    held = obs.copy()
    for a, b in runs(occ):
        held[a:b] = ref[a:b].mean(0)
    out["true span mean"] = err(np.where(occ[:, None, None], held, obs))
    out["line through the clean ends"] = err(np.where(occ[:, None, None], readout.linear_fill(ref, ~occ), obs))
    return out


def clip_study(clip, seed: int, cache: Path, networks) -> dict[str, dict[str, float]]:
    """{variant: row scores} for one clip, from the benchmark's cached variants."""
    import torch

    from avface import media
    from avface.bench import harness as H
    from avface.bench.occluders import make_plan, occluded_frames
    from avface.models.avnets import infer_expression
    from avface.stages.networks.evidence import build_evidence
    from avface.stages.networks.run import trusted_mouth
    from avface.stages.tracking import track

    cfg = H.BenchConfig(seed=seed)
    info = media.probe(clip.video)
    clean = track(info, config=cfg.tracking, cache_dir=cache / "tracking")
    wave, feats = H._read_speech(clip.audio if clip.audio is not None else clip.video, clean.n_frames, float(info.fps))
    if feats is None:
        return {}
    plan = make_plan(clip.id, seed, clean, feats.activity)
    paths = H._variant_paths(cache, clip.id)
    H._ensure_variants(info, plan, paths)
    trackings = {"clean": clean, **{v: H._track_variant(paths[v], clean.n_frames, cfg, cache) for v in VARIANTS}}
    confidences = H._confidences(trackings, {})
    fit_cfg, _ = H._clip_camera(clean, confidences["clean"][0], cfg, {})
    inputs = H._method_inputs(clip.id, trackings, confidences, feats, wave, float(info.fps), fit_cfg)

    def evidence(v):
        return build_evidence(inputs[v].tracking, feats, mouth_conf=inputs[v].visual_conf, fov_deg=fit_cfg.fov_deg)

    ref = evidence("clean").expression["landmarks"].numpy().astype(np.float64)
    out = {}
    for v in VARIANTS:
        occ = occluded_frames(plan, v)
        if not occ.any():
            continue
        ev = evidence(v)
        e = ev.expression
        trusted = trusted_mouth(ev, inputs[v].visual_conf)
        with torch.no_grad():
            f_a = (networks.expression.audio(e["phones"], e["mel"]) * e["audio_present"][:, None]).numpy()

        def network(hidden, e=e, trusted=trusted):
            seen = torch.as_tensor(trusted & ~hidden, dtype=torch.float32)
            with torch.no_grad():
                return infer_expression(networks.expression, dict(e, usable=e["usable"] * seen)).numpy()

        out[v] = study_variant(e["landmarks"].numpy().astype(np.float64), ref, trusted, occ,
                               f_a.astype(np.float64), raw_speech_features(e), network)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("clips_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path("bench_out/cache"),
                        help="the benchmark's cache (tracking and variants), shared with avface bench")
    args = parser.parse_args()

    import torch

    from avface.core.clips import discover_clips
    from avface.models.checkpoint import load_default_checkpoint

    torch.set_num_threads(1)
    networks = load_default_checkpoint().networks.eval()
    totals = {v: collections.defaultdict(float) for v in VARIANTS}
    worst = {v: collections.defaultdict(float) for v in VARIANTS}
    for clip in discover_clips(args.clips_dir):
        for v, scores in clip_study(clip, args.seed, args.cache_dir, networks).items():
            print(f"{clip.id:28s} {v:10s} " + " ".join(f"{k} {scores[k] / scores['interp']:.2f}" for k in ROWS[:5]),
                  flush=True)
            for k, x in scores.items():
                totals[v][k] += x
                worst[v][k] = max(worst[v][k], x / scores["interp"])
    print(f"\nseed {args.seed}: each fill's lip error on the occluded frames / interp's, summed over clips "
          "(worst clip in brackets)\n")
    print("| fill | " + " | ".join(VARIANTS) + " |\n|---|" + "---|" * len(VARIANTS))
    for k in ROWS:
        print(f"| {k} | " + " | ".join(f"{totals[v][k] / totals[v]['interp']:.3f} ({worst[v][k]:.2f})" for v in VARIANTS)
              + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
