"""The visual-confidence stage: each evidence term on its own (detection, hand cover, lip
jump, absolute and relative appearance anomaly) and how they combine. An occluder of
skin-like colour stands out against the clip's own frames even when its absolute anomaly is
moderate."""
from __future__ import annotations

import numpy as np

from avface.stages.confidence import RELATIVE_MIN_FRAMES, relative_anomaly_confidence


def _series(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return 0.5 + 0.05 * rng.standard_normal(n), np.ones(n, bool)


def test_a_moderate_but_clip_unusual_anomaly_is_flagged():
    a, det = _series()
    a[80:100] = 1.6  # a skin-coloured hand: under the absolute onset (2.0), far outside the clip
    conf = relative_anomaly_confidence(a, det)
    assert (conf[80:100] < 0.5).all()
    assert (conf[:80] == 1).all() and (conf[100:] == 1).all()


def test_steady_clips_and_short_clips_are_left_alone():
    a, det = _series()
    a[50:55] = 0.9  # many MADs in a very steady clip, but below the minimum anomaly
    assert (relative_anomaly_confidence(a, det) == 1).all()
    short, det_short = _series(RELATIVE_MIN_FRAMES - 1)
    short[10:20] = 1.6  # too few frames for the clip to be its own reference
    assert (relative_anomaly_confidence(short, det_short) == 1).all()
    # undetected frames neither count nor get flagged here (detection has its own evidence)
    a2, det2 = _series()
    det2[:100] = False
    a2[:100] = 0.0
    a2[150:160] = 1.6
    conf = relative_anomaly_confidence(a2, det2)
    assert (conf[:100] == 1).all() and (conf[150:160] < 0.5).all()


# ---------------------------------------------------------------- each evidence term on its own

from avface.core.topology import LIPS, LIPS_LOWER_OUTER  # noqa: E402
from avface.models.canonical_mesh import lower_face_ids  # noqa: E402
from avface.stages import confidence as C  # noqa: E402


def _tracking(n=100, seed=0):
    """A steady face with skin colours that vary a little from frame to frame."""
    import dataclasses

    from test_bench_occluders import projected_face_tracking

    tr = projected_face_tracking(n=n, seed=seed)
    rng = np.random.default_rng(seed)
    skin = np.array([190.0, 140.0, 120.0])
    colors = np.clip(skin + rng.normal(0.0, 3.0, (n, 468, 3)), 0, 255).astype(np.uint8)
    return dataclasses.replace(tr, colors=colors)


def test_detection_term_is_zero_without_a_face():
    det = np.array([True, False, True])
    np.testing.assert_array_equal(C.detection_confidence(det), [1.0, 0.0, 1.0])


def test_hand_term_is_one_minus_the_covered_share_of_the_mouth():
    cover = np.array([[0.0, 0.9, 0.9], [0.25, 0.0, 0.1], [1.0, 0.0, 1.0], [1.7, 0.0, 0.0]])  # mouth, eyes, face
    # only the mouth column counts; more than all of it is all of it
    np.testing.assert_allclose(C.hand_confidence(cover), [1.0, 0.75, 0.0, 0.0])


def test_lip_jump_measures_a_lost_mouth_in_inter_ocular_distances():
    tr = _tracking(n=9)
    lm = tr.landmarks.copy()
    base = C.lip_jump(lm, tr.detected)
    assert base.max() < 0.01  # a steady face: the lips sit at their neighbours' midpoint
    assert base[0] == base[-1] == 0.0  # the ends have no two neighbours
    iod = np.linalg.norm(lm[4, 33, :2] - lm[4, 263, :2])
    lm[4, list(LIPS), 1] += 0.2 * iod  # every lip landmark jumps by 20 % of the IOD in frame 4
    jump = C.lip_jump(lm, tr.detected)
    assert abs(jump[4] - 0.2) < 0.01
    # its neighbours see half the jump in their own midpoints
    assert abs(jump[3] - 0.1) < 0.01 and abs(jump[5] - 0.1) < 0.01
    conf = C.lip_jump_confidence(np.array([0.0, C.LIP_JUMP_ONSET_IOD, 0.10, C.LIP_JUMP_ONSET_IOD + C.LIP_JUMP_RANGE_IOD, 1.0]))
    np.testing.assert_allclose(conf, [1.0, 1.0, 0.5, 0.0, 0.0])
    # a frame without a face next to it gives no jump evidence
    det = tr.detected.copy()
    det[3] = False
    assert C.lip_jump(lm, det)[4] == 0.0


def test_absolute_anomaly_term_ramps_from_onset_over_range():
    a = np.array([0.0, 1.0, C.ANOMALY_ONSET, C.ANOMALY_ONSET + C.ANOMALY_RANGE / 2, C.ANOMALY_ONSET + C.ANOMALY_RANGE, 9.0])
    np.testing.assert_allclose(C.absolute_anomaly_confidence(a), [1.0, 1.0, 1.0, 0.5, 0.0, 0.0])


def test_appearance_anomaly_rises_where_the_lower_face_changes_colour():
    tr = _tracking(n=80)
    lower = [i for i in lower_face_ids() if i in set(LIPS_LOWER_OUTER) or i not in set(LIPS)]
    tr.colors[40:45, lower] = np.array([40, 60, 200], np.uint8)  # a blue object over the mouth and chin
    a = C.appearance_anomaly(tr)
    assert np.median(a[:40]) < 1.5 and a[40:45].min() > 5.0
    # a global change of lighting moves the upper face too, and is not an anomaly
    tr2 = _tracking(n=80)
    tr2.colors[60:65] = (tr2.colors[60:65] * 0.7).astype(np.uint8)
    assert C.appearance_anomaly(tr2)[60:65].max() < 2.0


def test_evidence_combines_as_a_product_and_flags_below_the_threshold():
    tr = _tracking(n=100)
    tr.hand_cover[10, 0] = 0.3  # a hand over 30 % of the lips: confidence 0.7, not occluded
    tr.hand_cover[20, 0] = 0.8  # over 80 %: 0.2, occluded
    tr.detected[30] = False
    tr.landmarks[30] = np.nan
    conf, occluded = C.visual_confidence(tr)
    assert conf.dtype == np.float32 and occluded.dtype == bool
    assert abs(conf[10] - 0.7) < 1e-6 and not occluded[10]
    assert abs(conf[20] - 0.2) < 1e-6 and occluded[20]
    assert conf[30] == 0.0 and occluded[30]
    clean = np.setdiff1d(np.arange(100), [10, 20, 29, 30, 31])
    assert (conf[clean] == 1.0).all()
    np.testing.assert_array_equal(occluded, conf < C.OCCLUDED_BELOW)
    np.testing.assert_array_equal(C.mouth_visible(conf), ~occluded)


# ---------------------------------------------------------------- lip contrast

from avface.core.topology import PERIORAL_LEFT, PERIORAL_RIGHT, VERMILION_LEFT, VERMILION_RIGHT  # noqa: E402

LIP_RGB = np.array([170.0, 80.0, 85.0])
SKIN_RGB = np.array([200.0, 150.0, 125.0])


def _lipped(n=120, seed=0, lip=LIP_RGB, skin=SKIN_RGB, noise=3.0):
    """A steady face, 50 cm from the camera and facing it, whose lips are redder than its skin."""
    tr = _tracking(n=n, seed=seed)
    rng = np.random.default_rng(seed + 1)
    colors = skin + rng.normal(0.0, noise, (n, 468, 3))
    vermilion = list(set(VERMILION_RIGHT + VERMILION_LEFT))
    colors[:, vermilion] = lip + rng.normal(0.0, noise, (n, len(vermilion), 3))
    tr.colors[:] = np.clip(colors, 0, 255).astype(np.uint8)
    tr.transforms[:, 2, 3] = -50.0
    return tr


def test_the_vermilion_and_perioral_ids_are_the_canonical_mesh_regions():
    """Derived again from the canonical mesh: the lips' red part lies inside the outer lip
    contour and outside the inner one; the skin around it within 0.3 mouth widths outside."""
    from matplotlib.path import Path as Polygon

    from avface.core.topology import LIPS_LOWER_INNER, LIPS_LOWER_OUTER, LIPS_UPPER_INNER, LIPS_UPPER_OUTER
    from avface.models.canonical_mesh import load_canonical_mesh

    v = load_canonical_mesh().vertices[:, :2].astype(np.float64)
    outer = list(LIPS_UPPER_OUTER) + list(LIPS_LOWER_OUTER[::-1])
    inner = list(LIPS_UPPER_INNER) + list(LIPS_LOWER_INNER[::-1])
    po, pi = Polygon(v[outer]), Polygon(v[inner])
    verm = {i for i in range(468) if po.contains_point(v[i]) and not pi.contains_point(v[i]) and i not in outer + inner}
    width = np.linalg.norm(v[61] - v[291])
    near = np.linalg.norm(v[:, None] - v[outer][None], axis=-1).min(1)
    ring = {i for i in range(468) if 0.05 * width < near[i] < 0.3 * width and not po.contains_point(v[i])}
    x = v[:, 0] - v[[61, 291], 0].mean()
    assert set(VERMILION_RIGHT) | set(VERMILION_LEFT) == verm and set(PERIORAL_RIGHT) | set(PERIORAL_LEFT) == ring
    for ids, sign in ((VERMILION_RIGHT, -1), (VERMILION_LEFT, 1), (PERIORAL_RIGHT, -1), (PERIORAL_LEFT, 1)):
        assert (sign * x[list(ids)] >= -1e-6).all()  # each half on its side, the midline in both
    assert len(verm) >= 30 and len(ring) >= 20


def test_a_skin_coloured_hand_over_the_lips_is_flagged_by_their_lost_contrast():
    tr = _lipped()
    mouth = list(set(VERMILION_RIGHT + VERMILION_LEFT + PERIORAL_RIGHT + PERIORAL_LEFT))
    # a hand the colour of the skin over the mouth: the other appearance terms see little
    tr.colors[50:70, mouth] = np.clip(SKIN_RGB + 4.0, 0, 255).astype(np.uint8)
    dep = C.lip_contrast_departure(tr)
    assert np.nanmax(dep[:50]) < 0.3 and dep[50:70].min() > 0.9
    conf, occluded = C.visual_confidence(tr)
    assert occluded[50:70].all()
    assert not occluded[:50].any() and not occluded[70:].any()


def test_lip_contrast_tolerates_smiles_turns_and_a_half_covered_mouth():
    tr = _lipped()
    vr = list(VERMILION_RIGHT)
    # a broad smile thins the lips: the contrast falls by 40 %
    lab_mid = 0.6 * LIP_RGB + 0.4 * SKIN_RGB
    tr.colors[20:30, list(set(VERMILION_RIGHT + VERMILION_LEFT))] = lab_mid.astype(np.uint8)
    # one half of the mouth behind a finger (or darkened by a turn): the other half still shows lips
    tr.colors[60:70, vr] = SKIN_RGB.astype(np.uint8)
    dep = C.lip_contrast_departure(tr)
    assert 0.25 < dep[20:30].min() and dep[20:30].max() < C.LIP_CONTRAST_ONSET
    assert dep[60:70].max() < 0.3
    assert not C.visual_confidence(tr)[1].any()


def test_no_lip_contrast_evidence_without_contrast_or_facing_away():
    # lips the colour of the skin (a grey-scale video, say): no evidence at all
    flat = _lipped(lip=SKIN_RGB)
    assert np.isnan(C.lip_contrast_departure(flat)).all()
    # a head turned 50 degrees: the far half's skin is out of view, no evidence on those frames
    tr = _lipped()
    a = np.radians(50.0)
    tr.transforms[40:60, :3, :3] = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    tr.colors[40:60, list(VERMILION_LEFT)] = 20  # what the far half now samples
    tr.colors[40:60, list(VERMILION_RIGHT)] = 20
    turn = C.head_turn_deg(tr.transforms)
    assert abs(turn[45] - 50.0) < 1e-3 and turn[0] < 1e-3
    dep = C.lip_contrast_departure(tr)
    assert np.isnan(dep[40:60]).all() and np.isfinite(dep[:40]).all()
    assert (C.lip_contrast_confidence(dep)[40:60] == 1.0).all()


def test_lip_contrast_onset_rises_with_the_clips_own_noise():
    steady = np.full(200, 0.1) + 0.02 * np.random.default_rng(0).standard_normal(200)
    steady[100:110] = 0.8
    conf = C.lip_contrast_confidence(steady)
    assert (conf[100:110] < 0.5).all() and (conf[:100] == 1).all()
    noisy = 0.4 + 0.25 * np.random.default_rng(1).standard_normal(200)  # small, far lips
    noisy[100:110] = 0.8
    assert (C.lip_contrast_confidence(noisy)[100:110] == 1.0).all()
    ramp = C.lip_contrast_confidence(np.r_[np.zeros(20), [C.LIP_CONTRAST_ONSET + C.LIP_CONTRAST_RANGE / 2]])
    assert abs(ramp[-1] - 0.5) < 1e-9
    # NaN (no evidence) is confidence 1
    assert (C.lip_contrast_confidence(np.full(30, np.nan)) == 1).all()
