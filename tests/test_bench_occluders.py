"""The occlusion protocol on a face whose landmarks are known exactly (the canonical mesh
projected into the frame): the occluders cover the lips and the lower face and leave the
eyes, the same seed gives the same spans and masks, rendering changes exactly the covered
pixels, and audio-only spans are black."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from avface.bench import occluders as O
from avface.core.topology import CHIN, LEFT_EYE, LIPS, RIGHT_EYE
from avface.models.canonical_mesh import load_canonical_mesh
from avface.stages.tracking import Tracking

W, H, FPS, N = 256, 240, 25.0, 100


def projected_face_tracking(n: int = N, seed: int = 0, width: int = W, height: int = H, detected=None) -> Tracking:
    """A Tracking whose landmarks are the canonical face projected orthographically, about
    110 px wide, turning and moving a little: the exact 'projected lip landmarks'."""
    v = load_canonical_mesh().vertices.astype(np.float64)  # metres, y up
    rng = np.random.default_rng(seed)
    px_per_m = 110.0 / float(np.ptp(v[:, 0]))
    lm = np.zeros((n, 478, 3), np.float32)
    for t in range(n):
        r = Rotation.from_rotvec([0.05 * np.sin(t / 9), 0.2 * np.sin(t / 15), 0.08 * np.sin(t / 11)]).as_matrix()
        p = v @ r.T
        x = width / 2 + 6 * np.sin(t / 13) + px_per_m * p[:, 0]
        y = height / 2 - px_per_m * p[:, 1] + rng.normal(0, 0.2)
        z = -px_per_m * p[:, 2]
        pts = np.stack([x, y, z], 1)
        lm[t] = np.concatenate([pts, pts[[33] * 5 + [263] * 5]])
    det = np.ones(n, bool) if detected is None else np.asarray(detected, bool)
    lm[~det] = np.nan
    values = dict(landmarks=lm, blendshapes=np.zeros((n, 52), np.float32), blendshape_names=tuple(f"b{i}" for i in range(52)),
                  transforms=np.tile(np.eye(4, dtype=np.float32), (n, 1, 1)), detected=det,
                  hands=np.full((n, 2, 21, 2), np.nan, np.float32), hand_cover=np.zeros((n, 3), np.float32),
                  colors=np.zeros((n, 468, 3), np.uint8), fps=FPS, width=width, height=height, frame_start=0, seconds=0.0)
    return Tracking(**{f.name: values[f.name] for f in dataclasses.fields(Tracking)})


def face_frame(tracking: Tracking, t: int) -> np.ndarray:
    """A frame with a skin-coloured, noisy face hull over a grey background, for rendering tests."""
    import cv2

    img = np.full((tracking.height, tracking.width, 3), 90, np.uint8)
    hull = cv2.convexHull(tracking.landmarks[t, :468, :2].astype(np.float32)).astype(np.int32)
    cv2.fillConvexPoly(img, hull, (205, 160, 135))
    noise = np.random.default_rng(t).integers(-12, 13, img.shape)
    img = np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)
    for ids in (LEFT_EYE, RIGHT_EYE, LIPS):
        c = tracking.landmarks[t, list(ids), :2].mean(0)
        cv2.circle(img, (int(c[0]), int(c[1])), 4, (120, 60, 60), -1)
    return img


@pytest.fixture(scope="module")
def tracking() -> Tracking:
    return projected_face_tracking()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_occluders_cover_the_lips_and_chin_not_the_eyes(tracking, seed):
    plan = O.make_plan("clip", seed, tracking, None)
    assert plan.occluder_spans, "a 4 s clip gets at least one occluder span"
    lips_all, chin_all = [], []
    for variant in O.OCCLUDER_VARIANTS:
        cover = O.lip_coverage(plan, variant)
        in_span = plan.span_mask(variant)
        assert np.all(cover[~in_span] == 0)
        # the intended landmarks: the lips, every frame of every span
        assert cover[in_span].min() >= 0.75, (variant, cover[in_span].min())
        assert O.occluded_frames(plan, variant)[in_span].all()
        for t in np.nonzero(in_span)[0]:
            layer = O.layer_at(plan, variant, int(t))
            lm = tracking.landmarks[t, :, :2]
            lips_all.append(layer.covers(lm[list(LIPS)]).mean())
            chin_all.append(layer.covers(lm[list(CHIN)]).mean())
            # the eyes stay visible: the occluder is on the lower face
            assert not layer.covers(lm[list(LEFT_EYE + RIGHT_EYE)]).any(), (variant, t)
            # covers() reads the same full-frame mask a person would look at
            mask = layer.full_mask((tracking.height, tracking.width))
            xy = np.floor(lm[list(LIPS)]).astype(int)
            assert_same = (mask[xy[:, 1], xy[:, 0]] >= O.COVERED_AT) == layer.covers(lm[list(LIPS)])
            assert assert_same.all()
    assert np.mean(lips_all) >= 0.95
    assert np.mean(chin_all) >= 0.3  # the lower face, not only the mouth


def test_same_seed_same_plan_and_masks(tracking):
    a = O.make_plan("clip", 7, tracking, None)
    b = O.make_plan("clip", 7, tracking, None)
    assert a.describe() == b.describe() and a.digest() == b.digest()
    for variant in O.OCCLUDER_VARIANTS:
        for t in np.nonzero(a.span_mask(variant))[0][::5]:
            la, lb = O.layer_at(a, variant, int(t)), O.layer_at(b, variant, int(t))
            assert (la.x0, la.y0) == (lb.x0, lb.y0)
            np.testing.assert_array_equal(la.coverage, lb.coverage)
    c = O.make_plan("clip", 8, tracking, None)
    d = O.make_plan("other clip", 7, tracking, None)
    assert c.digest() != a.digest() and d.digest() != a.digest()
    assert a.object_kind in ("bar", "mic")


def test_occluders_move_and_turn_a_little_from_frame_to_frame(tracking):
    plan = O.make_plan("clip", 0, tracking, None)
    occ = plan.hand[0]
    a, b = occ.span
    poses = np.array([[*O._pose(plan, occ, t)[0], O._pose(plan, occ, t)[2]] for t in range(a, b)])
    mouth = plan.geometry.mouth[a:b]
    offset = np.linalg.norm(poses[:, :2] - mouth, axis=1)
    assert 0 < offset.max() < 0.2 * plan.geometry.face_w[a]  # it follows the mouth, drifting a little
    step = np.abs(np.diff(poses[:, 2]))
    assert step.max() > 0 and step.max() < 5.0  # degrees per frame: it turns, but smoothly


def test_rendering_changes_exactly_the_covered_pixels_and_black_frames(tracking):
    plan = O.make_plan("clip", 1, tracking, None)
    r = O.VariantRenderer(plan)
    a, b = plan.occluder_spans[0]
    for variant in ("hand", "object"):
        for t in (a, (a + b) // 2):
            frame = face_frame(tracking, t)
            out = r.render(variant, t, frame)
            layer = O.layer_at(plan, variant, t)
            mask = layer.full_mask(frame.shape[:2])
            changed = np.abs(out.astype(int) - frame.astype(int)).max(-1) > 0
            # the occluder replaces every fully covered pixel; only its soft shadow reaches beyond it
            assert changed[mask >= 0.99].mean() > 0.97
            far = np.ones_like(mask, bool)
            y0, x0 = layer.y0, layer.x0
            h, w = layer.coverage.shape
            far[max(0, y0 - 20):y0 + h + 20, max(0, x0 - 20):x0 + w + 20] = False
            assert not changed[far].any()
        t_out = next(t for t in range(plan.n_frames) if not plan.span_mask("hand")[t])
        frame = face_frame(tracking, t_out)
        assert r.render(variant, t_out, frame) is frame
    # the hand takes the cheeks' colour: its mean is near the face's skin, not the template's
    frame = face_frame(tracking, a)
    hand = r.render("hand", a, frame)
    cov = O.layer_at(plan, "hand", a).full_mask(frame.shape[:2]) >= 0.99
    assert np.abs(hand[cov].mean(0) - np.array([205, 160, 135])).max() < 25
    # audio-only spans are black, everything else untouched
    s, e = plan.audio_spans[0]
    frame = face_frame(tracking, s)
    assert not r.render("audio_only", s, frame).any()
    assert r.render("audio_only", 0 if s > 0 else e, frame) is frame


def test_plan_survives_undetected_frames_and_turned_heads():
    det = np.ones(N, bool)
    det[40:50] = False  # the tracker lost the face: placement is interpolated, coverage unknown there
    tr = projected_face_tracking(detected=det)
    plan = O.make_plan("clip", 0, tr, None)
    assert np.isfinite(plan.geometry.mouth).all() and np.isfinite(plan.geometry.face_w).all()
    cover = O.lip_coverage(plan, "hand")
    assert np.isnan(cover[40:50][plan.span_mask("hand")[40:50]]).all()
    assert not O.occluded_frames(plan, "hand")[40:50].any()


def test_spans_depend_on_speech_activity(tracking):
    act = np.zeros(N)
    act[60:95] = 1.0
    plan = O.make_plan("clip", 0, tracking, act)
    for a, b in plan.occluder_spans + plan.audio_spans:
        assert act[a:b].mean() >= 0.8
    with pytest.raises(ValueError, match="no detected face"):
        O.make_plan("clip", 0, projected_face_tracking(detected=np.zeros(N, bool)), None)
