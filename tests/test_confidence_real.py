"""Visual confidence on a real talking face (../shared/data) under an occluder the tracker
misses: a hand of the face's own skin colour, drawn by the training occluders (not the
benchmark's), over the mouth of the clip whose hand MediaPipe's hand landmarker does not
find. The lips' lost contrast flags it; the clean clip keeps every frame."""
from __future__ import annotations

import numpy as np
import pytest

from avface import media
from avface.core.clips import discover_clips
from avface.core.topology import LIPS
from avface.stages.confidence import lip_contrast_departure, visual_confidence
from avface.stages.tracking import track
from avface.train import occluders as O

CLIP_ID = "styletalk_feifeili_clip1"  # skin-toned, 256 px: a hand the hand landmarker missed
FRAMES = 150
COVER = (50, 100)


@pytest.mark.slow
def test_a_skin_toned_hand_over_a_real_mouth_is_flagged(shared_data, tmp_path):
    clips = {c.id: c for c in discover_clips(shared_data)}
    if CLIP_ID not in clips:
        pytest.skip(f"{CLIP_ID} is not in {shared_data}")
    info = media.probe(clips[CLIP_ID].video)
    clean = track(info, 0, FRAMES, cache_dir=tmp_path / "cache")
    assert clean.detected.all()
    conf, flagged = visual_confidence(clean)
    assert not flagged.any(), np.nonzero(flagged)[0]

    # a static hand, the colour of this face's cheeks, centred on the mouth
    rng = np.random.default_rng(7)
    cheeks = np.median(clean.colors[:, [205, 425, 50, 280]].reshape(-1, 3), axis=0)
    mouth = O.face_points_2d()[list(LIPS)].mean(0)
    outline = O._outline(rng, "hand") * 0.9 + mouth
    hand = O.OccluderTrack(np.repeat(outline[None], FRAMES, 0), "hand", "skin", cheeks.astype(np.uint8), 7)
    frames = []
    for t, frame in enumerate(media.iter_frames(info, 0, FRAMES)):
        covered = COVER[0] <= t < COVER[1]
        frames.append(O.paste(frame, outline, clean.landmarks[t], hand) if covered else frame)
    video = media.write_video(frames, tmp_path / "hand.mp4", info.fps)
    occluded = track(media.probe(video), cache_dir=tmp_path / "cache")

    conf, flagged = visual_confidence(occluded)
    cover = np.zeros(FRAMES, bool)
    cover[COVER[0]:COVER[1]] = True
    print(f"hand cover seen by the hand landmarker on {np.mean(occluded.hand_cover[cover, 0] > 0.5):.2f} of the covered frames; "
          f"flagged {flagged[cover].mean():.2f}; lip-contrast departure {np.nanmedian(lip_contrast_departure(occluded)[cover]):.2f}")
    assert flagged[cover].mean() >= 0.9
    # the frames around the hand (two frames of encoder blur aside) keep their mouth
    away = np.ones(FRAMES, bool)
    away[COVER[0] - 2:COVER[1] + 2] = False
    assert not flagged[away & occluded.detected].any()
