"""Bodies that arrive in many small pieces: the filter must find `model` wherever it is and
forward the body intact.

HTTP/1.1 chunked transfer encoding written by hand on a raw socket (1-7 byte chunks, with
pauses so Envoy really reads them separately), and HTTP/2 with many small DATA frames.
"""

from __future__ import annotations

import json
import random
import socket
import time
import zlib

import pytest
from conftest import BACKEND_OF, LORA, PHI, QWEN, parse_http1

BIG_MESSAGES = [
    {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}: " + "lorem ipsum " * 40}
    for i in range(30)
]  # about 15 KB


def _body(model: str, where: str) -> bytes:
    if where == "start":
        doc = {"model": model, "messages": BIG_MESSAGES, "max_tokens": 4}
    elif where == "middle":
        doc = {"messages": BIG_MESSAGES, "model": model, "temperature": 0.5, "stop": ["x"] * 50, "max_tokens": 4}
    else:
        doc = {"messages": BIG_MESSAGES, "max_tokens": 4, "model": model}
    return json.dumps(doc).encode()


def _small_chunks(data: bytes, seed: int):
    rng = random.Random(seed)
    i = 0
    while i < len(data):
        n = rng.randint(1, 7)
        yield data[i : i + n]
        i += n


def _read_response(sock: socket.socket, timeout: float = 30.0) -> tuple[int, dict, bytes]:
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        part = sock.recv(65536)
        if not part:
            break
        data += part
    return parse_http1(data)


@pytest.mark.parametrize("model", [QWEN, PHI, LORA])
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_http1_chunked_tiny_chunks(envoy, model, where):
    body = _body(model, where)
    with socket.create_connection(("127.0.0.1", envoy.port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        for n, piece in enumerate(_small_chunks(body, seed=zlib.crc32(f"{model}|{where}".encode()))):
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            if n % 40 == 0:
                time.sleep(0.001)  # let Envoy read (and hand the filter) a partial body
        s.sendall(b"0\r\n\r\n")
        status, headers, resp = _read_response(s)
    assert status == 200, (status, resp[:300])
    assert headers["x-mock-backend"] == BACKEND_OF[model]
    assert headers["x-echo-model-name"] == model
    assert headers["x-echo-request-body-bytes"] == str(len(body)), "body altered on the way"
    assert json.loads(resp)["model"] == model


@pytest.mark.parametrize("model", [QWEN, PHI, LORA])
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_http2_many_small_data_frames(envoy, model, where):
    body = _body(model, where)

    def frames():
        for n, piece in enumerate(_small_chunks(body, seed=len(body))):
            if n % 200 == 0:
                time.sleep(0.001)
            yield piece

    client = envoy.client(http2=True)
    r = client.post("/v1/chat/completions", content=frames(), headers={"content-type": "application/json"})
    assert r.http_version == "HTTP/2"
    assert r.status_code == 200, r.text
    assert r.headers["x-mock-backend"] == BACKEND_OF[model]
    assert r.headers["x-echo-model-name"] == model
    assert r.headers["x-echo-request-body-bytes"] == str(len(body))
    assert r.json()["model"] == model


def test_http1_chunked_split_inside_model_value(envoy):
    """Chunk boundaries inside the key, the colon and the escaped value itself."""
    body = (
        b'{"messages": [{"role": "user", "content": "hi"}], "mo' + b'del"' + b" : " + b'"Qwen\\/Qwen2.5-3B-Instruct"}'
    )
    pieces = [body[i : i + 1] for i in range(len(body))]  # one byte per chunk
    with socket.create_connection(("127.0.0.1", envoy.port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        for piece in pieces:
            s.sendall(b"1\r\n%s\r\n" % piece)
            time.sleep(0.0005)
        s.sendall(b"0\r\n\r\n")
        status, headers, resp = _read_response(s)
    assert status == 200, resp[:300]
    assert headers["x-mock-backend"] == BACKEND_OF[QWEN]
    assert headers["x-echo-base-model-name"] == QWEN
