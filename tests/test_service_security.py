"""Security: a non-loopback bind without CurveZMQ keys refuses to start; with keys, a client
with the wrong server key (or none) gets no answer, and a known-clients folder keeps out
every other client. Every server here binds loopback only."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import zmq
from service_util import make_server  # noqa: F401  (a fixture)

from avface.service.cli import make_keys
from avface.service.client import Client, NoAnswer


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:0", "tcp://*:0", "tcp://192.0.2.1:5555"])
def test_non_loopback_bind_without_keys_refuses_to_start(tmp_path, bind):
    ready = tmp_path / "ready.json"
    out = subprocess.run([sys.executable, "-m", "avface", "serve", "--bind", bind, "--data-dir",
                          str(tmp_path / "data"), "--ready-file", str(ready)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "refusing to bind" in out.stderr and "avface keys" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not ready.exists()


def test_keys_command_writes_key_pairs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "avface", "keys", "-o", str(tmp_path / "k")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "k").iterdir())
    assert names == ["client.key", "client.key_secret", "server.key", "server.key_secret"]
    for name in ("client.key_secret", "server.key_secret"):
        assert stat.S_IMODE(os.stat(tmp_path / "k" / name).st_mode) == 0o600
    again = subprocess.run([sys.executable, "-m", "avface", "keys", "-o", str(tmp_path / "k")],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "--force" in again.stderr


def test_curve_server_answers_only_the_right_server_key(make_server, tmp_path):
    keys = make_keys(tmp_path / "keys")
    server = make_server(args=("--curve-secret", str(keys["server_secret"])))
    assert server.public_key == keys["server"].read_text().split('public-key = "')[1].split('"')[0]
    with Client(server.address, server_key=keys["server"], client_key=keys["client_secret"]) as good:
        assert good.hello()["auth"] == "curve"
    with Client(server.address, server_key=keys["server"]) as ephemeral:  # any client key is fine here
        assert ephemeral.ping()
    wrong_public, _ = zmq.curve_keypair()
    for kw in ({"server_key": wrong_public}, {}):
        with Client(server.address, timeout_s=0.5, retries=1, **kw) as bad:
            with pytest.raises(NoAnswer):
                bad.hello()
    with Client(server.address, server_key=keys["server"]) as good:  # still serving
        assert good.hello()["server"] == "avface"


def test_known_clients_folder_admits_only_those_clients(make_server, tmp_path):
    keys = make_keys(tmp_path / "keys")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "client.key").write_text(keys["client"].read_text())
    server = make_server(args=("--curve-secret", str(keys["server_secret"]), "--curve-clients", str(allowed)))
    with Client(server.address, server_key=keys["server"], client_key=keys["client_secret"]) as known:
        assert known.hello()["auth"] == "curve"
    with Client(server.address, server_key=keys["server"], timeout_s=0.5, retries=1) as stranger:
        with pytest.raises(NoAnswer):
            stranger.hello()
