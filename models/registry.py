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
    from avface.models.flame import flame_status

    ok, reason = flame_status(flame_dir)
    out["flame"] = {"available": ok, "reason": reason}
    return out


def load_model(model: str, flame_dir: str | None):
    """The fixed-basis face model for ``model`` (``flame``), or None for the default model,
    whose basis the fit learns per clip. A missing FLAME file raises ModelFileError here,
    before any work."""
    if model == "flame":
        from avface.models.flame import load_flame

        return load_flame(flame_dir)
    return None
