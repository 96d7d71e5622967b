"""All AVFace networks in one module, and their checkpoint: one file with every network's
config and weights (docs/networks.md).

The file is torch's own format, read with ``weights_only=True`` so loading cannot run code.
It holds a SHA-256 over the configs, the metadata and every tensor's name, dtype, shape and
bytes; loading recomputes it. A shipped checkpoint is also checked by file size and SHA-256,
as :mod:`avface.core.assets` checks the MediaPipe files. Anything missing, truncated, altered or
of another format raises :class:`~avface.errors.ModelFileError` naming the file and how to
rebuild it: the networks never run on random weights by accident.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import typing
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from avface.errors import ModelFileError
from avface.models.avnets import ExpressionNet, FusionConfig, PoseEncoder, PoseEncoderConfig
from avface.models.lip_siren import LipSiren, LipSirenConfig

log = logging.getLogger(__name__)

FORMAT = "avface-networks"
FORMAT_VERSION = 1
#: How to make a checkpoint again; every checkpoint error ends with it.
REBUILD_HINT = ("rebuild it with `python -m avface.train CLIP.npz ... -o {path}` (docs/networks.md, "
                "'Training'), or point the job at another checkpoint")


@dataclass(frozen=True)
class NetworksConfig:
    """The configs of every network a checkpoint holds."""

    pose: PoseEncoderConfig = PoseEncoderConfig()
    """Coarse temporal encoder."""
    expression: FusionConfig = FusionConfig()
    """Expression branch (audio and video encoders, fusion)."""
    lips: LipSirenConfig = LipSirenConfig()
    """Lip SIREN; its cond_dim must equal the audio embedding's size."""

    def __post_init__(self):
        if self.lips.cond_dim != self.expression.audio.dim:
            raise ValueError(f"lip SIREN cond_dim {self.lips.cond_dim} must equal f_a's size {self.expression.audio.dim}")


class AVFaceNetworks(nn.Module):
    """The coarse temporal encoder, the expression branch and the lip SIREN. The SIREN is
    conditioned on the expression branch's audio embedding f_a, so the audio encoder is
    shared: ``lips(positions, expression.audio(phones, mel), activity)``."""

    def __init__(self, config: NetworksConfig = NetworksConfig()):
        super().__init__()
        self.config = config
        self.pose = PoseEncoder(config.pose)
        self.expression = ExpressionNet(config.expression)
        self.lips = LipSiren(config.lips)
        #: The fine stage's generic detail network (:class:`avface.models.fine.DetailNet`),
        #: which per-clip adaptation starts from; None in a checkpoint without that part.
        self.fine = None

    def lip_offsets(self, positions: torch.Tensor, phones: torch.Tensor, mel: torch.Tensor,
                    audio_present: torch.Tensor, activity: torch.Tensor) -> torch.Tensor:
        """positions (L, 3) normalised neutral lip vertices; phones (B, T, 16, P), mel
        (B, T, 16, 80), audio_present and activity (B, T). Returns offsets (B, T, L, 3) in
        inter-ocular units, zero where there is no speech or no audio."""
        f_a = self.expression.audio(phones, mel)  # (B, T, 64)
        return self.lips(positions, f_a, activity * audio_present.float())


def build_networks(config: NetworksConfig = NetworksConfig(), *, seed: int = 0) -> AVFaceNetworks:
    """Freshly initialised networks; the same seed gives the same weights, and the global
    random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AVFaceNetworks(config)


# --------------------------------------------------------------------------- config <-> dict


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(cls, data: dict):
    """Rebuild a (nested) frozen config dataclass from its dict; unknown keys are an error."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = config_from_dict(hint, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


# --------------------------------------------------------------------------- file I/O


def _digest(configs: dict, meta: dict, state: dict[str, dict[str, torch.Tensor]]) -> str:
    """SHA-256 over the configs, the metadata and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    h.update(json.dumps({"configs": configs, "meta": meta}, sort_keys=True).encode())
    for net in sorted(state):
        for key in sorted(state[net]):
            t = state[net][key].detach().to("cpu").contiguous()
            h.update(f"{net}.{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the whole file (what a shipped checkpoint is pinned by)."""
    from avface.core.assets import file_hash

    return file_hash(path).hexdigest()


def save_checkpoint(path: str | Path, networks: AVFaceNetworks, meta: dict | None = None) -> str:
    """Write every network's config and weights to one file (atomically); returns the
    content SHA-256 stored in it. ``meta`` (JSON-able) records how it was made."""
    path = Path(path)
    configs = config_to_dict(networks.config)
    meta = dict(meta or {})
    json.dumps(meta)  # fail here, not in a reader, on something that is not JSON
    parts = ("pose", "expression", "lips") + (("fine",) if networks.fine is not None else ())
    if networks.fine is not None:
        configs["fine"] = config_to_dict(networks.fine.cfg)
    state = {name: {k: v.detach().to("cpu").clone() for k, v in getattr(networks, name).state_dict().items()}
             for name in parts}
    digest = _digest(configs, meta, state)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "configs": json.dumps(configs),
               "meta": json.dumps(meta), "state": state, "sha256": digest}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.info("saved networks checkpoint %s (sha256 %s)", path, digest[:12])
    return digest


