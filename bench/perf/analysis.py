"""From runs to figures: medians and per-round ratios per cell, the scan speed, and each
target met or not."""

from __future__ import annotations

from typing import Any
from typing import Optional

from . import settings
from .settings import CLASS_FLOOR_TARGET, FLOOR_MODES, KiB, MiB, P50_VS_EXTPROC_1K, SCAN_GB_S, VS_EXTPROC, VS_EXTPROC_1K_C64, VS_FLOOR_LARGE, VS_FLOOR_SMALL, VS_NATIVE_1K, VS_NATIVE_LARGE, size_label
from .bodies import CLASS_PREFIX
from .configs import PICKER_CONFIGS
from .runs import median


def summarize(runs: list[dict], positions, sizes, concs) -> dict:
    cells: dict[str, Any] = {}
    for pos in positions:
        for size in sizes:
            for conns in concs:
                sel = [r for r in runs if r["position"] == pos and r["size"] == size and r["conns"] == conns]
                by = {cfg: sorted((r for r in sel if r["config"] == cfg), key=lambda r: r["round"]) for cfg in settings.CONFIGS}
                c: dict[str, Any] = {"position": pos, "size": size, "conns": conns, "configs": {}}
                for cfg, rs in by.items():
                    reqs = sum(r["requests"] for r in rs) or 1
                    done = [r for r in rs if r["requests"] > 0]
                    c["configs"][cfg] = {
                        "rps": median([r["rps"] for r in rs]),
                        "rps_runs": [round(r["rps"], 2) for r in rs],
                        "rps_little": median([r["rps_little"] for r in done]),
                        "run_seconds": rs[0]["duration_s"] if rs else None,
                        "p50_ms": median([r["latency_us"]["percentiles"]["50"] / 1000 for r in done]),
                        "p99_ms": median([r["latency_us"]["percentiles"]["99"] / 1000 for r in done]),
                        "errors": sum(r["errors_total"] for r in rs),
                        # Envoy's CPU, plus for extproc the peer's own (what that architecture costs).
                        "gateway_cpu_us_per_req": 1e6 * sum(r["gateway_cpu_s"] + r.get("peer_cpu_s", 0.0)
                                                            for r in rs) / reqs,
                        "envoy_cpu_us_per_req": 1e6 * sum(r["gateway_cpu_s"] for r in rs) / reqs,
                        "upstream_cpu_us_per_req": 1e6 * sum(r["upstream_cpu_s"] for r in rs) / reqs,
                        "wrk_cpu_us_per_req": 1e6 * sum(r["wrk_cpu_s"] for r in rs) / reqs,
                        "upstream_rx_bytes_per_request": median([r["upstream_rx_bytes_per_request"]
                                                                 for r in done]),
                    }
                rounds = min(len(v) for v in by.values())

                def paired(a: str, b: str) -> float:
                    if a not in by or b not in by:  # e.g. a diagnostic vs a baseline that did not run
                        return float("nan")
                    return median([by[a][i]["rps"] / by[b][i]["rps"] for i in range(rounds) if by[b][i]["rps"] > 0])

                # Only "bbr" is required (main): a ratio is there when both its configurations ran.
                c["ratio"] = {f"{a}_vs_{b}": paired(a, b)
                              for a, b in (("native", "baseline"), ("bbr", "baseline"), ("bbr", "native"))
                              if a in by and b in by}
                if "buffer" in by:
                    c["ratio"]["buffer_vs_baseline"] = paired("buffer", "baseline")
                    c["ratio"]["bbr_vs_buffer"] = paired("bbr", "buffer")
                if "bbr_early" in by:
                    c["ratio"]["bbr_early_vs_baseline"] = paired("bbr_early", "baseline")
                if "extproc" in by:
                    c["ratio"]["extproc_vs_baseline"] = paired("extproc", "baseline")
                    c["ratio"]["bbr_vs_extproc"] = paired("bbr", "extproc")
                    c["configs"]["extproc"]["peer_cpu_us_per_req"] = 1e6 * sum(
                        r.get("peer_cpu_s", 0.0) for r in by["extproc"]) / (sum(r["requests"] for r in by["extproc"]) or 1)
                if "bbr_noprefix" in by:
                    c["ratio"]["bbr_vs_bbr_noprefix"] = paired("bbr", "bbr_noprefix")
                for pc in PICKER_CONFIGS:
                    if pc not in by:
                        continue
                    c["ratio"][f"{pc}_vs_bbr"] = paired(pc, "bbr")
                    picks = [r["picker"] for r in by[pc] if "picker" in r]
                    c["configs"][pc]["endpoint_picked"] = sum(k["endpoint_picked_total"] for k in picks)
                    c["configs"][pc]["endpoint_failed_over"] = sum(k["endpoint_failed_over_total"] for k in picks)
                    c["configs"][pc]["requests"] = sum(r["requests"] for r in by[pc])
                if "bbr_picker" in by and "bbr_picker_noretry" in by:
                    c["ratio"]["bbr_picker_vs_bbr_picker_noretry"] = paired("bbr_picker", "bbr_picker_noretry")
                if "bbr_alt" in by:
                    c["ratio"]["bbr_alt_vs_baseline"] = paired("bbr_alt", "baseline")
                    c["ratio"]["bbr_alt_vs_bbr"] = paired("bbr_alt", "bbr")
                for mode in FLOOR_MODES:
                    if f"wasm_{mode}" in by and "baseline" in by:
                        c["ratio"][f"wasm_{mode}_vs_baseline"] = paired(f"wasm_{mode}", "baseline")
                    if f"wasm_{mode}" in by:
                        c["ratio"][f"bbr_vs_wasm_{mode}"] = paired("bbr", f"wasm_{mode}")
                wasm = [r["wasm"] for r in by["bbr"] if "wasm" in r]
                sb = sum(w["scanned_bytes"] for w in wasm)
                sn = sum(w["scan_ns"] for w in wasm)
                c["scan"] = {"bytes": sb, "ns": sn, "routed": sum(w["routed"] for w in wasm),
                             "memory_bytes": max((w["memory_bytes"] or 0 for w in wasm), default=None)}
                cells[f"{pos}/{size}/{conns}"] = c
    return cells


