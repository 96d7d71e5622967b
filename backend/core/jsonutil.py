"""Strict JSON from what the pipeline computes: metrics.json and the service's wire both use
``allow_nan=False``, so NaN and infinities become null and numpy scalars Python numbers."""
from __future__ import annotations

import math


def json_safe(obj):
    """``obj`` with NaN and infinities as None, numpy scalars as Python numbers, paths and
    other objects as strings; dicts and sequences recursively (keys as strings)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)  # a path, an enum: its text
