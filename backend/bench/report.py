"""report.md: the benchmark's tables for people, written from metrics.json's document."""
from __future__ import annotations

import math
from pathlib import Path

from avface.bench.methods import REFERENCE_METHOD
from avface.stages.confidence import OCCLUDED_BELOW

MAIN_COLUMNS = (
    ("nme_visible", "NME vis. %", 2),
    ("nme_lips_visible", "lips NME vis. %", 2),
    ("auc_visible", "AUC@10", 3),
    ("lip_err_occluded", "lip err. occl. mm", 2),
    ("lip_err_occluded_ratio", f"÷ {REFERENCE_METHOD}", 2),
    ("lip_err_audio_only", "lip err. audio-only mm", 2),
    ("jitter", "jitter mm/fr²", 3),
    ("occl_recall", "occl. recall", 2),
    ("occl_clean_flagged", "clean flagged", 3),
    ("mm_synth_visible", "synth mm vis.", 2),
    ("mm_synth_occluded", "synth mm occl.", 2),
    ("rtf_total", "RTF", 2),
    ("ratio_to_tracking", "× tracking", 2),
)


def _fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _value(doc: dict, clip: str, method: str, metric: str):
    for r in doc["records"]:
        if r["clip"] == clip and r["method"] == method and r["metric"] == metric:
            return r["value"]
    return None


def main_table(doc: dict) -> list[str]:
    """The report's main table (one row per method, aggregates over clips)."""
    rows = []
    for m in doc["methods"]:
        agg = doc["aggregate"].get(m, {})
        rows.append([f"`{m}`"] + [_fmt(agg.get(k), d) for k, _, d in MAIN_COLUMNS])
    return _table(["method"] + [h for _, h, _ in MAIN_COLUMNS], rows)


def write_report(doc: dict, path: Path) -> Path:
    real = [c for c in doc["clips"] if doc["clip_info"][c].get("kind") == "real" and "n_frames" in doc["clip_info"][c]]
    synth = [c for c in doc["clips"] if doc["clip_info"][c].get("kind") == "synth"]
    methods = doc["methods"]
    L = _header(doc, real, synth)
    if real:
        L += _occlusion_errors(doc, real, methods)
        L += _occlusions(doc, real)
        L += _visible_accuracy(doc, real, methods)
        L += _speed(doc, real, methods)
        L += _detail(doc, real, methods)
    if synth:
        L += _synthetic(doc, synth, methods)
    L += _plots(doc)
    L += _definitions(doc)
    path.write_text("\n".join(L) + "\n")
    return path

def _header(doc: dict, real: list[str], synth: list[str]) -> list[str]:
    """Title, what ran, the main table and the methods."""
    methods = doc["methods"]
    run = doc["run"]
    L: list[str] = ["# AVFace benchmark", ""]
    L.append(f"Clips: `{doc['clips_dir']}` ({len(real)} real, {len(synth)} synthetic); seed {doc['seed']}; "
             f"methods: {', '.join(f'`{m}`' for m in methods)}.")
    wall, cpu = run.get("wall_s"), run.get("cpu_s")
    L.append(f"Run: {_fmt(wall, 0)} s wall, {_fmt(cpu, 0)} s CPU on {run.get('cpu_count')} cores; "
             f"peak memory {_fmt(run.get('peak_rss_mb'), 0)} MiB"
             + (f"; GPU {run['cuda']['device']}, peak {_fmt(run['cuda']['peak_allocated_mb'], 0)} MiB allocated"
                if run.get("cuda") else "; no GPU") + ".")
    L += ["", "## Main table", "",
          "Averages over clips (each clip counts once; ratios by geometric mean; real-time factors weighted by "
          "duration). Lower is better except AUC.", ""]
    L += main_table(doc)
    L += ["", "## Methods", ""]
    for m in methods:
        info = doc["method_info"][m]
        L.append(f"- `{m}`: {info['description']} (stages: {', '.join(info['stages'])})")
    return L


