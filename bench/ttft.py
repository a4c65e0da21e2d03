#!/usr/bin/env python3
"""`make bench-ttft`: the time to first token of a stream through the gateway against straight
from the model server, to show whether the gateway (routing and token accounting) adds more
than 1 ms to it.

A single request's first token moves by more than 1 ms on a shared machine, and a real
model's by tens of ms, so no single pair says anything. The bench sends many requests in
interleaved rounds: straight to the server ("direct"), through the gateway with the
accounting on ("on", the shipped configuration), with it off ("off"), and through Envoy
without the filter ("plain", below), the order rotated through all 24 permutations. Each
round gives paired differences taken a few milliseconds apart, so slow drifts of the machine
cancel; the bench reports the median of each difference with a distribution-free confidence
interval (order statistics, at least 95 %), beside the medians of the four times.

Upstreams (BENCH_TTFT_BACKEND):
  mock   (default) mock-vllm streaming 8 tokens with a fixed 20 ms to the first and 2 ms
         between tokens: the server's own time is constant, so the differences are the
         gateway's added time to within the client's and the scheduler's noise;
  llama  llama-server with SmolLM2-135M-Instruct (tests/llama_pool.py; built once by
         scripts/llama-deps.sh), 4 tokens per stream, the prompt cached after the warm-up:
         the real model, whose own spread is tens of ms.

A fourth target, "plain", is the same Envoy with no wasm filter at all, its one route sending
every request to the pool's cluster: plain - direct is what Envoy itself adds (its codec, the
upstream connection, the event loop), off - plain what the routing filter adds, on - off what
the token accounting adds. The target is on - direct; the others say where it goes.

The client is the same for all four: one keep-alive HTTP/1.1 connection per target (no
connect in the timed part), the request written whole, the clock read when the request is
sent and when the bytes holding the first event with content arrive (the first non-empty
`delta.content`, as the filter's histogram and tests/llama's client read it); the rest of the
stream is read to its end before the next request. The gateway is one Envoy (--concurrency 1)
with the shipped configuration, two listeners (accounting on, off), each its own VM, and the
plain listener.

Environment: BENCH_TTFT_BACKEND (mock | llama), BENCH_TTFT_PAIRS (rounds of the four; default 300
for the mock, 150 for llama), BENCH_OUT (default bench/results; writes ttft-<backend>.json and .md),
BENCH_TTFT_FLOOR=1 (two more targets, bench/floor-filter's logic-free module in place of the
filter: "pass", in the chain doing nothing, and "buffer", the request held until its body ends;
they split off - plain into the VM in the chain, holding the body, and the filter's own work).
"""

from __future__ import annotations

import copy
import http.client
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import perf.processes  # noqa: E402
from perf.processes import Envoy, Proc, free_port, http_get  # noqa: E402
from perf.settings import ROOT, START_TIMEOUT  # noqa: E402
from usage import MOCK, PHI, WASM, gateway_config, hcm_of, plugin_of, start_mock  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
import llama_pool  # noqa: E402  (tests/llama_pool.py)

PATH = "/v1/chat/completions"
TARGET_MS = 1.0
FLOOR_WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "bbr_floor.wasm"
FLOOR_MODES = ("pass", "buffer")
MOCK_TTFT_MS, MOCK_ITL_MS, MOCK_TOKENS = 20, 2, 8
LLAMA_TOKENS = 4


def body(model: str, tokens: int) -> bytes:
    return json.dumps({
        "model": model, "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": tokens, "temperature": 0,
        "messages": [{"role": "user", "content": "Write one word."}],
    }).encode()


def has_content(event: bytes) -> bool:
    """Whether an SSE event's data is a chunk whose first choice carries content."""
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return False
        try:
            chunk = json.loads(data)
        except ValueError:
            return False
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content") or choice.get("text"):
                return True
    return False


