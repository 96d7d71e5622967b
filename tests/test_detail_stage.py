"""The fine stage in `reconstruct` (docs/fine_stage.md): a short synthetic clip with speech and a hand
over the mouth, the shipped networks, small maps and few steps. The result's detail maps
validate (count, size, bit depth) and are read back to rebuild a detailed point by hand;
a rerun without detail leaves no stale maps; a damaged map is a SchemaError; the preview
gets its second panel; the CLI switches the stage."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from avface.config import DetailStageConfig, ReconstructOptions
from avface.core.topology import LIPS
from avface.errors import SchemaError
from avface.models.canonical_mesh import load_canonical_mesh
from avface.pipeline import reconstruct
from avface.result import DetailEncoding, detail_state, load_result, validate
from avface.stages.detail import uvspace
from avface.stages.detail.fine import read_detail_map
from avface.stages.detail.run import lower_face_weights, mouth_texels

# reconstruct end to end with the detail stage: `make test`, not `make check`
pytestmark = [pytest.mark.usefixtures("torch_one_thread"), pytest.mark.slow]

MAP = 64
"""Map side in the tests (256 in a real run on the CPU)."""


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from avface.synth import make_demo_clip

    return make_demo_clip(tmp_path_factory.mktemp("clip"), seed=4, duration_s=2.0, size=256)


def _options(clip, tmp_path, **kw) -> ReconstructOptions:
    fov = math.degrees(2 * math.atan(clip.height / 2.0 / clip.K[1, 1]))
    fine = DetailStageConfig(map_size=MAP, steps=6, batch=2, train_frames=6, holdout_stride=5)
    return ReconstructOptions(fov_deg=fov, cache_dir=str(tmp_path.parent / "cache"), fine=fine, **kw)


@pytest.fixture(scope="module")
def detailed(clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("detailed")
    stages, heads = [], []

    def on_head(path):  # what a user could import at this moment
        heads.append((load_result(path).meta, sorted(p.name for p in (out / "detail").glob("*")), list(stages)))

    path = reconstruct(clip.video_path, out, _options(clip, out, detail=True, preview=True),
                       progress=lambda stage, f, msg: stages.append(stage), on_head=on_head)
    return path, stages, heads


def test_the_head_comes_before_the_detail(detailed):
    """result.npz is written, valid and importable, before the fine stage starts; the maps
    follow, and the same file then says they are complete."""
    path, stages, heads = detailed
    assert len(heads) == 1
    head, files_then, stages_then = heads[0]
    assert detail_state(head) == "pending" and head["detail"]["n_maps"] == 0 and files_then == []
    assert "detail" not in stages_then and "detail" not in head["stages_run"] and head["stages_run"][-1] == "export"
    assert stages.index("detail") > stages.index("export")
    final = validate(path)
    assert detail_state(final) == "complete" and final["detail"]["n_maps"] == final["n_frames"]
    assert final["stages_run"][-3:] == ["export", "detail", "preview"]
    # the head's arrays are the final result's: the detail adds maps, it moves no vertex
    with np.load(path) as z:
        assert json.loads(str(z["meta"]))["detail"]["state"] == "complete"


def test_a_cancelled_detail_keeps_the_head(clip, tmp_path):
    from avface.errors import CancelledError

    out = tmp_path / "cancelled"
    seen = []
    with pytest.raises(CancelledError):
        reconstruct(clip.video_path, out, _options(clip, tmp_path, detail=True),
                    progress=lambda stage, f, msg: seen.append(stage), should_cancel=lambda: "detail" in seen)
    meta = validate(out / "result.npz")
    assert detail_state(meta) == "cancelled" and meta["detail"]["n_maps"] == 0
    assert not list((out / "detail").glob("*.png")), "no half-written maps beside the head"
    from avface.result import load_result, summary

    assert "cancelled: the head is complete" in summary(load_result(out / "result.npz"))


def test_detail_maps_validate_and_rebuild_a_detailed_point_by_hand(detailed, clip):
    path, stages, _ = detailed
    meta = validate(path)
    assert "detail" in meta["stages_run"] and "detail" in stages
    d = meta["detail"]
    n = meta["n_frames"]
    assert d["n_maps"] == n and d["map_size"] == MAP and d["format"] == "png16" and d["folder"] == "detail"
    assert d["train_frames"] <= 6 and d["held_out_frames"] > 0 and d["audio"]  # the networks' f_a was its audio
    assert math.isfinite(d["photo_residual_coarse"]) and math.isfinite(d["photo_residual_detail"])
    files = sorted((path.parent / "detail").glob("*.png"))
    assert len(files) == n
    # a real PNG reader: 16-bit greyscale, MAP x MAP
    with Image.open(files[0]) as im:
        assert im.mode.startswith("I;16") and im.size == (MAP, MAP)

    # By hand, at a lower-face texel of a middle frame: the texel's (u, v), the triangle of
    # the result's UV layout holding it, its barycentrics, the result's vertices there and the
    # interpolated vertex normal; V_d = V_c + D N_c with D read from the PNG as meta says.
    r = load_result(path)
    a = r.arrays
    t = n // 2
    verts = a["vertices"][t].astype(np.float64)
    faces, uv, uv_faces = a["faces"], a["uv"].astype(np.float64), a["uv_faces"]
    enc = DetailEncoding.from_meta(d)
    maps = read_detail_map(files[t], enc)
    raster = uvspace.rasterise_uv(uv, uv_faces, MAP)
    cand = np.argwhere(raster.mask & (np.abs(maps) > 20 * enc.metres_per_unit / 65535))
    assert len(cand), "the detail is not zero anywhere"
    row, col = cand[len(cand) // 2]
    u, v = (col + 0.5) / MAP, 1.0 - (row + 0.5) / MAP
    hit = None
    for f, (ia, ib, ic) in enumerate(uv_faces):
        pa, pb, pc = uv[ia], uv[ib], uv[ic]
        m = np.array([[pb[0] - pa[0], pc[0] - pa[0]], [pb[1] - pa[1], pc[1] - pa[1]]])
        if abs(np.linalg.det(m)) < 1e-15:
            continue
        w1, w2 = np.linalg.solve(m, [u - pa[0], v - pa[1]])
        if min(1 - w1 - w2, w1, w2) >= -1e-9:
            hit = (f, np.array([1 - w1 - w2, w1, w2]))
            break
    assert hit is not None
    f, bary = hit
    corners = faces[f]
    vn = np.zeros_like(verts)
    for tri in faces:
        p0, p1, p2 = verts[tri]
        vn[tri] += np.cross(p1 - p0, p2 - p0)  # area-weighted
    vn /= np.linalg.norm(vn, axis=1, keepdims=True)
    normal = bary @ vn[corners]
    normal /= np.linalg.norm(normal)
    png = np.asarray(Image.open(files[t]), np.float64)
    d_texel = (png[row, col] / 65535.0 - d["midlevel"]) * d["metres_per_unit"]
    by_hand = bary @ verts[corners] + d_texel * normal
    vt = torch.as_tensor(verts)[None]
    module = uvspace.displace(uvspace.interpolate(raster, faces, vt), uvspace.texel_normals(raster, faces, vt),
                              torch.as_tensor(maps, dtype=torch.float64)[None])[0, row, col].numpy()
    np.testing.assert_allclose(module, by_hand, atol=2e-6)
    assert abs(d_texel) > 1e-6


def test_preview_shows_the_detail_panel(detailed, clip):
    from avface import media

    path = detailed[0]
    info = media.probe(path.parent / "preview.mp4")
    assert (info.width, info.height) == (2 * clip.width, clip.height)


def test_rerun_without_detail_leaves_no_stale_maps(detailed, clip, tmp_path):
    import shutil

    path = detailed[0]
    out = tmp_path / "again"
    shutil.copytree(path.parent, out)
    again = reconstruct(clip.video_path, out, _options(clip, tmp_path, detail=False, networks_checkpoint="none"))
    meta = validate(again)
    assert meta["detail"]["n_maps"] == 0 and "detail" not in meta["stages_run"] and detail_state(meta) == "off"
    assert not list((out / "detail").glob("*.png"))
    # the threads the job ran with (the fixture's one; OpenMP's threads sleep while they wait)
    assert meta["threads"]["torch_intra_op"] == 1 and meta["threads"]["omp_wait_policy"] == "PASSIVE"


def test_a_damaged_or_missing_map_is_a_schema_error(detailed, tmp_path):
    import shutil

    path = detailed[0]
    out = tmp_path / "copy"
    shutil.copytree(path.parent, out)
    files = sorted((out / "detail").glob("*.png"))
    Image.fromarray(np.zeros((MAP, MAP), np.uint8)).save(files[3])  # 8-bit in place of 16-bit
    with pytest.raises(SchemaError, match="16-bit"):
        load_result(out / "result.npz")
    files[3].unlink()
    with pytest.raises(SchemaError, match="expected .* maps"):
        load_result(out / "result.npz")


def test_lower_face_and_mouth_regions_of_the_default_model():
    from avface.models.registry import load_model  # noqa: F401  (the default model is the canonical mesh)

    mesh = load_canonical_mesh()
    w = lower_face_weights(mesh.vertices, LIPS)[0]
    assert w.shape == (468,) and (w[list(LIPS)] == 1).all()
    assert w[10] == 0 and w[151] == 0  # forehead
    assert w[152] > 0  # the chin is lower face

    class Model:  # only what mouth_texels reads
        faces, uv, uv_faces, lip_vertex_ids = mesh.faces, mesh.uv, mesh.faces, np.asarray(LIPS)

        @staticmethod
        def neutral_vertices(betas=None):
            return mesh.vertices

    raster = uvspace.rasterise_uv(mesh.uv, mesh.faces, 128)
    mouth = mouth_texels(raster, Model)
    assert mouth.any() and not (mouth & ~raster.mask).any()
    # the lips' own UVs fall inside the region, the forehead's do not
    def texel(vid):
        u, v = mesh.uv[vid]
        return int((1 - v) * 128), int(u * 128)
    assert sum(mouth[texel(i)] for i in LIPS) >= 0.9 * len(LIPS)
    assert not mouth[texel(10)]


def test_cli_switches_the_fine_stage():
    from avface.cli import _options_from_args, build_parser

    p = build_parser()
    on = _options_from_args(p.parse_args(["reconstruct", "in.mp4", "-o", "out", "--detail"]))
    off = _options_from_args(p.parse_args(["reconstruct", "in.mp4", "-o", "out", "--no-detail"]))
    default = _options_from_args(p.parse_args(["reconstruct", "in.mp4", "-o", "out"]))
    assert on.detail and not off.detail and default.detail == ReconstructOptions().detail
    # the options round-trip through the config file the job writes
    assert ReconstructOptions.from_dict(json.loads(json.dumps(on.to_dict()))) == on
    assert dataclasses.replace(on, fine=DetailStageConfig(steps=3)).fine.steps == 3
