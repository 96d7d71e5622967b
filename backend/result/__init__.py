"""The result contract between the backend and the Blender add-on, schema v1: what
``result.npz`` holds and how it is validated (:mod:`.contract`), the per-frame detail maps
beside it (:mod:`.detail_maps`), and the 52 ARKit names its curves go by
(:mod:`.arkit_names`).

numpy and the standard library only, and relative imports only: ``build_addon.py`` vendors
this package (with ``avface/errors.py``) into the add-on byte for byte, so the add-on reads a
result with the very code that wrote it. Nothing here imports torch.
"""
from .arkit_names import ARKIT_NAMES
from .contract import (CONVENTIONS, DETAIL_STATES, META_KEYS, MODELS, OPTIONAL, SCHEMA_VERSION, SPEC, Result,
    check_arrays, detail_state, ensure_writable, load_result, summary, validate, write_result)
from .detail_maps import (DETAIL_DIR, DETAIL_FORMAT, DETAIL_PATTERN, DetailEncoding, check_detail_maps, check_png16,
    detail_files, detail_path)

__all__ = [
    "ARKIT_NAMES", "CONVENTIONS", "DETAIL_STATES", "META_KEYS", "MODELS", "OPTIONAL", "SCHEMA_VERSION", "SPEC", "Result",
    "check_arrays", "detail_state", "ensure_writable", "load_result", "summary", "validate", "write_result", "DETAIL_DIR",
    "DETAIL_FORMAT", "DETAIL_PATTERN", "DetailEncoding", "check_detail_maps", "check_png16", "detail_files", "detail_path",
]