def scan_table(cells: dict, positions, sizes, concs) -> list[dict]:
    rows = []
    for size in sizes:
        sel = [cells[f"{p}/{size}/{c}"] for p in positions for c in concs]
        b = sum(c["scan"]["bytes"] for c in sel)
        n = sum(c["scan"]["ns"] for c in sel)
        routed = sum(c["scan"]["routed"] for c in sel)
        mem_by_c = {str(c): cells[f"{p}/{size}/{c}"]["scan"]["memory_bytes"] for p in positions[:1] for c in concs}
        rows.append({"size": size, "bytes": b, "ns": n, "requests": routed, "memory_by_conns": mem_by_c,
                     "gb_s": b / n if n else float("nan"),
                     "ms_per_mib": (n / 1e6) / (b / MiB) if b else float("nan"),
                     "us_per_request": n / 1e3 / routed if routed else float("nan"),
                     "memory_bytes": max((c["scan"]["memory_bytes"] or 0) for c in sel)})
    b = sum(r["bytes"] for r in rows)
    n = sum(r["ns"] for r in rows)
    overall = {"bytes": b, "ns": n, "gb_s": b / n if n else float("nan"),
               "ms_per_mib": (n / 1e6) / (b / MiB) if b else float("nan")}
    return rows, overall


def floor_config() -> Optional[str]:
    """The floor the targets are compared with: the most complete one that ran."""
    for cfg in ("wasm_route", "wasm_read"):
        if cfg in settings.CONFIGS:
            return cfg
    return None


def checks(cells: dict, scan_rows: list[dict], scan_overall: dict, positions, sizes, concs) -> list[dict]:
    """The targets: against the wasm_route floor, native json_to_metadata, the ext_proc
    peer (extproc_checks), the scan speed and the wasm memory. None against the baseline."""
    out = []

    def add(name: str, value: float, ok: bool, target: str) -> None:
        out.append({"target": name, "value": value, "pass": bool(ok), "want": target})

    for pos in positions:
        for conns in concs:
            if "wasm_route" in settings.CONFIGS:
                for size in sizes:
                    r = cells[f"{pos}/{size}/{conns}"]["ratio"]["bbr_vs_wasm_route"]
                    want = VS_FLOOR_SMALL if size < 256 * KiB else VS_FLOOR_LARGE
                    add(f"bbr/wasm_route floor, model {pos}, {size_label(size)}, c={conns}", r, r >= want,
                        f">= {want:.2f}x")
            for size in sizes if "native" in settings.CONFIGS else ():
                c = cells[f"{pos}/{size}/{conns}"]
                rn = c["ratio"]["bbr_vs_native"]
                if size >= MiB:
                    add(f"bbr/native, model {pos}, {size_label(size)}, c={conns}", rn, rn >= VS_NATIVE_LARGE,
                        f">= {VS_NATIVE_LARGE:.0f}x")
                elif size <= KiB:
                    add(f"bbr/native, model {pos}, {size_label(size)}, c={conns}", rn, rn >= VS_NATIVE_1K,
                        f">= {VS_NATIVE_1K:.1f}x")
    if "extproc" in settings.CONFIGS:
        out += extproc_checks(cells, positions, sizes, concs)
    add("scan speed in V8, all sizes (GB/s)", scan_overall["gb_s"], scan_overall["gb_s"] >= SCAN_GB_S,
        f">= {SCAN_GB_S:.1f} GB/s")
    for r in scan_rows:
        if r["size"] >= 256 * KiB:  # smaller bodies: the two clock reads per window weigh in
            add(f"scan speed in V8, {size_label(r['size'])} (GB/s)", r["gb_s"], r["gb_s"] >= SCAN_GB_S,
                f">= {SCAN_GB_S:.1f} GB/s")
    # Linear memory only grows, in 64 KiB pages. A filter that kept bodies would grow by
    # megabytes between the smallest and the largest body; one page is allocator noise
    # (e.g. 64 large requests in flight at once, each with its small scanner state).
    mems = [r["memory_bytes"] for r in scan_rows if r["memory_bytes"]]
    if mems:
        grew = mems[-1] - mems[0]
        add(f"wasm memory flat: growth from {size_label(scan_rows[0]['size'])} to "
            f"{size_label(scan_rows[-1]['size'])} bodies (bytes)", grew, grew <= 65536,
            "<= 65536 (one wasm page)")
    return out


