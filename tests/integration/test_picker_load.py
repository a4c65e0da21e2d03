"""The endpoint picker with the servers' own load (prefixAffinity.picker.serverMetrics): each
host's /metrics read by one scraper per Envoy process, through the pool's cluster (its
override_host policy sends the call to the host named), and what goes wrong with a scrape
(a hang, garbage, a page past the cap, a 404) never holds a request up: that host falls back
to the gateway's in-flight counts, and the counters say so.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from conftest import QWEN, free_port
from test_picker import SEEN, chat, counter, tenant_messages
from test_picker_cluster import BOUND_S, picker_cluster_envoy

METRICS = {"serverMetrics": {"intervalMs": 50, "timeoutMs": 300, "maxBytes": 8192}}


def long_request(port: int, i: int) -> int:
    """A request straight to a replica, around the gateway: 60 tokens at 50 ms each."""
    body = {"model": QWEN, "max_tokens": 60, "messages": [{"role": "user", "content": f"outside {i}"}]}
    return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60.0).status_code


def _tagged(env, name: str, outcome: str) -> int:
    """A counter with an outcome tag, from /stats (Envoy prints the tag inside the name)."""
    for line in env.admin(f"/stats?filter={name}").splitlines():
        key, _, value = line.rpartition(": ")
        if name in key and f"={outcome};" in key and value.strip().isdigit():
            return int(value)
    return 0


def metrics_of(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0).text


def gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}")


def test_a_replica_with_a_long_queue_from_outside_gets_clearly_fewer(mock_factory, envoy_factory, backends):
    """Replica q-1 runs 2 requests at a time (vLLM's --max-num-seqs) and is sent 14 long ones
    straight, around the gateway: 12 wait. This Envoy has nothing in flight there, so its
    in-flight counts alone would give q-1 a third of the new requests; its server reports the
    queue, and it gets almost none while the queue lasts."""
    engine = ("--ttft-ms", "5", "--itl-ms", "50", "--prefill-tokens-per-s", "1000000", "--max-num-seqs", "2")
    replicas = [mock_factory(QWEN, rid, extra=engine) for rid in ("q-1", "q-2", "q-3")]
    env = picker_cluster_envoy(envoy_factory, backends, replicas, "picker-queue", kind="STATIC",
                               picker_extra=METRICS)
    busy = replicas[0]
    time.sleep(BOUND_S)
    with ThreadPoolExecutor(max_workers=14) as outside:
        direct = [outside.submit(long_request, busy.port, i) for i in range(14)]
        deadline = time.monotonic() + 5
        while gauge(metrics_of(busy.port), "vllm:num_requests_waiting") < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gauge(metrics_of(busy.port), "vllm:num_requests_waiting") >= 10
        time.sleep(0.3)  # two scrapes
        where = []
        with httpx.Client(base_url=env.url, timeout=60.0) as client:
            def one(i):
                r = chat(client, tenant_messages(20000 + i, "Queued?"))
                return r.status_code, r.headers.get("x-mock-backend")

            with ThreadPoolExecutor(max_workers=3) as ex:
                results = list(ex.map(one, range(24)))
        assert all(code == 200 for code, _ in results), results
        where = [b for _, b in results]
        assert [f.result() for f in direct] == [200] * 14
    counts = {m.id: where.count(m.id) for m in replicas}
    # A third would be 8 of 24.
    assert counts["q-1"] <= 2, counts
    assert _tagged(env, "bbr_picker_metric_scrapes_total", "ok") > 0


class FaultyReplica(ThreadingHTTPServer):
    """A stand-in replica whose /metrics fails one way (`mode`) and which answers chat requests
    at once (as `fault-<mode>`) and /health with 200."""

    daemon_threads = True

    def __init__(self, mode: str):
        self.mode = mode
        self.stop_event = threading.Event()
        super().__init__(("127.0.0.1", free_port()), FaultyHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def id(self) -> str:
        return f"fault-{self.mode}"

    @property
    def port(self) -> int:
        return self.server_address[1]

    def stop(self) -> None:
        self.stop_event.set()
        self.shutdown()
        self.server_close()


class FaultyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-mock-backend", self.server.id)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        try:
            self.get()
        except (BrokenPipeError, ConnectionResetError):
            pass  # Envoy gave up on the call (its timeout): expected for `hang`.

    def get(self):
        mode = self.server.mode
        if self.path == "/health":
            return self.reply(200, b"")
        if self.path != "/metrics":
            return self.reply(404, b"")
        if mode == "hang":
            # Bounded: the test stops the server, which ends the wait.
            self.server.stop_event.wait(30)
            return
        if mode == "garbage":
            return self.reply(200, b"vllm:num_requests_waiting{model_name=\"x\" 3\n\xff\xfe not a page\n")
        if mode == "huge":
            line = b"vllm:num_requests_running{model_name=\"x\"} 0\n"
            return self.reply(200, b"# padding\n" * 2000 + line)
        return self.reply(404, b"not found")

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        self.rfile.read(length)
        body = b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"length"}]}'
        self.reply(200, body, "application/json")


@pytest.fixture
def faulty():
    servers = [FaultyReplica(mode) for mode in ("hang", "garbage", "huge", "404")]
    yield servers
    for s in servers:
        s.stop()


def test_failed_scrapes_never_stall_a_request_and_are_counted(mock_factory, envoy_factory, backends, faulty):
    good = mock_factory(QWEN, "fault-good", extra=("--ttft-ms", "5"))
    replicas = [good] + faulty
    env = picker_cluster_envoy(envoy_factory, backends, replicas, "picker-faults", kind="STATIC",
                               picker_extra=METRICS)
    time.sleep(BOUND_S + 0.5)
    with httpx.Client(base_url=env.url, timeout=30.0) as client:
        where, slowest = [], 0.0
        for i in range(30):
            t = time.monotonic()
            r = chat(client, tenant_messages(30000 + i, "Faults?"))
            slowest = max(slowest, time.monotonic() - t)
            assert r.status_code == 200, r.text[:300]
            where.append(r.headers["x-mock-backend"])
    # Every host served (the picker falls back to in-flight counts, ties rotating), none waited
    # on a scrape: the slowest answer is far below the hang or the scrape timeout.
    assert set(where) == {"fault-good", "fault-hang", "fault-garbage", "fault-huge", "fault-404"}, where
    assert slowest < 0.25, slowest
    outcomes = {o: _tagged(env, "bbr_picker_metric_scrapes_total", o)
                for o in ("ok", "timeout", "garbage", "too_large", "http_error")}
    assert all(outcomes[o] > 0 for o in outcomes), outcomes
    # One fallback per host that went without a report (4), counted once per change.
    fallbacks = counter(env, "bbr_picker_load_fallback_total")
    assert 4 <= fallbacks <= 8, fallbacks


def test_mock_vllm_background_load_queues_and_reports_like_vllm(mock_factory):
    """mock-vllm's --background-load: requests from outside any gateway, which queue behind
    --max-num-seqs and show in /metrics as vLLM reports them (waiting, running, KV use)."""
    m = mock_factory(QWEN, "bg-1", extra=("--max-num-seqs", "2", "--background-load", "3", "--background-ms", "5000"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = metrics_of(m.port)
        if gauge(text, "vllm:num_requests_running") == 2:
            break
        time.sleep(0.05)
    assert gauge(text, "vllm:num_requests_running") == 2, text
    assert gauge(text, "vllm:num_requests_waiting") == 1, text
    assert gauge(text, "vllm:kv_cache_usage_perc") == 1.0, text
    # A request through it now waits for a slot: the background ones hold both for 5 s.
    t = time.monotonic()
    r = httpx.post(f"{m.url}/v1/completions", json={"model": QWEN, "prompt": "x", "max_tokens": 1}, timeout=30.0)
    assert r.status_code == 200
    assert time.monotonic() - t > 1.0
