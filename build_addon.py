#!/usr/bin/env python3
"""Build the AVFace Blender extension into an installable zip.

    python build_addon.py                  # build/avface-<version>.zip with every platform's pyzmq
    python build_addon.py --no-wheels      # the same without wheels (a quick local build)
    python build_addon.py --stage-only     # only build/addon/avface_blender/ (what the tests import)

Steps:

1. **Stage** ``blender_addon/`` into ``build/addon/avface_blender/`` and **vendor** into its
   ``_vendor/`` subpackage the pure-Python code the add-on shares with the backend, copied
   from its one source at build time (never by hand, never committed):
   ``backend/service/client.py``, ``backend/service/protocol.py``,
   ``backend/export/axes.py``, ``backend/export/kinematics.py``, ``backend/errors.py`` and
   the result package ``backend/result/`` (the contract, its loader, the detail maps, the
   ARKit names). The add-on imports them as ``from ._vendor import client``.
   The staged folder is named ``avface_blender`` so that tests which put ``build/addon`` on
   ``sys.path`` import exactly what the zip holds, never the source folder.
2. **Wheels**: ``pip download --only-binary=:all:`` the pyzmq wheels, unmodified, for each
   platform and Python that Blender 4.2-5.x runs (cp311 for 4.2-5.0, cp313 for 5.1) into
   ``wheels/``, and list them in the manifest's ``wheels``.
3. **Check** the manifest (schema 1.0.0, the keys Blender requires, a permissions table
   with reasons, every listed wheel present) and write the zip with the manifest at its root.
4. **List** what was packed.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

log = logging.getLogger("build_addon")

ROOT = Path(__file__).resolve().parent
SOURCE = ROOT / "blender_addon"
BUILD = ROOT / "build"
STAGE_PARENT = BUILD / "addon"
PACKAGE = "avface_blender"
STAGE = STAGE_PARENT / PACKAGE

#: (file in the repository, name in the add-on's _vendor package)
VENDORED = (
    (ROOT / "backend" / "service" / "client.py", "client.py"),
    (ROOT / "backend" / "service" / "protocol.py", "protocol.py"),
    (ROOT / "backend" / "export" / "axes.py", "axes.py"),
    # the bones' per-frame transforms, computed as the USD/glTF rig computes them
    (ROOT / "backend" / "export" / "kinematics.py", "kinematics.py"),
    # the result contract, its loader and validator, the detail maps and the 52 ARKit names: the
    # add-on reads a result with the code that wrote it (a package, with the errors it raises)
    (ROOT / "backend" / "result", "result"),
    (ROOT / "backend" / "errors.py", "errors.py"),
)

PYZMQ_REQUIREMENT = "pyzmq>=26,<28"
#: Blender's extension platform name -> pip --platform tags, most specific first.
PLATFORMS = {
    "linux-x64": ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"),
    "windows-x64": ("win_amd64",),
    "macos-arm64": ("macosx_11_0_arm64", "macosx_11_0_universal2"),
    "macos-x64": ("macosx_10_15_x86_64", "macosx_10_9_x86_64", "macosx_10_15_universal2"),
}
#: cp311: Blender 4.2-5.0; cp313: Blender 5.1.
PYTHON_VERSIONS = ("3.11", "3.13")

REQUIRED_KEYS = ("schema_version", "id", "version", "name", "tagline", "maintainer", "type",
                 "blender_version_min", "license")
KNOWN_PERMISSIONS = {"files", "network", "clipboard", "camera", "microphone"}


class BuildError(Exception):
    """The extension cannot be built; the message says what to fix."""


VENDOR_INIT = '''"""Files vendored by build_addon.py from the repository at build time; do not edit.