def _occlusion_errors(doc: dict, real: list[str], methods: list[str]) -> list[str]:
    """Lip errors per clip on occluded and audio-only spans."""
    L: list[str] = []
    L += ["", "## Occlusion robustness per clip", "",
          f"Lip-vertex error in mm on occluded frames (hand / object), and the pooled ratio to `{REFERENCE_METHOD}`.", ""]
    rows = []
    for c in real:
        row = [c]
        for m in methods:
            h = _value(doc, c, m, "lip_err_occluded_hand")
            o = _value(doc, c, m, "lip_err_occluded_object")
            r = _value(doc, c, m, "lip_err_occluded_ratio")
            row.append(f"{_fmt(h)} / {_fmt(o)} ({_fmt(r)}×)")
        rows.append(row)
    L += _table(["clip"] + [f"`{m}`" for m in methods], rows)
    L += ["", "Audio-only spans (black frames): lip-vertex error in mm (ratio), and the leak of occlusion into "
          "frames ≥ 1 s from any occluder (`lip_err_unoccluded`, mm, hand variant).", ""]
    rows = []
    for c in real:
        row = [c]
        for m in methods:
            row.append(f"{_fmt(_value(doc, c, m, 'lip_err_audio_only'))} ({_fmt(_value(doc, c, m, 'lip_err_audio_only_ratio'))}×); "
                       f"leak {_fmt(_value(doc, c, m, 'lip_err_unoccluded'))}")
        rows.append(row)
    L += _table(["clip"] + [f"`{m}`" for m in methods], rows)
    return L


def _camera(ci: dict) -> str:
    """The clip's vertical field of view as the methods used it: ``est.`` when estimated."""
    cam = ci.get("camera")
    if not cam:
        return "n/a"
    s = f"{cam['fov_deg']:.1f}" + (" est." if cam.get("estimated") else "")
    if ci.get("camera_fov_true_deg") is not None:
        s += f" (true {ci['camera_fov_true_deg']:.1f})"
    return s


def _occlusions(doc: dict, real: list[str]) -> list[str]:
    """Where the occluders went, and how many of their frames the confidence flagged."""
    L: list[str] = []
    L += ["", "## The occlusions", "",
          "Spans in seconds; frames counted as occluded (≥ 50 % of the clean lip landmarks under the occluder); "
          f"the share of those frames that the visual confidence flags (< {OCCLUDED_BELOW:g}) on each variant, and its false "
          "alarms on the clean clip.", ""]
    rows = []
    for c in real:
        ci = doc["clip_info"][c]
        occ, fl = ci["occlusion"], ci["flagged_by_visual_confidence"]
        rows.append([c, f"{ci['duration_s']:.1f}",
                     ", ".join(f"{a:.2f}–{b:.2f}" for a, b in occ["occluder_spans_s"]) or "none",
                     occ["object_kind"],
                     ", ".join(f"{a:.2f}–{b:.2f}" for a, b in occ["audio_only_spans_s"]) or "none",
                     f"{ci['occluded_frames']['hand']} / {ci['occluded_frames']['object']} / {ci['occluded_frames']['audio_only']}",
                     f"{_fmt(fl.get('hand'))} / {_fmt(fl.get('object'))} / {_fmt(fl.get('audio_only'))}",
                     _fmt(fl.get("clean_false_positive")), f"{ci['still_frames']}", _camera(ci)])
    L += _table(["clip", "s", "occluder spans", "object", "audio-only spans", "occl. frames h/o/a",
                 "flagged h/o/a", "clean flagged", "still frames", "camera fov °"], rows)
    return L


def _visible_accuracy(doc: dict, real: list[str], methods: list[str]) -> list[str]:
    """NME and jitter per clip on the clean clips."""
    L: list[str] = []
    L += ["", "## Accuracy on visible frames and stability per clip", "",
          "NME and lips NME in % of the inter-ocular distance against the tracker's landmarks on the clean clip; "
          "jitter in mm/frame² on still frames.", ""]
    rows = []
    for c in real:
        row = [c]
        for m in methods:
            row.append(f"{_fmt(_value(doc, c, m, 'nme_visible'))} / {_fmt(_value(doc, c, m, 'nme_lips_visible'))}; "
                       f"{_fmt(_value(doc, c, m, 'jitter'), 3)}")
        rows.append(row)
    L += _table(["clip"] + [f"`{m}` NME / lips; jitter" for m in methods], rows)
    return L


