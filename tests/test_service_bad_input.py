"""Bad input, each answered with an error code while the server keeps serving: broken
envelopes, wrong versions and types, oversized frames, paths outside the roots, job ids
that try to leave the data dir, corrupt media, no face, every limit, and a fuzz loop."""
from __future__ import annotations

import json
import socket
import subprocess

import numpy as np
import pytest
from service_util import ServerProcess, fake_clip, make_server, send_raw, wait_for  # noqa: F401

from avface.service import protocol as P
from avface.service.client import ServiceError

MAX_FRAME = 64 << 10


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("bad-input")
    (work / "root").mkdir()
    s = ServerProcess(work, roots=(work / "root",), args=("--max-frame-bytes", str(MAX_FRAME))).start()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    c = server.client()
    yield c
    assert c.hello()["server"] == "avface", "the server stopped serving"  # every test: still serving
    assert server.proc.poll() is None


def raw(client, frames) -> P.Message:
    reply = send_raw(client, frames)
    assert reply.msg_type == "error" and reply.content["status"] == "error"
    assert reply.content["code"] in P.ERROR_CODES
    return reply


def frames_of(msg: P.Message) -> list:
    return [bytes(f) for f in P.encode(msg)]


def test_malformed_envelopes(client):
    assert raw(client, [b"just garbage"]).content["code"] == "bad_envelope"
    assert raw(client, [P.DELIMITER, b"{not json", b"{}"]).content["code"] == "bad_envelope"
    msg = P.build("hello")
    f = frames_of(msg)
    reply = raw(client, f[:2])  # no content frame
    assert reply.content["code"] == "bad_envelope"
    reply = raw(client, [f[0], f[1], b"[]"])
    assert reply.content["code"] == "bad_envelope" and reply.parent_id == msg.msg_id
    reply = raw(client, f + [b"an undeclared buffer"])
    assert reply.content["code"] == "bad_envelope"


def test_wrong_protocol_version(client):
    msg = P.build("hello")
    msg.header["version"] = "2.0"
    reply = raw(client, frames_of(msg))
    assert reply.content["code"] == "version_mismatch" and reply.parent_id == msg.msg_id
    assert "2.0" in reply.content["message"] and P.PROTOCOL_VERSION in reply.content["message"]


def test_unknown_message_type(client):
    msg = P.build("hello")
    msg.header["msg_type"] = "format_disk"
    reply = raw(client, frames_of(msg))
    assert reply.content["code"] == "unknown_type" and reply.parent_id == msg.msg_id
    msg = P.build("hello_reply")  # a reply type is not a request
    assert raw(client, frames_of(msg)).content["code"] == "unknown_type"


def test_oversized_frame(client):
    job_id = client.call("submit", {"video": {"upload": {"size": MAX_FRAME + 1, "name": "big.mp4"}}})["job_id"]
    with pytest.raises(ServiceError) as e:
        client.call("upload", {"job_id": job_id, "part": "video", "offset": 0}, buffers=[b"x" * (MAX_FRAME + 1)])
    assert e.value.code == "too_large"
    with pytest.raises(ServiceError) as e:
        client.call("status", {"job_id": job_id, "pad": "x" * (P.MAX_JSON_BYTES + 10)})
    assert e.value.code == "too_large"
    # the server still takes a normal chunk afterwards
    assert client.call("upload", {"job_id": job_id, "part": "video", "offset": 0}, buffers=[b"x" * 100])["received"] == 100
    client.cancel(job_id)


def test_paths_outside_the_roots(server, client, tmp_path):
    root = server.work / "root"
    outside = fake_clip(tmp_path)  # a real file, but not under the root
    (root / "link.json").symlink_to(outside)
    cases = {
        str(outside): "path_not_allowed",
        str(root / ".." / outside.name): "path_not_allowed",
        str(root / "link.json"): "path_not_allowed",  # a symlink out of the root
        "/etc/passwd": "path_not_allowed",
        "relative/clip.json": "path_not_allowed",
        str(root / "missing.mp4"): "not_found",
        str(root): "not_found",  # a folder is not a video
    }
    for path, code in cases.items():
        with pytest.raises(ServiceError) as e:
            client.call("submit", {"video": {"path": path}})
        assert e.value.code == code, path
    with pytest.raises(ServiceError) as e:
        client.call("submit", {"video": {"path": str(fake_clip(root))}, "audio": {"path": "/etc/hostname"}})
    assert e.value.code == "path_not_allowed"
    with pytest.raises(ServiceError) as e:
        client.call("submit", {"video": {"path": str(fake_clip(root))}, "options": {"flame_dir": "/etc"}})
    assert e.value.code == "path_not_allowed"


@pytest.mark.parametrize("job_id", ["../../etc/passwd", "../" + "a" * 29, "a" * 31 + "/", "A" * 32, "", 42, None])
def test_job_ids_cannot_escape_the_data_dir(client, job_id):
    for msg_type in ("status", "cancel", "fetch", "delete", "watch"):
        with pytest.raises(ServiceError) as e:
            client.call(msg_type, {"job_id": job_id})
        assert e.value.code == "bad_job_id", (msg_type, job_id)


def test_fetch_names_only_files_of_the_result(server, client):
    job_id = client.submit(fake_clip(server.work / "root", steps=1))
    server.wait_state(client, job_id, P.DONE)
    for path in ("../job.json", "/etc/passwd", "manifest.json", "detail", 7):
        with pytest.raises(ServiceError) as e:
            client.call("fetch", {"job_id": job_id, "path": path})
        assert e.value.code in ("not_found", "bad_request"), path
    with pytest.raises(ServiceError) as e:
        client.call("status", {"job_id": "f" * 32})
    assert e.value.code == "unknown_job"