class Client:
    """One keep-alive connection to one target."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.reconnects = 0

    def first_token(self, payload: bytes) -> float:
        """Seconds from the request sent to the first content event received; reads the
        stream to its end. A connection the server closed while idle (llama-server closes
        kept-alive connections at will) is opened again and the request sent again, untimed
        until then."""
        for attempt in range(3):
            try:
                return self._first_token(payload)
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                self.reconnects += 1
        return self._first_token(payload)

    def _first_token(self, payload: bytes) -> float:
        self.conn.putrequest("POST", PATH, skip_accept_encoding=True)
        self.conn.putheader("Content-Type", "application/json")
        self.conn.putheader("Content-Length", str(len(payload)))
        self.conn.endheaders(payload)
        t0 = time.perf_counter()
        r = self.conn.getresponse()
        if r.status != 200:
            raise SystemExit(f"bench-ttft: port {self.port}: HTTP {r.status}: {r.read()[:300]!r}")
        first = None
        pending = b""
        while True:
            data = r.read1(65536)
            if not data:
                break
            if first is None:
                pending += data.replace(b"\r\n", b"\n")
                *events, pending = pending.split(b"\n\n")
                if any(has_content(e) for e in events):
                    first = time.perf_counter() - t0
        if r.will_close:
            # llama-server ends a stream's connection: the next request opens a new one
            # before its clock starts (the connect is in `endheaders`, before t0).
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        if first is None:
            raise SystemExit(f"bench-ttft: port {self.port}: a stream without a content event")
        return first

    def close(self) -> None:
        self.conn.close()


def add_pool_listener(cfg: dict, port: int, cluster: str, floor_mode: Optional[str] = None) -> None:
    """A listener beside the gateway's: the same connection manager (codec, timeouts, access
    log) with the wasm filter taken out and one route, the pool's own, matching every path.
    `floor_mode`: the filter replaced by bench/floor-filter's logic-free module in that mode
    (`pass`: in the chain, doing nothing; `buffer`: the request held until its body ends)."""
    template = cfg["static_resources"]["listeners"][0]
    lst = copy.deepcopy(template)
    lst["name"] = f"floor_{floor_mode}" if floor_mode else "plain"
    lst["address"]["socket_address"].update(address="127.0.0.1", port_value=port)
    hcm = hcm_of(lst)
    if floor_mode:
        plugin = plugin_of(lst)
        plugin["name"] = f"floor_{floor_mode}"
        plugin["configuration"]["value"] = floor_mode
        plugin["vm_config"]["vm_id"] = f"floor-{floor_mode}"
        plugin["vm_config"]["code"]["local"]["filename"] = str(FLOOR_WASM)
    else:
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.wasm"]
    vhost = hcm["route_config"]["virtual_hosts"][0]
    route = copy.deepcopy(next(r for r in vhost["routes"] if r["route"].get("cluster") == cluster))
    route["name"] = lst["name"]
    route["match"] = {"prefix": "/"}
    route["route"].pop("hash_policy", None)
    vhost["routes"] = [route]
    hcm["route_config"]["name"] = lst["name"]
    cfg["static_resources"]["listeners"].append(lst)


def median_ci95(xs: list[float]) -> tuple[float, float, float]:
    """The median's distribution-free confidence interval: the widest symmetric pair of order
    statistics whose binomial coverage is still at least 95 % (low, high, coverage)."""
    s = sorted(xs)
    n = len(s)
    best = (s[0], s[-1], 1.0)
    for k in range(0, n // 2):
        cov = 1 - 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
        if cov < 0.95:
            break
        best = (s[k + 1], s[n - 2 - k], cov)
    return best


def main() -> int:
    backend = os.environ.get("BENCH_TTFT_BACKEND", "mock")
    if backend not in ("mock", "llama"):
        raise SystemExit(f"bench-ttft: BENCH_TTFT_BACKEND={backend!r} is neither mock nor llama")
    pairs = int(os.environ.get("BENCH_TTFT_PAIRS", "300" if backend == "mock" else "150"))
    out_dir = Path(os.environ.get("BENCH_OUT", ROOT / "bench" / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in (MOCK, WASM):
        if not p.is_file():
            raise SystemExit(f"bench-ttft: missing {p}; make bench-ttft builds it")
    work = Path(tempfile.mkdtemp(prefix="bbr-bench-ttft-"))
    floor = os.environ.get("BENCH_TTFT_FLOOR") == "1"
    if floor and not FLOOR_WASM.is_file():
        raise SystemExit(f"bench-ttft: missing {FLOOR_WASM}; build it with "
                         "cargo build --release --target wasm32-wasip1 -p bbr-floor")
    ports = {k: free_port() for k in ("admin", "on", "off", "plain", "json", "sse", "llama", *FLOOR_MODES)}
    procs: list[Proc] = []
    clients: dict[str, Client] = {}
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load0 = os.getloadavg()
    try:
        # The gateway's two pools: the sse one is the streaming mock (and the json one an
        # idle mock, so every host of the shipped configuration is healthy).
        procs.append(start_mock("mock-idle", ports["json"], "Qwen/Qwen2.5-3B-Instruct", work, 0))
        mock = Proc("mock-stream", [str(MOCK), "--listen", f"127.0.0.1:{ports['sse']}", "--model", PHI,
                                    "--id", "mock-stream", "--ttft-ms", str(MOCK_TTFT_MS),
                                    "--itl-ms", str(MOCK_ITL_MS)], work / "mock-stream.log")
        procs.append(mock)
        deadline = time.monotonic() + START_TIMEOUT
        while "listening" not in mock.text():
            if not mock.alive() or time.monotonic() > deadline:
                raise SystemExit(f"bench-ttft: the streaming mock did not start:\n{mock.tail()}")
            time.sleep(0.05)
        mutate = None
        if backend == "llama":
            server = llama_pool.install()
            procs.append(Proc("llama", llama_pool.server_argv(server, ports["llama"], parallel=1),
                              work / "llama.log"))
            deadline = time.monotonic() + 120
            while not llama_pool.healthy(ports["llama"]):
                if not procs[-1].alive() or time.monotonic() > deadline:
                    raise SystemExit(f"bench-ttft: llama-server did not start:\n{procs[-1].tail()}")
                time.sleep(0.5)
            mutate = lambda cfg: llama_pool.add_pool(cfg, [ports["llama"]])  # noqa: E731
            model, tokens, direct_port = llama_pool.MODEL, LLAMA_TOKENS, ports["llama"]
            cluster = llama_pool.CLUSTER
        else:
            model, tokens, direct_port = PHI, MOCK_TOKENS, ports["sse"]
            cluster = "phi-vllm"
        env_bin = subprocess.run(["bash", str(ROOT / "scripts" / "envoy-bin.sh")], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.split()[-1]
        perf.processes.START_TIMEOUT = START_TIMEOUT * 2
        cfg = gateway_config(ports, {"on": (WASM, True), "off": (WASM, False)}, mutate=mutate)
        add_pool_listener(cfg, ports["plain"], cluster)
        if floor:
            for mode in FLOOR_MODES:
                add_pool_listener(cfg, ports[mode], cluster, floor_mode=mode)
        gw = Envoy("gateway-ttft", env_bin, cfg, ports, work)
        procs.append(gw.proc)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            _, text = http_get(gw.admin, "/clusters")
            flags = [l.rsplit("::", 1)[1] for l in text.splitlines() if "::health_flags::" in l]
            if flags and all(f == "healthy" for f in flags):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"bench-ttft: upstreams not healthy: {flags}")
            time.sleep(0.2)
        payload = body(model, tokens)
        clients = {"direct": Client(direct_port), "on": Client(ports["on"]), "off": Client(ports["off"]),
                   "plain": Client(ports["plain"])}
        if floor:
            clients.update({mode: Client(ports[mode]) for mode in FLOOR_MODES})
        for _ in range(5):  # warm-up: connections open, the prompt cached, the VMs' code hot
            for c in clients.values():
                c.first_token(payload)
        counted0 = gw.stats("bbr_usage_responses_total")
        times: dict[str, list[float]] = {k: [] for k in clients}
        orders = list(itertools.permutations(clients))
        t_start = time.monotonic()
        for i in range(pairs):
            for which in orders[i % len(orders)]:
                times[which].append(clients[which].first_token(payload) * 1e3)
        wall = time.monotonic() - t_start
        counted1 = gw.stats("bbr_usage_responses_total")
        reconnects = {k: c.reconnects for k, c in clients.items()}
    finally:
        for c in clients.values():
            c.close()
        for p in reversed(procs):
            p.stop()
    load1 = os.getloadavg()
    diffs = {
        "on - direct": [a - b for a, b in zip(times["on"], times["direct"])],
        "off - direct": [a - b for a, b in zip(times["off"], times["direct"])],
        "on - off": [a - b for a, b in zip(times["on"], times["off"])],
        "plain - direct": [a - b for a, b in zip(times["plain"], times["direct"])],
        "off - plain": [a - b for a, b in zip(times["off"], times["plain"])],
    }
    if floor:
        diffs.update({
            "pass - plain": [a - b for a, b in zip(times["pass"], times["plain"])],
            "buffer - pass": [a - b for a, b in zip(times["buffer"], times["pass"])],
            "off - buffer": [a - b for a, b in zip(times["off"], times["buffer"])],
        })
    stats = {}
    for name, xs in list(times.items()) + list(diffs.items()):
        lo, hi, cov = median_ci95(xs)
        q = statistics.quantiles(xs, n=10)
        stats[name] = {"median": statistics.median(xs), "ci": [lo, hi], "ci_coverage": cov,
                       "p10": q[0], "p90": q[-1]}
    moved = {k: counted1.get(k, 0) - counted0.get(k, 0) for k in counted1}
    results = {"started": started, "backend": backend, "pairs": pairs, "model": model, "tokens": tokens,
               "wall_s": wall, "load_average": {"start": load0, "end": load1},
               "ms": times, "stats": stats, "usage_responses_moved": moved,
               "reconnects": reconnects}
    upstream = (f"mock-vllm, {MOCK_TTFT_MS} ms to the first token, {MOCK_ITL_MS} ms between tokens, "
                f"{tokens} tokens" if backend == "mock" else
                f"llama-server, {llama_pool.MODEL}, {tokens} tokens, temperature 0, prompt cached")
    within = stats["on - direct"]["ci"][1] <= TARGET_MS
    targets = "direct, gateway with accounting, without, Envoy without the filter" + (
        ", the floor filter passing and holding the body" if floor else "")
    lines = [f"bench-ttft {started} ({backend}): {pairs} interleaved rounds ({targets}) in {wall:.0f} s; "
             f"upstream {upstream}; load average (1, 5, 15 min) "
             f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at the start, {load1[0]:.2f} {load1[1]:.2f} "
             f"{load1[2]:.2f} at the end",
             "",
             "| time to first token, ms | median | 95 % CI of the median | p10 | p90 |",
             "| --- | --- | --- | --- | --- |"]
    for name, s in stats.items():
        lines.append(f"| {name} | {s['median']:+.3f} | [{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}] | "
                     f"{s['p10']:+.3f} | {s['p90']:+.3f} |" if " - " in name else
                     f"| {name} | {s['median']:.3f} | [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] | "
                     f"{s['p10']:.3f} | {s['p90']:.3f} |")
    lines.append("")
    lines.append(f"Target: the gateway with accounting within {TARGET_MS:g} ms of direct (the upper end of the "
                 f"95 % CI of the paired median on - direct): {'met' if within else 'not met'}.")
    md = "\n".join(lines)
    print(md)
    (out_dir / f"ttft-{backend}.json").write_text(json.dumps(results, indent=2))
    (out_dir / f"ttft-{backend}.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
