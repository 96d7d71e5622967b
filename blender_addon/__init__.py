"""AVFace for Blender: reconstruct an animated 3D head from a movie strip and its speech.

An extension (metadata in ``blender_manifest.toml``, no ``bl_info``). Only relative imports,
and nothing imports ``bpy`` at module level except the Blender-facing modules loaded by
:func:`register`, so the pure parts (``io_result``, ``arkit_match``, the vendored client) can
be imported and tested without Blender.

Shared code with the backend lives in ``_vendor/`` (``client.py``, ``protocol.py``,
``axes.py``, ``kinematics.py`` and ``arkit_names.py``), which ``build_addon.py`` fills at build time from ``backend/``; the source folder
never holds a copy. Tests and development import the staged package the build writes to
``build/addon/avface_blender`` (``python build_addon.py --stage-only``).
"""
from __future__ import annotations

_MODULES = ("preferences", "operators", "render_setup", "reconstruct")


def _modules():
    import importlib

    return [importlib.import_module(f".{name}", __package__) for name in _MODULES]


def register() -> None:
    for module in _modules():
        module.register()


def unregister() -> None:
    for module in reversed(_modules()):
        module.unregister()
