"""The synthetic demo clip (avface.synth) and the speech it speaks (avface.synth.tts).

Short clips (2 s at 256 px) keep the whole file under a minute on a 2-core CPU.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close

from avface import media, synth
from avface.core.topology import LIPS
from avface.errors import InputError
from avface.models.canonical_mesh import N_VERTICES
from avface.synth import tts

SIZE = 256
DURATION_S = 2.0
FPS = 25
#: MediaPipe's mean landmark error on visible frames must stay below this (pixels at 256 px;
#: measured about 1.1 px, and 2.1-2.9 px on 512 px clips).
MAX_MEAN_LANDMARK_ERROR_PX = 3.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return synth.make_demo_clip(tmp_path_factory.mktemp("demo"), seed=3, duration_s=DURATION_S, fps=FPS, size=SIZE)


@pytest.fixture(scope="module")
def clip_again(tmp_path_factory):
    """The same arguments again, in another folder."""
    return synth.make_demo_clip(tmp_path_factory.mktemp("demo_again"), seed=3, duration_s=DURATION_S, fps=FPS,
                                size=SIZE)


# --------------------------------------------------------------------------- tts


def test_tts_speech_with_phoneme_and_word_timing():
    text = "Please pass the big blue book."
    speech = tts.synthesise(text)
    assert speech.sample_rate == 22050
    assert speech.wave.dtype == np.float32 and speech.wave.ndim == 1
    assert np.abs(speech.wave).max() <= 1.0
    assert 1.0 < speech.duration_s < 4.0

    starts = np.array([s for _, s, _ in speech.phonemes])
    ends = np.array([e for _, _, e in speech.phonemes])
    assert len(speech.phonemes) >= 15
    assert np.all(np.diff(starts) >= 0), "phonemes out of time order"
    assert np.all(ends >= starts) and np.all(ends[:-1] <= starts[1:] + 1e-9)
    assert ends[-1] <= speech.duration_s + 1e-9
    # the phonemes cover the speech: loud 10 ms blocks fall inside a phoneme's span
    hop = speech.sample_rate // 100
    rms = np.sqrt(np.mean(speech.wave[: len(speech.wave) // hop * hop].reshape(-1, hop) ** 2, axis=1))
    loud_t = (np.nonzero(rms > 0.1 * rms.max())[0] + 0.5) * 0.01
    covered = np.array([any(s - 0.02 <= t <= e + 0.02 for _, s, e in speech.phonemes) for t in loud_t])
    assert covered.mean() > 0.97, f"only {covered.mean():.0%} of the loud audio lies inside phonemes"
    assert starts[0] < 0.1 and ends[-1] > loud_t.max() - 0.05

    assert [w.lower() for w, _, _ in speech.words] == ["please", "pass", "the", "big", "blue", "book"]
    word_starts = [s for _, s, _ in speech.words]
    assert word_starts == sorted(word_starts)
    # espeak mnemonics, stress marks stripped, mapped to lip shapes
    names = [p for p, _, _ in speech.phonemes]
    assert "p" in names and "b" in names and all("'" not in p and "," not in p for p in names)
    visemes = [tts.phoneme_to_viseme(p) for p in names]
    assert set(visemes) <= set(tts.VISEMES)
    assert all(v == "PP" for p, v in zip(names, visemes) if p in ("p", "b", "m"))
    assert tts.phoneme_to_viseme("u:") == "ou" and tts.phoneme_to_viseme("aI") == "aa"
    assert tts.phoneme_to_viseme("_:") == "sil"


def test_tts_is_deterministic_and_checks_its_arguments():
    a = tts.synthesise("Hello there.")
    b = tts.synthesise("Hello there.")
    assert np.array_equal(a.wave, b.wave) and a.phonemes == b.phonemes
    with pytest.raises(InputError):
        tts.synthesise("   ")
    with pytest.raises(InputError):
        tts.synthesise("hello", voice="no-such-voice")
    with pytest.raises(InputError):
        tts.synthesise("hello", rate_wpm=10)


# --------------------------------------------------------------------------- the clip


def test_clip_files_and_shapes(clip):
    t = round(DURATION_S * FPS)
    assert clip.n_frames == t and clip.fps == FPS and clip.width == clip.height == SIZE
    assert clip.video_path.is_file() and clip.wav_path.is_file() and clip.gt_path.is_file()
    assert clip.gt_vertices.shape == (t, N_VERTICES, 3) and clip.gt_vertices.dtype == np.float32
    assert clip.K.shape == (3, 3)
    assert clip.occluded.shape == (t,) and clip.occluded.dtype == bool
    assert clip.expression.shape == (t, len(clip.expression_names))
    assert clip.expression_basis.shape == (len(clip.expression_names), N_VERTICES, 3)
    assert clip.jaw_pose.shape == clip.global_orient.shape == clip.transl.shape == (t, 3)
    assert clip.text and clip.phonemes and clip.words

    back = synth.load_demo_gt(clip.gt_path.parent)
    for name in ("gt_vertices", "K", "occluded", "occlusion_fraction", "expression", "jaw_pose", "neutral_vertices"):
        assert np.array_equal(getattr(back, name), getattr(clip, name)), name
    assert back.phonemes == clip.phonemes and back.words == clip.words and back.text == clip.text
    assert back.occluder_span_s == clip.occluder_span_s and back.video_path == clip.video_path


def test_mp4_has_audio_and_the_right_frame_count(clip):
    info = media.probe(clip.video_path)
    assert info.n_frames == clip.n_frames
    assert (info.width, info.height) == (clip.width, clip.height)
    assert info.fps == pytest.approx(FPS)
    assert info.has_audio
    rate = media.SAMPLE_RATE_HZ
    wav = media.read_audio(clip.wav_path, sample_rate=rate)
    assert len(wav) / rate == pytest.approx(clip.duration_s, abs=0.01)
    muxed = media.read_audio(clip.video_path, sample_rate=rate)
    assert len(muxed) / rate == pytest.approx(clip.duration_s, abs=0.05)
    # the muxed track is the speech: same loudness envelope (10 ms blocks) as the wav
    n = min(len(wav), len(muxed)) // 160 * 160
    env = lambda w: np.sqrt(np.mean(w[:n].reshape(-1, 160) ** 2, axis=1))  # noqa: E731
    assert np.abs(wav).max() > 0.1
    assert np.corrcoef(env(wav), env(muxed))[0, 1] > 0.9


def test_ground_truth_projects_inside_the_frame(clip):
    v = clip.gt_vertices
    assert np.all(v[..., 2] > 0.3), "the face must be in front of the camera"
    uv = clip.project()
    assert np.all(uv >= 0) and np.all(uv[..., 0] <= clip.width) and np.all(uv[..., 1] <= clip.height)
    face_height = np.ptp(uv[..., 1], axis=1) / clip.height
    assert np.all((0.35 < face_height) & (face_height < 0.65))
    # K is a centred pinhole; the model-to-camera transform maps the model's y up to y down
    assert clip.K[0, 2] == clip.width / 2 and clip.K[1, 2] == clip.height / 2
    assert_close(clip.model_to_camera[:3, :3], np.diag([1.0, -1.0, -1.0]), what="model_to_camera rotation")
    forehead, chin = v[:, 10, 1], v[:, 152, 1]
    assert np.all(forehead < chin), "camera y runs down the face"


def test_lips_follow_the_speech(clip):
    """Closed lips in the leading silence, open during the vowels, a real jaw motion."""
    gap_mm = 1e3 * np.linalg.norm(clip.gt_vertices[:, 13] - clip.gt_vertices[:, 14], axis=1)
    t = np.arange(clip.n_frames) / clip.fps
    first = clip.phonemes[0][1]
    silent = t < first - 0.1
    assert silent.any()
    assert gap_mm[silent].max() < 1.0
    assert gap_mm.max() > 8.0
    assert clip.jaw_pose[:, 0].max() > 0.1 and np.all(clip.jaw_pose[:, 0] <= synth.JAW_MAX_RAD + 1e-6)
    # the head moves a little: a few degrees, a few millimetres
    angles = np.degrees(np.linalg.norm(clip.global_orient, axis=1))
    assert 0.2 < angles.max() < 12.0
    assert np.abs(clip.transl).max() < 0.03


def test_occluded_only_while_the_hand_is_there(clip):
    assert clip.occluder_span_s is not None
    a, b = clip.occluder_span_s
    assert 0.0 <= a < b <= clip.duration_s
    t = np.arange(clip.n_frames) / clip.fps
    assert clip.occluded.any()
    assert np.all((t[clip.occluded] >= a) & (t[clip.occluded] < b))
    assert np.all(clip.occlusion_fraction[(t < a) | (t >= b)] == 0)


def test_same_seed_same_clip(clip, clip_again):
    assert np.array_equal(clip.gt_vertices, clip_again.gt_vertices)
    assert np.array_equal(clip.occluded, clip_again.occluded)
    assert clip.phonemes == clip_again.phonemes and clip.text == clip_again.text
    info_a, info_b = media.probe(clip.video_path), media.probe(clip_again.video_path)
    for k, (fa, fb) in enumerate(zip(media.iter_frames(info_a), media.iter_frames(info_b))):
        assert np.array_equal(fa, fb), f"frame {k} differs"


def test_seed_changes_the_face(tmp_path, clip):
    other = synth.make_demo_clip(tmp_path, seed=4, duration_s=0.4, fps=FPS, size=128, text="Hi.", occluder=False)
    assert other.n_frames == 10 and not other.occluded.any() and other.occluder_span_s is None
    diff_mm = 1e3 * np.abs(other.neutral_vertices - clip.neutral_vertices).max()
    assert 0.5 < diff_mm < 15.0, f"identities differ by {diff_mm:.1f} mm"


def test_explicit_occluder_span(tmp_path):
    c = synth.make_demo_clip(tmp_path, seed=1, duration_s=1.6, fps=FPS, size=128, text="Oh, hello.",
                             occluder_span_s=(0.4, 1.4))
    t = np.arange(c.n_frames) / c.fps
    assert c.occluder_span_s == (0.4, 1.4)
    assert c.occluded.any() and np.all((t[c.occluded] >= 0.4) & (t[c.occluded] < 1.4))


def test_bad_arguments(tmp_path):
    with pytest.raises(InputError):
        synth.make_demo_clip(tmp_path, size=8)
    with pytest.raises(InputError):
        synth.make_demo_clip(tmp_path, duration_s=0.0)
    with pytest.raises(InputError):
        synth.make_demo_clip(tmp_path, duration_s=1.0, size=64, text="Hi.", occluder_span_s=(0.8, 0.2))


def test_mediapipe_finds_the_face_where_the_ground_truth_is(clip):
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    from avface.core.assets import FACE_LANDMARKER, locate

    options = vision.FaceLandmarkerOptions(
        base_options=BaseOptions(model_asset_path=str(locate(FACE_LANDMARKER))),
        running_mode=vision.RunningMode.VIDEO, num_faces=1,
        output_face_blendshapes=True, output_facial_transformation_matrixes=True,
    )
    projected = clip.project()
    errors, lip_errors, detected = [], [], []
    with vision.FaceLandmarker.create_from_options(options) as landmarker:
        for k, frame in enumerate(media.iter_frames(media.probe(clip.video_path))):
            image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(frame))
            result = landmarker.detect_for_video(image, int(round(k * 1000 / clip.fps)))
            detected.append(bool(result.face_landmarks))
            if not result.face_landmarks or clip.occluded[k]:
                continue
            # MediaPipe's normalised coordinates times the size are continuous pixels, as K's
            found = np.array([(p.x * clip.width, p.y * clip.height) for p in result.face_landmarks[0]])[:N_VERTICES]
            err = np.linalg.norm(found - projected[k], axis=1)
            errors.append(err.mean())
            lip_errors.append(err[list(LIPS)].mean())
    detected = np.array(detected)
    assert detected[~clip.occluded].all(), f"face missed on {int((~detected[~clip.occluded]).sum())} visible frames"
    assert np.mean(errors) < MAX_MEAN_LANDMARK_ERROR_PX, f"mean landmark error {np.mean(errors):.2f} px"
    assert np.mean(lip_errors) < MAX_MEAN_LANDMARK_ERROR_PX, f"mean lip landmark error {np.mean(lip_errors):.2f} px"
