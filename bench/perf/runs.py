"""Running and sampling: wrk runs in interleaved rounds, the gateway's CPU and the filter's
own counters around each run."""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Optional

from . import settings
from .settings import HEADER_ROUTED, MODEL, PATH, ROOT, WRK_SCRIPT, say, size_label
from .processes import Envoy, Proc, http_post
from .configs import PICKER_CONFIGS, picker_stats


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_wrk(wrk: str, port: int, body_file: Path, conns: int, seconds: float, header: Optional[str],
            work: Path) -> dict:
    out = work / "wrk-out.json.tmp"
    if out.exists():
        out.unlink()
    env = dict(os.environ, BENCH_BODY=str(body_file), BENCH_OUT=str(out),
               BENCH_MODEL_HEADER=header or "")
    argv = [wrk, "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
            "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}{PATH}"]
    cpu0 = children_cpu()
    p = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=seconds + 60, check=False)
    cpu = children_cpu() - cpu0
    if p.returncode != 0 or not out.exists():
        raise RuntimeError(f"wrk failed (exit {p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    r = json.loads(out.read_text())
    out.unlink()
    r["wrk_cpu_s"] = cpu
    dur = r["duration_us"] / 1e6
    r["rps"] = r["requests"] / dur if dur > 0 else 0.0
    # Little's law cross-check (closed loop: `conns` requests always in flight): unlike the
    # completed-request count it is not cut short by the requests still in flight at the end.
    mean_s = r["latency_us"]["mean"] / 1e6
    r["rps_little"] = conns / mean_s if r["requests"] and mean_s > 0 else 0.0
    r["errors_total"] = sum(r["errors"].values())
    return r


def median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def sanity_check(gw: Envoy, up: Envoy, body: bytes) -> None:
    """One request per configuration: 200, answered by the qwen pool, whole body upstream;
    for bbr_picker, also that the filter picked the endpoint (bbr_endpoint_picked_total + 1)
    and that Envoy served it there (no failover counted)."""
    for cfg in settings.CONFIGS:
        before = up.stats(r"^http\.upstream_qwen\.downstream_cx_rx_bytes_total$")
        header = {"x-gateway-base-model-name": MODEL} if cfg in HEADER_ROUTED else {}
        picks0 = picker_stats(gw) if cfg in PICKER_CONFIGS else None
        status, headers, resp = http_post(gw.ports[cfg], body, header)
        if status != 200 or headers.get("x-bench-pool") != "qwen":
            raise SystemExit(f"bench: {cfg} at {size_label(len(body))}: status {status}, "
                             f"pool {headers.get('x-bench-pool')!r}, body {resp[:300]!r}")
        after = up.stats(r"^http\.upstream_qwen\.downstream_cx_rx_bytes_total$")
        got = sum(after.values()) - sum(before.values())
        if got < len(body):
            raise SystemExit(f"bench: {cfg}: the upstream received {got} bytes for a {len(body)}-byte body")
        if picks0 is not None:
            time.sleep(0.1)  # the filter counts a failover at the response's end
            picks1 = picker_stats(gw)
            picked = picks1.get("endpoint_picked_total", 0) - picks0.get("endpoint_picked_total", 0)
            failed = picks1.get("endpoint_failed_over_total", 0) - picks0.get("endpoint_failed_over_total", 0)
            if picked != 1 or failed != 0:
                raise SystemExit(f"bench: {cfg} at {size_label(len(body))}: bbr_endpoint_picked_total "
                                 f"grew by {picked}, bbr_endpoint_failed_over_total by {failed} (want 1 and 0): "
                                 f"{picks1}")


UPSTREAM_RX = r"^http\.upstream_(qwen|phi)\.downstream_cx_rx_bytes_total$"
WASM_STATS = r"^wasmcustom\.bbr_(scanned_bytes_total|scan_nanoseconds_total|wasm_memory_bytes|routed_total)$"


def wasm_stats(gw: Envoy) -> dict[str, int]:
    s = gw.stats(WASM_STATS)
    return {k.removeprefix("wasmcustom.bbr_"): v for k, v in s.items()}


def cell_seconds(runs: list[dict], warm: dict[str, dict], pos: str, size: int, conns: int,
                 duration: float, max_duration: float, waves: float) -> float:
    """How long each run of a cell lasts: BENCH_DURATION, or longer at c > 1 so that a run
    spans at least `waves` times the slowest configuration's latency at this concurrency."""
    if conns <= 1:
        return duration
    latency = 0.0
    for cfg in settings.CONFIGS:
        c1 = [r["rps"] for r in runs if r["config"] == cfg and r["position"] == pos
              and r["size"] == size and r["conns"] == 1 and r["rps"] > 0]
        if c1:  # closed loop: at c connections a request waits for about c others
            latency = max(latency, conns / median(c1))
        w = warm.get(cfg)
        if w is not None:
            if w["requests"] > 0:
                latency = max(latency, w["latency_us"]["mean"] / 1e6)
            else:  # not one response within the warm-up
                latency = max(latency, 2 * w["duration_us"] / 1e6)
    return float(min(max_duration, max(duration, math.ceil(waves * latency))))


def sweep(gw: Envoy, up: Envoy, wrk: str, bodies: dict[tuple[str, int], Path], positions: list[str],
          sizes: list[int], concs: list[int], rounds: int, duration: float, warmup: float,
          max_duration: float, waves: float, work: Path, peer: Optional[Proc] = None) -> list[dict]:
    """peer: the ext_proc peer's process, whose CPU the extproc runs add to the gateway's."""
    runs: list[dict] = []
    total = len(positions) * len(sizes) * len(concs)
    cell = 0
    for pos in positions:
        for size in sizes:
            for conns in concs:
                cell += 1
                body = bodies[(pos, size)]
                warm: dict[str, dict] = {}
                if warmup > 0:
                    for cfg in settings.CONFIGS:
                        w = run_wrk(wrk, gw.ports[cfg], body, conns, warmup,
                                    MODEL if cfg in HEADER_ROUTED else None, work)
                        warm[cfg] = w
                        time.sleep(0.2)
                secs = cell_seconds(runs, warm, pos, size, conns, duration, max_duration, waves)
                say(f"[{cell}/{total}] model {pos}, {size_label(size)}, c={conns}: "
                    f"{rounds} rounds x {len(settings.CONFIGS)} configs x {secs:.0f}s")
                for r in range(rounds):
                    k = r % len(settings.CONFIGS)
                    order = settings.CONFIGS[k:] + settings.CONFIGS[:k]
                    for cfg in order:
                        w0 = wasm_stats(gw) if cfg == "bbr" else None
                        k0 = picker_stats(gw) if cfg in PICKER_CONFIGS else None
                        g0, u0 = gw.proc.cpu_seconds(), up.proc.cpu_seconds()
                        p0 = peer.cpu_seconds() if peer is not None and cfg == "extproc" else None
                        rx0 = sum(up.stats(UPSTREAM_RX).values())
                        res = run_wrk(wrk, gw.ports[cfg], body, conns, secs,
                                      MODEL if cfg in HEADER_ROUTED else None, work)
                        res["gateway_cpu_s"] = gw.proc.cpu_seconds() - g0
                        res["upstream_cpu_s"] = up.proc.cpu_seconds() - u0
                        if p0 is not None:
                            res["peer_cpu_s"] = peer.cpu_seconds() - p0
                        # Body bytes the upstream read per answered request (about the body size,
                        # plus headers; requests cut off at the end of the run blur it a little).
                        rx = sum(up.stats(UPSTREAM_RX).values()) - rx0
                        res["upstream_rx_bytes_per_request"] = rx / res["requests"] if res["requests"] else None
                        time.sleep(0.2)  # let the gateway drop what the closed connections left
                        if k0 is not None:
                            k1 = picker_stats(gw)
                            res["picker"] = {k: k1.get(k, 0) - k0.get(k, 0)
                                             for k in ("endpoint_picked_total", "endpoint_failed_over_total")}
                        if w0 is not None:
                            w1 = wasm_stats(gw)
                            res["wasm"] = {
                                "scanned_bytes": w1.get("scanned_bytes_total", 0) - w0.get("scanned_bytes_total", 0),
                                "scan_ns": w1.get("scan_nanoseconds_total", 0) - w0.get("scan_nanoseconds_total", 0),
                                "routed": w1.get("routed_total", 0) - w0.get("routed_total", 0),
                                "memory_bytes": w1.get("wasm_memory_bytes"),
                            }
                        res.update(position=pos, size=size, conns=conns, round=r, config=cfg,
                                   duration_s=secs)
                        runs.append(res)
                        flag = f"  ERRORS {res['errors']}" if res["errors_total"] else ""
                        if "picker" in res:
                            flag += (f"  picked {res['picker']['endpoint_picked_total']}"
                                     f" (failed over {res['picker']['endpoint_failed_over_total']})"
                                     f" for {res['requests']} answered")
                        say(f"    {cfg:8s} {res['rps']:9.1f} req/s  p50 {res['latency_us']['percentiles']['50'] / 1000:8.2f} ms"
                            f"  p99 {res['latency_us']['percentiles']['99'] / 1000:8.2f} ms{flag}")
                    if not gw.proc.alive() or not up.proc.alive():
                        raise SystemExit(f"bench: an Envoy died:\n{gw.proc.tail()}\n{up.proc.tail()}")
                    if peer is not None and not peer.alive():
                        raise SystemExit(f"bench: the ext_proc peer died:\n{peer.tail()}")
    return runs