def extproc_checks(cells: dict, positions, sizes, concs) -> list[dict]:
    """bbr-wasm against the ext_proc peer, one run, side by side."""
    out = []
    for pos in positions:
        for conns in concs:
            for size in sizes:
                c = cells[f"{pos}/{size}/{conns}"]
                r = c["ratio"]["bbr_vs_extproc"]
                want = VS_EXTPROC_1K_C64 if (size <= KiB and conns == 64) else VS_EXTPROC
                out.append({"target": f"bbr/extproc throughput, model {pos}, {size_label(size)}, c={conns}",
                            "value": r, "pass": bool(r >= want), "want": f">= {want:.0f}x"})
            for size in sizes:
                if size > KiB:
                    continue
                c = cells[f"{pos}/{size}/{conns}"]
                p = c["configs"]["bbr"]["p50_ms"] / c["configs"]["extproc"]["p50_ms"]
                out.append({"target": f"bbr p50 / extproc p50, model {pos}, {size_label(size)}, c={conns}",
                            "value": p, "pass": bool(p <= P50_VS_EXTPROC_1K), "want": "<= 0.333 (1/3)"})
    return out



def class_rows(cells: dict, classes: list[str], concs: list[int]) -> list[dict]:
    """One row per class and concurrency: the ratios, the scan speed, the real-text floor target."""
    floor = floor_config()
    rows = []
    for cls in classes:
        for conns in concs:
            c = cells[f"{CLASS_PREFIX}{cls}/{MiB}/{conns}"]
            r = c["ratio"]
            vs_floor = r.get(f"bbr_vs_{floor}") if floor else None
            rows.append({
                "class": cls, "conns": conns,
                "bbr_vs_baseline": r.get("bbr_vs_baseline"), "bbr_vs_native": r.get("bbr_vs_native"),
                "floor_vs_baseline": r.get(f"{floor}_vs_baseline") if floor else None,
                "bbr_vs_floor": vs_floor,
                "bbr_alt_vs_bbr": r.get("bbr_alt_vs_bbr"),
                "scan_gb_s": c["scan"]["bytes"] / c["scan"]["ns"] if c["scan"]["ns"] else None,
                "floor_target_met": None if vs_floor is None else bool(vs_floor >= CLASS_FLOOR_TARGET),
                "scan_needed_gb_s": scan_needed(c, floor) if floor else None,
            })
    return rows

def scan_needed(cell: dict, floor: str) -> Optional[float]:
    """The scan speed (GB/s) at which bbr-wasm's gateway CPU per request would be the floor's
    / CLASS_FLOOR_TARGET, the rest of bbr-wasm's work (its CPU per request above the floor's,
    less the scan its counters measured) kept as measured: what the target asks of the
    scanner in this cell. Infinite when the rest alone is over the budget; None without the
    CPU figures or the scan counters."""
    cfg = cell["configs"]
    try:
        floor_us = cfg[floor]["gateway_cpu_us_per_req"]
        bbr_us = cfg["bbr"]["gateway_cpu_us_per_req"]
        scan = cell["scan"]
        scan_us = scan["ns"] / scan["routed"] / 1e3
        bytes_per_req = scan["bytes"] / scan["routed"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    allowed_us = floor_us / CLASS_FLOOR_TARGET - (bbr_us - scan_us)
    return bytes_per_req / (allowed_us * 1e3) if allowed_us > 0 else float("inf")
