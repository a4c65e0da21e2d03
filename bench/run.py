#!/usr/bin/env python3
"""`make bench`: bbr-wasm against the no-inspection baseline, Envoy's native C++ filter, the
wasm floor and the seeds' ext_proc architecture.

One gateway Envoy (--concurrency 1: one worker) holds the configurations side by side, one
listener each (bench/envoy/gateway.yaml):

  baseline  the client sends x-gateway-base-model-name itself; no body inspection;
  native    envoy.filters.http.json_to_metadata + RouteMatch.dynamic_metadata;
  bbr       bbr-wasm, the filter block of envoy/envoy.yaml with the built .wasm;
  extproc   Envoy's ext_proc filter and bench/extproc-peer, a Rust peer of the Inference
            Extension's Go Body Based Router (the seeds' router): the body goes over gRPC to
            a separate process that parses it whole and answers with the routing headers.
            The bench starts and stops the peer; Envoy's worker thread and the peer are
            pinned to the same CPU, so neither borrows the machine's other core; the peer's
            own CPU is added to the gateway's CPU per request (docs/performance.md);

and, by default, one floor for reference:

  wasm_route a proxy-wasm filter with no logic (bench/floor-filter) that holds each request
             until its body is complete, copies every body byte into the VM as bbr-wasm must
             (without looking at them), then sets the two routing headers bbr-wasm sets, so
             Envoy routes on a header changed by wasm. What any body-based router written as a
             wasm filter costs in this Envoy: the distance from it to bbr-wasm is bbr-wasm's
             own work (classification, scan, decision, metrics), and where it is itself below
             a target, no such filter can meet that target.

All of them route to the same fast upstream: a second Envoy (bench/envoy/upstream.yaml) that
reads every body to the end and answers a small 200. wrk (Debian) POSTs realistic
chat-completions bodies of exact sizes at concurrency 1 and 64. For every (size,
concurrency) cell the three configurations are run in short, interleaved rounds (ABC, BCA,
CAB, ...) so machine noise hits all three alike; the figures are medians over the rounds, and
each ratio is the median of the per-round ratios (the runs of one round are adjacent in time).

The filter's own counters give the scan speed inside V8 (delta of bbr_scanned_bytes_total
over delta of bbr_scan_nanoseconds_total, per size) and its memory gauge
(bbr_wasm_memory_bytes) across sizes.

Writes bench/results/results.md, results.png and results.json; prints the tables and a
met / not met line per target (against the wasm_route floor, native, the
ext_proc peer; the scan speed and the wasm memory; none against the baseline). Exits 0 unless BENCH_STRICT=1 and a target is missed
(the machine is shared and noisy; a person reads the numbers).

Environment (all optional):
  BENCH_SIZES        body sizes, default "1K,16K,256K,1M,4M"
  BENCH_CONCURRENCY  connections, default "1,64"
  BENCH_ROUNDS       interleaved rounds per cell, default 3
  BENCH_DURATION     seconds per wrk run, default 3; at concurrency > 1 a cell's runs are
                     made longer (up to BENCH_MAX_DURATION, default 15) so that they last at
                     least BENCH_WAVES (default 8) times the slowest configuration's latency
                     at that concurrency (estimated from its c=1 throughput, or its warm-up):
                     wrk counts only completed requests, and with 64 large bodies in flight
                     one "wave" of responses can take a second or more
  BENCH_WARMUP       seconds of unrecorded warm-up per configuration and cell, default 1
  BENCH_POSITIONS    where "model" sits in the body: "last" (default), "first", or "last,first"
  BENCH_CONFIGS      default "baseline,native,bbr,bbr_noprefix,wasm_route,extproc" (bbr_noprefix:
                     the shipped filter with prefixAffinity off). Optional: "bbr_picker", the
                     shipped filter with prefixAffinity.picker on, one pool listing the bench's
                     upstream (so it really picks and sets x-gateway-destination-endpoint), on a
                     copy of the qwen cluster with envoy/picker-lb-policy.yaml's override_host
                     policy and its routes' retry policy (so Envoy really follows the header):
                     what the filter's replica choice costs the gateway, reported as "picker on
                     / bbr" (no target); the filter's bbr_endpoint_picked_total is read around
                     each of its runs and printed. Only "bbr" is required: without baseline or
                     native, the ratios and targets against them are left out (e.g.
                     BENCH_CONFIGS=bbr,bbr_noprefix,bbr_picker). "bbr_picker_noretry": a
                     diagnostic, bbr_picker without the routes' retry policy (how much of its
                     cost is Envoy's retry state). More diagnostics: "buffer",
                     "bbr_early" (bench/envoy/gateway.yaml says what they are), "wasm_pass",
                     "wasm_buffer" and "wasm_read" (bench/floor-filter/src/lib.rs), and "bbr_alt"
  BENCH_ALT_WASM     a second build of the filter (a .wasm path), run as the "bbr_alt"
                     configuration next to bbr-wasm, same plugin configuration, its own VM:
                     an A/B comparison of two builds in one run, paired round by round. Adds
                     "bbr_alt" to BENCH_CONFIGS when it is set. Both VMs write the same
                     metric names: the scan figures are still bbr-wasm's (deltas around its
                     own runs), but the memory gauge holds whichever VM wrote it last
  BENCH_WORKER_CPU   the CPU for Envoy's worker thread and the ext_proc peer, default the
                     highest CPU the bench may use
  BENCH_CLASSES      body classes of the corpus (`make corpus`, target/corpus) to run at 1 MiB,
                     c as in BENCH_CONCURRENCY, after the size sweep: "all", or names such as
                     "en,zh,emoji,tool-use"; default none. Each class is a cell like a size
                     (every configuration, BENCH_ROUNDS rounds); "all" adds about half an
                     hour (an estimate).
                     The results gain a body-class table with the real-text target (bbr-wasm
                     >= 0.80x the wasm_route floor on every class), met or not
  BENCH_STRICT       1: exit 1 when a target is missed
  BENCH_OUT          output directory, default bench/results
  ENVOY_BIN, WRK_BIN the binaries (default: scripts/envoy-bin.sh, wrk on PATH)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf import settings  # noqa: E402
from perf.settings import ALL_CONFIGS, BENCH, FLOOR_MODES, FLOOR_WASM, MiB, ROOT, WASM, env_list, parse_size, say  # noqa: E402
from perf.bodies import CLASS_PREFIX, CORPUS, body_classes, chat_body  # noqa: E402
from perf.processes import Envoy, Proc, free_port  # noqa: E402
from perf.extproc import EXTPROC_PEER, pin_envoy_worker, start_extproc_peer, time_extproc_steps, worker_cpus  # noqa: E402
from perf.configs import PICKER_CONFIGS, fill, gateway_config  # noqa: E402
from perf.runs import sanity_check, sweep, wasm_stats  # noqa: E402
from perf.analysis import checks, class_rows, scan_table, summarize  # noqa: E402
from perf.report import add_extproc_steps, chart, class_markdown, machine_info, markdown  # noqa: E402


def main() -> int:
    sizes = [parse_size(s) for s in env_list("BENCH_SIZES", "1K,16K,256K,1M,4M")]
    concs = [int(c) for c in env_list("BENCH_CONCURRENCY", "1,64")]
    positions = env_list("BENCH_POSITIONS", "last")
    for p in positions:
        if p not in ("first", "last"):
            raise SystemExit(f"bench: BENCH_POSITIONS: {p!r} is neither first nor last")
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    duration = float(os.environ.get("BENCH_DURATION", "3"))
    warmup = float(os.environ.get("BENCH_WARMUP", "1"))
    max_duration = float(os.environ.get("BENCH_MAX_DURATION", "15"))
    waves = float(os.environ.get("BENCH_WAVES", "8"))
    settings.CONFIGS = tuple(env_list("BENCH_CONFIGS", "baseline,native,bbr,bbr_noprefix,wasm_route,extproc"))
    if "bbr" not in settings.CONFIGS:
        raise SystemExit("bench: BENCH_CONFIGS must include bbr (every comparison and target is about it)")
    for c in settings.CONFIGS:
        if c not in ALL_CONFIGS:
            raise SystemExit(f"bench: BENCH_CONFIGS: unknown configuration {c!r}; known: {ALL_CONFIGS}")
    alt = os.environ.get("BENCH_ALT_WASM")
    if alt:
        if not Path(alt).is_file():
            raise SystemExit(f"bench: BENCH_ALT_WASM: {alt} is not a file")
        if "bbr_alt" not in settings.CONFIGS:
            settings.CONFIGS += ("bbr_alt",)
    elif "bbr_alt" in settings.CONFIGS:
        raise SystemExit("bench: the bbr_alt configuration needs BENCH_ALT_WASM (a .wasm path)")
    strict = os.environ.get("BENCH_STRICT", "0") == "1"
    out_dir = Path(os.environ.get("BENCH_OUT", str(BENCH / "results")))
    if not out_dir.is_absolute():
        out_dir = ROOT / out_dir

    if not WASM.is_file():
        raise SystemExit(f"bench: {WASM.relative_to(ROOT)} is missing; run `make build`")
    if "extproc" in settings.CONFIGS and not EXTPROC_PEER.is_file():
        raise SystemExit(f"bench: {EXTPROC_PEER.relative_to(ROOT)} is missing; run `make bench` (it builds it)")
    if any(c.startswith("wasm_") for c in settings.CONFIGS) and not FLOOR_WASM.is_file():
        raise SystemExit(f"bench: {FLOOR_WASM.relative_to(ROOT)} is missing; run `make bench` (it builds it)")
    wrk = os.environ.get("WRK_BIN") or shutil.which("wrk")
    if not wrk:
        raise SystemExit("bench: wrk not found; run `bash scripts/bench-deps.sh` (or set WRK_BIN)")
    envoy_bin = os.environ.get("ENVOY_BIN_RESOLVED") or subprocess.run(
        ["bash", str(ROOT / "scripts" / "envoy-bin.sh")], capture_output=True, text=True, check=True,
        timeout=600).stdout.strip().splitlines()[-1]
    envoy_version = re.search(r"/(\d+\.\d+\.\d+)/", subprocess.run(
        [envoy_bin, "--version"], capture_output=True, text=True, timeout=30).stdout)
    envoy_version = envoy_version.group(1) if envoy_version else "?"
    wrk_version = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
    wrk_version = (wrk_version.stdout + wrk_version.stderr).splitlines()[0].strip()

    run_root = ROOT / ".run"
    run_root.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=run_root))
    say(f"work dir {work.relative_to(ROOT)} (Envoy configs and logs)")

    bodies: dict[tuple[str, int], Path] = {}
    for pos in positions:
        for size in sizes:
            p = work / f"body-{pos}-{size}.json"
            p.write_bytes(chat_body(size, pos))
            bodies[(pos, size)] = p

    extproc_socket = work / "extproc.sock"
    cpus = worker_cpus()
    classes = body_classes()
    class_positions = [f"{CLASS_PREFIX}{c}" for c in classes]
    class_bodies: dict[tuple[str, int], Path] = {
        (f"{CLASS_PREFIX}{c}", MiB): CORPUS / f"{c}.json" for c in classes}

    up_ports = {"admin": free_port(), "qwen": free_port(), "phi": free_port()}
    gw_ports = {"admin": free_port(), "baseline": free_port(), "native": free_port(), "bbr": free_port(),
                "buffer": free_port(), "bbr_early": free_port(), "bbr_alt": free_port(), "extproc": free_port(),
                "bbr_noprefix": free_port(), "bbr_picker": free_port(), "bbr_picker_noretry": free_port(),
                **{f"wasm_{m}": free_port() for m in FLOOR_MODES}}
    up_cfg = fill(BENCH / "envoy" / "upstream.yaml",
                  {"PORT_ADMIN": up_ports["admin"], "PORT_QWEN": up_ports["qwen"], "PORT_PHI": up_ports["phi"]})
    gw_cfg = gateway_config({"PORT_ADMIN": gw_ports["admin"], "PORT_BASELINE": gw_ports["baseline"],
                             "PORT_NATIVE": gw_ports["native"], "PORT_BBR": gw_ports["bbr"],
                             "PORT_BUFFER": gw_ports["buffer"], "PORT_BBR_EARLY": gw_ports["bbr_early"], "PORT_BBR_ALT": gw_ports["bbr_alt"],
                             "PORT_BBR_NOPREFIX": gw_ports["bbr_noprefix"], "PORT_BBR_PICKER": gw_ports["bbr_picker"],
                             "PORT_BBR_PICKER_NORETRY": gw_ports["bbr_picker_noretry"],
                             "UPSTREAM_QWEN": up_ports["qwen"], "UPSTREAM_PHI": up_ports["phi"],
                             "PORT_EXTPROC": gw_ports["extproc"], "EXTPROC_SOCKET": extproc_socket,
                             **{f"PORT_WASM_{m.upper()}": gw_ports[f"wasm_{m}"] for m in FLOOR_MODES}})

    procs: list[Envoy] = []
    peer: Optional[Proc] = None

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    info = machine_info()
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        up = Envoy("upstream", envoy_bin, up_cfg, up_ports, work)
        procs.append(up)
        if "extproc" in settings.CONFIGS:
            peer = start_extproc_peer(extproc_socket, cpus, work)
        gw = Envoy("gateway", envoy_bin, gw_cfg, gw_ports, work)
        procs.append(gw)
        worker_tid = pin_envoy_worker(gw, cpus)
        say(f"gateway worker thread {worker_tid} pinned to CPU {sorted(cpus)}"
            + (f", ext_proc peer pid {peer.pid} on the same" if peer else ""))
        say(f"gateway pid {gw.proc.pid} (listeners baseline :{gw_ports['baseline']}, native "
            f":{gw_ports['native']}, bbr :{gw_ports['bbr']}), upstream pid {up.proc.pid}")
        for (pos, size), p in sorted(bodies.items(), key=lambda kv: kv[0][1]):
            if size in (min(sizes), max(sizes)):
                sanity_check(gw, up, p.read_bytes())
        for p in class_bodies.values():
            sanity_check(gw, up, p.read_bytes())
        say("sanity check passed: each configuration routes to the qwen pool and the upstream reads whole bodies"
            + ("; the picker picked the endpoint for each of its requests"
               if any(pc in settings.CONFIGS for pc in PICKER_CONFIGS) else ""))
        runs = sweep(gw, up, wrk, bodies, positions, sizes, concs, rounds, duration, warmup,
                     max_duration, waves, work, peer)
        class_runs = sweep(gw, up, wrk, class_bodies, class_positions, [MiB], concs, rounds, duration,
                           warmup, max_duration, waves, work, peer) if classes else []
        mem_final = wasm_stats(gw).get("wasm_memory_bytes")
        steps = time_extproc_steps(bodies, cpus) if peer is not None else {}
    finally:
        for e in reversed(procs):
            e.proc.stop()
        if peer is not None:
            peer.stop()
    elapsed = time.monotonic() - started
    load_after = os.getloadavg()

    cells = summarize(runs, positions, sizes, concs)
    for pc in PICKER_CONFIGS:
        if pc not in settings.CONFIGS:
            continue
        picked = [r["picker"] for r in runs if r["config"] == pc and "picker" in r]
        say(f"{pc}: bbr_endpoint_picked_total grew by {sum(k['endpoint_picked_total'] for k in picked)} "
            f"and bbr_endpoint_failed_over_total by {sum(k['endpoint_failed_over_total'] for k in picked)} "
            f"over its {len(picked)} recorded runs, which answered "
            f"{sum(r['requests'] for r in runs if r['config'] == pc)} requests (wrk's count)")
    add_extproc_steps(cells, steps, positions, sizes, concs)
    scan_rows, scan_overall = scan_table(cells, positions, sizes, concs)
    results = checks(cells, scan_rows, scan_overall, positions, sizes, concs)
    class_cells = summarize(class_runs, class_positions, [MiB], concs) if classes else {}
    classes_table = class_rows(class_cells, classes, concs)
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except subprocess.SubprocessError:
        commit = "?"
    meta = {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": info["machine"],
        "lscpu": info["lscpu"],
        "nproc": info["nproc"],
        "envoy_version": envoy_version,
        "setup": (f"Envoy {envoy_version}, gateway with --concurrency 1; wrk -t1, HTTP/1.1 keep-alive; "
                  f"{rounds} interleaved rounds per configuration and cell, medians reported."),
        "command": " ".join([f"{k}={os.environ[k]}" for k in sorted(os.environ)
                             if k.startswith("BENCH_") and k != "BENCH_OUT"] + ["make bench"]),
        "envoy": f"{envoy_version} ({envoy_bin})",
        "wrk": f"{wrk_version}, -t1, --timeout 30s, one prepared body per run (bench/wrk/post.lua)",
        "gateway": f"one Envoy, --concurrency 1, one listener per configuration ({', '.join(settings.CONFIGS)}; "
                   "bench/envoy/gateway.yaml and the floor listeners bench/run.py derives from it); "
                   "per_connection_buffer_limit_bytes 8454144 on every listener and cluster; no access log; "
                   f"its worker thread pinned to CPU {sorted(cpus)}"
                   + ("; the ext_proc peer (bench/extproc-peer, one thread) pinned to the same CPU, on a Unix "
                      "socket" if "extproc" in settings.CONFIGS else "")
                   + (f"; bbr_alt runs {os.environ['BENCH_ALT_WASM']}" if "bbr_alt" in settings.CONFIGS else ""),
        "upstream": "a second Envoy, --concurrency 1, direct_response 200 after the buffer filter has read "
                    "the whole body (bench/envoy/upstream.yaml)",
        "bodies": "chat-completions JSON of exactly the stated size: system prompt, user/assistant turns of "
                  "prose with some non-ASCII and escapes, sampling parameters; `model` "
                  + " and ".join(positions) + " (last is the harder case for a scanner that could stop early; "
                  "bbr-wasm always reads to the end to validate)",
        "rounds": f"{rounds} rounds per cell, each running every configuration once for {duration:.0f} s "
                  f"(longer at c > 1 where one wave of responses is slow: at least {waves:.0f} x the slowest "
                  f"configuration's latency, at most {max_duration:.0f} s), order rotated per round "
                  f"(ABCD, BCDA, ...); {warmup:.0f} s unrecorded warm-up per configuration and cell; "
                  f"{elapsed / 60:.1f} min in all",
        "commit": commit,
        "load": f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
                "(other work on the machine shares its cores)",
        "final_wasm_memory_bytes": mem_final,
        "extproc_steps": steps,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({
        "meta": meta, "sizes": sizes, "concurrency": concs, "positions": positions,
        "cells": cells, "scan": {"per_size": scan_rows, "overall": scan_overall},
        "targets": results, "runs": runs,
        "classes": {"names": classes, "rows": classes_table, "cells": class_cells, "runs": class_runs}},
        indent=1) + "\n")
    md = markdown(meta, cells, scan_rows, scan_overall, results, positions, sizes, concs)
    if classes:
        md += "\n" + class_markdown(classes_table)
    (out_dir / "results.md").write_text(md)
    why = chart(out_dir / "results.png", meta, cells, positions, sizes, concs)
    if why:
        say(why)
    print(md)
    n_fail = sum(not c["pass"] for c in results)
    for c in results:
        v = c["value"]
        verdict = "met    " if c["pass"] else "NOT MET"
        print(f"{verdict}  {c['target']}: {v:.3f} (want {c['want']})"
              if isinstance(v, float) else f"{verdict}  {c['target']}: {v} (want {c['want']})")
    print(f"bench: {len(results) - n_fail} of {len(results)} targets met; results in "
          f"{out_dir.relative_to(ROOT) if out_dir.is_relative_to(ROOT) else out_dir}/results.{{md,png,json}}")
    shutil.rmtree(work, ignore_errors=True)
    if n_fail and strict:
        print("bench: BENCH_STRICT=1 and a target was missed: exit 1")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