def _speed(doc: dict, real: list[str], methods: list[str]) -> list[str]:
    """Real-time factors per stage, and memory."""
    run = doc["run"]
    L: list[str] = []
    L += ["", "## Speed and memory", "",
          "Seconds per second of video (real-time factor) of each stage on the clean clip, measured in this run. "
          "`decode` is a decode-only pass for reference (tracking decodes as it goes, so it is not added). "
          "A method's own stages (networks, fit, lips, detail) are timed together as `fit`.", ""]
    fit_methods = [m for m in methods if "fit" in doc["method_info"][m]["stages"]]
    rows = []
    for c in real:
        ci = doc["clip_info"][c]
        d = ci["duration_s"]
        ss, cs = ci["stage_seconds"], ci["stage_cpu_seconds"]
        row = [c, f"{d:.1f}"] + [_fmt(ss.get(s, 0) / d, 3) for s in ("probe", "decode", "tracking", "audio", "confidence")]
        row += [_fmt(_value(doc, c, m, "rtf_fit"), 3) for m in fit_methods]
        row += [_fmt(_value(doc, c, REFERENCE_METHOD, "rtf_export"), 3),
                _fmt(_value(doc, c, REFERENCE_METHOD, "rtf_total"), 3),
                _fmt(_value(doc, c, REFERENCE_METHOD, "cpu_rtf_total"), 3),
                _fmt(_value(doc, c, REFERENCE_METHOD, "ratio_to_tracking"), 2),
                _fmt(cs.get("tracking", 0) / d, 3)]
        rows.append(row)
    L += _table(["clip", "s", "probe", "decode", "tracking", "audio", "confidence"] + [f"fit `{m}`" for m in fit_methods]
                + ["export", f"total `{REFERENCE_METHOD}`", "CPU total", "× tracking", "tracking CPU"], rows)
    L += ["", f"Peak resident memory of the benchmark process: {_fmt(run.get('peak_rss_mb'), 0)} MiB "
          "(ffmpeg children not included)."
          + (f" CUDA: {run['cuda']['device']}, {_fmt(run['cuda']['peak_allocated_mb'], 0)} MiB peak allocated."
             if run.get("cuda") else " No CUDA device: no GPU figures.")]
    return L


DETAIL_COLUMNS = (("photo_residual_coarse", 2), ("photo_residual_detail", 2), ("detail_gain", 3),
                  ("detail_occluder_ratio", 2), ("ratio_to_tracking", 2))


def _detail(doc: dict, real: list[str], methods: list[str]) -> list[str]:
    """The fine stage's figures per clip, for the methods that have one."""
    fine = [m for m in methods if "detail_gain" in doc["aggregate"].get(m, {})]
    L: list[str] = []
    for m in fine:
        L += ["", f"## Fine stage (`{m}`)", "",
              "Held-out photometric residual of the clean clip (8-bit levels) shaded with the coarse and with the "
              "detailed normals, `detail_gain` = 1 - detail / coarse, and what a hand over the mouth leaves in the "
              "maps (`detail_occluder_ratio`, 1 = no imprint).", ""]
        rows = [[c] + [_fmt(_value(doc, c, m, k), d) for k, d in DETAIL_COLUMNS] for c in real]
        agg = doc["aggregate"][m]
        rows.append(["**all**"] + [_fmt(agg.get(k), d) for k, d in DETAIL_COLUMNS])
        L += _table(["clip"] + [f"`{k}`" for k, _ in DETAIL_COLUMNS], rows)
    return L


