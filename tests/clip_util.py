"""Small inputs made with ffmpeg's lavfi sources for the tests."""
from __future__ import annotations

import subprocess
from pathlib import Path

from avface.media import ffmpeg_exe


def lavfi(path: Path, *inputs: str, args: tuple[str, ...] = ()) -> Path:
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y"]
    for src in inputs:
        cmd += ["-f", "lavfi", "-i", src]
    subprocess.run(cmd + list(args) + [str(path)], check=True, capture_output=True)
    return path


def faceless_clip(path: Path, seconds: float = 1.0) -> Path:
    """A test pattern with a tone: decodes fine, shows no face."""
    return lavfi(path, f"testsrc2=size=160x120:rate=25:duration={seconds}", f"sine=frequency=300:duration={seconds}",
                 args=("-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest"))


def tone_wav(path: Path, seconds: float = 1.0) -> Path:
    return lavfi(path, f"sine=frequency=440:duration={seconds}")
