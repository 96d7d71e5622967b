"""Video and audio I/O through ffmpeg: probe, stream frames, extract audio, write videos.

Everything goes through the ffmpeg binary that ships with ``imageio-ffmpeg`` (no system
ffmpeg or ffprobe is needed), driven by ``ffmpeg-python``. Frames are streamed through a
pipe as raw RGB24 and never held in memory as a whole video.

Timing model
------------
:func:`probe` reads the timestamps of every video packet with a stream copy (no
decoding, so it costs about as much as reading the file) and decodes a single frame to
prove the stream is decodable and to learn the delivered frame size (after the display
rotation that ffmpeg applies).

* A clip is **VFR** when the gaps between consecutive presentation timestamps are not
  constant (a gap deviates from the median gap by more than 10 % and more than one tick
  of the stream time base).
* ``fps`` is the source rate for CFR clips (the mean gap; the container's stated rate or
  a standard rate such as 30000/1001 when the measurement agrees with it to 0.02 %, or to
  two time-base ticks over the clip), and the average rate (frames / duration, to 1/1000
  fps) for VFR clips.
* :func:`iter_frames` always runs ffmpeg's ``fps`` filter at ``fps`` (an identity for CFR
  clips), so output frame ``i`` shows the source frame displayed at
  ``start_s + i / fps``. ``n_frames`` is computed the way the filter counts, from the
  first timestamp and the end of the last frame, both rounded to the nearest output slot:
  ``n_frames = round(end * fps) - round(first * fps)``. For CFR clips this is the packet
  count.

Audio is not shifted: read :func:`read_audio` from 0 and frame 0 is the first video frame,
as Blender's sequencer plays a movie strip against its sound strip. ``VideoInfo.start_s``
tells how late the first video frame is presented, for callers that want to align exactly.
"""
from __future__ import annotations

import collections
import functools
import logging
import math
import os
import re
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Iterable, Iterator

import ffmpeg
import numpy as np
import soundfile

from avface.errors import InputError, MediaError, OutputError

logger = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 16_000
"""Audio rate the method works at (the paper's 16 kHz)."""

VFR_GAP_RTOL = 0.10
"""A frame gap that differs from the median gap by more than this fraction (and by more
than one time-base tick) marks the clip as variable frame rate."""

FPS_SNAP_RTOL = 2e-4
"""A measured rate within this relative distance of a standard rate is snapped to it
(30 and 30000/1001 differ by 1e-3, so this must stay well below that)."""

STANDARD_FPS = tuple(
    Fraction(f)
    for f in ("24000/1001", "24", "25", "30000/1001", "30", "48", "50", "60000/1001", "60",
              "12", "15", "20", "100", "120")
)
"""Rates that measured rates are snapped to (NTSC rates as exact fractions)."""

VFR_FPS_DENOMINATOR = 1000
"""The average rate of a VFR clip is kept to 1/1000 fps, so ffmpeg gets a short rational."""

SEEKABLE_CONTAINERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")
"""Demuxers with a frame index, where ffmpeg's backward seek reliably lands on a key frame
at or before the target. Other containers (MPEG-PS/TS, AVI, ...) are decoded from the start,
because a seek that lands late would silently shift frames."""

SEEK_MARGIN_S = 0.5
"""Extra seconds to seek before the first wanted frame, on top of the longest frame gap,
so the source frame that covers the first wanted slot is always decoded."""

END_PAD_MAX_FRAMES = 1
"""iter_frames repeats the last frame at most this many times when ffmpeg delivers fewer
frames than ``n_frames`` (rounding at the end of a stream); more is an error."""

STDERR_KEEP_LINES = 200
"""Lines of ffmpeg stderr kept for error messages."""

PROCESS_EXIT_TIMEOUT_S = 5.0
"""How long to wait for ffmpeg to exit after closing its pipes before killing it."""


# AV_PKT_FLAG_DISCARD: packets an MP4 edit list trims away; the decoder drops them.
_PKT_FLAG_DISCARD = 0x4
_NOPTS = -(1 << 63)

# Channel counts for the layout names ffmpeg prints.
_LAYOUT_CHANNELS = {
    "mono": 1, "stereo": 2, "2.1": 3, "3.0": 3, "3.0(back)": 3, "4.0": 4, "quad": 4,
    "quad(side)": 4, "3.1": 4, "5.0": 5, "5.0(side)": 5, "4.1": 5, "5.1": 6, "5.1(side)": 6,
    "6.0": 6, "6.0(front)": 6, "hexagonal": 6, "6.1": 7, "6.1(back)": 7, "6.1(front)": 7,
    "7.0": 7, "7.0(front)": 7, "7.1": 8, "7.1(wide)": 8, "7.1(wide-side)": 8, "octagonal": 8,
    "downmix": 2,
}