def test_bad_requests_and_options(server, client):
    clip = str(fake_clip(server.work / "root"))
    cases = [
        ({}, "bad_request"),
        ({"video": "just a string"}, "bad_request"),
        ({"video": {"path": clip, "upload": {"size": 1}}}, "bad_request"),
        ({"video": {"upload": {"size": -1}}}, "bad_request"),
        ({"video": {"upload": {"size": 10, "sha256": "abc"}}}, "bad_request"),
        ({"video": {"path": clip}, "options": {"colour": "red"}}, "bad_input"),
        ({"video": {"path": clip}, "options": {"frame_start": True}}, "bad_input"),
        ({"video": {"path": clip}, "options": {"frame_start": 10, "frame_end": 5}}, "bad_input"),
        ({"video": {"path": clip}, "transcript": 5}, "bad_request"),
    ]
    for content, code in cases:
        with pytest.raises(ServiceError) as e:
            client.call("submit", content)
        assert e.value.code == code, content
    with pytest.raises(ServiceError) as e:
        client.call("watch", {"job_id": "a" * 32, "since": "zero"})
    assert e.value.code in ("unknown_job", "bad_request")


def test_corrupt_video_and_no_face(server, client):
    root = server.work / "root"
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(1).bytes(5000))
    job_id = client.submit(corrupt)
    job = server.wait_state(client, job_id, P.FAILED)
    assert job["error"]["code"] == "bad_media" and job["attempts"] == 1  # a domain error is not retried
    job_id = client.submit(fake_clip(root, "noface.json", fail="no_face"))
    job = server.wait_state(client, job_id, P.FAILED)
    assert job["error"]["code"] == "no_face" and job["attempts"] == 1
    with pytest.raises(ServiceError) as e:
        client.call("fetch", {"job_id": job_id})
    assert e.value.code == "not_ready" and "no_face" in e.value.message
    with pytest.raises(ServiceError) as e:  # the client library reports the job's own error
        client.fetch(job_id, root / "out")
    assert e.value.code == "no_face"


def test_fuzz_1000_random_frames(server, client):
    rng = np.random.default_rng(1234)
    sock = client.socket
    answers = 0
    header = P.dumps(P.build("hello").header)
    for i in range(1000):
        n = int(rng.integers(1, 5))
        frames = [rng.bytes(int(rng.integers(0, 300))) for _ in range(n)]
        if i % 10 == 0:  # sometimes a delimiter and a plausible header, to get past the first check
            frames = [P.DELIMITER, header if i % 20 == 0 else frames[0], *frames[1:]]
        sock.send_multipart(frames)
        while sock.poll(0):
            sock.recv_multipart()
            answers += 1
    for _ in range(2000):  # bounded drain of the remaining error replies
        if not sock.poll(200):
            break
        sock.recv_multipart()
        answers += 1
    assert answers >= 990  # every message is answered (a REQ-like empty first frame may be routing)
    # and raw garbage on a plain TCP connection does not hurt either
    host, port = server.address.replace("tcp://", "").rsplit(":", 1)
    for _ in range(5):
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(rng.bytes(4096))
    stats = client.stats()
    assert stats["errors"]["bad_envelope"] >= 900


def test_queue_full(make_server, tmp_path):
    server = make_server(args=("--max-queue", "2"))
    client = server.client()
    gate = str(tmp_path / "gate")
    first = client.submit(fake_clip(tmp_path, "a.json", gate=gate))
    wait_for(lambda: client.status(first)["state"] == P.RUNNING)
    client.submit(fake_clip(tmp_path, "b.json"))
    client.call("submit", {"video": {"upload": {"size": 10, "name": "c.mp4"}}})  # uploading jobs wait too
    with pytest.raises(ServiceError) as e:
        client.submit(fake_clip(tmp_path, "d.json"))
    assert e.value.code == "queue_full"
    assert client.hello()["limits"]["max_queue"] == 2


def test_too_many_chunks_and_too_large_upload(make_server, tmp_path):
    server = make_server(args=("--max-chunks", "2", "--max-upload-bytes", "1000"))
    client = server.client()
    with pytest.raises(ServiceError) as e:
        client.call("submit", {"video": {"upload": {"size": 1001, "name": "v.mp4"}}})
    assert e.value.code == "too_large"
    job_id = client.call("submit", {"video": {"upload": {"size": 300, "name": "v.mp4"}}})["job_id"]
    for offset in (0, 100):
        client.call("upload", {"job_id": job_id, "part": "video", "offset": offset}, buffers=[b"x" * 100])
    with pytest.raises(ServiceError) as e:
        client.call("upload", {"job_id": job_id, "part": "video", "offset": 200}, buffers=[b"x" * 100])
    assert e.value.code == "too_many_chunks"
    job = client.status(job_id)
    assert job["state"] == P.FAILED and job["error"]["code"] == "too_many_chunks"


def test_too_long(make_server, tmp_path):
    import imageio_ffmpeg

    video = tmp_path / "long.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=10",
                    "-t", "3", "-pix_fmt", "yuv420p", str(video)], check=True)
    server = make_server(args=("--max-duration-s", "2"))
    client = server.client()
    # refused at submit, before any worker starts
    with pytest.raises(ServiceError) as e:
        client.submit(video)
    assert e.value.code == "too_long" and "3.0 s" in e.value.message
    # the frame range counts: the first 10 frames are 1 s
    job = server.wait_state(client, client.submit(video, options={"frame_end": 10}), (P.FAILED, P.DONE))
    assert job["error"] is None or job["error"]["code"] != "too_long"
    assert json.loads((server.data_dir / "jobs" / job["job_id"] / "job.json").read_text())["options"] == {"frame_end": 10}
