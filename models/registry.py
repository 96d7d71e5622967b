"""Which face models this backend can run, and loading the one a job asks for."""
from __future__ import annotations

from avface.errors import AVFaceError


def available_models(flame_dir: str | None = None) -> dict[str, dict]:
    """Which face models this backend can run, and why not where it cannot."""
    out: dict[str, dict] = {}
    try:
        from avface.models.canonical_mesh import load_canonical_mesh

        load_canonical_mesh()
        out["default"] = {"available": True, "reason": ""}
    except AVFaceError as e:
        out["default"] = {"available": False, "reason": str(e)}
    try:
        from avface.models.ict import check_model_file, read_embedding, DATA_DIR, MODEL_FILE

        check_model_file(DATA_DIR / MODEL_FILE)
        read_embedding()
        out["ict"] = {"available": True, "reason": ""}
    except AVFaceError as e:
        out["ict"] = {"available": False, "reason": str(e)}
    from avface.models.flame import flame_status

    ok, reason = flame_status(flame_dir)
    out["flame"] = {"available": ok, "reason": reason}
    return out


def load_model(model: str, flame_dir: str | None):
    """The fixed-basis face model for ``model`` (``flame``, ``ict``), or None for the default model,
    whose basis the fit learns per clip. A missing FLAME file, or a missing or damaged ICT
    file, raises ModelFileError here, before any work."""
    if model == "flame":
        from avface.models.flame import load_flame

        return load_flame(flame_dir)
    if model == "ict":
        from avface.models.ict import load_ict

        return load_ict()
    return None