def _synthetic(doc: dict, synth: list[str], methods: list[str]) -> list[str]:
    """Errors against ground truth on the synthetic clips."""
    L: list[str] = []
    L += ["", "## Synthetic clips with ground truth", "",
          "Mean vertex error (mm, similarity-aligned per frame) / lip-vertex error (mm) on frames without the "
          "occluder and on occluded frames. The methods fit with the field of view estimated from the video, as "
          "for the real clips, not with the renderer's own (shown in brackets).", ""]
    rows = []
    for c in synth:
        ci = doc["clip_info"][c]
        row = [c, f"{ci['occluded_frames']}/{ci['n_frames']}", _camera(ci)]
        for m in methods:
            row.append(f"{_fmt(_value(doc, c, m, 'mm_synth_visible'))} / {_fmt(_value(doc, c, m, 'mm_synth_lips_visible'))}"
                       f" → {_fmt(_value(doc, c, m, 'mm_synth_occluded'))} / {_fmt(_value(doc, c, m, 'mm_synth_lips_occluded'))}")
        rows.append(row)
    L += _table(["clip", "occl. frames", "camera fov °"] + [f"`{m}` vis. → occl." for m in methods], rows)
    return L


def _plots(doc: dict) -> list[str]:
    """Links to the plots and the side-by-side strip."""
    L: list[str] = []
    plots = doc.get("plots") or {}
    if plots:
        L += ["", "## Plots", ""]
        for key in ("lip_error_ratio", "stage_timing", "nme_ced", "camera_fov"):
            if key in plots:
                L += [f"![{key}]({plots[key]})", ""]
        strip = plots.get("strip")
        if strip:
            L += [f"Side by side, {strip['clip']} frames {strip['frames'][0]}–{strip['frames'][1]} (occluded "
                  f"{strip['span'][0]}–{strip['span'][1]}, red dot): [{strip['video']}]({strip['video']})", "",
                  f"![strip]({strip['image']})", ""]
        detail = plots.get("detail")
        if detail:
            L += [f"The fine stage (`{detail['method']}`) on {detail['clip']}: frame {detail['frame']}'s UV normal map "
                  "(held out of training), coarse and with the detail:", "", f"![detail normals]({detail['normals']})", ""]
            if "occluded" in detail:
                L += [f"Its displacement on frame {detail['occluded_frame']} with a hand over the mouth, next to the "
                      "same frame of the clean clip (-1 mm black, +1 mm white): the hand should leave no imprint.",
                      "", f"![detail under a hand]({detail['occluded']})", ""]
        for key, p in plots.items():
            if key.startswith("lip_opening_"):
                L += [f"![{key}]({p})", ""]
    return L


def _definitions(doc: dict) -> list[str]:
    """What each metric means, and the two that need more words."""
    L: list[str] = []
    L += ["", "## Definitions", ""]
    for k, v in doc["definitions"].items():
        L.append(f"- `{k}`: {v}")
    L += ["", "Lip-vertex error, precisely: for each measured frame t, the method's mesh on the occluded clip is "
          "moved by the rotation and translation (no scale) that best fit its 25 skull-rigid vertices (`RIGID`) onto "
          "the same method's mesh of the clean clip at frame t; the error is the mean Euclidean distance over the 40 "
          "lip vertices (`LIPS`), in mm. So it measures what the occlusion changed in the lips relative to the skull, "
          "not head pose. For `tracker`, 3D is the tracker's landmarks back-projected to metric points.",
          "",
          "Jitter, precisely: still frames are those where the clean clip's tracker head pose turns by less than "
          "12 °/s and its skull points move by less than 30 mm/s (measured from t−2 to t+2), in runs of at least "
          "0.3 s. Each method's clean mesh is rigidly aligned (on `RIGID`) onto its first still frame, and jitter is "
          "the mean over still frames t (with t±1 still) and all 468 vertices of |x[t+1] − 2x[t] + x[t−1]| in "
          "mm/frame². Speech moves the lips too, so jitter compares methods on the same frames, it is not pure noise.",
          ""]
    return L
