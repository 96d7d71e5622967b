"""The fine stage's UV-space machinery: rasterising the layout, unwrapping frames, visibility,
normals of the displaced surface and the symmetry map."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close
from uv_util import intrinsics, posed_camera_vertices, render_textured, smooth_texture

from avface.core.topology import LIPS
from avface.models.canonical_mesh import load_canonical_mesh, lower_face_ids
from avface.stages.detail import uvspace

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _uv_areas(uv, faces, size):
    t = uv[faces] * size
    return 0.5 * np.abs((t[:, 1, 0] - t[:, 0, 0]) * (t[:, 2, 1] - t[:, 0, 1])
                        - (t[:, 2, 0] - t[:, 0, 0]) * (t[:, 1, 1] - t[:, 0, 1]))


@pytest.mark.parametrize("size", [256, 512])
def test_raster_covers_every_triangle_of_the_canonical_layout(size):
    mesh = load_canonical_mesh()
    r = uvspace.rasterise_uv(mesh.uv, mesh.faces, size)
    area = _uv_areas(mesh.uv.astype(np.float64), mesh.faces, size)  # texels
    count = r.texels_per_face()
    assert (count >= 1).all(), f"triangles with no texel: {np.nonzero(count == 0)[0][:10]}"
    # Whole layout: texel count equals the UV area up to the boundary's half-texel band.
    assert abs(count.sum() - area.sum()) / area.sum() < 0.01, (count.sum(), area.sum())
    # Per triangle: within the texels its edges cross (perimeter), plus the centroid texel.
    t = mesh.uv[mesh.faces].astype(np.float64) * size
    perimeter = sum(np.linalg.norm(t[:, i] - t[:, (i + 1) % 3], axis=1) for i in range(3))
    err = np.abs(count - area)
    assert (err <= 0.5 * perimeter + 1).all(), f"worst triangle {np.argmax(err - 0.5 * perimeter)}"
    # Barycentrics rebuild the texel centre (except for the few centroid texels).
    centres = uvspace.texel_centres(size).reshape(-1, 2)[r.texel]
    rebuilt = np.einsum("nk,nkc->nc", r.bary, mesh.uv[mesh.faces[r.face]])
    centroid_texels = np.all(r.bary == np.float32(1.0 / 3.0), axis=1)
    assert centroid_texels.sum() <= 8
    inside = ~centroid_texels
    assert_close(rebuilt[inside], centres[inside], atol=2e-6, what="uv from barycentrics")
    assert_close(r.bary.sum(1), np.ones(r.n_texels), atol=1e-5, what="barycentric sum")


def test_raster_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(Vt, 2\)"):
        uvspace.rasterise_uv(np.zeros((4, 3)), np.zeros((1, 3), int), 64)
    with pytest.raises(ValueError, match="index UVs outside"):
        uvspace.rasterise_uv(np.zeros((3, 2)), np.array([[0, 1, 3]]), 64)


@pytest.fixture(scope="module")
def canonical():
    mesh = load_canonical_mesh()
    return mesh, uvspace.rasterise_uv(mesh.uv, mesh.faces, 256)


def _unwrap_rendered(canonical, yaw_deg, occlusion_test=True):
    mesh, r = canonical
    size = 384
    k = intrinsics(size)
    verts = posed_camera_vertices(yaw_deg=yaw_deg)
    img, _ = render_textured(verts, mesh.faces, mesh.uv.astype(np.float64), k, size)
    v = torch.as_tensor(verts, dtype=torch.float32)[None]
    pts = uvspace.interpolate(r, mesh.faces, v)
    nrm = uvspace.texel_normals(r, mesh.faces, v)
    kt = torch.as_tensor(k, dtype=torch.float32)
    image = torch.as_tensor(img).permute(2, 0, 1)[None]
    unwrapped, in_frame = uvspace.unwrap(image, pts, kt)
    vis = uvspace.visibility(pts, nrm, kt, (size, size), uvspace.texel_mask(r), occlusion_test=occlusion_test)
    uv = uvspace.texel_centres(r.size)
    expected = smooth_texture(uv[..., 0], uv[..., 1])
    return unwrapped[0].numpy(), vis[0].numpy() & in_frame[0].numpy(), expected


def test_unwrapping_a_rendered_frame_gives_back_its_texture(canonical):
    got, vis, expected = _unwrap_rendered(canonical, yaw_deg=0.0)
    mesh, r = canonical
    assert vis.sum() > 0.8 * r.n_texels  # a frontal face shows nearly all of itself
    err = np.abs(got - expected)[vis]  # (N, 3)
    # Bilinear sampling of a 384 px frame of a smooth texture (measured: mean 0.0009, 99th
    # percentile 0.0096); the outliers are texels on the silhouette, whose pixel mixes face
    # and background.
    assert err.mean() < 0.003, err.mean()
    assert np.percentile(err, 99) < 0.03, np.percentile(err, 99)


def test_turned_head_hides_the_far_cheek_behind_the_nose(canonical):
    got, vis, expected = _unwrap_rendered(canonical, yaw_deg=45.0)
    mesh, r = canonical
    front_vis = _unwrap_rendered(canonical, yaw_deg=0.0)[1]
    assert vis.sum() < 0.85 * front_vis.sum()  # part of the face turned away or hidden
    err = np.abs(got - expected)[vis]
    # measured: mean 0.0009, 99th percentile 0.0128
    assert err.mean() < 0.003, err.mean()
    assert np.percentile(err, 99) < 0.03, np.percentile(err, 99)
    # Without the z-buffer the hidden cheek carries the nose's colour (measured 99th
    # percentile 0.39): the test above would see it.
    got, vis, expected = _unwrap_rendered(canonical, yaw_deg=45.0, occlusion_test=False)
    assert np.percentile(np.abs(got - expected)[vis], 99) > 0.1


def test_point_zbuffer_hides_a_surface_behind_another():
    # Two parallel squares, the second 5 cm behind the first and half covered by it.
    uv = np.array([[0, 0], [0.5, 0], [0.5, 1], [0, 1], [0.5, 0], [1, 0], [1, 1], [0.5, 1]], np.float64)
    faces = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    near = np.array([[-0.05, 0.05, 0.5], [0.05, 0.05, 0.5], [0.05, -0.05, 0.5], [-0.05, -0.05, 0.5]])
    far = near + np.array([0.05, 0.0, 0.05])
    verts = torch.as_tensor(np.concatenate([near, far]), dtype=torch.float32)[None]
    r = uvspace.rasterise_uv(uv, faces, 64)
    pts = uvspace.interpolate(r, faces, verts)
    nrm = uvspace.texel_normals(r, faces, verts)
    k = torch.as_tensor(intrinsics(256), dtype=torch.float32)
    vis = uvspace.visibility(pts, nrm, k, (256, 256), uvspace.texel_mask(r))[0].numpy()
    x = pts[0, ..., 0].numpy()
    near_half = uvspace.texel_centres(64)[..., 0] < 0.5
    assert vis[near_half].all()
    # texels of the far square whose x lies behind the near square (|x| < 0.05 scaled by depth)
    hidden = ~near_half & (x * 0.5 / pts[0, ..., 2].numpy() < 0.045)
    shown = ~near_half & (x * 0.5 / pts[0, ..., 2].numpy() > 0.055)
    assert hidden.sum() > 100 and shown.sum() > 100
    assert not vis[hidden].any()
    assert vis[shown].all()


def test_normals_point_outwards_and_flat_displacement_keeps_them(canonical):
    mesh, r = canonical
    v = torch.as_tensor(posed_camera_vertices(), dtype=torch.float32)[None]
    n = uvspace.texel_normals(r, mesh.faces, v)
    m = torch.as_tensor(r.mask)
    # the face looks at the camera: camera-frame normals point to -z on the whole front
    assert (n[0, ..., 2][m] < 0).float().mean() > 0.95
    pts = uvspace.interpolate(r, mesh.faces, v)
    nd = uvspace.detail_normals(pts, n, torch.zeros(pts.shape[:-1]), m)
    assert_close(nd[0][m].numpy(), n[0][m].numpy(), atol=1e-6, what="normals under D = 0")
    # a constant D moves the surface along its normal without tilting it
    nd = uvspace.detail_normals(pts, n, torch.full(pts.shape[:-1], 1e-3), m)
    assert_close(nd[0][m].numpy(), n[0][m].numpy(), atol=1e-6, what="normals under constant D")


def test_detail_normals_match_the_analytic_normals_of_a_displaced_plane():
    # A 10 cm square in the plane z = 0.5 m, facing the camera; D = a sin(2 pi x / wavelength).
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float64)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    side = 0.1
    verts = np.array([[-1, 1, 0], [1, 1, 0], [1, -1, 0], [-1, -1, 0]], np.float64) * side / 2 + [0, 0, 0.5]
    # camera frame (y down): uv's v up is -y, and the winding gives normals towards the camera
    verts_t = torch.as_tensor(verts, dtype=torch.float64)[None]
    r = uvspace.rasterise_uv(uv, faces, 128)
    pts = uvspace.interpolate(r, faces, verts_t)
    n = uvspace.texel_normals(r, faces, verts_t)
    assert (n[0, ..., 2] < -0.999).all()
    amp, wavelength = 0.5e-3, 0.025
    x = pts[0, ..., 0]
    d = amp * torch.sin(2 * np.pi * x / wavelength)
    nd = uvspace.detail_normals(pts, n, d[None], uvspace.texel_mask(r))[0]
    # surface p + d(x) n with n = (0, 0, -1): tangent along x is (1, 0, -d'(x)); along y (0, 1, 0)
    slope = amp * 2 * np.pi / wavelength * torch.cos(2 * np.pi * x / wavelength)
    expected = torch.nn.functional.normalize(torch.stack([-slope, torch.zeros_like(x), -torch.ones_like(x)], -1), dim=-1)
    inner = slice(2, -2)  # one-sided differences at the border are first-order only
    cos = (nd[inner, inner] * expected[inner, inner]).sum(-1)
    angle_deg = torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))
    assert angle_deg.max() < 0.5, angle_deg.max()  # tilts reach 7 degrees; central differences are 2nd order
    assert slope.abs().max() > 0.1


def test_displace_moves_along_the_normal():
    pts = torch.zeros(1, 4, 4, 3)
    n = torch.zeros(1, 4, 4, 3)
    n[..., 2] = -1
    d = torch.full((1, 4, 4), 0.002)
    assert_close(uvspace.displace(pts, n, d)[..., 2].numpy(), -0.002 * np.ones((1, 4, 4)), atol=1e-9)
    with pytest.raises(ValueError, match="displacement map"):
        uvspace.displace(pts, n, torch.zeros(1, 3, 3))


def test_mirror_map_of_the_symmetric_canonical_face(canonical):
    mesh, r = canonical
    mirror, ok = uvspace.mirror_texels(r, mesh.faces, mesh.vertices)
    assert ok.sum() > 0.97 * r.n_texels
    s = r.size
    rows, cols = np.divmod(mirror[ok], s)
    src_rows, src_cols = np.nonzero(ok)
    # the canonical layout is itself mirror-symmetric about u = 0.5
    assert np.abs(rows - src_rows).max() <= 1
    assert np.abs(cols - (s - 1 - src_cols)).max() <= 1
    # mirroring twice comes back (to within a texel)
    twice = mirror.reshape(-1)[mirror[ok]]
    tr, tc = np.divmod(twice, s)
    assert np.abs(tr - src_rows).max() <= 1 and np.abs(tc - src_cols).max() <= 1


def test_confidence_map_lowers_only_the_region(canonical):
    mesh, r = canonical
    w = np.zeros((1, len(mesh.vertices)), np.float32)
    w[0, list(lower_face_ids())] = 1.0
    conf = uvspace.confidence_map(r, mesh.faces, w, torch.tensor([[1.0], [0.0]]), torch.tensor([1.0, 0.8]))
    face_of = r.face_id()
    lips = np.isin(mesh.faces, list(LIPS)).all(1)[np.maximum(face_of, 0)] & (face_of >= 0)
    forehead = (uvspace.texel_centres(256)[..., 1] > 0.8) & (face_of >= 0)
    assert (conf[0][torch.as_tensor(r.mask)] == 1.0).all()
    assert conf[1][torch.as_tensor(lips)].max() < 1e-6
    assert (conf[1][torch.as_tensor(forehead)] - 0.8).abs().max() < 1e-6


def test_flame_layout_with_seams(tmp_path):
    """FLAME keeps UV vertices apart from geometry vertices (seams): the raster works on
    uv_faces, every per-vertex value goes through the geometry faces. On the synthetic
    FLAME-format head with its cylindrical layout."""
    from flame_fixture import write_synthetic_flame

    from avface.models.flame import load_flame

    model = load_flame(write_synthetic_flame(tmp_path, seed=0).folder)
    assert len(model.uv) != model.n_vertices  # seams duplicate UV vertices
    r = uvspace.rasterise_uv(model.uv, model.uv_faces, 128)
    assert (r.texels_per_face()[_uv_areas(model.uv.astype(np.float64), model.uv_faces, 128) > 0] >= 1).all()
    rest = torch.as_tensor(model.neutral_vertices(), dtype=torch.float32)[None]
    pts, n = uvspace.texel_geometry(r, model.faces, rest)
    m = torch.as_tensor(r.mask)
    # texel points lie on the surface and normals point away from the head's centre
    centre = rest[0].mean(0)
    outward = ((pts[0][m] - centre) * n[0][m]).sum(-1)
    assert (outward > 0).float().mean() > 0.95
    # a texel's point is the barycentric blend of its triangle's geometry vertices
    f, b = r.face[100], r.bary[100]
    row, col = divmod(int(r.texel[100]), 128)
    assert_close(pts[0, row, col].numpy(), b @ model.neutral_vertices()[model.faces[f]], atol=1e-6, what="texel point")


def test_splat_draws_texels_back_into_the_frame(canonical):
    """Unwrap a rendered frame, splat the unwrapped colours back: the face's pixels come back."""
    mesh, r = canonical
    size = 256
    k = intrinsics(size)
    verts = posed_camera_vertices(yaw_deg=30.0)
    img, ids = render_textured(verts, mesh.faces, mesh.uv.astype(np.float64), k, size)
    v = torch.as_tensor(verts, dtype=torch.float32)[None]
    pts, n = uvspace.texel_geometry(r, mesh.faces, v)
    kt = torch.as_tensor(k, dtype=torch.float32)
    unwrapped, _ = uvspace.unwrap(torch.as_tensor(img).permute(2, 0, 1)[None], pts, kt)
    vis = uvspace.visibility(pts, n, kt, (size, size), uvspace.texel_mask(r))
    back, drawn = uvspace.splat(unwrapped, pts, kt, (size, size), vis)
    face = ids >= 0
    drawn = drawn[0].numpy()
    # 256^2 texels cover the face without holes; what is left are grazing parts, not visible
    # (measured: 99 % of the face's pixels, mean error 0.004)
    assert (drawn & face).sum() > 0.97 * face.sum()
    err = np.abs(back[0].numpy() - img)[drawn & face]
    assert np.median(err) < 0.01 and err.mean() < 0.01, (np.median(err), err.mean())
    rgb = uvspace.normal_map_image(n[0], uvspace.texel_mask(r))
    assert rgb.dtype == np.uint8 and rgb.shape == (256, 256, 3)
    assert (rgb[~r.mask] == 0).all() and rgb[r.mask, 2].mean() < 100  # camera-facing: z < 0, little blue
