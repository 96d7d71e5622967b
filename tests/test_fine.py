"""The fine stage's losses, the carrying of detail over occluded frames, and the 16-bit detail
maps (read back, validated, and V_d rebuilt at a texel by hand)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from PIL import Image
from uv_util import posed_camera_vertices

from avface import result as R
from avface.errors import SchemaError
from avface.models.canonical_mesh import load_canonical_mesh
from avface.stages.detail import fine, shading, uvspace

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _plane(size=48, side_m=0.06):
    """A square patch 0.5 m in front of the camera, facing it, rasterised at size^2."""
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float64)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    verts = np.array([[-1, 1, 0], [1, 1, 0], [1, -1, 0], [-1, -1, 0]], np.float64) * side_m / 2 + [0, 0, 0.5]
    r = uvspace.rasterise_uv(uv, faces, size)
    v = torch.as_tensor(verts, dtype=torch.float32)[None]
    return r, uvspace.interpolate(r, faces, v), uvspace.texel_normals(r, faces, v), torch.as_tensor(r.mask)


def _bump(points, amp=0.6e-3, sigma=0.008):
    x, y = points[..., 0], points[..., 1]
    return amp * torch.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))


def _light(batch=1):
    sh = torch.zeros(batch, 9, 3)
    sh[:, 0] = 2.0
    sh[:, 3] = 1.0  # from the side (camera x), so a bump's slopes shade differently
    sh[:, 1] = -0.5
    return sh


def test_photometric_and_normal_losses_ignore_untrusted_texels():
    r, pts, n, covered = _plane()
    d = _bump(pts)
    nd = uvspace.detail_normals(pts, n, d, covered)
    albedo = torch.full((r.size, r.size, 3), 0.6)
    sh = _light()
    image = shading.render(albedo, nd, sh)
    trust = covered[None].clone()
    cfg = fine.FineLossConfig()
    kw = dict(albedo=albedo, sh=sh, displacement=d)
    layout = fine.TexelLayout(covered, torch.zeros(r.size, r.size, dtype=torch.long),
                              torch.zeros(r.size, r.size, dtype=torch.bool))

    def loss(**batch):
        return fine.fine_loss(cfg, fine.FineLossBatch(**batch, **kw), layout)

    _, terms = loss(image_uv=image, detail_normals=nd, shading_normals=nd, trust=trust)
    assert terms["photometric"] < 1e-6 and terms["normal"] < 1e-6
    # an occluder (a dark blob with sharp edges) over texels the confidence does not trust
    hand = torch.zeros(1, r.size, r.size, dtype=torch.bool)
    hand[:, 10:30, 5:25] = True
    occluded = image.clone()
    occluded[hand] = 0.05
    shading_n = torch.where(hand[..., None], -nd, nd)  # and the normals it would imply
    trust_no_hand = trust & ~hand
    base, base_terms = loss(image_uv=image, detail_normals=nd, shading_normals=nd, trust=trust_no_hand)
    total, terms = loss(image_uv=occluded, detail_normals=nd, shading_normals=shading_n, trust=trust_no_hand)
    assert terms == base_terms and float(total) == float(base)
    # trusted, the same occluder is a large residual
    _, seen = loss(image_uv=occluded, detail_normals=nd, shading_normals=shading_n, trust=trust)
    assert seen["photometric"] > 0.05 and seen["normal"] > 0.1
    # a confidence below min_trust counts as untrusted; above it weights the texel
    soft = torch.where(hand, torch.tensor(0.3), torch.tensor(1.0)) * covered
    _, soft_terms = loss(image_uv=occluded, detail_normals=nd, shading_normals=shading_n, trust=soft)
    assert soft_terms["photometric"] == pytest.approx(base_terms["photometric"], abs=1e-7)


def test_normal_loss_sees_detail_not_the_overall_tilt():
    r, pts, n, covered = _plane()
    tilted = F.normalize(n + torch.tensor([0.2, 0.0, 0.0]), dim=-1)
    w = covered[None].float()
    assert float(fine.normal_loss(n, tilted, w)) < 1e-6  # a constant offset has no Laplacian
    nd = uvspace.detail_normals(pts, n, _bump(pts), covered)
    assert float(fine.normal_loss(nd, n, w)) > 1e-4  # measured 7.8e-4


def test_symmetry_loss_on_the_canonical_mirror_map():
    mesh = load_canonical_mesh()
    r = uvspace.rasterise_uv(mesh.uv, mesh.faces, 128)
    mirror, ok = uvspace.mirror_texels(r, mesh.faces, mesh.vertices)
    mirror, ok = torch.as_tensor(mirror), torch.as_tensor(ok)
    rest = uvspace.interpolate(r, mesh.faces, torch.as_tensor(mesh.vertices)[None])
    x = rest[..., 0]
    symmetric = 1e-3 * torch.cos(40 * x)  # even in x
    odd = 1e-3 * torch.sin(40 * x)
    assert float(fine.symmetry_loss(symmetric, mirror, ok)) < 2e-5  # a texel's mirror is within a texel
    assert float(fine.symmetry_loss(odd, mirror, ok)) > 5e-4


def test_fine_loss_gradients_recover_a_bump():
    """The losses are wired right: descending them from D = 0 on a frame rendered with a
    bump (and the bump's normals as the shading-implied target) finds the bump.

    D is searched over a smooth family (7 x 7 Gaussians, the bump among them), as a network's
    output is smooth: over free per-texel values the Laplacian-of-normals term, a third
    derivative of D, is so stiff at the texel scale that Adam and L-BFGS both stalled with
    the total loss above its start (measured), though along the line from 0 to the bump
    the loss falls monotonically to 0."""
    r, pts, n, covered = _plane(size=48)
    truth = _bump(pts) * covered
    n_true = uvspace.detail_normals(pts, n, truth, covered)
    albedo = torch.full((r.size, r.size, 3), 0.6)
    sh = _light()
    image = shading.render(albedo, n_true, sh)
    centres = torch.linspace(-0.024, 0.024, 7)
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    x, y = pts[0, ..., 0], pts[0, ..., 1]
    basis = torch.exp(-((x[None] - cx.reshape(-1, 1, 1)) ** 2 + (y[None] - cy.reshape(-1, 1, 1)) ** 2)
                      / (2 * 0.008 ** 2))  # (49, S, S)
    coef = torch.zeros(49, requires_grad=True)
    opt = torch.optim.LBFGS([coef], lr=1, max_iter=200, line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                            tolerance_change=1e-15)
    cfg = fine.FineLossConfig()
    none = torch.zeros(r.size, r.size, dtype=torch.bool)
    history = []

    def displacement():
        return (1e-3 * torch.einsum("k,kij->ij", coef, basis) * covered)[None]

    def closure():
        opt.zero_grad()
        d = displacement()
        nd = uvspace.detail_normals(pts, n, d, covered)
        loss, _ = fine.fine_loss(cfg, fine.FineLossBatch(image_uv=image, albedo=albedo, sh=sh, detail_normals=nd,
                                                         shading_normals=n_true, displacement=d, trust=covered[None]),
                                 fine.TexelLayout(covered, none.long(), none))
        loss.backward()
        history.append(float(loss.detach()))
        return loss

    opt.step(closure)
    # measured: 0.0124 -> 1.5e-6 (what is left is lambda_d |D|), D within 1e-8 m of the bump
    assert history[-1] < 1e-3 * history[0], (history[0], history[-1])
    assert float((displacement().detach() - truth).abs().max()) < 0.02 * float(truth.max())


def test_carry_displacement_across_an_occlusion():
    t, s = 7, 2
    d = np.zeros((t, s, s), np.float32)
    d[:, 0, 0] = np.arange(t)  # 0..6
    d[:, 0, 1] = 9.0  # a bogus value while untrusted
    trusted = np.ones((t, s, s), bool)
    trusted[2:5, 0, 0] = False  # occluded in frames 2, 3, 4
    trusted[:, 0, 1] = False  # never seen
    trusted[:3, 1, 0] = False  # hidden at the start
    trusted[5:, 1, 1] = False  # hidden at the end
    d[:, 1, 0] = np.arange(t) * 10
    d[:, 1, 1] = np.arange(t) * 10
    d[2:5, 0, 0] = 100.0  # what the network made of the hand
    out = fine.carry_displacement(d, trusted)
    assert_close(out[:, 0, 0], [0, 1, 2, 3, 4, 5, 6], atol=1e-6, what="linear between trusted frames")
    assert_close(out[:, 0, 1], d[:, 0, 1], what="never trusted: unchanged")
    assert_close(out[:, 1, 0], [30, 30, 30, 30, 40, 50, 60], what="nearest at the start")
    assert_close(out[:, 1, 1], [0, 10, 20, 30, 40, 40, 40], what="nearest at the end")
    with pytest.raises(ValueError, match="matching"):
        fine.carry_displacement(d, trusted[:3])


def _vertex_normals_by_hand(v, faces):
    n = np.zeros_like(v)
    for a, b, c in faces:
        fn = np.cross(v[b] - v[a], v[c] - v[a])
        n[a] += fn
        n[b] += fn
        n[c] += fn
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def test_detail_maps_round_trip_and_rebuild_a_detailed_vertex_by_hand(tmp_path):
    mesh = load_canonical_mesh()
    size = 64
    r = uvspace.rasterise_uv(mesh.uv, mesh.faces, size)
    verts = posed_camera_vertices(yaw_deg=10.0)  # (V, 3) camera frame, as the result's vertices
    vt = torch.as_tensor(verts, dtype=torch.float64)[None]
    pts = uvspace.interpolate(r, mesh.faces, vt)
    normals = uvspace.texel_normals(r, mesh.faces, vt)
    enc = R.DetailEncoding.for_range(size, 0.004, n_maps=2)
    uvc = uvspace.texel_centres(size)
    d = np.stack([1.5e-3 * np.sin(12 * uvc[..., 0]) * np.cos(5 * uvc[..., 1]), np.full((size, size), -3.9e-3)])
    d *= r.mask
    paths = fine.write_detail_maps(tmp_path, d, enc)
    R.check_detail_maps(tmp_path, enc, 2)
    # a real PNG reader agrees that these are 16-bit greyscale maps of the stated size
    with Image.open(paths[0]) as im:
        assert im.mode.startswith("I;16") and im.size == (size, size)
    back = fine.read_detail_map(paths[0], enc)
    assert np.abs(back - d[0]).max() <= 0.5 * enc.metres_per_unit / 65535 + 1e-9
    # Blender's Displace modifier reads value / 65535: (value - midlevel) * strength is D
    meta = enc.to_meta()
    raw = np.asarray(Image.open(paths[0]), np.float64) / 65535.0
    assert_close((raw - meta["midlevel"]) * meta["metres_per_unit"], back, atol=1e-9, what="Blender D")
    assert R.DetailEncoding.from_meta(meta) == enc

    # By hand: texel (row, col) -> (u, v) -> the triangle holding it -> barycentrics -> point
    # and interpolated vertex normal -> V_d = V_c + D N_c, against the module's maps.
    row, col = 30, 25
    u, v = (col + 0.5) / size, 1.0 - (row + 0.5) / size
    vn = _vertex_normals_by_hand(verts, mesh.faces)
    hit = None
    for f, (a, b, c) in enumerate(mesh.faces):
        pa, pb, pc = mesh.uv[a].astype(np.float64), mesh.uv[b].astype(np.float64), mesh.uv[c].astype(np.float64)
        m = np.array([[pb[0] - pa[0], pc[0] - pa[0]], [pb[1] - pa[1], pc[1] - pa[1]]])
        w1, w2 = np.linalg.solve(m, [u - pa[0], v - pa[1]])
        if min(1 - w1 - w2, w1, w2) >= -1e-9:
            hit = (f, np.array([1 - w1 - w2, w1, w2]))
            break
    assert hit is not None, "the chosen texel lies on the face"
    f, bary = hit
    a, b, c = mesh.faces[f]
    point = bary @ verts[[a, b, c]]
    normal = bary @ vn[[a, b, c]]
    normal /= np.linalg.norm(normal)
    png = np.asarray(Image.open(paths[0]))
    d_texel = (int(png[row, col]) / 65535 - meta["midlevel"]) * meta["metres_per_unit"]
    by_hand = point + d_texel * normal
    vd = uvspace.displace(pts, normals, torch.as_tensor(back, dtype=torch.float64)[None])
    assert_close(vd[0, row, col].numpy(), by_hand, atol=1e-7, what="V_d at the texel")
    assert abs(d_texel) > 1e-4  # the detail is not zero there, so the test sees it


def test_detail_maps_refusals(tmp_path):
    enc = R.DetailEncoding.for_range(16, 0.01)
    with pytest.raises(ValueError, match=r"\(T, 16, 16\)"):
        fine.write_detail_maps(tmp_path, np.zeros((2, 8, 8)), enc)
    fine.write_detail_maps(tmp_path, np.zeros((2, 16, 16)), enc)
    enc = R.DetailEncoding.for_range(16, 0.01, n_maps=2)
    with pytest.raises(SchemaError, match="expected 3 maps"):
        R.check_detail_maps(tmp_path, enc, 3)
    # an 8-bit map in place of a 16-bit one
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(R.detail_path(tmp_path, 1))
    with pytest.raises(SchemaError, match="16-bit greyscale"):
        R.check_detail_maps(tmp_path, enc, 2)
    with pytest.raises(SchemaError, match="malformed"):
        R.DetailEncoding.from_meta({"map_size": 16})


def test_unwrap_clip_streams_frames_and_applies_confidence():
    from uv_util import intrinsics, render_textured, smooth_texture

    from avface.models.canonical_mesh import lower_face_ids

    mesh = load_canonical_mesh()
    r = uvspace.rasterise_uv(mesh.uv, mesh.faces, 128)
    size = 256
    k = intrinsics(size)
    yaws = (0.0, 20.0, -20.0)
    verts = np.stack([posed_camera_vertices(yaw_deg=y) for y in yaws])
    frames = (np.round(255 * render_textured(v, mesh.faces, mesh.uv.astype(np.float64), k, size)[0]).astype(np.uint8)
              for v in verts)  # a generator, as a decoder streams them
    w = np.zeros((1, len(mesh.vertices)), np.float32)
    w[0, list(lower_face_ids())] = 1.0
    conf = uvspace.confidence_map(r, mesh.faces, w, torch.tensor([[1.0], [0.0], [1.0]]))  # a hand in frame 1
    clip = fine.unwrap_clip(frames, torch.as_tensor(verts, dtype=torch.float32), mesh.faces, r, k,
                            confidence=conf, chunk=2)
    assert clip.image.shape == (3, 128, 128, 3) and clip.image.dtype == torch.uint8
    uv = uvspace.texel_centres(128)
    expected = smooth_texture(uv[..., 0], uv[..., 1])
    for t in range(3):
        seen = (clip.trust[t] > 0.99).numpy()
        assert seen.sum() > (0.3 if t == 1 else 0.6) * r.n_texels
        err = np.abs(clip.frames(t).numpy() - expected)[seen]
        assert err.mean() < 0.006, (t, err.mean())  # 8-bit frames and 8-bit maps: ~1 level
    lower = torch.as_tensor(np.isin(mesh.faces, list(lower_face_ids())).all(1)[np.maximum(r.face_id(), 0)] & r.mask)
    # frame 0 shows most of the lower face (measured 79 %: the underside of the chin turns away)
    assert clip.trust[1][lower].max() < 1e-6 and clip.trust[0][lower].mean() > 0.7
    with pytest.raises(ValueError, match="vertex sets"):
        fine.unwrap_clip(np.zeros((2, size, size, 3), np.uint8), torch.as_tensor(verts, dtype=torch.float32),
                         mesh.faces, r, k)


def test_pad_maps_fills_a_gutter_from_the_nearest_texel():
    covered = np.zeros((16, 16), bool)
    covered[4:12, 4:8] = True
    maps = np.zeros((2, 16, 16), np.float32)
    maps[0][covered] = np.arange(covered.sum())
    maps[1][covered] = 7.0
    out = uvspace.pad_maps(maps, covered, width=2)
    assert_close(out[:, covered], maps[:, covered], what="covered texels unchanged")
    assert out[1, 4:12, 2:4].min() == 7.0 and out[1, 4:12, 8:10].min() == 7.0  # two texels each side
    assert out[1, :, 11:].max() == 0.0 and out[1, 0, :].max() == 0.0  # beyond the gutter
    assert out[0, 6, 8] == maps[0, 6, 7] and out[0, 6, 3] == maps[0, 6, 4]


def test_photo_residual_is_in_8_bit_levels():
    n = torch.zeros(1, 4, 4, 3)
    n[..., 2] = -1
    albedo = torch.full((4, 4, 3), 0.5)
    sh = torch.zeros(1, 9, 3)
    sh[:, 0] = 1.0 / shading.sh_basis(n)[0, 0, 0, 0]  # shading 1
    image = torch.full((1, 4, 4, 3), 0.5 + 2.0 / 255.0)
    assert fine.photo_residual(image, albedo, sh, n, torch.ones(1, 4, 4)) == pytest.approx(2.0, abs=1e-4)


def test_detail_occluder_ratio():
    clean = np.full((4, 8, 8), 1e-4, np.float32)
    occluded = clean.copy()
    occluded[2, 2:6, 2:6] = 5e-4  # an engraved hand in frame 2
    region = np.zeros((8, 8), bool)
    region[2:6, 2:6] = True
    assert fine.detail_occluder_ratio(clean, clean, [1, 2], region) == pytest.approx(1.0)
    assert fine.detail_occluder_ratio(occluded, clean, [1, 2], region) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="at least one frame"):
        fine.detail_occluder_ratio(occluded, clean, [], region)


def test_shaded_detail_panel_shows_the_detail():
    from uv_util import intrinsics

    mesh = load_canonical_mesh()
    r = uvspace.rasterise_uv(mesh.uv, mesh.faces, 128)
    v = torch.as_tensor(posed_camera_vertices(yaw_deg=10.0), dtype=torch.float32)
    k = intrinsics(192)
    coarse = fine.shaded_detail_panel(v, mesh.faces, r, k, (192, 192))
    uvc = uvspace.texel_centres(128)
    d = torch.as_tensor(0.5e-3 * np.sin(2 * np.pi * 12 * uvc[..., 0]) * r.mask, dtype=torch.float32)
    detailed = fine.shaded_detail_panel(v, mesh.faces, r, k, (192, 192), d)
    assert coarse.shape == (192, 192, 3) and coarse.dtype == np.uint8
    face = coarse.any(-1)
    assert 0.1 < face.mean() < 0.5 and (coarse[~face] == 0).all()
    # the ripples change the shading across the face, not just here and there (measured: a
    # quarter of the face's pixels by more than 8 levels; the rest lie where the ripples'
    # slope is small)
    changed = np.abs(detailed.astype(int) - coarse.astype(int)).max(-1) > 8
    assert changed[face].mean() > 0.15, changed[face].mean()
    assert (detailed[~face] == 0).all()


def test_appearance_outliers_flag_a_patch_over_the_region_and_not_light_changes():
    """The fine stage's own occlusion evidence: in UV space a skin-toned patch over most of the
    lower face departs from the texel's median look; a brighter frame (exposure) and small
    per-texel noise (speech, compression) do not; and when the patch covers most of the clip,
    the median is the patch, so nothing is flagged."""
    rng = np.random.default_rng(0)
    t, s = 30, 16
    skin = rng.uniform(0.4, 0.7, (s, s, 3))  # a textured face
    frames = np.repeat(skin[None], t, 0) * rng.uniform(0.97, 1.03, (t, s, s, 3))
    frames[7] *= 1.3  # a brighter frame: exposure, not an occluder
    # skin-toned, but not this skin: fingers and the shadows between them
    hand = np.where((np.arange(12) // 2 % 2 == 0)[None, :, None], [0.85, 0.62, 0.5], [0.3, 0.2, 0.17])
    covered = list(range(12, 16))
    for k in covered:
        frames[k, 6:16, 2:14] = hand
    region = torch.zeros(s, s, dtype=torch.bool)
    region[8:16, :] = True  # the lower face
    image = torch.as_tensor(np.clip(frames * 255, 0, 255).round().astype(np.uint8))
    clip = fine.ClipUV(image, torch.ones(t, s, s))
    flags = fine.appearance_outlier_frames(clip, region, margin=0)
    assert flags[covered].all() and flags.sum() == len(covered)
    # widened by the margin on each side
    wide = fine.appearance_outlier_frames(clip, region, margin=2)
    assert np.array_equal(np.nonzero(wide)[0], np.arange(10, 18))
    # texels that are not visible count for nothing: a frame whose region is all hidden
    hidden = clip.trust.clone()
    hidden[12:16, 8:16] = 0
    assert not fine.appearance_outlier_frames(fine.ClipUV(image, hidden), region, margin=0)[12:16].any()
    # the medians over reference frames only: a patch on 20 of 30 frames is the majority's
    # look, yet it is found when the reference (the frames the visual confidence trusts)
    # leaves those frames out
    many = frames.copy()
    for k in range(5, 25):
        many[k, 6:16, 2:14] = hand
    img2 = torch.as_tensor(np.clip(many * 255, 0, 255).round().astype(np.uint8))
    ref = np.ones(t, bool)
    ref[5:25] = False
    found = fine.appearance_outlier_frames(fine.ClipUV(img2, torch.ones(t, s, s)), region, ref, margin=0)
    assert found[5:25].all() and not found[ref].any()
    # a clip whose lower face never looks the same twice has no usual look: nothing is flagged
    wild = np.repeat(skin[None], t, 0) * rng.uniform(0.3, 1.7, (t, s, s, 3))
    img3 = torch.as_tensor(np.clip(wild * 255, 0, 255).round().astype(np.uint8))
    assert not fine.appearance_outlier_frames(fine.ClipUV(img3, torch.ones(t, s, s)), region, margin=0).any()
