"""Interchange: one result, any tool (docs/design.md section 8).

``axes`` holds the one axis and unit conversion that every writer and the Blender add-on share.
``rig`` turns a result into a blend-shape + skeleton rig that reproduces its mesh exactly; the
writers (``usd``, ``gltf``, ``livelink``) are pure format code on top of it (no bpy).

    from avface.export import export_result
    export_result("out/talk/result.npz", ["usd", "gltf", "livelink-csv"], "out/talk/export")

Format modules import their libraries (usd-core, pygltflib) only when they are used.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable

from avface.errors import InputError, OutputError

log = logging.getLogger(__name__)

#: format name -> (file suffix written by default, suffixes accepted for -o FILE, what it holds)
FORMATS = {
    "usd": (".usd", (".usd", ".usda", ".usdc"), "UsdSkel: mesh, blend shapes, joints, animation, ARKit curves"),
    "gltf": (".glb", (".glb",), "glTF 2.0 binary: mesh, morph targets, skin, animation"),
    "livelink-csv": (".csv", (".csv",), "Live Link Face take: 52 ARKit curves, head and eye angles"),
}
Progress = Callable[[str, float, str], None]


def check_formats(formats: Iterable[str]) -> list[str]:
    """The formats asked for, without repeats, or InputError naming the unknown one."""
    out: list[str] = []
    for f in formats:
        key = str(f).strip().lower()
        if key not in FORMATS:
            raise InputError(f"unknown export format {f!r}; choose from {', '.join(FORMATS)}")
        if key not in out:
            out.append(key)
    if not out:
        raise InputError(f"no export format given; choose from {', '.join(FORMATS)}")
    return out


def _base_name(result_path: Path) -> str:
    """``out/talk/result.npz`` -> ``talk``; ``clip7.npz`` -> ``clip7``."""
    if result_path.stem == "result" and result_path.resolve().parent.name:
        return result_path.resolve().parent.name
    return result_path.stem


def output_paths(result_path: str | Path, formats: list[str], output: str | Path | None) -> dict[str, Path]:
    """Where each format goes. `output` is a file for a single format when it has that format's
    suffix, otherwise a folder (created) that gets ``<name>.<suffix>`` per format, where name is
    the result's folder for ``.../result.npz``. None means the result's own folder."""
    result_path = Path(result_path)
    out = Path(output) if output is not None else result_path.parent
    suffix = out.suffix.lower()
    known = {s for _, accepted, _ in FORMATS.values() for s in accepted}
    if suffix in known and not out.is_dir():
        if len(formats) > 1:
            raise InputError(f"-o {out} is one file, but {len(formats)} formats were asked for; "
                             f"give a folder with several --to")
        accepted = FORMATS[formats[0]][1]
        if suffix not in accepted:
            raise InputError(f"-o {out}: a {formats[0]} file ends in {' or '.join(accepted)}, not {suffix}")
        return {formats[0]: out}
    name = _base_name(result_path)
    return {f: out / f"{name}{FORMATS[f][0]}" for f in formats}


def _check_writable(paths: Iterable[Path]) -> None:
    """OutputError before any work when a target folder cannot be created or written."""
    from avface.result import ensure_writable

    for folder in {p.parent for p in paths}:
        ensure_writable(folder, "the export folder")


def export_result(result_path: str | Path, formats: Iterable[str], output: str | Path | None = None, *,
                  flame_dir: str | Path | None = None, check: bool = True,
                  progress: Progress | None = None) -> dict[str, Path]:
    """Export one result file to each of `formats` (``usd``, ``gltf``, ``livelink-csv``).

    Returns {format: path written}. Errors: SchemaError (the result does not validate, or its
    parameters do not give its stored mesh), InputError (unknown format, -o that does not fit),
    OutputError (a path that cannot be written), ModelFileError (a FLAME result without its
    FLAME files). ``progress(format, fraction, message)`` is called as each file is written.
    """
    from avface.export.rig import rig_from_result
    from avface.result import load_result

    formats = check_formats(formats)
    result_path = Path(result_path)
    report = progress or (lambda stage, fraction, message: None)
    paths = output_paths(result_path, formats, output)
    result = load_result(result_path)  # SchemaError when it does not validate
    _check_writable(paths.values())
    rig = None
    if {"usd", "gltf"} & set(formats):
        report("rig", 0.0, "")
        rig = rig_from_result(result, result_path, flame_dir=flame_dir, check=check)
        report("rig", 1.0, f"{len(rig.shape_names)} shapes, {len(rig.joint_names)} joints")
    written: dict[str, Path] = {}
    for fmt in formats:
        path = paths[fmt]
        step = lambda f, fmt=fmt: report(fmt, f, "")  # noqa: E731
        report(fmt, 0.0, path.name)
        try:
            if fmt == "usd":
                from avface.export.usd import write_usd

                written[fmt] = write_usd(rig, path, progress=step)
            elif fmt == "gltf":
                from avface.export.gltf import write_gltf

                written[fmt] = write_gltf(rig, path, progress=step)
            else:
                from avface.export.livelink import write_livelink_csv

                written[fmt] = write_livelink_csv(result, path, progress=step)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
        report(fmt, 1.0, str(path))
        log.info("wrote %s (%s)", path, fmt)
    return written


__all__ = ["FORMATS", "check_formats", "export_result", "output_paths"]
