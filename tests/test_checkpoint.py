"""The networks checkpoint (models/checkpoint.py): one file with every config and weight,
verified by SHA-256; missing or damaged files are a ModelFileError that names the file and
how to rebuild it, never random weights."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_networks import expression_inputs

from avface.errors import ModelFileError
from avface.models.avnets import AudioEncoderConfig, FusionConfig, TemporalConfig
from avface.models.checkpoint import (NetworksConfig, build_networks, config_from_dict, config_to_dict, file_sha256,
    load_checkpoint, save_checkpoint)
from avface.models.lip_siren import LipSirenConfig


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("ckpt") / "networks.pt"
    nets = build_networks(seed=4)
    digest = save_checkpoint(path, nets, {"trained_on": "nothing", "steps": 0})
    return path, digest


def test_round_trip_gives_the_same_networks(saved):
    path, digest = saved
    ck = load_checkpoint(path)
    assert ck.sha256 == digest and ck.meta == {"trained_on": "nothing", "steps": 0}
    assert not ck.networks.training
    ref = build_networks(seed=4).eval()
    x = expression_inputs(2)
    with torch.no_grad():
        assert torch.equal(ck.networks.expression(**x), ref.expression(**x))
    for (k, a), (_, b) in zip(ck.networks.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    # saving the same networks again gives the same content hash
    assert save_checkpoint(path.with_name("again.pt"), ref, ck.meta) == digest


def test_a_non_default_config_round_trips(tmp_path):
    cfg = NetworksConfig(
        expression=FusionConfig(audio=AudioEncoderConfig(channels=(32, 32), dim=48),
                                temporal=TemporalConfig(d_model=112, n_layers=1)),
        lips=LipSirenConfig(cond_dim=48, hidden=32, n_layers=2),
    )
    assert config_from_dict(NetworksConfig, config_to_dict(cfg)) == cfg
    save_checkpoint(tmp_path / "small.pt", build_networks(cfg))
    assert load_checkpoint(tmp_path / "small.pt").networks.config == cfg


def test_the_default_checkpoint_fits_the_size_budget(saved):
    assert saved[0].stat().st_size < 20 * 1024 * 1024


def assert_rebuild_error(path: Path, match: str, **kwargs):
    with pytest.raises(ModelFileError) as info:
        load_checkpoint(path, **kwargs)
    msg = str(info.value)
    assert str(path) in msg and "rebuild it with" in msg, msg
    assert match in msg, msg
    assert info.value.code == "model_file"


def test_missing_checkpoint_names_the_file_and_how_to_rebuild(tmp_path):
    assert_rebuild_error(tmp_path / "nope.pt", "not found")


def test_truncated_checkpoint_is_refused(saved, tmp_path):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(saved[0].read_bytes()[: saved[0].stat().st_size // 2])
    assert_rebuild_error(bad, "cannot be read")


def test_altered_weights_fail_the_content_check(saved, tmp_path):
    """Flip bytes inside a weight tensor's storage, leaving the zip structure valid."""
    data = bytearray(saved[0].read_bytes())
    # torch's zip stores tensors uncompressed; find a long run of a known weight's bytes
    ref = build_networks(seed=4)
    w = ref.expression.video.net[0].weight.detach().reshape(-1)[:64].numpy().tobytes()
    at = bytes(data).find(w)
    assert at > 0, "weight bytes not found in the file"
    data[at + 8] ^= 0xFF
    bad = tmp_path / "altered.pt"
    bad.write_bytes(bytes(data))
    assert_rebuild_error(bad, "content check")


def test_pinned_size_and_hash(saved):
    path, _ = saved
    assert load_checkpoint(path, expected_size=path.stat().st_size, expected_sha256=file_sha256(path))
    assert_rebuild_error(path, "bytes, expected", expected_size=123)
    assert_rebuild_error(path, "checksum", expected_sha256="0" * 64)


def test_other_files_are_not_checkpoints(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    assert_rebuild_error(other, "not an AVFace networks checkpoint")
    text = tmp_path / "text.pt"
    text.write_text("hello")
    assert_rebuild_error(text, "cannot be read")


def test_a_checkpoint_of_other_networks_is_refused(saved, tmp_path):
    """A valid file whose configs name a field this backend does not know."""
    payload = torch.load(saved[0], weights_only=True)
    import json

    from avface.models import checkpoint as ck

    configs = json.loads(payload["configs"])
    configs["lips"]["colour"] = 1
    payload["configs"] = json.dumps(configs)
    payload["sha256"] = ck._digest(configs, json.loads(payload["meta"]), payload["state"])
    bad = tmp_path / "other_nets.pt"
    torch.save(payload, bad)
    assert_rebuild_error(bad, "does not match this backend")


def test_meta_must_be_json(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "x.pt", build_networks(), {"bad": object()})
    assert not (tmp_path / "x.pt").exists()


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        NetworksConfig().lips.hidden = 3  # type: ignore[misc]


def test_the_shipped_checkpoint_loads_pinned_and_was_trained_on_synthetic_clips_only():
    from avface.models.checkpoint import DEFAULT_CHECKPOINT, DEFAULT_SIZE, load_default_checkpoint

    assert DEFAULT_CHECKPOINT.stat().st_size == DEFAULT_SIZE <= 20 * 1024 * 1024
    ck = load_default_checkpoint()
    assert ck.path == DEFAULT_CHECKPOINT and ck.meta["steps"] >= 1000 and ck.meta["n_clips"] >= 50
    # trained, not random: the lower-face head's weights moved far from a fresh build's
    from avface.models.checkpoint import build_networks

    fresh = build_networks(seed=0).state_dict()
    moved = [float((v - fresh[k]).abs().max()) for k, v in ck.networks.state_dict().items()
             if v.dtype.is_floating_point and k in fresh]  # the fine part: tests/test_fine_generic.py
    assert max(moved) > 0.05


def test_a_damaged_shipped_checkpoint_says_how_to_restore_it(tmp_path, monkeypatch):
    import avface.models.checkpoint as C

    bad = tmp_path / "avface_networks.pt"
    data = C.DEFAULT_CHECKPOINT.read_bytes()
    bad.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit off
    monkeypatch.setattr(C, "DEFAULT_CHECKPOINT", bad)
    with pytest.raises(ModelFileError, match="checksum.*git checkout -- models/weights.*avface.train.synthetic"):
        C.load_default_checkpoint()
    bad.unlink()
    with pytest.raises(ModelFileError, match="not found.*restore"):
        C.load_default_checkpoint()
