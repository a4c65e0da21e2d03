"""`routeBeforeBodyEnds`: the request goes upstream as soon as `model` is read.

A client sends a 4 MiB body slowly, `model` first. Envoy's `upstream_rq_total` for the model's
cluster shows when the upstream request starts: with the option on, while the client is still
sending; by default only after the last byte (the filter holds the request for its whole-body
checks). The time to the first upstream request is printed for both.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
from conftest import QWEN, backend_ports, filter_config_with, read_http1_until_close, set_filter_config

BODY_BYTES = 4 * 1024 * 1024
SLICES = 16
PAUSE_S = 0.1  # between slices: the whole body takes ~1.6 s to send


def slow_body() -> bytes:
    head = json.dumps({"model": QWEN, "max_tokens": 2, "prompt": ""})[:-2]  # ..."prompt": "
    pad = BODY_BYTES - len(head) - 2
    return (head + "x" * pad + '"}').encode()


@pytest.fixture(scope="module")
def early_envoy(envoy_factory, backends):
    return envoy_factory(
        backend_ports(backends),
        mutate=lambda c: set_filter_config(c, filter_config_with(routeBeforeBodyEnds=True)),
        name="route-before-body-ends",
    )


def send_slowly(env) -> tuple[float, float, int, bytes]:
    """Sends the body in slices, watching the cluster's upstream_rq_total; returns (seconds
    until it moved, seconds until the last byte was sent, status, response body)."""
    body = slow_body()
    stat = "cluster.qwen-vllm.upstream_rq_total"
    before = env.stat(stat)
    started = time.monotonic()
    first_upstream = None

    def check() -> None:
        nonlocal first_upstream
        if first_upstream is None and env.stat(stat) > before:
            first_upstream = time.monotonic() - started

    with socket.create_connection(("127.0.0.1", env.port), timeout=30) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        step = len(body) // SLICES
        for i in range(SLICES - 1):
            s.sendall(body[i * step : (i + 1) * step])
            time.sleep(PAUSE_S)
            check()
        last_byte = time.monotonic() - started
        s.sendall(body[(SLICES - 1) * step :])
        status, _, resp = read_http1_until_close(s)
    check()
    assert first_upstream is not None, "the upstream request never started"
    return first_upstream, last_byte, status, resp


def test_upstream_starts_before_the_body_ends(early_envoy):
    first, last_byte, status, resp = send_slowly(early_envoy)
    print(f"\nrouteBeforeBodyEnds=true: upstream request after {first:.2f} s; last byte sent at {last_byte:.2f} s")
    assert status == 200, resp[:300]
    assert json.loads(resp)["model"] == QWEN
    # `model` is in the first slice: the upstream request starts while the client still sends.
    assert first < last_byte / 2, (first, last_byte)


def test_default_holds_the_request_until_the_body_ends(envoy):
    first, last_byte, status, resp = send_slowly(envoy)
    print(f"\nrouteBeforeBodyEnds=false: upstream request after {first:.2f} s; last byte sent at {last_byte:.2f} s")
    assert status == 200, resp[:300]
    assert first >= last_byte, (first, last_byte)
