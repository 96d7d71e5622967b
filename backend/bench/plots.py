"""The benchmark's pictures: lip opening over time per method with the occluded spans
shaded, per-clip bars of the lip-error ratios, stage timing bars, the cumulative NME curve,
and a side-by-side video strip of one occluded span with every method's mesh drawn over
the frame."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from avface import media
from avface.bench import metrics as M
from avface.bench.methods import REFERENCE_METHOD
from avface.bench.occluders import VARIANTS

log = logging.getLogger(__name__)

VARIANT_TITLES = {"hand": "hand over the mouth", "object": "plain object over the mouth",
                  "audio_only": "audio only (black frames)"}
SPAN_COLOURS = {"hand": "#f4b183", "object": "#9dc3e6", "audio_only": "#bfbfbf"}
STRIP_PANEL_PX = 256
DPI = 110


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _colours(methods: list[str]) -> dict[str, str]:
    cycle = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    return {m: cycle[i % len(cycle)] for i, m in enumerate(methods)}


def lip_opening_plot(clip_id: str, s: dict, methods: list[str], path: Path) -> Path:
    plt = _plt()
    fps = float(s["fps"])
    n = int(s["n_frames"])
    t = np.arange(n) / fps
    col = _colours(methods)
    fig, axes = plt.subplots(len(VARIANTS), 1, figsize=(11, 2.6 * len(VARIANTS)), sharex=True)
    for ax, v in zip(np.atleast_1d(axes), VARIANTS):
        for a, b in np.asarray(s.get(f"spans_{v}", np.zeros((0, 2)))).reshape(-1, 2):
            ax.axvspan(a / fps, b / fps, color=SPAN_COLOURS[v], alpha=0.5, lw=0)
        ref = s.get(f"lip_open_{REFERENCE_METHOD}_clean")
        if ref is not None:
            ax.plot(t, ref, color="k", ls="--", lw=1.0, label=f"{REFERENCE_METHOD}, clean clip")
        for m in methods:
            y = s.get(f"lip_open_{m}_{v}")
            if y is not None:
                ax.plot(t, y, color=col[m], lw=1.1, label=m)
        ax.set_ylabel("lip opening (mm)")
        ax.set_title(f"{clip_id}: {VARIANT_TITLES[v]} (shaded)", fontsize=10)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=8, ncol=len(methods) + 1, loc="upper right")
    np.atleast_1d(axes)[-1].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def synth_lip_plot(clip_id: str, s: dict, methods: list[str], path: Path) -> Path:
    plt = _plt()
    fps = float(s["fps"])
    n = int(s["n_frames"])
    t = np.arange(n) / fps
    col = _colours(methods)
    fig, ax = plt.subplots(figsize=(11, 3))
    for a, b in M.runs(np.asarray(s["occluded"], bool)):
        ax.axvspan(a / fps, b / fps, color=SPAN_COLOURS["hand"], alpha=0.5, lw=0)
    ax.plot(t, s["lip_open_gt"], color="k", lw=1.6, label="ground truth")
    for m in methods:
        y = s.get(f"lip_open_{m}")
        if y is not None:
            ax.plot(t, y, color=col[m], lw=1.1, label=m)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("lip opening (mm)")
    ax.set_title(f"{clip_id}: synthetic clip, its hand occluder shaded", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=len(methods) + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _value(doc: dict, clip: str, method: str, metric: str) -> float:
    for r in doc["records"]:
        if r["clip"] == clip and r["method"] == method and r["metric"] == metric:
            return float("nan") if r["value"] is None else float(r["value"])
    return float("nan")


def ratio_bars(doc: dict, path: Path) -> Path | None:
    plt = _plt()
    clips = [c for c in doc["clips"] if doc["clip_info"][c].get("kind") == "real" and "n_frames" in doc["clip_info"][c]]
    methods = [m for m in doc["methods"] if m != REFERENCE_METHOD]
    if not clips or not methods:
        return None
    col = _colours(doc["methods"])
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 1.2 * len(clips) + 3), 7), sharex=True)
    x = np.arange(len(clips))
    w = 0.8 / len(methods)
    for ax, metric, title in ((axes[0], "lip_err_occluded_ratio", "occluders (hand and object pooled)"),
                              (axes[1], "lip_err_audio_only_ratio", "audio-only spans (black frames)")):
        for i, m in enumerate(methods):
            y = [_value(doc, c, m, metric) for c in clips]
            ax.bar(x + (i - (len(methods) - 1) / 2) * w, np.nan_to_num(y, nan=0.0), w, color=col[m], label=m)
        ax.axhline(1.0, color="k", lw=1, ls="--")
        ax.set_ylabel(f"lip error / {REFERENCE_METHOD}")
        ax.set_title(f"lip-vertex error ratio to {REFERENCE_METHOD}: {title} (< 1 is better)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(clips, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def timing_bars(doc: dict, path: Path) -> Path | None:
    """Per clip, one stacked bar per method: the stages it needs (probe, tracking, fit,
    export), with the audio stage the full pipeline adds drawn hatched on top; the decode-
    only pass as a tick; the label is the method's total over tracking alone."""
    plt = _plt()
    clips = [c for c in doc["clips"] if doc["clip_info"][c].get("kind") == "real" and "stage_seconds" in doc["clip_info"][c]]
    if not clips:
        return None
    methods = doc["methods"]
    stage_cols = {"probe": "#c7c7c7", "tracking": "#1f77b4", "fit": "#d62728", "networks": "#9467bd",
                  "export": "#8c564b", "audio": "#2ca02c"}
    fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(clips) * len(methods) + 3), 4.8))
    x = np.arange(len(clips))
    w = 0.8 / len(methods)
    labelled: set = set()
    for i, m in enumerate(methods):
        xm = x + (i - (len(methods) - 1) / 2) * w
        bottom = np.zeros(len(clips))
        for s in ("probe", "tracking", "fit", "networks", "export"):
            y = np.nan_to_num([_value(doc, c, m, f"rtf_{s}") for c in clips])
            if not y.any():
                continue
            ax.bar(xm, y, w * 0.92, bottom=bottom, color=stage_cols[s], label=None if s in labelled else s)
            labelled.add(s)
            bottom += y
        if "audio" not in doc["method_info"][m]["stages"]:
            y = np.array([doc["clip_info"][c]["stage_seconds"].get("audio", 0.0) / doc["clip_info"][c]["duration_s"]
                          for c in clips])
            ax.bar(xm, y, w * 0.92, bottom=bottom, color="none", edgecolor=stage_cols["audio"], hatch="///", lw=0,
                   label=None if "audio_extra" in labelled else "audio (the pipeline runs it; not in this total)")
            labelled.add("audio_extra")
            top = bottom + y
        else:
            top = bottom
        for xi, c, b in zip(xm, clips, top):
            r = _value(doc, c, m, "ratio_to_tracking")
            ax.text(xi, b * 1.01, f"{m}\n{r:.2f}x", ha="center", va="bottom", fontsize=5.5)
    dec = [doc["clip_info"][c]["stage_seconds"].get("decode", 0.0) / doc["clip_info"][c]["duration_s"] for c in clips]
    ax.scatter(x, dec, marker="_", s=400, color="k", zorder=3, label="decode only (already inside tracking)")
    ax.axhline(1.0, color="r", lw=0.8, ls=":")
    ax.set_xticks(x)
    ax.set_xticklabels(clips, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("seconds per second of video")
    ax.set_title("stage timing per method (real-time factor, 1 = real time); labels: total / tracking alone", fontsize=10)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def ced_plot(doc: dict, series: dict, path: Path) -> Path | None:
    plt = _plt()
    col = _colours(doc["methods"])
    fig, ax = plt.subplots(figsize=(6, 4))
    any_line = False
    for m in doc["methods"]:
        e = [np.asarray(s[f"nme_{m}"]) for s in series.values() if f"nme_{m}" in s]
        if not e:
            continue
        e = np.concatenate(e)
        x, f = M.ced_curve(e)
        ax.plot(x, f, color=col[m], label=f"{m} (AUC {M.auc(e):.3f})")
        any_line = True
    if not any_line:
        plt.close(fig)
        return None
    ax.set_xlabel("NME (% of inter-ocular distance)")
    ax.set_ylabel("fraction of visible frames")
    ax.set_title("cumulative NME on visible frames, all real clips", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def camera_plot(doc: dict, path: Path) -> Path | None:
    """Each clip's camera estimate: the quick fit's reprojection error at each candidate field
    of view (relative to its best), the chosen one marked, and the renderer's own for the
    synthetic clips."""
    cams = [(c, doc["clip_info"][c]) for c in doc["clips"]
            if (doc["clip_info"][c].get("camera") or {}).get("residual_px")]
    if not cams:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    cycle = _colours([c for c, _ in cams])
    for c, ci in cams:
        cam = ci["camera"]
        x, r = np.asarray(cam["candidates_deg"]), np.asarray(cam["residual_px"])
        style = "--" if ci.get("kind") == "synth" else "-"
        ax.plot(x, r / r.min(), style, color=cycle[c], marker=".", label=f"{c}: {cam['fov_deg']:.0f}°")
        ax.axvline(cam["fov_deg"], color=cycle[c], lw=0.8, alpha=0.5)
        if ci.get("camera_fov_true_deg") is not None:
            ax.plot([ci["camera_fov_true_deg"]], [1.0], "*", color=cycle[c], ms=10)
    ax.axvline(63.0, color="k", lw=1, ls=":", label="63° (the old fixed guess)")
    ax.set_xlabel("vertical field of view (degrees)")
    ax.set_ylabel("reprojection error ÷ the clip's best")
    ax.set_title("camera estimate per clip (dashed: synthetic, ★ its true field of view)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def write_all(doc: dict, series: dict, out_dir: Path) -> dict:
    """Write every plot; returns {name: path relative to the output folder's parent}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict = {}
    methods = doc["methods"]
    for clip in doc["clips"]:
        s = series.get(clip)
        if not s:
            continue
        kind = doc["clip_info"][clip].get("kind")
        p = out_dir / f"lip_opening_{_safe(clip)}.png"
        if kind == "real" and "spans_hand" in s:
            written[f"lip_opening_{clip}"] = lip_opening_plot(clip, s, methods, p)
        elif kind == "synth":
            written[f"lip_opening_{clip}"] = synth_lip_plot(clip, s, methods, p)
    for name, fn in (("lip_error_ratio", ratio_bars), ("stage_timing", timing_bars), ("camera_fov", camera_plot)):
        p = fn(doc, out_dir / f"{name}.png")
        if p is not None:
            written[name] = p
    p = ced_plot(doc, series, out_dir / "nme_ced.png")
    if p is not None:
        written["nme_ced"] = p
    return {k: str(v.relative_to(out_dir.parent)) for k, v in written.items()}


# --------------------------------------------------------------------------- the strip


def _lip_edges(faces: np.ndarray, lips) -> np.ndarray:
    lipset = {int(i) for i in lips}
    edges = {tuple(sorted((int(a), int(b)))) for f in faces for a, b in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0]))}
    return np.array(sorted(e for e in edges if e[0] in lipset and e[1] in lipset), np.int64).reshape(-1, 2)


def _label(img: np.ndarray, text: str, colour=(255, 255, 255)) -> np.ndarray:
    import cv2

    cv2.rectangle(img, (0, img.shape[0] - 18), (img.shape[1], img.shape[0]), (0, 0, 0), -1)
    cv2.putText(img, text, (4, img.shape[0] - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.42, colour, 1, cv2.LINE_AA)
    return img


def write_strip(strip: dict, out_dir: Path) -> dict:
    """strip.mp4 (and strip.png, its middle frame): panels side by side: the occluded
    input, then each method's mesh on the occluded clip, then the reference method on the
    clean clip. Occluded frames carry a red mark."""
    import cv2

    from avface.core.geometry import project
    from avface.core.topology import LIPS
    from avface.models.canonical_mesh import load_canonical_mesh
    from avface.stages.preview import draw_mesh

    out_dir.mkdir(parents=True, exist_ok=True)
    lo, hi = strip["range"]
    a, b = strip["span"]
    faces = load_canonical_mesh().faces
    lip_edges = _lip_edges(faces, LIPS)
    ref_v, ref_k = strip["clean_reference"]
    ref_pts = project(ref_v.astype(np.float64), ref_k)
    clean_info = media.probe(strip["clean_video"])
    hand_info = media.probe(strip["hand_video"])
    # one square crop for the whole strip, around the clean reference mesh
    mn, mx = np.nanmin(ref_pts.reshape(-1, 2), 0), np.nanmax(ref_pts.reshape(-1, 2), 0)
    c = 0.5 * (mn + mx)
    half = 0.5 * 1.35 * float(np.max(mx - mn))
    half = min(half, 0.5 * min(clean_info.width, clean_info.height))
    x0 = int(np.clip(round(c[0] - half), 0, clean_info.width - 2 * half))
    y0 = int(np.clip(round(c[1] - half), 0, clean_info.height - 2 * half))
    side = int(round(2 * half))
    scale = STRIP_PANEL_PX / side
    methods = list(strip["vertices"])
    pts = {m: project(v.astype(np.float64), k) for m, (v, k) in strip["vertices"].items()}

    def crop(frame):
        return cv2.resize(np.ascontiguousarray(frame[y0:y0 + side, x0:x0 + side]), (STRIP_PANEL_PX, STRIP_PANEL_PX),
                          interpolation=cv2.INTER_AREA)

    def to_panel(p):
        return (p - np.array([x0, y0])) * scale

    mid = (a + b) // 2 - lo
    kept: dict = {}

    def frames():
        for i, (occ, clean) in enumerate(zip(media.iter_frames(hand_info, lo, hi), media.iter_frames(clean_info, lo, hi))):
            t = lo + i
            oc = crop(occ)
            panels = [_label(oc.copy(), f"input, frame {t}")]
            for m in methods:
                panels.append(_label(draw_mesh(oc, to_panel(pts[m][i]), faces, lip_edges), m))
            panels.append(_label(draw_mesh(crop(clean), to_panel(ref_pts[i]), faces, lip_edges),
                                 f"{REFERENCE_METHOD}, clean clip", (200, 255, 200)))
            row = np.concatenate(panels, axis=1)
            if a <= t < b:
                cv2.circle(row, (12, 12), 7, (255, 40, 40), -1)
            if i == mid:
                kept["still"] = row
            yield row

    path = media.write_video(frames(), out_dir / "strip.mp4", strip["fps"])
    # the still for report.md: the middle of the occluded span
    still = kept.get("still")
    png = out_dir / "strip.png"
    if still is not None:
        cv2.imwrite(str(png), cv2.cvtColor(still, cv2.COLOR_RGB2BGR))
    return {"video": str(path.relative_to(out_dir.parent)), "image": str(png.relative_to(out_dir.parent)),
            "clip": strip["clip"], "frames": [lo, hi], "span": [a, b], "methods": methods}


DETAIL_PICTURE_RANGE_M = 1e-3
"""Displacement pictures map -1 mm .. +1 mm to black .. white."""


def _displacement_image(d: np.ndarray) -> np.ndarray:
    grey = np.clip(0.5 + 0.5 * np.asarray(d, np.float64) / DETAIL_PICTURE_RANGE_M, 0, 1)
    return np.repeat((grey * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def write_detail_pictures(pictures: dict, out_dir: Path) -> dict:
    """detail_normals.png (one held-out frame's UV normal map, coarse | detailed) and, when
    the hand variant ran, detail_occluded.png (the displacement of its most occluded frame |
    the same frame of the clean clip, -1..+1 mm as black..white). Returns their paths,
    relative to the report, with what they show."""
    import cv2

    out_dir.mkdir(parents=True, exist_ok=True)
    clip, method = pictures["clip"], pictures["method"]
    t, coarse, detailed = pictures["normal_maps"]
    img = np.concatenate([_label(coarse.copy(), "coarse normals"), _label(detailed.copy(), "with detail")], axis=1)
    path = out_dir / "detail_normals.png"
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    out = {"clip": clip, "method": method, "frame": t, "normals": f"plots/{path.name}"}
    if "occluded" in pictures:
        t, hand, clean = pictures["occluded"]
        img = np.concatenate([_label(_displacement_image(hand), "hand over the mouth"),
                              _label(_displacement_image(clean), "clean clip")], axis=1)
        path = out_dir / "detail_occluded.png"
        cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        out.update(occluded_frame=t, occluded=f"plots/{path.name}")
    return out