# stderr patterns that say a file with a readable header is cut short.
_TRUNCATION_PATTERNS = ("partial file", "File ended prematurely")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` found out about a clip, and how :func:`iter_frames` delivers it."""

    path: Path
    """The clip (absolute)."""
    width: int
    """Width in pixels of the delivered frames (after display rotation)."""
    height: int
    """Height in pixels of the delivered frames (after display rotation)."""
    fps: float
    """The constant rate frames are delivered at: the source rate for CFR clips, the
    average rate for VFR clips."""
    n_frames: int
    """Number of frames :func:`iter_frames` yields for the whole clip at ``fps``."""
    duration_s: float
    """Duration of the video stream in seconds: from the first frame to the end of the last."""
    vfr: bool
    """Variable frame rate detected (the gaps between frames are not constant)."""
    codec: str
    """Video codec name as ffmpeg prints it (``h264``, ``mpeg1video``, ...)."""
    has_audio: bool
    """The file has an audio stream."""
    audio_sample_rate: int | None
    """Sample rate of the first audio stream in Hz, None without audio."""
    audio_channels: int | None
    """Channel count of the first audio stream, None without audio or when unknown."""
    start_s: float = 0.0
    """Presentation time of the first video frame, in seconds after the container's start
    (video that starts after the audio has ``start_s > 0``)."""
    first_pts_s: float = 0.0
    """Raw presentation time of the first video frame in seconds (ffmpeg ``-copyts``
    timeline); iter_frames uses it to place frame 0."""
    max_gap_s: float = 0.0
    """Longest gap between two consecutive source frames in seconds (seek margin)."""
    container: str = ""
    """ffmpeg's demuxer name(s) for the file, e.g. ``mov,mp4,m4a,3gp,3g2,mj2``."""

    def frame_range(self, start: int | None, end: int | None) -> tuple[int, int]:
        """Validate a half-open frame range ``[start, end)``; None means the clip's start/end.

        Raises :class:`InputError` unless ``0 <= start < end <= n_frames``.
        """
        for name, value in (("start", start), ("end", end)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise InputError(f"frame {name} must be an integer frame index, got {value!r}")
        s = 0 if start is None else int(start)
        e = self.n_frames if end is None else int(end)
        if s < 0 or e > self.n_frames or s >= e:
            raise InputError(
                f"frame range [{start}, {end}) is not inside the clip {self.path.name}, "
                f"which has {self.n_frames} frames (valid: 0 <= start < end <= {self.n_frames})"
            )
        return s, e


@dataclass(frozen=True)
class _Stream:
    """One stream line of ffmpeg's input dump."""

    kind: str  # "Video" | "Audio" | "Subtitle" | "Data" | ...
    codec: str
    line: str
    attached_pic: bool
    rotation_deg: float


@dataclass(frozen=True)
class _Header:
    """The parts of ``ffmpeg -i FILE`` stderr this module needs."""

    format_name: str
    start_s: float
    streams: tuple[_Stream, ...]

    @property
    def video(self) -> _Stream | None:
        """The stream ``-map 0:V:0`` selects: the first video stream that is not cover art."""
        return next((s for s in self.streams if s.kind == "Video" and not s.attached_pic), None)

    @property
    def audio(self) -> _Stream | None:
        """The first audio stream (``-map 0:a:0``)."""
        return next((s for s in self.streams if s.kind == "Audio"), None)


# --------------------------------------------------------------------------- ffmpeg plumbing


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary bundled with imageio-ffmpeg."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _cmd(*global_args: str) -> list[str]:
    """ffmpeg command prefix; global options go before the inputs, where ffmpeg wants them
    (ffmpeg-python's ``global_args`` would put them after the last output)."""
    return [ffmpeg_exe(), "-hide_banner", "-nostdin", *global_args]


class _StderrDrain:
    """Reads a process's stderr in a thread, so ffmpeg never blocks on a full pipe, and
    keeps the last lines for error messages."""

    def __init__(self, stream: IO[bytes]):
        self._lines: collections.deque[str] = collections.deque(maxlen=STDERR_KEEP_LINES)
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: IO[bytes]) -> None:
        try:
            for raw in iter(stream.readline, b""):
                self._lines.append(raw.decode("utf-8", "replace").rstrip())
        except (OSError, ValueError):  # pipe closed under us during shutdown
            pass

    def text(self, timeout_s: float = PROCESS_EXIT_TIMEOUT_S) -> str:
        """All kept lines, after the process has closed its stderr."""
        self._thread.join(timeout_s)
        return "\n".join(self._lines)


def _stop_process(proc: subprocess.Popen) -> None:
    """Close our pipe ends and make sure ffmpeg has exited and been reaped (no zombie)."""
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:  # pragma: no cover - broken pipe on close
                pass
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=PROCESS_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # pragma: no cover - ffmpeg ignoring SIGTERM
            logger.warning("ffmpeg (pid %d) did not exit on SIGTERM; killing it", proc.pid)
            proc.kill()
            proc.wait()
    if proc.stderr is not None:
        try:
            proc.stderr.close()
        except OSError:  # pragma: no cover
            pass


def _last_error_line(stderr: str) -> str:
    """The most telling line of ffmpeg's stderr, for a one-line message."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if any(k in ln.lower() for k in ("error", "invalid", "not found", "corrupt", "denied", "no such")):
            return ln
    return lines[-1] if lines else "(no message)"


def _check_readable(path: Path) -> None:
    """MediaError for a missing, unreadable or empty path."""
    if not path.exists():
        raise MediaError(f"{path}: no such file")
    if not path.is_file():
        raise MediaError(f"{path} is not a file")
    if not os.access(path, os.R_OK):
        raise MediaError(f"{path} cannot be read (permission denied)")
    if path.stat().st_size == 0:
        raise MediaError(f"{path} is empty (0 bytes); was the recording or copy interrupted?")


_ISOBMFF_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid")


def _looks_like_isobmff(path: Path) -> bool:
    """True when the file starts like an MP4/MOV (a box header), so a missing 'moov' means
    a cut file rather than a file of some other kind named .mp4."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return len(head) == 8 and head[4:8] in _ISOBMFF_BOXES


def _open_failure(path: Path, stderr: str) -> MediaError:
    """A MediaError for a file ffmpeg could not open, with a message that says why."""
    if "misdetection possible" in stderr or ("Invalid data found" in stderr and not _looks_like_isobmff(path)):
        msg = f"{path.name} is not a video or audio file that ffmpeg can read (or it is corrupt)"
    elif "moov atom not found" in stderr:
        msg = (f"{path.name} is truncated or incomplete: its MP4 index (the 'moov' atom) is "
               "missing, as when a recording or download was interrupted")
    elif "Invalid data found when processing input" in stderr:
        msg = f"{path.name} is not a video or audio file that ffmpeg can read (or it is corrupt)"
    elif "Permission denied" in stderr:
        msg = f"{path.name} cannot be read (permission denied)"
    else:
        msg = f"ffmpeg cannot read {path.name}: {_last_error_line(stderr)}"
    return MediaError(msg, detail=stderr)


_STREAM_RE = re.compile(r"^\s*Stream #0:(\d+)\S*: (\w+): (\S+)(.*)$")
_ROTATION_RE = re.compile(r"rotation of (-?[\d.]+) degrees", re.IGNORECASE)
_INPUT_RE = re.compile(r"^Input #0, ([^,]+(?:,[^,\s]+)*), from")
_START_RE = re.compile(r"start: (-?[\d.]+)")


def _parse_header(stderr: str) -> _Header | None:
    """Parse the ``Input #0`` dump of ffmpeg's stderr; None when ffmpeg printed none."""
    lines = stderr.splitlines()
    i0 = next((i for i, ln in enumerate(lines) if ln.startswith("Input #0")), None)
    if i0 is None:
        return None
    m = _INPUT_RE.match(lines[i0])
    format_name = m.group(1) if m else "?"
    start_s = 0.0
    streams: list[dict] = []
    for ln in lines[i0 + 1:]:
        if ln and not ln.startswith(" "):  # end of the dump (e.g. "Stream mapping:", "Output #0")
            break
        if ln.strip().startswith("Duration:"):
            sm = _START_RE.search(ln)
            if sm:
                start_s = float(sm.group(1))
            continue
        sm = _STREAM_RE.match(ln)
        if sm:
            streams.append(dict(kind=sm.group(2), codec=sm.group(3).rstrip(","), line=ln.strip(),
                                attached_pic="(attached pic)" in ln, rotation_deg=0.0))
            continue
        rm = _ROTATION_RE.search(ln)
        if rm and streams:  # side data belongs to the stream above it
            streams[-1]["rotation_deg"] = float(rm.group(1))
    return _Header(format_name, start_s, tuple(_Stream(**s) for s in streams))


def _audio_params(stream: _Stream) -> tuple[int | None, int | None]:
    """(sample rate Hz, channel count) from an ffmpeg audio stream line."""
    rate_m = re.search(r", (\d+) Hz", stream.line)
    rate = int(rate_m.group(1)) if rate_m else None
    channels = None
    after = stream.line.split(" Hz, ", 1)[1] if " Hz, " in stream.line else ""
    layout = after.split(",", 1)[0].strip()
    if layout in _LAYOUT_CHANNELS:
        channels = _LAYOUT_CHANNELS[layout]
    else:
        cm = re.match(r"(\d+) channels", layout)
        if cm:
            channels = int(cm.group(1))
        elif layout.split("(")[0] in _LAYOUT_CHANNELS:
            channels = _LAYOUT_CHANNELS[layout.split("(")[0]]
    return rate, channels


def _read_header(path: Path) -> _Header:
    """Run ``ffmpeg -i FILE`` (no output) and parse what it says about the streams."""
    proc = subprocess.run(_cmd("-i", str(path)), capture_output=True)
    stderr = proc.stderr.decode("utf-8", "replace")
    header = _parse_header(stderr)
    if header is None:
        raise _open_failure(path, stderr)
    return header


# --------------------------------------------------------------------------- probe


def _parse_framecrc(text: str) -> tuple[Fraction, list[tuple[int, int]], tuple[int, int] | None]:
    """Parse ffmpeg's framecrc output.

    Returns (time base in seconds, [(pts, duration)] in ticks for kept packets,
    (width, height) from the ``#dimensions`` line or None).
    """
    tb = Fraction(1, 1)
    dims = None
    packets: list[tuple[int, int]] = []
    for ln in text.splitlines():
        if ln.startswith("#tb 0:"):
            tb = Fraction(ln.split(":", 1)[1].strip())
        elif ln.startswith("#dimensions 0:"):
            w, h = ln.split(":", 1)[1].strip().split("x")
            dims = (int(w), int(h))
        elif ln and not ln.startswith("#"):
            parts = [p.strip() for p in ln.split(",")]
            if len(parts) < 6:
                continue
            dts, pts, dur = int(parts[1]), int(parts[2]), int(parts[3])
            flags = int(parts[6].split("=")[1], 16) if len(parts) > 6 and parts[6].startswith("F=") else 1
            if flags & _PKT_FLAG_DISCARD:
                continue
            packets.append((pts if pts != _NOPTS else dts, dur))
    return tb, packets, dims


def _round_near(x: Fraction) -> int:
    """Round half away from zero, as ffmpeg's AV_ROUND_NEAR_INF."""
    return math.floor(x + Fraction(1, 2)) if x >= 0 else -math.floor(-x + Fraction(1, 2))


def _snap_fps(rate: Fraction, rtol: float = FPS_SNAP_RTOL) -> Fraction:
    """Snap a measured rate to the nearest standard one when it is within ``rtol``."""
    nearest = min(STANDARD_FPS, key=lambda std: abs(rate - std))
    return nearest if abs(rate - nearest) <= rtol * nearest else rate


def _fps_fraction(fps: float) -> Fraction:
    """The exact rational behind a VideoInfo.fps float (30000/1001, 2214/100, ...)."""
    return Fraction(fps).limit_denominator(1_000_000)


def _header_fps(stream: _Stream) -> Fraction | None:
    """The ``NN fps`` (else ``NN tbr``) figure of a video stream line, as a fraction."""
    for unit in ("fps", "tbr"):
        m = re.search(rf", ([\d.]+)(k?) {unit}\b", stream.line)
        if m:
            value = Fraction(m.group(1)) * (1000 if m.group(2) else 1)
            if value > 0:
                return _snap_fps(value)
    return None


def probe(path: str | os.PathLike) -> VideoInfo:
    """Describe a clip: size, rate, frame count, VFR, codec, audio.

    One ffmpeg run reads every video packet's timestamps by stream copy (no decoding) and
    decodes the first frame only. Raises :class:`MediaError` (message for people, ffmpeg's
    stderr in ``.detail``) for a missing, empty, unreadable, truncated or corrupt file, a
    file without any decodable video frame, and a file with no video stream.
    """
    path = Path(path).expanduser().resolve()
    _check_readable(path)
    t0 = time.perf_counter()
    returncode, packets_text, first_text, stderr = _run_probe(path)
    header = _parse_header(stderr)
    if header is None:
        raise _open_failure(path, stderr)
    vstream = header.video
    _check_streams(path, header, stderr)
    tb, packets, _ = _parse_framecrc(packets_text)
    _, decoded, dims = _parse_framecrc(first_text)
    _check_decoded(path, vstream, packets, decoded, dims, returncode, stderr)
    pts = np.unique(np.array([p for p, _ in packets], dtype=np.int64))  # sorted, B-frame order undone
    fps, n_frames, first, duration, vfr, gaps = _frame_timing(pts, packets, tb, vstream)
    if vstream.rotation_deg:
        logger.debug("%s: display rotation %.0f degrees, applied on decode", path.name, vstream.rotation_deg)
    sar = re.search(r"\[SAR (\d+):(\d+)", vstream.line)
    if sar and sar.group(1) != sar.group(2) and sar.group(1) != "0":
        logger.warning("%s has non-square pixels (SAR %s:%s); frames are delivered as stored, "
                       "not stretched to the display aspect", path.name, sar.group(1), sar.group(2))

    astream = header.audio
    rate, channels = _audio_params(astream) if astream else (None, None)
    width, height = dims
    info = VideoInfo(
        path=path, width=width, height=height, fps=float(fps), n_frames=int(n_frames),
        duration_s=float(duration), vfr=vfr, codec=vstream.codec, has_audio=astream is not None,
        audio_sample_rate=rate, audio_channels=channels,
        start_s=float(first) - header.start_s, first_pts_s=float(first),
        max_gap_s=float(gaps.max() * tb) if gaps.size else 0.0, container=header.format_name,
    )
    logger.debug("probed %s in %.3f s: %s", path.name, time.perf_counter() - t0, info)
    if vfr:
        logger.info("%s has a variable frame rate (gaps %.1f to %.1f ms); frames are resampled to "
                    "its average %.3f fps", path.name, 1e3 * float(gaps.min() * tb),
                    1e3 * float(gaps.max() * tb), float(fps))
    return info


def _run_probe(path: Path) -> tuple[int, str, str, str]:
    """(return code, framecrc of every video packet, framecrc of the first decoded frame,
    ffmpeg's stderr) from one ffmpeg run."""
    with tempfile.TemporaryDirectory(prefix="avface-probe-") as tmp:
        first_crc = Path(tmp) / "first.crc"
        inp = ffmpeg.input(str(path))
        video = inp["V:0?"]
        packets_out = video.output("pipe:", f="framecrc", c="copy")
        # Decoding one frame proves the stream decodes and gives the delivered size.
        first_out = video.output(str(first_crc), f="framecrc", pix_fmt="rgb24", **{"frames:v": 1})
        spec = ffmpeg.merge_outputs(packets_out, first_out)
        proc = subprocess.run(_cmd("-copyts") + ffmpeg.get_args(spec), capture_output=True)
        stderr = proc.stderr.decode("utf-8", "replace")
        first_text = first_crc.read_text() if first_crc.exists() else ""
    return proc.returncode, proc.stdout.decode("utf-8", "replace"), first_text, stderr


def _check_streams(path: Path, header, stderr: str) -> None:
    """A text file, a file without video and a truncated file are refused here."""
    vstream = header.video
    if header.format_name == "tty":  # ffmpeg renders any text file as an ANSI "video"
        raise MediaError(f"{path.name} is a text file, not a video", detail=stderr)
    if vstream is None:
        found = ", ".join(f"{s.kind.lower()} ({s.codec})" for s in header.streams) or "no streams"
        raise MediaError(
            f"{path.name} has no video stream; AVFace needs a video of a face (this file holds {found}). "
            "Select the movie strip, not its sound strip.",
            detail=stderr,
        )
    if any(p in stderr for p in _TRUNCATION_PATTERNS):
        raise MediaError(
            f"{path.name} is truncated or damaged: its data ends before the frames its index "
            "lists (was the recording or download interrupted?)",
            detail=stderr,
        )


def _check_decoded(path: Path, vstream, packets, decoded, dims, returncode: int, stderr: str) -> None:
    """A codec the bundled ffmpeg lacks, a stream of which nothing decodes, and an ffmpeg
    failure are refused here; corrupt packets are only reported."""
    if not decoded and re.search(r"Decoder \(.*\) not found|[Dd]ecoder .*not found", stderr):
        raise MediaError(f"{path.name} uses the video codec '{vstream.codec}', which the bundled "
                         "ffmpeg cannot decode; convert it to H.264 first", detail=stderr)
    if not packets or not decoded or dims is None:
        raise MediaError(f"{path.name} is corrupt: it has a video stream but not one frame of it "
                         "can be decoded", detail=stderr)
    if returncode != 0:
        raise MediaError(f"ffmpeg cannot read the video of {path.name}: {_last_error_line(stderr)}",
                         detail=stderr)
    n_corrupt = stderr.count("corrupt input packet")
    if n_corrupt:
        logger.warning("%s: ffmpeg reports %d corrupt video packet(s); frames there may be "
                       "damaged or repeated", path.name, n_corrupt)


def _frame_timing(pts: np.ndarray, packets, tb: Fraction, vstream):
    """(fps, frame count, first timestamp s, duration s, VFR, gaps between timestamps) from
    the sorted unique packet timestamps ``pts`` in time-base units."""
    last_dur = max(p[1] for p in packets if p[0] == pts[-1])
    gaps = np.diff(pts)
    median_gap = int(np.median(gaps)) if gaps.size else 0
    if last_dur <= 0:
        last_dur = median_gap
    vfr = bool(gaps.size >= 2 and np.any(
        np.abs(gaps - median_gap) > max(1.0, VFR_GAP_RTOL * median_gap)))
    first = pts[0] * tb
    end = (int(pts[-1]) + last_dur) * tb
    duration = end - first
    if len(pts) == 1 or duration <= 0:
        fps = _header_fps(vstream) or Fraction(25)
        end = first + 1 / fps
        duration = end - first
    elif vfr:
        fps = _snap_fps(Fraction(round(len(pts) / duration * VFR_FPS_DENOMINATOR), VFR_FPS_DENOMINATOR))
    else:
        span = (pts[-1] - pts[0]) * tb
        # Coarse time bases (Matroska's 1 ms) blur a short clip's measured rate: allow
        # two ticks of error over the span.
        measured = (len(pts) - 1) / span
        rtol = max(FPS_SNAP_RTOL, float(2 * tb / span))
        stated = _header_fps(vstream)  # the container's own figure breaks ties (30 vs 29.97)
        if stated is not None and abs(measured - stated) <= rtol * stated:
            fps = stated
        else:
            fps = _snap_fps(measured, rtol).limit_denominator(1001)
    # Count frames the way ffmpeg's fps filter does: slots from the first timestamp to the
    # end of the last frame, both rounded to the nearest slot.
    n_frames = _round_near(end * fps) - _round_near(first * fps)
    return fps, n_frames, first, duration, vfr, gaps


# --------------------------------------------------------------------------- frames


def _read_exact(stream: IO[bytes], n_bytes: int) -> bytearray | None:
    """Read exactly n_bytes into a fresh (writable) buffer; None at end of stream."""
    buf = bytearray(n_bytes)
    view = memoryview(buf)
    got = 0
    while got < n_bytes:
        k = stream.readinto(view[got:])
        if not k:
            return None
        got += k
    return buf


def iter_frames(info: VideoInfo, start: int = 0, end: int | None = None) -> Iterator[np.ndarray]:
    """Yield frames ``[start, end)`` of a probed clip as (H, W, 3) uint8 RGB arrays.

    Frames are streamed from ffmpeg through a pipe; frame ``i`` shows the source frame
    displayed at ``info.start_s + i / info.fps`` (VFR clips are resampled with ffmpeg's fps
    filter). For ``start > 0`` ffmpeg seeks to a key frame before the range instead of
    decoding from the beginning; the frames are the same as a full pass gives. Closing the
    generator early stops and reaps ffmpeg. Raises :class:`MediaError` when decoding fails
    or stops short.
    """
    start, end = info.frame_range(start, end)  # validated now, not at the first next()
    return _stream_frames(info, start, end)


def _stream_frames(info: VideoInfo, start: int, end: int) -> Iterator[np.ndarray]:
    """The generator behind iter_frames, for a validated range."""
    fps = _fps_fraction(info.fps)
    slot0 = _round_near(Fraction(info.first_pts_s) * fps)  # fps filter's slot of frame 0
    first_slot, end_slot = slot0 + start, slot0 + end
    seek_s = float(first_slot / fps) - info.max_gap_s - SEEK_MARGIN_S  # on the -copyts timeline
    in_kwargs = {}
    if start > 0 and seek_s > info.first_pts_s and info.container in SEEKABLE_CONTAINERS:
        # -copyts keeps the file's timestamps, so the slots below stay absolute after the seek;
        # -noaccurate_seek hands every frame from the key frame on to the filters, which pick.
        # -ss itself counts from the container's start time, not from timestamp 0.
        container_start_s = info.first_pts_s - info.start_s
        in_kwargs = {"ss": f"{seek_s - container_start_s:.6f}", "noaccurate_seek": None}
    stream = (
        ffmpeg.input(str(info.path), **in_kwargs)["V:0"]
        .filter("fps", fps=f"{fps.numerator}/{fps.denominator}", round="near")
        .trim(start_pts=first_slot, end_pts=end_slot)
        # Force the probed size so a mid-stream resolution change cannot garble the pipe.
        .filter("scale", info.width, info.height)
        .output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough", an=None, sn=None, dn=None)
    )
    cmd = _cmd("-copyts", "-v", "error") + ffmpeg.get_args(stream)
    logger.debug("iter_frames: %s", subprocess.list2cmdline(cmd))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    drain = _StderrDrain(proc.stderr)
    frame_bytes = info.width * info.height * 3
    want = end - start
    count = 0
    last: np.ndarray | None = None
    try:
        while count < want:
            buf = _read_exact(proc.stdout, frame_bytes)
            if buf is None:
                break
            last = np.frombuffer(buf, dtype=np.uint8).reshape(info.height, info.width, 3)
            count += 1
            yield last
        if count < want:
            rc = proc.wait()
            stderr = drain.text()
            if rc != 0:
                raise MediaError(
                    f"decoding {info.path.name} failed at frame {start + count} of [{start}, {end}): "
                    f"{_last_error_line(stderr)}", detail=stderr)
            if last is None or want - count > END_PAD_MAX_FRAMES:
                raise MediaError(
                    f"{info.path.name} ended after frame {start + count} although the range "
                    f"[{start}, {end}) was asked for; the file is truncated or changed since it was probed",
                    detail=stderr)
            logger.debug("%s: repeating the last frame %d time(s) to reach n_frames",
                         info.path.name, want - count)
            while count < want:
                count += 1
                yield last.copy()
    finally:
        _stop_process(proc)


# --------------------------------------------------------------------------- audio


def read_audio(
    path: str | os.PathLike,
    *,
    sample_rate: int = SAMPLE_RATE_HZ,
    start_s: float = 0.0,
    duration_s: float | None = None,
) -> np.ndarray:
    """Extract the first audio stream as mono float32 at ``sample_rate``: shape (N,).

    Works on video containers with audio and on audio files (wav, mp3, ...). Channels are
    averaged (not summed, so a stereo file does not clip). ``start_s``/``duration_s`` cut
    a window in seconds. Raises :class:`MediaError` when the file has no audio stream or
    cannot be read.
    """
    path = Path(path).expanduser().resolve()
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise InputError(f"sample_rate must be a positive integer in Hz, got {sample_rate!r}")
    if not math.isfinite(start_s) or start_s < 0:
        raise InputError(f"start_s must be >= 0 seconds, got {start_s!r}")
    if duration_s is not None and (not math.isfinite(duration_s) or duration_s <= 0):
        raise InputError(f"duration_s must be > 0 seconds, got {duration_s!r}")
    _check_readable(path)
    header = _read_header(path)
    astream = header.audio
    if astream is None:
        found = ", ".join(f"{s.kind.lower()} ({s.codec})" for s in header.streams) or "no streams"
        raise MediaError(f"{path.name} has no audio stream (it holds {found}); AVFace needs the speech "
                         "of the clip: give an audio file or a video with sound")
    _, channels = _audio_params(astream)
    in_kwargs: dict = {}
    if start_s > 0:
        in_kwargs["ss"] = f"{start_s:.6f}"
    if duration_s is not None:
        in_kwargs["t"] = f"{duration_s:.6f}"
    out_kwargs: dict = dict(format="f32le", acodec="pcm_f32le", ac=1, ar=sample_rate)
    if channels and channels > 1:
        # ffmpeg's own downmix (-ac 1) sums channels at -3 dB, which can clip; average instead.
        # (Passed as -af: ffmpeg-python's .filter() over-escapes the '=' inside pan's spec.)
        gain = 1.0 / channels
        out_kwargs["af"] = "pan=mono|c0=" + "+".join(f"{gain:.8f}*c{i}" for i in range(channels))
    stream = ffmpeg.input(str(path), **in_kwargs)["a:0"].output("pipe:", **out_kwargs)
    cmd = _cmd("-v", "error") + ffmpeg.get_args(stream)
    logger.debug("read_audio: %s", subprocess.list2cmdline(cmd))
    proc = subprocess.run(cmd, capture_output=True)
    stderr = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise MediaError(f"extracting the audio of {path.name} failed: {_last_error_line(stderr)}",
                         detail=stderr)
    wave = np.frombuffer(proc.stdout, dtype="<f4").astype(np.float32)  # (N,), copy: writable
    if wave.size == 0:
        logger.warning("%s: no audio samples in the requested window (start %.3f s)", path.name, start_s)
    return wave


def write_wav(path: str | os.PathLike, wave: np.ndarray, sample_rate: int, *, subtype: str = "PCM_16") -> Path:
    """Write a wav file with soundfile: ``wave`` is (N,) mono or (N, C), float in [-1, 1]
    (clipped with a warning) or integer PCM. Raises OutputError if it cannot be written."""
    path = Path(path)
    wave = np.asarray(wave)
    if wave.ndim not in (1, 2) or wave.shape[0] == 0:
        raise InputError(f"expected (N,) or (N, C) audio samples, got shape {tuple(wave.shape)}")
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise InputError(f"sample_rate must be a positive integer in Hz, got {sample_rate!r}")
    if np.issubdtype(wave.dtype, np.floating):
        peak = float(np.max(np.abs(wave))) if wave.size else 0.0
        if not math.isfinite(peak):
            raise InputError("audio samples contain NaN or infinity")
        if peak > 1.0 and subtype.startswith("PCM"):
            logger.warning("clipping audio written to %s (peak %.3f > 1)", path.name, peak)
            wave = np.clip(wave, -1.0, 1.0)
    _ensure_writable_dir(path.parent)
    try:
        soundfile.write(str(path), wave, int(sample_rate), subtype=subtype)
    except (OSError, RuntimeError) as e:  # soundfile raises LibsndfileError (a RuntimeError)
        raise OutputError(f"cannot write {path}: {e}") from e
    return path


# --------------------------------------------------------------------------- writing video


def _ensure_writable_dir(folder: Path) -> None:
    """Create ``folder`` if needed; OutputError if that fails or it is not writable."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder {folder}: {e.strerror or e}") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"the output folder {folder} is not writable")


def _check_frame(frame: object, index: int, shape: tuple[int, ...] | None) -> np.ndarray:
    """Validate one frame for write_video: (H, W, 3) uint8, same shape as the first."""
    arr = np.asarray(frame)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise InputError(f"write_video expects (H, W, 3) uint8 RGB frames; frame {index} is "
                         f"{arr.dtype} with shape {tuple(arr.shape)}")
    if shape is not None and arr.shape != shape:
        raise InputError(f"write_video needs frames of one size; frame {index} is {tuple(arr.shape)}, "
                         f"frame 0 was {shape}")
    return arr


def _check_video_args(fps, crf) -> None:
    """InputError unless ``fps`` is a positive finite number and ``crf`` an integer in [0, 51]."""
    if isinstance(fps, bool) or not (
            isinstance(fps, (int, float, np.integer, np.floating, Fraction)) and math.isfinite(fps) and fps > 0):
        raise InputError(f"fps must be a positive number, got {fps!r}")
    if not isinstance(crf, (int, np.integer)) or not 0 <= crf <= 51:
        raise InputError(f"crf must be an integer in [0, 51], got {crf!r}")


def _audio_to_mux(audio: str | os.PathLike | None) -> Path | None:
    """The resolved path of ``audio`` (None for none); MediaError when it has no audio stream."""
    audio_path = None
    if audio is not None:
        audio_path = Path(audio).expanduser().resolve()
        _check_readable(audio_path)
        if _read_header(audio_path).audio is None:
            raise MediaError(f"cannot mux audio from {audio_path.name}: it has no audio stream")
    return audio_path


def _first_frame(it: Iterator) -> np.ndarray:
    """The first frame of ``it``, checked; InputError when there is none."""
    try:
        first = next(it)
    except StopIteration:
        raise InputError("write_video got no frames") from None
    return _check_frame(first, 0, None)


def _encode_command(size: tuple[int, int], rate: Fraction, crf, audio_path: Path | None, tmp: Path) -> list[str]:
    """The ffmpeg command encoding raw RGB frames of ``size`` (w, h) from stdin, plus ``audio_path``, to ``tmp``."""
    width, height = size
    video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24",
                         s=f"{width}x{height}", framerate=f"{rate.numerator}/{rate.denominator}")
    # Convert with BT.709 and tag the frames (setparams) so that players, and our own decoder,
    # convert back with the same matrix; encoder options alone leave the tags unset.
    video = video.filter("scale", out_color_matrix="bt709", out_range="tv").filter(
        "setparams", colorspace="bt709", color_primaries="bt709", color_trc="bt709", range="tv")
    streams = [video]
    out_kwargs: dict = dict(
        format="mp4", vcodec="libx264", pix_fmt="yuv420p", crf=int(crf), preset="medium",
        movflags="+faststart",
    )
    if audio_path is not None:
        # apad + -shortest: the audio runs exactly as long as the video.
        streams.append(ffmpeg.input(str(audio_path))["a:0"].filter("apad"))
        out_kwargs.update(acodec="aac", audio_bitrate="192k", shortest=None)
    return _cmd("-y", "-v", "error") + ffmpeg.get_args(ffmpeg.output(*streams, str(tmp), **out_kwargs))


def _pipe_frames(proc: subprocess.Popen, first: np.ndarray, it: Iterator, pad_h: int, pad_w: int) -> int:
    """Feed ``first`` and the rest of ``it`` (checked, edge-padded) to ffmpeg's stdin; returns the count fed."""
    n_written = 0
    frame = first
    while True:
        if pad_h or pad_w:
            frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        try:
            proc.stdin.write(np.ascontiguousarray(frame).data)
        except BrokenPipeError:
            break  # ffmpeg died; its stderr says why (below)
        n_written += 1
        try:
            frame = _check_frame(next(it), n_written, first.shape)
        except StopIteration:
            break
    try:
        proc.stdin.close()
    except BrokenPipeError:
        pass
    return n_written


def _finish_encoding(proc: subprocess.Popen, drain: _StderrDrain, tmp: Path, path: Path) -> None:
    """Wait for ffmpeg; on success move ``tmp`` to ``path``, else raise what its stderr says."""
    rc = proc.wait()
    stderr = drain.text()
    if rc != 0:
        if any(k in stderr for k in ("Permission denied", "No space left", "Read-only file system")):
            raise OutputError(f"cannot write {path}: {_last_error_line(stderr)}", detail=stderr)
        raise MediaError(f"encoding {path.name} failed: {_last_error_line(stderr)}", detail=stderr)
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e


def write_video(
    frames: Iterable[np.ndarray],
    path: str | os.PathLike,
    fps: float,
    *,
    audio: str | os.PathLike | None = None,
    crf: int = 20,
) -> Path:
    """Encode (H, W, 3) uint8 RGB frames to an H.264 (yuv420p, BT.709) MP4 and return its path.

    Odd sizes are padded to even by repeating the last row/column (yuv420p needs even
    sizes). ``audio`` (a wav or any media file with an audio stream) is muxed as AAC; the
    video decides the length: longer audio is cut, shorter audio is padded with silence.
    The file is written under a temporary name and renamed when complete, so a failure
    never leaves a half-written video at ``path``. Raises InputError for bad frames or
    arguments, MediaError for unusable audio, OutputError when ``path`` cannot be written.
    """
    path = Path(path).expanduser().absolute()
    _check_video_args(fps, crf)
    audio_path = _audio_to_mux(audio)
    _ensure_writable_dir(path.parent)

    it = iter(frames)
    first = _first_frame(it)
    height, width = first.shape[:2]
    pad_h, pad_w = height % 2, width % 2
    rate = _fps_fraction(float(fps)) if not isinstance(fps, Fraction) else fps

    tmp = path.with_name(f".{path.name}.partial")
    cmd = _encode_command((width + pad_w, height + pad_h), rate, crf, audio_path, tmp)
    logger.debug("write_video: %s", subprocess.list2cmdline(cmd))
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    drain = _StderrDrain(proc.stderr)
    n_written = 0
    ok = False
    try:
        n_written = _pipe_frames(proc, first, it, pad_h, pad_w)
        _finish_encoding(proc, drain, tmp, path)
        ok = True
    finally:
        _stop_process(proc)
        if not ok:
            tmp.unlink(missing_ok=True)
    logger.debug("wrote %s: %d frames %dx%d at %s fps%s", path, n_written, width + pad_w,
                 height + pad_h, rate, " with audio" if audio_path else "")
    return path


# --------------------------------------------------------------------------- hashing


def content_hash(path: str | os.PathLike, extra: str = "") -> str:
    """sha256 hex digest of the file's bytes (read in 1 MiB chunks) followed by ``extra``
    (for example a config digest), for cache keys."""
    path = Path(path)
    if not path.is_file():  # an empty file is fine here: it has a hash
        raise MediaError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    from avface.core.assets import file_hash

    h = file_hash(path)
    h.update(extra.encode("utf-8"))
    return h.hexdigest()