@dataclass(frozen=True)
class Checkpoint:
    networks: AVFaceNetworks
    sha256: str
    """The content hash stored in (and verified against) the file."""
    meta: dict
    path: Path


#: The checkpoint that ships with the project, trained on the synthetic corpus only (nothing
#: it learned comes from clips the project may not redistribute), pinned by size and hash.
DEFAULT_CHECKPOINT = Path(__file__).with_name("weights") / "avface_networks.pt"
DEFAULT_SIZE = 6629242
DEFAULT_SHA256 = "1d6b55dd0d467ede7de0eee6fc82e54d38f1a3d0fb1e8aa91c609352ef10c467"
#: The one command that reproduces it (docs/networks.md, "The default checkpoint").
DEFAULT_REBUILD = ("python -m avface.train.synthetic -o out/synth-corpus --clips 100 --seed 1 && "
                   "python -m avface.train out/synth-corpus -o models/weights/avface_networks.pt "
                   "--steps 6000 --batch 32 --threads 1 -q && "
                   "python -m avface.train.synthetic -o out/detail-corpus --clips 24 --seed 2 --size 512 --duration 4 "
                   "--detail && python -m avface.train.fine_generic out/detail-corpus "
                   "--networks models/weights/avface_networks.pt -o models/weights/avface_networks.pt")


def load_default_checkpoint(*, device: str | torch.device = "cpu") -> Checkpoint:
    """The shipped checkpoint, verified against its pinned size and hash; ModelFileError
    saying how to get it back otherwise (never random weights)."""
    try:
        return load_checkpoint(DEFAULT_CHECKPOINT, device=device, expected_size=DEFAULT_SIZE,
                               expected_sha256=DEFAULT_SHA256)
    except ModelFileError as e:
        raise ModelFileError(f"the default networks checkpoint is missing or damaged ({e}); restore "
                             f"models/weights/avface_networks.pt from the repository (`git checkout -- "
                             f"models/weights`), or rebuild it with `{DEFAULT_REBUILD}`") from e


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu", expected_size: int | None = None,
                    expected_sha256: str | None = None) -> Checkpoint:
    """Read and verify a checkpoint. ``expected_size`` and ``expected_sha256`` (of the whole
    file) pin a shipped checkpoint; the content hash inside the file is always checked.
    Raises ModelFileError naming the file and how to rebuild it."""
    path = Path(path)
    hint = REBUILD_HINT.format(path=path)

    def fail(what: str, cause: Exception | None = None):
        err = ModelFileError(f"networks checkpoint {path} {what}; {hint}")
        if cause is not None:
            raise err from cause
        raise err

    if not path.is_file():
        fail("not found")
    if expected_size is not None and path.stat().st_size != expected_size:
        fail(f"has {path.stat().st_size} bytes, expected {expected_size}: it is damaged or a different version")
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        fail(f"fails its checksum (sha256 {expected_sha256} expected): it is damaged or a different version")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a zip, not torch's format: all the same to the user
        fail(f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): it is damaged or not a checkpoint", e)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        fail(f"is not an AVFace networks checkpoint (format {FORMAT!r} expected)")
    if payload.get("format_version") != FORMAT_VERSION:
        fail(f"has format version {payload.get('format_version')}, this backend reads {FORMAT_VERSION}")
    try:
        configs = json.loads(payload["configs"])
        meta = json.loads(payload["meta"])
        state = payload["state"]
        stored = payload["sha256"]
    except (KeyError, TypeError, ValueError) as e:
        fail(f"lacks a part ({e})", e)
    if _digest(configs, meta, state) != stored:
        fail("fails its content check (SHA-256 of configs and weights): it is damaged")
    try:
        configs = dict(configs)
        fine_config = configs.pop("fine", None)
        config = config_from_dict(NetworksConfig, configs)
        networks = AVFaceNetworks(config)
        for name in ("pose", "expression", "lips"):
            getattr(networks, name).load_state_dict(state[name], strict=True)
        if fine_config is not None:  # the fine stage's generic part (a checkpoint may lack it)
            from avface.models.fine import DetailNet, FineNetConfig

            networks.fine = DetailNet(config_from_dict(FineNetConfig, fine_config))
            networks.fine.load_state_dict(state["fine"], strict=True)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        fail(f"does not match this backend's networks ({e})", e)
    networks.to(device).eval()
    return Checkpoint(networks, stored, meta, path)
