"""HTTP/2 requests whose body ends with trailers.

The last DATA frame of such a request does not carry END_STREAM: the trailers do, so the
filter's body callback never sees end_of_stream and the verdict comes from its trailers
callback. Routed requests must reach the right backend, broken ones get their error, and
nothing stalls.
"""

from __future__ import annotations

import json
import select
import socket
import time

import h2.config
import h2.connection
import h2.events
import pytest
from conftest import BACKEND_OF, LORA, PHI, QWEN, totals


def h2_post_with_trailers(port: int, body: bytes, timeout: float = 20.0) -> tuple[int, dict, bytes]:
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    status, headers, resp = None, {}, b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(
            sid,
            [(":method", "POST"), (":path", "/v1/completions"), (":scheme", "http"),
             (":authority", "gateway"), ("content-type", "application/json")],
        )
        # Two DATA frames, neither ending the stream, then the trailers that do.
        half = len(body) // 2
        conn.send_data(sid, body[:half])
        conn.send_data(sid, body[half:])
        conn.send_headers(sid, [("x-request-checksum", "abc")], end_stream=True)
        s.sendall(conn.data_to_send())
        deadline = time.monotonic() + timeout
        ended = False
        while not ended and time.monotonic() < deadline:
            ready, _, _ = select.select([s], [], [], 0.5)
            if not ready:
                continue
            data = s.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    headers = dict(ev.headers)
                    status = int(headers[":status"])
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    resp += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) and ev.stream_id == sid:
                    ended = True
            s.sendall(conn.data_to_send())
    assert status is not None, "no response before the timeout: the request stalled"
    return status, headers, resp


@pytest.mark.parametrize("model", [QWEN, PHI, LORA])
def test_routed_when_trailers_end_the_body(envoy, model):
    body = json.dumps({"prompt": "hello " * 50, "max_tokens": 2, "model": model}).encode()
    status, headers, resp = h2_post_with_trailers(envoy.port, body)
    assert status == 200, resp[:300]
    assert headers.get("x-mock-backend") == BACKEND_OF[model]
    assert json.loads(resp)["model"] == model


@pytest.mark.parametrize(
    "body,code",
    [(b'{"prompt": "x", "model": "Qwen/Qwen2.5-3B-Instruct"', "invalid_json"),
     (b'{"prompt": "x"}', "missing_model"),
     (b'{"model": "gpt-4o"}', "model_not_found")],
)
def test_refused_when_trailers_end_the_body(envoy, backends, body, code):
    before = totals(backends)
    status, _, resp = h2_post_with_trailers(envoy.port, body)
    assert json.loads(resp)["error"]["code"] == code, resp[:300]
    assert status in (400, 404)
    assert totals(backends) == before
