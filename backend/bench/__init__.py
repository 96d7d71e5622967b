"""``avface bench``: accuracy, occlusion robustness, stability and speed of every registered
reconstruction method, measured side by side on a folder of talking-face clips.

Modules: :mod:`.methods` (the registry of compared methods), :mod:`.occlusion` (the
occlusion protocol: spans, occluders, variants), :mod:`.metrics` (the error measures),
:mod:`.harness` (the run, metrics.json), :mod:`.plots`, :mod:`.report` (report.md) and
:mod:`.cli` (the ``bench`` subcommand).
"""
from .harness import SCHEMA_VERSION, BenchConfig, run_bench  # noqa: F401
from .methods import MethodInput, MethodOutput, available_methods, register_method  # noqa: F401
