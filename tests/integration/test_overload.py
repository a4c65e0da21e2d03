"""A flood of slow 8 MB uploads must not take the gateway down.

envoy/envoy.yaml as shipped (1 GiB fixed_heap budget, the overload actions, the HTTP/2 caps),
one Envoy per flood so that memory figures are its own. Each flood: 300 uploads of 8 MB
that hold back their last 16 bytes, started over 2 s and held 6 s, while a prober sends small
chat requests on fresh connections (tests/flood.py). Checked:

- Envoy's peak RSS stays under the budget plus MARGIN (per protocol: see there), and under
  its RSS at rest plus the filter's held-body budget (maxHeldBodyBytes) plus a margin;
- the small requests keep succeeding (MIN_SUCCESS, per protocol), and those that fail get
  the 503 gateway_overloaded JSON;
- every flood request ends cleanly: a reset, a 503 gateway_overloaded or 408
  request_timeout JSON, or still held when the client gives up; never another answer;
- Envoy does not crash, the wasm VM is not replaced (its stats do not move), the filter holds
  no request any more afterwards (bbr_bodies_in_progress back to 0);
- the heap in use comes back down after the flood (the RSS is printed, not asserted).

The figures are printed (pytest -s shows them) and are docs/reliability.md's flood figures.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from conftest import (
    PHI,
    QWEN,
    assert_routed,
    backend_ports,
    chat_body,
    hcm,
    load_envoy_yaml,
    ENVOY_K8S_YAML,
    log_size,
    wasm_failure_lines,
    wasm_vm_stats,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flood  # noqa: E402  (tests/flood.py)

MIB = flood.MIB
UPLOADS = 300
# Allowance above the budget, per protocol. The fixed_heap monitor counts tcmalloc's heap in
# use; the RSS also holds V8 and the binary (~100 MiB at rest), pages freed but still mapped,
# and what arrives between two 100 ms samples. HTTP/2 streams are reset by buffered memory and
# stay close to the budget (measured peak 1009-1051 MiB for a 1 GiB budget). HTTP/1.1 streams
# cannot be (Envoy does not account their memory: envoyproxy/envoy#29581): only new requests
# are refused and uploads in progress cut at 95 %, and the measured peaks were 1.2-2.2 GiB
# for 300 uploads of 8 MB (2.4 GB unprotected).
MARGIN = {"http2": 256 * MIB, "http1": 1280 * MIB}
# Before that: the filter's own budget (maxHeldBodyBytes per worker, 256 MiB by default; these
# Envoys run one worker) sheds large bodies past it, over both protocols, so the peak stays
# near the RSS at rest plus that budget (measured 392 MiB over HTTP/1.1, 386 MiB over HTTP/2,
# against 1974-2232 and 1009-1067 MiB with Envoy's overload manager alone).
FILTER_BUDGET_MARGIN = 192 * MIB
# Small requests during the flood: the filter sheds only bodies over shedBodiesOverBytes
# (1 MiB), so small requests go on over both protocols (measured 100 % each). With Envoy's
# overload manager alone, HTTP/1.1 reached its refusal threshold and small requests got 3-97 %.
MIN_SUCCESS = {"http2": 0.95, "http1": 0.95}
RECOVERY_SECONDS = 30.0
# After the flood tcmalloc's heap in use must be back near where it was. The RSS is only
# printed: tcmalloc gives freed pages back slowly or not at all despite the background
# release (memory_allocator_manager); measured 30 s after a flood: 438-656 MiB after
# HTTP/1.1, 900-960 MiB after HTTP/2. Those pages are reused by the next flood and are not
# counted as pressure.
ALLOCATED_ABOVE_START = 64 * MIB
CLEAN = {"reset", "held", "json:503:gateway_overloaded", "json:408:request_timeout"}


def budget(cfg: dict) -> int:
    for m in cfg["overload_manager"]["resource_monitors"]:
        if m["name"] == "envoy.resource_monitors.fixed_heap":
            return int(m["typed_config"]["max_heap_size_bytes"])
    raise AssertionError("no fixed_heap monitor")


def filter_budget(cfg: dict) -> int:
    """The filter's maxHeldBodyBytes (its default when the configuration does not set it)."""
    for f in hcm(cfg)["http_filters"]:
        if f["name"] == "envoy.filters.http.wasm":
            conf = json.loads(f["typed_config"]["config"]["configuration"]["value"])
            return int(conf.get("maxHeldBodyBytes", 256 * MIB))
    raise AssertionError("no wasm filter")