client.py and protocol.py come from backend/service/, axes.py and kinematics.py from backend/export/, the result
package and errors.py from backend/.
"""
'''


def stage(dest: Path = STAGE) -> Path:
    """Copy the add-on's sources into ``dest`` and vendor the shared files into ``_vendor``."""
    if not (SOURCE / "__init__.py").is_file():
        raise BuildError(f"{SOURCE} has no __init__.py: run this from the repository")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(SOURCE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "_vendor", "wheels"))
    vendor = dest / "_vendor"
    vendor.mkdir()
    (vendor / "__init__.py").write_text(VENDOR_INIT)
    for src, name in VENDORED:
        if src.is_dir() and (src / "__init__.py").is_file():
            shutil.copytree(src, vendor / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            shutil.copy2(src, vendor / name)
        else:
            raise BuildError(f"cannot vendor {src}: the file is missing")
    return dest


def read_manifest(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BuildError(f"cannot read the manifest {path}: {e}") from e


def check_manifest(manifest: dict, root: Path) -> list[str]:
    """Problems with ``manifest`` (an empty list when it is valid), with ``root`` the folder
    the zip is made from (so that listed wheels can be checked)."""
    problems = [f"missing key {k!r}" for k in REQUIRED_KEYS if k not in manifest]
    if manifest.get("schema_version") != "1.0.0":
        problems.append(f"schema_version must be '1.0.0', got {manifest.get('schema_version')!r}")
    if manifest.get("type") != "add-on":
        problems.append(f"type must be 'add-on', got {manifest.get('type')!r}")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", str(manifest.get("id", ""))):
        problems.append(f"id {manifest.get('id')!r} must be an identifier")
    if not re.fullmatch(r"\d+\.\d+\.\d+", str(manifest.get("version", ""))):
        problems.append(f"version {manifest.get('version')!r} must be semantic (X.Y.Z)")
    if not re.fullmatch(r"\d+\.\d+\.\d+", str(manifest.get("blender_version_min", ""))):
        problems.append("blender_version_min must be X.Y.Z")
    tagline = str(manifest.get("tagline", ""))
    if len(tagline) > 64 or tagline.endswith((".", "!", "?")):
        problems.append("tagline must be at most 64 characters and not end in punctuation")
    perms = manifest.get("permissions")
    if not isinstance(perms, dict):
        problems.append("permissions must be a table of name = reason")
    else:
        for name in ("network", "files"):
            if name not in perms:
                problems.append(f"permissions lacks {name!r}")
        for name, reason in perms.items():
            if name not in KNOWN_PERMISSIONS:
                problems.append(f"unknown permission {name!r}")
            if not isinstance(reason, str) or not reason or len(reason) > 64 or reason.endswith("."):
                problems.append(f"permission {name!r} needs a reason of at most 64 characters without a final period")
    for wheel in manifest.get("wheels", []):
        if not (root / wheel).is_file():
            problems.append(f"listed wheel {wheel} is not in the package")
    if re.search(r"(?m)^bl_info\s*=", (root / "__init__.py").read_text()):
        problems.append("__init__.py defines bl_info: extensions take their metadata from the manifest only")
    return problems


def download_wheels(dest: Path, cache: Path) -> list[Path]:
    """pyzmq wheels for every platform and Python, unmodified, from the package registry.

    Each (platform, Python) pair is downloaded into its own folder, so the wheel pip chose for
    it is unambiguous (pyzmq ships abi3 wheels for cp312+ and universal2 wheels for macOS, so
    one file may serve several pairs; it is packed once)."""
    dest.mkdir(parents=True, exist_ok=True)
    wheels: dict[str, Path] = {}
    for platform, tags in PLATFORMS.items():
        for py in PYTHON_VERSIONS:
            abi = "cp" + py.replace(".", "")
            target = cache / f"{platform}-{abi}"
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--python-version", py, "--implementation", "cp",
                   *(a for t in tags for a in ("--platform", t)), "--dest", str(target), PYZMQ_REQUIREMENT]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise BuildError(f"pip could not download pyzmq for {platform} {abi}:\n{proc.stderr[-2000:]}")
            found = sorted(target.glob("pyzmq-*.whl"))
            if len(found) != 1:
                raise BuildError(f"expected one pyzmq wheel for {platform} {abi}, pip left {[f.name for f in found]}")
            wheel = found[0]
            if wheel.name not in wheels:
                shutil.copy2(wheel, dest / wheel.name)
                wheels[wheel.name] = dest / wheel.name
            log.info("pyzmq for %s %s: %s", platform, abi, wheel.name)
    return sorted(wheels.values())


def write_manifest_wheels(manifest_path: Path, wheels: list[str]) -> None:
    """Replace the manifest's ``wheels = [...]`` list (kept in the staged copy only)."""
    text = manifest_path.read_text()
    text = re.sub(r"(?ms)^wheels\s*=\s*\[.*?\]\n", "", text)
    listing = "wheels = [\n" + "".join(f'  "{w}",\n' for w in wheels) + "]\n"
    text = text.replace("\n[permissions]", "\n" + listing + "\n[permissions]", 1)
    manifest_path.write_text(text)


def build(out_dir: Path = BUILD, *, wheels: bool = True) -> Path:
    staged = stage()
    manifest_path = staged / "blender_manifest.toml"
    if wheels:
        found = download_wheels(staged / "wheels", BUILD / "wheel-cache")
        write_manifest_wheels(manifest_path, [f"./wheels/{w.name}" for w in found])
    manifest = read_manifest(manifest_path)
    problems = check_manifest(manifest, staged)
    if problems:
        raise BuildError("the manifest is not valid:\n  " + "\n  ".join(problems))
    out_dir.mkdir(parents=True, exist_ok=True)
    zip_path = out_dir / f"{manifest['id']}-{manifest['version']}.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(p for p in staged.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            rel = path.relative_to(staged).as_posix()
            # wheels are already compressed
            z.write(path, rel, compress_type=zipfile.ZIP_STORED if rel.endswith(".whl") else zipfile.ZIP_DEFLATED)
    return zip_path


def listing(zip_path: Path) -> str:
    with zipfile.ZipFile(zip_path) as z:
        infos = z.infolist()
    lines = [f"{zip_path} ({zip_path.stat().st_size / 1e6:.1f} MB, {len(infos)} files):"]
    lines += [f"  {i.file_size:>10,d}  {i.filename}" for i in infos]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-wheels", action="store_true", help="skip downloading the pyzmq wheels")
    parser.add_argument("--stage-only", action="store_true", help="only stage and vendor into build/addon")
    parser.add_argument("-o", "--out-dir", type=Path, default=BUILD, help="where the zip goes (default build/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.stage_only:
            log.info("staged %s", stage())
            return 0
        zip_path = build(args.out_dir, wheels=not args.no_wheels)
    except BuildError as e:
        log.error("build_addon: %s", e)
        return 1
    log.info("%s", listing(zip_path))
    with open(zip_path, "rb") as f:
        log.info("sha256 %s", hashlib.sha256(f.read()).hexdigest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
