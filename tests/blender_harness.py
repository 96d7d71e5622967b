"""Run add-on checks inside real Blenders: the ``bpy`` wheels from PyPI, each in its own venv
(``make blender-venvs`` builds ``.venv-bpy/<version>``; both are cp311).

A check is a function in a script under ``tests/blender/`` (named ``bl_*.py`` so that pytest
does not collect it in the main venv). :class:`Blender.run` executes it in a fresh Blender
subprocess through ``tests/blender/runner.py``, which imports the add-on as the build stages
it (``build/addon/avface_blender``, with ``_vendor/`` filled from ``backend/``), and returns
what the check returned (JSON). A check that fails raises; the test then fails with the
Blender side's traceback and output.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BLENDER_TESTS = Path(__file__).resolve().parent / "blender"
#: Keep in step with BPY_VERSIONS in the Makefile.
BPY_VERSIONS = ("5.0.1", "4.2.23")
BPY_VENVS = Path(os.environ.get("AVFACE_BPY_VENVS", REPO_ROOT / ".venv-bpy"))
RUN_TIMEOUT_S = 600
OUTPUT_TAIL_CHARS = 6000


def load_build_addon():
    """The repository's build_addon.py as a module (it is a script at the top level)."""
    spec = importlib.util.spec_from_file_location("build_addon", REPO_ROOT / "build_addon.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BlenderError(AssertionError):
    pass


class Blender:
    """One Blender version: ``run(script, check, **kwargs)`` -> the check's JSON result."""

    def __init__(self, version: str, python: Path, stage_parent: Path, work: Path):
        self.version = version
        self.python = python
        self.stage_parent = stage_parent
        self.work = work
        self._n = 0

    @property
    def major_minor(self) -> tuple[int, int]:
        major, minor = self.version.split(".")[:2]
        return int(major), int(minor)

    def run(self, script: str, check: str, *, timeout_s: float = RUN_TIMEOUT_S, env: dict | None = None, **kwargs):
        self._n += 1
        args_path = self.work / f"bl-{self._n}-args.json"
        out_path = self.work / f"bl-{self._n}-out.json"
        args_path.write_text(json.dumps(kwargs, default=str))
        cmd = [str(self.python), str(BLENDER_TESTS / "runner.py"), str(BLENDER_TESTS / script), check,
               str(args_path), str(out_path), str(self.stage_parent)]
        proc_env = dict(os.environ, **(env or {}))
        proc_env.pop("PYTHONPATH", None)  # the main venv's paths must not leak into Blender's Python
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=proc_env,
                                  stdin=subprocess.DEVNULL, cwd=self.work)
        except subprocess.TimeoutExpired as e:
            raise BlenderError(f"Blender {self.version}: {script}:{check} ran past {timeout_s} s\n"
                               f"{(e.stdout or b'')[-OUTPUT_TAIL_CHARS:]!r}") from e
        if proc.returncode != 0 or not out_path.exists():
            output = (proc.stdout + proc.stderr)[-OUTPUT_TAIL_CHARS:]
            raise BlenderError(f"Blender {self.version}: {script}:{check} failed (exit {proc.returncode}):\n{output}")
        return json.loads(out_path.read_text())


@pytest.fixture(scope="session")
def staged_addon() -> Path:
    """Stage the add-on as the build does (vendoring the shared files); returns the folder to
    put on sys.path so that ``import avface_blender`` finds it."""
    build_addon = load_build_addon()
    build_addon.stage()
    return build_addon.STAGE_PARENT


@pytest.fixture(params=BPY_VERSIONS, ids=lambda v: f"bpy-{v}")
def blender(request, staged_addon, tmp_path) -> Blender:
    version = request.param
    python = BPY_VENVS / version / "bin" / "python"
    if not python.exists():
        pytest.skip(f"Blender {version} (bpy=={version}) is not installed in {python.parent.parent}: run `make blender-venvs`")
    return Blender(version, python, staged_addon, tmp_path)


def isolated_home(work: Path) -> dict:
    """Environment that points Blender's user folders (config, extensions) into ``work``."""
    home = work / "home"
    (home / ".config").mkdir(parents=True, exist_ok=True)
    return {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