def allocated(env) -> int:
    """tcmalloc's bytes in use (admin /memory)."""
    return int(json.loads(env.admin("/memory"))["allocated"])


def bodies_in_progress(env) -> int:
    return env.stat("wasmcustom.bbr_bodies_in_progress")


def probe(client: httpx.Client) -> httpx.Response:
    r = client.post("/v1/chat/completions", json=chat_body(PHI))
    if r.status_code == 200:
        assert_routed(r, PHI)
    return r


def check_flood(env, f: flood.Flood, vm_before: dict, log_from: int, protocol: str) -> None:
    print(f"\n[{protocol} flood] {f.summary()}")
    limit = budget(env.config)
    assert env.proc.alive(), f"Envoy died during the flood: {f.summary()}"
    assert f.peak_rss <= limit + MARGIN[protocol], f"peak RSS {f.peak_rss / MIB:.0f} MiB over budget + margin: {f.summary()}"
    held_budget = filter_budget(env.config)
    assert f.peak_rss <= f.rss_before + held_budget + FILTER_BUDGET_MARGIN, (
        f"peak RSS {f.peak_rss / MIB:.0f} MiB: more than the filter's held-body budget "
        f"({held_budget / MIB:.0f} MiB) above the RSS at rest: {f.summary()}"
    )
    assert f.outcomes.get("json:503:gateway_overloaded", 0) > 0, f"the filter shed nothing: {f.summary()}"
    assert set(f.outcomes) <= CLEAN, f"flood requests that did not fail cleanly: {f.summary()}"
    held = f.outcomes.get("held", 0)
    assert held < UPLOADS, f"nothing was cut off: {f.summary()}"
    assert f.probe.sent >= 3, f.summary()  # one at a time, from Python, on a loaded machine
    assert f.probe.rate >= MIN_SUCCESS[protocol], f.summary()
    assert set(f.probe.failures) <= {"json:503:gateway_overloaded"}, f.summary()
    assert wasm_vm_stats(env) == vm_before, "the wasm VM was replaced or failed"
    assert wasm_failure_lines(env, since=log_from) == []
    deadline = time.monotonic() + 10
    while bodies_in_progress(env) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert bodies_in_progress(env) == 0, "the filter still counts requests of the closed flood"
    allocated_before = f.allocated_before
    deadline = time.monotonic() + RECOVERY_SECONDS
    while allocated(env) > allocated_before + ALLOCATED_ABOVE_START and time.monotonic() < deadline:
        time.sleep(0.5)
    now = allocated(env)
    reached, rss, waited = flood.wait_rss_below(env.proc.pid, f.rss_before + 256 * MIB, max(1.0, deadline - time.monotonic()))
    print(
        f"[{protocol} flood] after: heap in use {now / MIB:.0f} MiB (before {allocated_before / MIB:.0f}); "
        f"RSS {rss / MIB:.0f} MiB (before {f.rss_before / MIB:.0f}, peak {f.peak_rss / MIB:.0f})"
    )
    assert now <= allocated_before + ALLOCATED_ABOVE_START, f"heap in use {now / MIB:.0f} MiB after the flood"
    # And the gateway serves normally again.
    with httpx.Client(base_url=env.url, timeout=10.0) as c:
        for _ in range(5):
            assert_routed(c.post("/v1/chat/completions", json=chat_body(PHI)), PHI)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("protocol", ["http1", "http2"])
