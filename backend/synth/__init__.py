"""The synthetic talking-face demo clip, with 3D ground truth.

:func:`make_demo_clip` speaks a text with espeak-ng (:mod:`avface.synth.tts`), animates the
MediaPipe canonical face (:class:`avface.models.canonical.CanonicalModel`) from espeak's
phoneme timing, renders it with a small software rasteriser, slides a hand over the mouth
for about a second, and writes ``demo.mp4`` (H.264 + AAC speech), ``demo.wav`` and
``demo_gt.npz``. The demo then needs no download, and tests can measure 3D error in
millimetres against the exact vertices that were drawn.

Conventions
-----------
* Ground-truth vertices are in the OpenCV camera frame: metres, x right, y down, z forward
  from the camera centre. The model frame (y up, z towards the viewer) maps to it by
  ``p_cam = R p_model + t`` with ``R = diag(1, -1, -1)`` (``model_to_camera``).
* Pixel coordinates are continuous, as MediaPipe's normalised landmarks times the frame
  size (avface.stages.tracking): pixel (i, j) covers [i, i + 1) x [j, j + 1), so a vertex projects
  to ``u = fx x / z + cx`` with ``cx = width / 2``.
* Frame ``t`` shows time ``t / fps``; audio sample 0 is time 0.

The face
--------
Identity: the canonical mesh, scaled by a few per cent per axis and bent by a smooth, mostly
symmetric random field of a few millimetres. Expression: the jaw joint (``jaw_pose`` about
x, about 0.2 rad on open vowels, never above JAW_MAX_RAD) plus a per-clip linear basis of smooth, localised displacement fields
(lip rounding, spreading, closing; a blink per eye; brow raise), each solved as a harmonic
field over the mesh from displacements prescribed on landmark rings. The curves come from
espeak's phonemes through visemes, blended over time like co-articulation. Head motion is
a few degrees of smooth yaw, pitch and roll and a few millimetres of translation.

The canonical mesh from the task bundle closes the eye and mouth openings with triangles;
those triangles are not drawn, so eyeballs (sclera, iris, pupil) and a mouth interior
(cavity, teeth, tongue) show through, and blinks and closed lips come from the mesh itself.

The renderer
------------
Painter's algorithm into a triangle-id buffer (``cv2.fillConvexPoly`` per triangle, back to
front within each layer, layers back to front: neck, skull and hair, ears, eyes, mouth, face),
then one vectorised pass over covered pixels: barycentric interpolation of normals and UVs,
a UV-space skin texture (lips, brows, lash lines, nostrils), wrapped Lambert + Blinn-Phong
lighting in linear light, 2x supersampling. About 40-60 ms per 512 x 512 frame on 2 CPU cores.

How real it looks to MediaPipe (6 s clips at 512 px, seeds 0-3, frames decoded from the
mp4): the face is detected on every frame, the hand's included, and its 468 landmarks lie
2.2-2.9 px (mean) from the projected ground truth on unoccluded frames, 2.1-2.4 px on the
lips; 1 px is about 0.72 mm at the face. Most of what is left is MediaPipe's own prior
(forehead top, nose ridge, the upper-lid ring, wide mouth openings), which no shading
change tried here moved.

Modules
-------
``clip`` (:class:`SynthClip`, the ground-truth file), ``generate`` (:func:`make_demo_clip`:
one seed to frames, audio and ground truth), ``speech`` (text and audio on the clip's time
line), ``face`` (identity and expression basis), ``texture`` (the UV skin texture),
``animation`` (expression, jaw, head and gaze curves), ``camera`` (intrinsics and placement),
``scene`` (everything drawn besides the face mesh), ``renderer`` (the rasteriser and its
shading), ``occluder`` (the hand) and ``common`` (units, sRGB, smooth noise). What other
modules use is exported here.
"""
from __future__ import annotations

from avface.synth.animation import ANTICIPATION_S, COARTICULATION_S, CURVE_RATE_HZ, JAW_MAX_RAD, VISEME_TARGETS
from avface.synth.camera import CAMERA_DISTANCE_M, FACE_CENTRE_V, FOV_Y_DEG, intrinsics
from avface.synth.clip import GT_FORMAT, GT_NAME, VIDEO_NAME, WAV_NAME, SynthClip, load_demo_gt
from avface.synth.common import MM
from avface.synth.face import EXPRESSION_NAMES
from avface.synth.generate import make_demo_clip
from avface.synth.occluder import OCCLUDED_MIN_FRACTION, OCCLUDER_RAMP_FRACTION, OCCLUDER_SPAN_S
from avface.synth.renderer import SLIVER_HEIGHT_PX, SUPERSAMPLE
from avface.synth.speech import AUDIO_PEAK, AUDIO_RATE_HZ, DEFAULT_SENTENCES, LEAD_SILENCE_S, MIN_TAIL_SILENCE_S
from avface.synth.texture import TEXTURE_SIZE

__all__ = [
    "make_demo_clip", "load_demo_gt", "SynthClip", "intrinsics",
    "GT_FORMAT", "GT_NAME", "VIDEO_NAME", "WAV_NAME",
    "AUDIO_RATE_HZ", "AUDIO_PEAK", "LEAD_SILENCE_S", "MIN_TAIL_SILENCE_S", "DEFAULT_SENTENCES",
    "FOV_Y_DEG", "CAMERA_DISTANCE_M", "FACE_CENTRE_V",
    "JAW_MAX_RAD", "VISEME_TARGETS", "COARTICULATION_S", "ANTICIPATION_S", "CURVE_RATE_HZ", "EXPRESSION_NAMES",
    "SUPERSAMPLE", "SLIVER_HEIGHT_PX", "TEXTURE_SIZE",
    "OCCLUDER_SPAN_S", "OCCLUDER_RAMP_FRACTION", "OCCLUDED_MIN_FRACTION", "MM",
]
