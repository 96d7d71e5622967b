"""``avface bench``: accuracy, occlusion robustness, stability and speed of every registered
reconstruction method, measured side by side on a folder of talking-face clips.

Modules: :mod:`.methods` (the registry of compared methods), :mod:`.occlusion` (the
occlusion protocol: spans, occluders, variants), :mod:`.metrics` (the error measures),
:mod:`.harness` (the run, metrics.json), :mod:`.plots`, :mod:`.report` (report.md) and
:mod:`.cli` (the ``bench`` subcommand).
"""
# Imported lazily: `avface serve` builds the whole command line, and its socket loop must not
# load torch just because the bench subcommand exists.
_LAZY = {
    "SCHEMA_VERSION": "harness", "BenchConfig": "harness", "run_bench": "harness",
    "MethodInput": "methods", "MethodOutput": "methods", "available_methods": "methods",
    "register_method": "methods",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