def test_flood_of_held_uploads(envoy_factory, backends, protocol):
    env = envoy_factory(backend_ports(backends), name=f"flood-{protocol}")
    vm_before, log_from = wasm_vm_stats(env), log_size(env)
    allocated_before = allocated(env)
    f = flood.run_flood(
        env.port,
        env.proc.pid,
        QWEN,
        probe,
        uploads=UPLOADS,
        http2_connections=3 if protocol == "http2" else 0,
        ramp_seconds=2.0,
        hold_seconds=6.0,
    )
    f.allocated_before = allocated_before
    if protocol == "http2":
        assert f.max_concurrent_streams == [100, 100, 100], f.max_concurrent_streams
    check_flood(env, f, vm_before, log_from, protocol)
    env.stop()


# --------------------------------------------------------------------------------------
# A reset in the middle of a body leaves nothing behind in the filter
# --------------------------------------------------------------------------------------


def _wait_gauge(env, want: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = bodies_in_progress(env)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_reset_in_the_middle_of_a_body_leaves_no_state(envoy, backends):
    """Uploads cut off mid-body, by the client closing an HTTP/1.1 connection and by an
    HTTP/2 RST_STREAM: while they are held the gauge counts them, after the reset it is back
    to its value before (the context and its scanner were dropped), and the gateway routes."""
    assert _wait_gauge(envoy, 0) == 0
    body = flood.upload_body(QWEN, 1_000_000)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    socks = []
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", envoy.port), timeout=10)
        s.sendall(head + body[: len(body) // 2])
        socks.append(s)

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2sock = socket.create_connection(("127.0.0.1", envoy.port), timeout=10)
    conn.initiate_connection()
    sids = []
    for _ in range(5):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(
            sid,
            [(":method", "POST"), (":scheme", "http"), (":authority", "gw"), (":path", "/v1/completions"),
             ("content-type", "application/json"), ("content-length", str(len(body)))],
        )
        conn.send_data(sid, body[:10_000])  # 5 x 10 kB: within the initial 64 KiB windows
        sids.append(sid)
    h2sock.sendall(conn.data_to_send())

    assert _wait_gauge(envoy, 10) == 10, "the held uploads are not counted"
    for s in socks:
        s.close()
    for sid in sids:
        conn.reset_stream(sid)
    h2sock.sendall(conn.data_to_send())
    assert _wait_gauge(envoy, 0) == 0, "state left behind by reset streams"
    h2sock.close()
    with httpx.Client(base_url=envoy.url, timeout=10.0) as c:
        assert_routed(c.post("/v1/chat/completions", json=chat_body(PHI)), PHI)


# --------------------------------------------------------------------------------------
# The shipped configs
# --------------------------------------------------------------------------------------


def test_http2_window_is_the_buffer_limit_and_both_configs_agree():
    """Envoy's per-stream buffer limit on HTTP/2 is the stream window: below the listener's
    limit, HTTP/2 bodies would get a 413 long before maxBodyBytes. And envoy-k8s.yaml carries
    the same protection as envoy.yaml (only the connection cap differs)."""
    local, k8s = load_envoy_yaml(), load_envoy_yaml(ENVOY_K8S_YAML)
    for cfg in (local, k8s):
        limit = cfg["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"]
        h2o = hcm(cfg)["http2_protocol_options"]
        assert h2o["initial_stream_window_size"] == limit
        assert h2o["max_concurrent_streams"] == 100
    strip = lambda om: {**om, "resource_monitors": [m for m in om["resource_monitors"] if "downstream_connections" not in m["typed_config"]["@type"]]}
    assert strip(local["overload_manager"]) == strip(k8s["overload_manager"])
    assert local["memory_allocator_manager"] == k8s["memory_allocator_manager"]
    assert hcm(local)["http2_protocol_options"] == hcm(k8s)["http2_protocol_options"]


def test_http2_body_of_seven_mib_is_routed(envoy, backends):
    """The HTTP/2 caps keep large bodies working: 7 MiB over h2c reaches its pool."""
    body = chat_body(QWEN, messages=[{"role": "user", "content": "x" * (7 * MIB)}])
    with httpx.Client(base_url=envoy.url, http1=False, http2=True, timeout=30.0) as c:
        assert_routed(c.post("/v1/chat/completions", json=body), QWEN)
