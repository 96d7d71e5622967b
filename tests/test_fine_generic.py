"""The fine stage's generic start (docs/fine_stage.md): synthetic skin detail to learn from, the
checkpoint's ``fine`` part, the corpus training, and what the shipped part finds on a face it
never saw."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avface.errors import ModelFileError
from avface.models.checkpoint import build_networks, load_checkpoint, load_default_checkpoint, save_checkpoint
from avface.models.fine import DetailNet, FineNetConfig
from avface.synth.wrinkles import bump_normals, make_wrinkles, vertex_tangents

# --------------------------------------------------------------------------- synthetic detail


def test_bump_normals_tilt_as_the_height_slopes():
    """A plane z = 0 seen from +z, u along x over L metres: a height H = a u tilts the normal to
    (-a / L, 0, 1), normalised; a slope along v tilts it along y."""
    length, a = 0.1, 0.004
    verts = np.array([[0, 0, 0], [length, 0, 0], [0, length, 0], [length, length, 0]], np.float64)
    faces = np.array([[0, 1, 2], [1, 3, 2]])
    uv = verts[:, :2] / length
    tu, tv = vertex_tangents(verts, faces, uv)
    np.testing.assert_allclose(tu, np.tile([length, 0, 0], (4, 1)), atol=1e-9)
    np.testing.assert_allclose(tv, np.tile([0, length, 0], (4, 1)), atol=1e-9)
    n = np.tile([0.0, 0.0, 1.0], (4, 1))
    got = bump_normals(n, tu, tv, np.tile([a, 0.0], (4, 1)))
    want = np.array([-a / length, 0, 1]) / np.hypot(a / length, 1)
    np.testing.assert_allclose(got, np.tile(want, (4, 1)), atol=1e-6)
    got = bump_normals(n, tu, tv, np.tile([0.0, -a], (4, 1)))
    np.testing.assert_allclose(got[0], np.array([0, a / length, 1]) / np.hypot(a / length, 1), atol=1e-6)
    np.testing.assert_allclose(bump_normals(n, tu, tv, np.zeros((4, 2))), n)


def test_wrinkles_deepen_with_their_expressions():
    from avface.models.canonical_mesh import load_canonical_mesh
    from avface.synth.face import EXPRESSION_NAMES

    uv = load_canonical_mesh().uv
    w = make_wrinkles(np.random.default_rng(3), uv, len(EXPRESSION_NAMES), EXPRESSION_NAMES, size=256)
    again = make_wrinkles(np.random.default_rng(3), uv, len(EXPRESSION_NAMES), EXPRESSION_NAMES, size=256)
    assert np.array_equal(w.static, again.static) and np.array_equal(w.dynamic, again.dynamic)
    depth = {name: -1000 * float(w.dynamic[i].min()) for i, name in enumerate(EXPRESSION_NAMES)}
    # a smile deepens the nasolabial folds by 1-2 mm, a raised brow the forehead lines
    assert 0.9 < depth["lips_spread"] < 2.1 and 0.3 < depth["brow_raise"] < 1.4 and depth["lips_round"] > 0.3
    assert depth["blink_left"] == depth["blink_right"] == depth["lips_close"] == 0.0
    # folds: the static field is at or below the surface, no deeper than 2.5 mm
    assert -2.5e-3 < w.static.min() < -5e-4 and w.static.max() < 1e-4
    # the folds sit beside the mouth, not on the eyes: rows of the nasolabial fold's texels
    smile = w.dynamic[EXPRESSION_NAMES.index("lips_spread")]
    rows, cols = np.nonzero(smile < 0.5 * smile.min())
    v = 1 - (rows + 0.5) / 256
    assert 0.2 < float(np.median(v)) < 0.45
    assert (np.abs((cols + 0.5) / 256 - 0.5) > 0.05).mean() > 0.6  # beside the mouth, not on the midline
    # the height is static + coefficients @ dynamic; its gradient is what the renderer reads
    e = np.array([0.0, 1.0, 0.0, 0.0, 0.0, 0.5], np.float32)
    np.testing.assert_allclose(w.height(e), w.static + w.dynamic[1] + 0.5 * w.dynamic[5], atol=1e-9)
    g = w.gradient(e)
    assert g.shape == (256, 256, 3)
    # creases darken (the fold's floor), flat skin does not
    assert g[..., 2].max() > 0.15 and np.median(g[..., 2]) < 0.01 and g[..., 2].min() >= 0


def test_detail_changes_only_the_skin(tmp_path):
    """A clip with detail draws the same mesh, hand and speech; its skin's shading differs
    and its height maps are written. Without detail no height file is left behind."""
    from avface import media
    from avface.synth import make_demo_clip

    a = make_demo_clip(tmp_path / "d", seed=5, duration_s=0.4, size=256, occluder=False, detail=True)
    b = make_demo_clip(tmp_path / "p", seed=5, duration_s=0.4, size=256, occluder=False, detail=False)
    assert np.array_equal(a.gt_vertices, b.gt_vertices) and a.text == b.text
    heights = np.load(tmp_path / "d" / "demo_detail.npz")
    assert heights["static"].shape == (256, 256) and heights["dynamic"].shape == (6, 256, 256)
    assert not (tmp_path / "p" / "demo_detail.npz").exists()
    fa = np.stack(list(media.iter_frames(media.probe(a.video_path), 0, 5))).astype(float)
    fb = np.stack(list(media.iter_frames(media.probe(b.video_path), 0, 5))).astype(float)
    xy = (a.gt_vertices[0] @ a.K.T)
    xy = xy[:, :2] / xy[:, 2:]
    x0, y0 = np.floor(xy.min(0)).astype(int)
    x1, y1 = np.ceil(xy.max(0)).astype(int)
    face = np.zeros(fa.shape[1:3], bool)
    face[y0:y1, x0:x1] = True
    diff = np.abs(fa - fb).mean(axis=(0, 3))
    assert diff[face].mean() > 0.5  # the skin is shaded differently...
    assert diff[:, :20].mean() < 0.5  # ...the background is not (a codec's ripple at most)


# --------------------------------------------------------------------------- the checkpoint's part


def test_checkpoint_carries_a_fine_part(tmp_path):
    nets = build_networks(seed=2)
    path = tmp_path / "bare.pt"
    save_checkpoint(path, nets)
    assert load_checkpoint(path).networks.fine is None  # older checkpoints still load
    nets.fine = DetailNet(FineNetConfig(), seed=9)
    path = tmp_path / "fine.pt"
    save_checkpoint(path, nets, {"fine": {"clips": 1}})
    ck = load_checkpoint(path)
    assert isinstance(ck.networks.fine, DetailNet) and ck.networks.fine.cfg == FineNetConfig()
    for (k, x), (_, y) in zip(ck.networks.fine.state_dict().items(), nets.fine.state_dict().items()):
        assert torch.equal(x, y), k
    # a fine part that does not fit this backend's network is an error, not random weights
    payload = torch.load(path, weights_only=True)
    cfg = json.loads(payload["configs"])
    cfg["fine"]["widths"] = [8, 16, 24, 32, 64]
    payload["configs"] = json.dumps(cfg)
    from avface.models.checkpoint import _digest

    payload["sha256"] = _digest(cfg, json.loads(payload["meta"]), payload["state"])
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(ModelFileError, match="does not match"):
        load_checkpoint(bad)


def test_the_shipped_checkpoint_has_a_generic_fine_part():
    ck = load_default_checkpoint()
    assert isinstance(ck.networks.fine, DetailNet)
    assert ck.meta["fine"]["clips"] >= 8 and "synthetic" in ck.meta["fine"]["corpus"]


# --------------------------------------------------------------------------- training and what it finds


@pytest.fixture(scope="module")
def detail_clip(tmp_path_factory):
    """An unseen synthetic face with skin detail (a seed outside the shipped corpus), unwrapped."""
    from avface.models.canonical import CanonicalModel
    from avface.stages.detail import uvspace
    from avface.synth import make_demo_clip
    from avface.train.fine_generic import load_detail_clip

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("detail_clip")
    make_demo_clip(out, seed=9001, duration_s=1.2, size=512, occluder=False, detail=True)
    model = CanonicalModel()
    raster = uvspace.rasterise_uv(model.uv, model.uv_faces, 256)
    return load_detail_clip(out, model, raster, load_default_checkpoint().networks), model, raster


@pytest.mark.slow  # renders a detail clip and adapts to it twice
def test_the_generic_part_explains_an_unseen_face(detail_clip):
    """On a face it never saw, with no adaptation at all, the shipped generic network's
    detail lowers the held-out photometric residual (measured: gain 0.18 and 0.23 on seeds
    9001 and 9002 at 3 s); a fresh network's changes nothing."""
    import copy

    from avface.stages.detail.adapt import AdaptInputs, FineAdaptConfig, adapt_clip

    clip, model, raster = detail_clip
    generic = load_default_checkpoint().networks.fine
    gains = {}
    for name, start in (("generic", generic), ("fresh", DetailNet(generic.cfg, seed=0))):
        cfg = FineAdaptConfig(steps=0, batch=2, holdout_stride=3, seed=0, net=start.cfg)
        res = adapt_clip(AdaptInputs(clip.uv, clip.vertices, np.asarray(model.faces), raster, clip.audio), cfg,
                         net=copy.deepcopy(start))
        gains[name] = res.detail_gain
    assert gains["generic"] > 0.08 and abs(gains["fresh"]) < 0.02, gains


