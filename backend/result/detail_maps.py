"""The detail maps of a result (``detail/``, ``meta.detail``): how a 16-bit PNG value maps to
a displacement along the coarse normal, where the files are, and the check that a result's
maps are complete. Standard library and numpy only: the Blender add-on vendors this package.
Writing and decoding the maps' values (OpenCV) belong to the fine stage
(:mod:`avface.stages.detail.fine`).
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import SchemaError

DETAIL_DIR = "detail"
DETAIL_FORMAT = "png16"
DETAIL_PATTERN = "frame_{:06d}.png"
_PNG_MAX = 65535


@dataclass(frozen=True)
class DetailEncoding:
    """How a 16-bit PNG value maps to a displacement, as the result contract (``meta.detail``)
    and Blender's Displace modifier read it: D = (value / 65535 - midlevel) * metres_per_unit
    metres along the coarse mesh's normal (V_d = V_c + D * N_c). The add-on sets the
    modifier's Midlevel to ``midlevel`` and its Strength to ``metres_per_unit``."""

    map_size: int  #: maps are map_size x map_size texels over the model's UV layout, row 0 at v = 1
    metres_per_unit: float  #: metres per unit of the normalised value (value / 65535)
    midlevel: float = 0.5  #: the normalised value of zero displacement
    format: str = DETAIL_FORMAT
    n_maps: int = 0  #: one per frame
    folder: str = DETAIL_DIR

    @classmethod
    def for_range(cls, size: int, max_displacement_m: float, n_maps: int = 0) -> "DetailEncoding":
        """+-max_displacement_m over the whole 16 bits, zero at midlevel 0.5 (a step of
        2 max_displacement_m / 65535: 0.3 micrometres for 10 mm)."""
        if max_displacement_m <= 0:
            raise ValueError(f"max_displacement_m must be positive, got {max_displacement_m}")
        return cls(int(size), 2.0 * float(max_displacement_m), 0.5, DETAIL_FORMAT, int(n_maps))

    def to_meta(self) -> dict:
        """meta.detail (the contract's keys; ``pattern`` names the files)."""
        return {**asdict(self), "pattern": DETAIL_PATTERN}

    @classmethod
    def from_meta(cls, meta: dict) -> "DetailEncoding":
        try:
            enc = cls(int(meta["map_size"]), float(meta["metres_per_unit"]), float(meta.get("midlevel", 0.5)),
                      str(meta.get("format", DETAIL_FORMAT)), int(meta.get("n_maps", 0)),
                      str(meta.get("folder", DETAIL_DIR)))
        except (KeyError, TypeError, ValueError) as e:
            raise SchemaError(f"meta.detail is incomplete or malformed ({e}); expected map_size, metres_per_unit, "
                              f"midlevel, format, n_maps and folder") from e
        if enc.map_size < 1 or not enc.metres_per_unit > 0 or enc.format != DETAIL_FORMAT:
            raise SchemaError(f"meta.detail: map_size {enc.map_size} and metres_per_unit {enc.metres_per_unit} must "
                              f"be positive and format {DETAIL_FORMAT!r}, got {enc.format!r}")
        return enc

    def encode(self, displacement: np.ndarray) -> np.ndarray:
        """(S, S) metres -> (S, S) uint16 (clipped to the range)."""
        v = np.rint((np.asarray(displacement, np.float64) / self.metres_per_unit + self.midlevel) * _PNG_MAX)
        return np.clip(v, 0, _PNG_MAX).astype(np.uint16)

    def decode(self, values: np.ndarray) -> np.ndarray:
        """(S, S) uint16 -> (S, S) float32 metres."""
        return ((np.asarray(values, np.float64) / _PNG_MAX - self.midlevel) * self.metres_per_unit).astype(np.float32)


def detail_path(out_dir, frame: int) -> Path:
    return Path(out_dir) / DETAIL_DIR / DETAIL_PATTERN.format(frame)


def detail_files(out_dir, folder: str = DETAIL_DIR) -> list[Path]:
    """The maps in a result folder's ``folder`` (meta.detail's), in frame order (sorted by
    name, as the add-on and the exporters read them)."""
    path = Path(out_dir) / folder
    return sorted(path.glob("*.png")) if path.is_dir() else []


def check_detail_maps(out_dir, encoding: DetailEncoding, n_frames: int) -> None:
    """Validate a result's detail maps: one per frame, no more, each a 16-bit greyscale PNG at
    the stated size. SchemaError says what is wrong."""
    found = detail_files(out_dir, encoding.folder)
    if encoding.n_maps != n_frames or len(found) != n_frames:
        raise SchemaError(f"{Path(out_dir) / encoding.folder}: expected {n_frames} maps (one per frame), meta says "
                          f"{encoding.n_maps} and the folder holds {len(found)}")
    for p in found:
        check_png16(p, encoding.map_size)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png16(path, size: int) -> None:
    """Check that ``path`` is a whole 16-bit greyscale PNG of ``size`` x ``size`` texels
    without decoding its values: the signature, every chunk's CRC, the header, and that the
    compressed image data inflates to exactly one filtered row per line. Standard library
    only (struct, zlib), so the add-on vendors it into Blender, which has no OpenCV."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SchemaError(f"{path}: not a readable PNG ({e.strerror or e})") from e
    if not data.startswith(_PNG_SIGNATURE):
        raise SchemaError(f"{path}: not a readable PNG")
    pos, header, idat = len(_PNG_SIGNATURE), None, []
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        crc = data[pos + 8 + length:pos + 12 + length]
        if len(body) != length or len(crc) != 4 or zlib.crc32(kind + body) != struct.unpack(">I", crc)[0]:
            raise SchemaError(f"{path}: not a readable PNG (chunk {kind!r} is damaged or cut short)")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    else:
        raise SchemaError(f"{path}: not a readable PNG (it ends before its IEND chunk)")
    if header is None or not idat:
        raise SchemaError(f"{path}: not a readable PNG (no header or no image data)")
    width, height, depth, colour = header[:4]
    if depth != 16 or colour != 0:
        raise SchemaError(f"{path}: expected a 16-bit greyscale PNG, got bit depth {depth} and colour type {colour}")
    if (height, width) != (size, size):
        raise SchemaError(f"{path}: expected {size} x {size} texels, got {(height, width)}")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise SchemaError(f"{path}: not a readable PNG (its image data does not inflate: {e})") from e
    if len(raw) != height * (1 + 2 * width):
        raise SchemaError(f"{path}: not a readable PNG (its image data holds {len(raw)} bytes, "
                          f"expected {height * (1 + 2 * width)})")
