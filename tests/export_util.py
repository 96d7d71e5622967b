"""Small results for the exporter tests, made by the real model code and the real
``assemble.result_arrays``, so that their ``vertices`` are exactly what a job would store.

The lip basis is not produced by the pipeline yet; where a test needs one, it is fabricated
honestly: the lip components are appended to the model's expression basis (zero outside the
lip vertices, and, for FLAME, zero on the vertices the joint regressor reads, so that they do
not move the joints), the mesh is evaluated by the model with them, and the result then stores
them split off as ``lip_basis`` / ``lip_coeffs``. That is the convention ``avface.export.rig``
documents: rest-frame offsets added before skinning.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from avface.core.geometry import intrinsics_for
from avface.models.base import FaceParams
from avface.result import SCHEMA_VERSION, write_result
from avface.stages.assemble.run import result_arrays
from avface.stages.fit import CoarseFit

#: beside a test result: its float32 world-frame vertices (T, V, 3), not part of the result
WORLD_F32 = "world_vertices_f32.npy"


def _meta(n_frames: int, fps: float, model: str, n_detail: int = 0) -> dict:
    return {"schema_version": SCHEMA_VERSION, "model": model, "fps": float(fps), "n_frames": int(n_frames),
            "width": 640, "height": 480,
            "source": {"path": "synthetic.mp4", "frame_start": 0, "frame_end": int(n_frames)},
            "audio_present": False, "stages_run": ["fit", "export"], "stage_seconds": {"fit": 0.0},
            "backend_version": "test", "lip_pca_residual": 0.0,
            "detail": {"n_maps": n_detail, "folder": "detail", "map_size": 8 if n_detail else 0,
                       "metres_per_unit": 1e-3 if n_detail else 0.0, "format": "png16"}}


def _params(rng, n_frames: int, n_shape: int, n_expr: int, *, joints5: bool) -> FaceParams:
    t = np.linspace(0, 2 * np.pi, n_frames)[:, None]

    def smooth(n, scale):
        phase = rng.uniform(0, 2 * np.pi, (1, n))
        freq = rng.uniform(0.5, 2.0, (1, n))
        return torch.tensor(scale * np.sin(freq * t + phase), dtype=torch.float32)

    betas = torch.tensor(np.tile(rng.normal(0, 1.0, (1, n_shape)), (n_frames, 1)), dtype=torch.float32)
    zeros = torch.zeros(n_frames, 3)
    transl = smooth(3, 0.02) + torch.tensor([0.01, -0.02, -0.55])
    return FaceParams(betas, smooth(n_expr, 1.5), smooth(3, 0.25), smooth(3, 0.15) if joints5 else zeros,
                      smooth(3, 0.2), smooth(3, 0.2) if joints5 else zeros, smooth(3, 0.2) if joints5 else zeros,
                      transl)


def _arkit(rng, n_frames: int) -> np.ndarray:
    return rng.uniform(0, 1, (n_frames, 52)).astype(np.float32)


def _finish(out_dir: Path, fit: CoarseFit, rng, *, n_lip: int, model_name: str, fps: float,
            n_detail: int = 0, config: dict | None = None) -> Path:
    n = fit.params.batch
    arrays = result_arrays(fit, _arkit(rng, n), np.ones(n, np.float32), np.zeros(n, bool), np.zeros(n, np.float32))
    if n_lip:
        e = arrays["expression_basis"].shape[0] - n_lip
        lips = arrays["lip_vertex_ids"]
        arrays["lip_basis"] = arrays["expression_basis"][e:, lips].copy()
        arrays["lip_coeffs"] = arrays["expression"][:, e:].copy()
        arrays["expression_basis"] = arrays["expression_basis"][:e].copy()
        if "expression_joints" in arrays:  # the fabricated lip components never move the joints
            assert not arrays["expression_joints"][e:].any()
            arrays["expression_joints"] = arrays["expression_joints"][:e].copy()
        arrays["expression"] = arrays["expression"][:, :e].copy()
    out_dir = Path(out_dir)
    if n_detail:
        import cv2

        (out_dir / "detail").mkdir(parents=True, exist_ok=True)
        for t in range(n_detail):
            cv2.imwrite(str(out_dir / "detail" / f"{t:06d}.png"), np.full((8, 8), 1000 * t, np.uint16))
    if config is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config))
    path = write_result(out_dir / "result.npz", arrays, _meta(n, fps, model_name, n_detail))
    # the float32 mesh before float16 storage: lets tests check the rig far below float16 rounding
    np.save(out_dir / WORLD_F32, fit.world_vertices())
    return path


def default_result(out_dir: Path, *, n_frames: int = 12, n_expr: int = 6, n_lip: int = 0, fps: float = 25.0,
                   seed: int = 0, n_detail: int = 0) -> Path:
    """A default-model (MediaPipe canonical) result: per-clip neutral and expression basis,
    root + jaw skinning, head motion."""
    from avface.models.canonical import CanonicalModel
    from avface.models.canonical_mesh import load_canonical_mesh

    rng = np.random.default_rng(seed)
    mesh = load_canonical_mesh()
    neutral = mesh.vertices + rng.normal(0, 0.002, mesh.vertices.shape).astype(np.float32)
    basis = rng.normal(0, 0.002, (n_expr + n_lip, 468, 3)).astype(np.float32)
    if n_lip:
        probe = CanonicalModel(neutral)
        off_lips = np.setdiff1d(np.arange(468), probe.lip_vertex_ids)
        basis[n_expr:, off_lips] = 0.0
    model = CanonicalModel(neutral, basis)
    params = _params(rng, n_frames, 0, n_expr + n_lip, joints5=False)
    fit = CoarseFit(model, params, intrinsics_for(640, 480, 63.0), np.zeros(n_frames, bool), 0.99, 0.0)
    return _finish(out_dir, fit, rng, n_lip=n_lip, model_name=model.name, fps=fps, n_detail=n_detail)


def flame_result(out_dir: Path, flame_dir: Path, *, n_frames: int = 10, n_shape: int = 8, n_expr: int = 6,
                 n_lip: int = 0, fps: float = 30.0, seed: int = 1, config: bool = False) -> Path:
    """A FLAME result on the synthetic FLAME model in `flame_dir` (tests/flame_fixture.py), with
    identity, expression, all five joints posed (neck and eyes too) and head motion."""
    from avface.models.flame import FlameModel, load_flame

    rng = np.random.default_rng(seed)
    model = load_flame(flame_dir, n_shape=n_shape, n_expression=n_expr)
    if n_lip:
        a = model.arrays
        v = a.v_template.shape[0]
        lipdirs = np.zeros((v, 3, n_lip))
        lipdirs[model.lip_vertex_ids] = rng.normal(0, 0.002, (len(model.lip_vertex_ids), 3, n_lip))
        lipdirs[np.any(a.j_regressor != 0, axis=0)] = 0.0  # lip offsets never move the joints
        cut = a.n_shape_total + n_expr
        shapedirs = np.concatenate([a.shapedirs[:, :, :cut], lipdirs, a.shapedirs[:, :, cut:]], axis=2)
        model = FlameModel(dataclasses.replace(a, shapedirs=shapedirs),
                           _embedding(model), name=model.name, uv=model.uv, uv_faces=model.uv_faces,
                           lip_vertex_ids=model.lip_vertex_ids, n_shape=n_shape, n_expression=n_expr + n_lip)
    params = _params(rng, n_frames, n_shape, n_expr + n_lip, joints5=True)
    fit = CoarseFit(model, params, intrinsics_for(640, 480, 63.0), np.zeros(n_frames, bool), float("nan"), 0.0)
    cfg = {"model": "flame", "flame_dir": str(flame_dir)} if config else None
    return _finish(out_dir, fit, rng, n_lip=n_lip, model_name=model.name, fps=fps, config=cfg)


def _embedding(model):
    from avface.models.flame import LandmarkEmbedding

    return LandmarkEmbedding(model.landmark_faces, model.landmark_bary.astype(np.float64), model.landmark_ids)


@dataclasses.dataclass(frozen=True)
class Case:
    """One exportable result and what the tests compare against."""

    name: str
    result_path: Path
    flame_dir: Path | None  #: pass to the exporter (None: default model, or found in config.yaml)
    world_f32: np.ndarray  #: (T, V, 3) the model's float32 world-frame mesh
    n_lip: int

    def frames(self) -> np.ndarray:
        """Three frames to check: first, one inside, last."""
        t = self.world_f32.shape[0]
        return np.array([0, t // 2 + 1, t - 1])


def build_cases(root: Path) -> dict[str, Case]:
    """Default model with and without a lip basis (the one with lips also has detail maps),
    FLAME with and without a lip basis (the one with lips finds its FLAME folder in config.yaml)."""
    from flame_fixture import write_synthetic_flame

    root = Path(root)
    flame_dir = root / "flame"
    write_synthetic_flame(flame_dir)
    made = {
        "default": (default_result(root / "default"), None, 0),
        "default_lips": (default_result(root / "default_lips", n_lip=3, n_detail=12, seed=3), None, 3),
        "flame": (flame_result(root / "flame_plain", flame_dir), flame_dir, 0),
        "flame_lips": (flame_result(root / "flame_lips", flame_dir, n_lip=4, config=True, seed=5), None, 4),
    }
    return {name: Case(name, path, fdir, np.load(path.parent / WORLD_F32), n_lip)
            for name, (path, fdir, n_lip) in made.items()}


@pytest.fixture(scope="session")
def export_cases(tmp_path_factory) -> dict[str, Case]:
    """The four results of :func:`build_cases`, made once per test session."""
    return build_cases(tmp_path_factory.mktemp("export_cases"))