@pytest.mark.slow  # trains a fine part on a corpus
def test_corpus_training_writes_a_fine_part(detail_clip, tmp_path):
    """A few steps over a one-clip corpus: the loss falls, the other networks are untouched,
    and the checkpoint reads back with the trained part."""
    from avface.train.fine_generic import FineCorpusConfig, train_generic_fine

    clip, model, raster = detail_clip
    clip.shading_fit = None
    net, history = train_generic_fine([clip], model, raster, FineCorpusConfig(rounds=2, steps_per_clip=4, seed=1))
    assert len(history) == 2 and all(np.isfinite(h["loss_last"]) for h in history)
    assert clip.shading_fit is not None  # fitted once, reused by the second round
    nets = build_networks(seed=3)
    nets.fine = net
    save_checkpoint(tmp_path / "c.pt", nets)
    ck = load_checkpoint(tmp_path / "c.pt")
    ref = build_networks(seed=3)
    for (k, x), (_, y) in zip(ck.networks.lips.state_dict().items(), ref.lips.state_dict().items()):
        assert torch.equal(x, y), k
    x = torch.rand(1, 64, 64, 3)
    n = torch.nn.functional.normalize(torch.randn(1, 64, 64, 3), dim=-1)
    valid = torch.ones(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(ck.networks.fine(x, n, valid, torch.zeros(1, 64)), net(x, n, valid, torch.zeros(1, 64)))


def test_height_supervision_term():
    """The corpus's optional supervised term: weight x mean |D - H| in millimetres over the
    trusted texels only; a clip without its true height is refused, not trained on zeros."""
    from avface.train.fine_generic import DetailTrainingClip, FineCorpusConfig, _height_term, train_generic_fine

    height = np.zeros((3, 4, 4), np.float32)
    height[1] = -0.002  # a 2 mm fold over frame 1
    d = torch.full((2, 4, 4), 0.001)
    trust = torch.ones(2, 4, 4)
    trust[0, :2] = 0.0  # half of the first frame untrusted: it counts for nothing
    term = _height_term(height, 0.5)
    # frame 1: |1 - (-2)| = 3 mm on 16 texels; frame 2: |1 - 0| = 1 mm on 16; frame 1's hidden half
    # excluded: (8 x 3 + 16 x 1) / 24
    assert abs(float(term(np.array([1, 2]), d, trust)) - 0.5 * (8 * 3 + 16 * 1) / 24) < 1e-5
    clip = DetailTrainingClip("no-height", None, torch.zeros(3, 468, 3), None, None)
    with pytest.raises(ValueError, match="no true height"):
        train_generic_fine([clip], None, None, FineCorpusConfig(height_weight=0.3))
