"""The wire envelope, without a server: encoding, every way a message can be refused, the
documented codes, and that protocol.py and client.py stand alone (the add-on vendors them)."""
from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, assert_close

from avface import errors
from avface.service import protocol as P


def test_roundtrip_with_arrays_and_bytes():
    arr = np.arange(12, dtype="<f4").reshape(3, 4)
    msg = P.build("upload", {"job_id": "a" * 32, "x": [1, 2.5, None]}, job_id="a" * 32, buffers=[arr, b"\x00\x01\x02"])
    frames = [bytes(f) for f in P.encode(msg)]
    assert frames[0] == P.DELIMITER
    back = P.decode(frames)
    assert back.header == msg.header
    assert back.content == msg.content
    assert back.header["version"] == P.PROTOCOL_VERSION
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", back.header["time"])
    assert_close(back.array(0), arr, what="array buffer")
    assert back.header["buffers"][0] == {"dtype": "<f4", "shape": [3, 4]}
    assert back.data(1) == b"\x00\x01\x02"


def test_reply_names_its_parent_and_routes_back():
    req = P.build("status", {"job_id": "b" * 32})
    req.routing = [b"client-identity"]
    rep = P.reply(req, {"job": {}})
    assert rep.parent_id == req.msg_id and rep.msg_type == "status_reply" and rep.content["status"] == "ok"
    assert P.encode(rep)[0] == b"client-identity"
    err = P.error_reply([b"id"], "unknown_job", "no such job", parent_id=req.msg_id)
    assert err.msg_type == "error" and err.parent_id == req.msg_id and err.content["code"] == "unknown_job"
    with pytest.raises(ValueError):
        P.error_reply([b"id"], "not_a_documented_code", "x")


def test_nan_is_refused_both_ways():
    with pytest.raises(ValueError):
        P.dumps({"x": math.nan})
    with pytest.raises(ValueError):
        P.encode(P.build("hello", {"x": math.inf}))
    header = P.dumps(P.build("hello").header)
    with pytest.raises(P.ProtocolError) as e:
        P.decode([P.DELIMITER, header, b'{"x": NaN}'])
    assert e.value.code == "bad_envelope"


def _frames(**header_changes):
    msg = P.build("hello")
    msg.header.update(header_changes)
    return [P.DELIMITER, P.dumps(msg.header), P.dumps(msg.content)]


@pytest.mark.parametrize("frames, code", [
    ([b"no delimiter", b"{}", b"{}"], "bad_envelope"),
    ([P.DELIMITER, b"not json", b"{}"], "bad_envelope"),
    ([P.DELIMITER, b"[1, 2]", b"{}"], "bad_envelope"),
    ([P.DELIMITER], "bad_envelope"),
    (_frames(msg_id="../../etc"), "bad_envelope"),
    (_frames(version="2.0"), "version_mismatch"),
    (_frames(version="one"), "bad_envelope"),
    (_frames(msg_type="format_disk"), "unknown_type"),
    (_frames(msg_type=7), "bad_envelope"),
    (_frames(buffers=[{"dtype": "<f4", "shape": [2]}]), "bad_envelope"),
    (_frames()[:2] + [b"\xff\xfe"], "bad_envelope"),
])
def test_refusals_have_codes(frames, code):
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frames)
    assert e.value.code == code
    assert e.value.code in P.ERROR_CODES


def test_refusal_keeps_msg_id_for_the_reply():
    with pytest.raises(P.ProtocolError) as e:
        P.decode(_frames(version="9.1", msg_id="abc"))
    assert e.value.msg_id == "abc"


def test_buffer_limits():
    msg = P.build("upload", {}, buffers=[b"x" * 1000])
    with pytest.raises(P.ProtocolError) as e:
        P.decode(P.encode(msg), max_frame_bytes=999)
    assert e.value.code == "too_large"
    msg.header["buffers"][0] = {"dtype": "<f8", "shape": [1000]}  # says 8000 bytes, 1000 follow
    with pytest.raises(P.ProtocolError) as e:
        P.decode(P.encode(msg))
    assert e.value.code == "bad_envelope"
    msg.header["buffers"][0] = {"dtype": "O", "shape": [1000]}
    with pytest.raises(P.ProtocolError) as e:
        P.decode(P.encode(msg))
    assert e.value.code == "bad_envelope"
    big = [P.DELIMITER, b" " * (P.MAX_JSON_BYTES + 1), b"{}"]
    with pytest.raises(P.ProtocolError) as e:
        P.decode(big)
    assert e.value.code == "too_large"


def test_loopback_detection():
    for ep in ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:*", "tcp://localhost:1", "tcp://[::1]:5", "ipc:///tmp/x"):
        assert P.is_loopback(ep), ep
    for ep in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.1.2:5555", "tcp://eth0:5555", "tcp://127.0.0.1.evil:1"):
        assert not P.is_loopback(ep), ep


def test_domain_codes_are_wire_codes():
    classes = [errors.AVFaceError, *errors.AVFaceError.__subclasses__()]
    for cls in classes:
        assert cls.code in P.ERROR_CODES, f"{cls.__name__}.code {cls.code!r} missing from protocol.ERROR_CODES"


def test_protocol_doc_lists_every_type_and_code():
    doc = (REPO_ROOT / "docs" / "protocol.md").read_text()
    for name in [*P.MESSAGE_TYPES, *P.ERROR_CODES, *P.JOB_STATES]:
        assert f"`{name}`" in doc, f"docs/protocol.md does not mention `{name}`"
    assert P.PROTOCOL_VERSION in doc


def test_protocol_and_client_stand_alone(tmp_path):
    """Copied side by side (as the add-on vendors them) they import with no avface, torch or bpy."""
    for name in ("protocol.py", "client.py"):
        shutil.copy(REPO_ROOT / "backend" / "service" / name, tmp_path / name)
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] in ('avface', 'torch', 'bpy'):\n"
        "        raise ImportError('forbidden import ' + name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import client, protocol\n"
        "assert client.P is protocol\n"
        "c = client.Client('tcp://127.0.0.1:9', timeout_s=0.1, retries=0)\n"
        "c.close()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_server_side_imports_no_torch():
    code = ("import sys, avface.service.server, avface.service.cli, avface.service.loadtest\n"
            "assert 'torch' not in sys.modules, 'the socket loop imports torch'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
