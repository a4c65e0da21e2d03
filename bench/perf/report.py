"""The report: results.md (tables and targets), results.png (the chart), and the machine's
description."""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

from . import settings
from .settings import CLASS_FLOOR_TARGET, FLOOR_MODES, LABELS, SHORT, size_label
from .configs import PICKER_CONFIGS
from .analysis import floor_config


def fmt_ratio(x: float) -> str:
    return "n/a" if x != x else (f"{x:.2f}×" if x < 10 else f"{x:.1f}×")


def markdown(meta: dict, cells: dict, scan_rows, scan_overall, results: list[dict], positions, sizes, concs) -> str:
    L: list[str] = []
    head = "| configuration | c | " + " | ".join(size_label(s) for s in sizes) + " |"
    sep = "| --- | --- | " + " | ".join("---" for _ in sizes) + " |"
    L.append("# bbr-wasm benchmark (`make bench`)")
    L.append("")
    L.append(f"Run {meta['date']} on {meta['machine']}. {meta['setup']}")
    L.append("")
    for pos in positions:
        if "baseline" in settings.CONFIGS:
            L.append(f"## Throughput relative to the no-inspection baseline (model {pos} in the body)")
        else:
            L.append(f"## Throughput ratios (model {pos} in the body; no baseline in this run)")
        L.append("")
        L.append("Median over the rounds of each round's ratio (the runs of a round are adjacent in time).")
        L.append("")
        L.append(head)
        L.append(sep)

        def ratio_rows(label: str, key: str) -> None:
            """One row per concurrency: the `key` ratio of this position at every size."""
            if key not in cells[f"{pos}/{sizes[0]}/{concs[0]}"]["ratio"]:
                return  # one of its two configurations did not run
            for conns in concs:
                L.append(f"| {label} | {conns} | " + " | ".join(
                    fmt_ratio(cells[f"{pos}/{s}/{conns}"]["ratio"][key]) for s in sizes) + " |")

        ratio_rows("native json_to_metadata (C++)", "native_vs_baseline")
        ratio_rows("bbr-wasm", "bbr_vs_baseline")
        ratio_rows("**bbr-wasm vs native**", "bbr_vs_native")
        if "buffer" in settings.CONFIGS:
            ratio_rows("diagnostic: buffer filter vs baseline", "buffer_vs_baseline")
            ratio_rows("diagnostic: bbr-wasm vs buffer filter", "bbr_vs_buffer")
        for mode in FLOOR_MODES:
            if f"wasm_{mode}" in settings.CONFIGS:
                ratio_rows(f"floor: {LABELS[f'wasm_{mode}'].removeprefix('diagnostic: ')}",
                           f"wasm_{mode}_vs_baseline")
        floor = floor_config()
        if floor:
            ratio_rows(f"**bbr-wasm vs the {floor} floor**", f"bbr_vs_{floor}")
        if "extproc" in settings.CONFIGS:
            ratio_rows(LABELS["extproc"], "extproc_vs_baseline")
            ratio_rows("**bbr-wasm vs the ext_proc peer**", "bbr_vs_extproc")
        if "bbr_early" in settings.CONFIGS:
            ratio_rows("diagnostic: bbr-wasm routeBeforeBodyEnds", "bbr_early_vs_baseline")
        if "bbr_noprefix" in settings.CONFIGS:
            ratio_rows("**bbr-wasm (prefix affinity on, as shipped) vs off**", "bbr_vs_bbr_noprefix")
        if "bbr_picker" in settings.CONFIGS:
            ratio_rows("**picker on (override_host) ÷ bbr-wasm**", "bbr_picker_vs_bbr")
        if "bbr_picker_noretry" in settings.CONFIGS:
            ratio_rows("diagnostic: picker without the retry policy ÷ bbr-wasm", "bbr_picker_noretry_vs_bbr")
            ratio_rows("diagnostic: picker with ÷ without the retry policy", "bbr_picker_vs_bbr_picker_noretry")
        if "bbr_alt" in settings.CONFIGS:
            ratio_rows("diagnostic: BENCH_ALT_WASM build", "bbr_alt_vs_baseline")
            ratio_rows("**BENCH_ALT_WASM build vs bbr-wasm**", "bbr_alt_vs_bbr")
        L.append("")
        secs = sorted({cells[f"{pos}/{s}/{c}"]["configs"]["bbr"]["run_seconds"] for s in sizes for c in concs})
        L.append(f"Run lengths used: {', '.join(f'{x:.0f} s' for x in secs)} (longer at c > 1 for slow cells, "
                 "see BENCH_WAVES in bench/run.py).")
        L.append("")
        L.append(f"### Requests per second (median), model {pos}")
        L.append("")
        L.append(head)
        L.append(sep)
        for cfg in settings.CONFIGS:
            for conns in concs:
                L.append(f"| {LABELS[cfg]} | {conns} | " + " | ".join(
                    f"{cells[f'{pos}/{s}/{conns}']['configs'][cfg]['rps']:.0f}" for s in sizes) + " |")
        L.append("")
        L.append(f"### Latency p50 / p99 in ms (median over rounds), model {pos}")
        L.append("")
        L.append(head)
        L.append(sep)
        for cfg in settings.CONFIGS:
            for conns in concs:
                L.append(f"| {LABELS[cfg]} | {conns} | " + " | ".join(
                    "{:.2f} / {:.2f}".format(cells[f'{pos}/{s}/{conns}']['configs'][cfg]['p50_ms'],
                                             cells[f'{pos}/{s}/{conns}']['configs'][cfg]['p99_ms']) for s in sizes) + " |")
        L.append("")
        L.append(f"### Bytes the upstream read per answered request (median), model {pos}")
        L.append("")
        L.append("Body plus request headers: every configuration really carries the whole body upstream.")
        L.append("")
        L.append(head)
        L.append(sep)
        for cfg in settings.CONFIGS:
            for conns in concs:
                L.append(f"| {LABELS[cfg]} | {conns} | " + " | ".join(
                    f"{cells[f'{pos}/{s}/{conns}']['configs'][cfg]['upstream_rx_bytes_per_request']:.0f}"
                    for s in sizes) + " |")
        L.append("")
        if "baseline" in settings.CONFIGS:
            L.append(f"### Gateway CPU cost relative to the baseline, model {pos}")
            L.append("")
            L.append("The baseline's gateway CPU time per request divided by this configuration's (from /proc, "
                     "all runs of the cell): what the throughput ratio would be if the gateway's one worker were "
                     "the only bottleneck. Less sensitive to other load on the machine than requests per second.")
            L.append("")
            L.append(head)
            L.append(sep)
            for cfg in settings.CONFIGS:
                if cfg == "baseline":
                    continue
                for conns in concs:
                    L.append(f"| {LABELS[cfg]} | {conns} | " + " | ".join(
                        fmt_ratio(cells[f'{pos}/{s}/{conns}']['configs']['baseline']['gateway_cpu_us_per_req']
                                  / cells[f'{pos}/{s}/{conns}']['configs'][cfg]['gateway_cpu_us_per_req'])
                        for s in sizes) + " |")
            L.append("")
        L.append(f"### Gateway CPU per request in µs (worker + main thread, from /proc), model {pos}")
        L.append("")
        if "extproc" in settings.CONFIGS:
            L.append("For the ext_proc peer: Envoy's CPU plus the peer process's own (a gRPC server "
                     "that the architecture needs); the split follows.")
            L.append("")
        L.append(head)
        L.append(sep)
        for cfg in settings.CONFIGS:
            for conns in concs:
                L.append(f"| {LABELS[cfg]} | {conns} | " + " | ".join(
                    f"{cells[f'{pos}/{s}/{conns}']['configs'][cfg]['gateway_cpu_us_per_req']:.0f}" for s in sizes) + " |")
        L.append("")
        if "extproc" in settings.CONFIGS:
            extproc_cpu_rows(L, cells, pos, sizes, concs)
        for pc in PICKER_CONFIGS:
            if pc in settings.CONFIGS:
                picker_rows(L, cells, pos, sizes, concs, pc)
    L.append("## Scan speed inside V8 and wasm memory (bbr-wasm's own counters)")
    L.append("")
    L.append("Delta of `bbr_scanned_bytes_total` over delta of `bbr_scan_nanoseconds_total` across the bbr-wasm "
             "runs of each size (both concurrencies). The time is read from the host clock around each 64 KiB "
             "window handed to the scanner, so for small bodies the two clock calls weigh in. "
             "`bbr_wasm_memory_bytes` is the VM's linear memory after the runs of that size.")
    L.append("")
    mem_cols = " | ".join(f"wasm memory after c={c}" for c in concs)
    L.append(f"| body | requests scanned | bytes scanned | scan time | GB/s | ms per MiB | µs per request | {mem_cols} |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in concs) + " |")
    for r in scan_rows:
        mems = " | ".join(f"{(r['memory_by_conns'].get(str(c)) or 0) / 1024:.0f} KiB" for c in concs)
        L.append(f"| {size_label(r['size'])} | {r['requests']} | {r['bytes']} | {r['ns'] / 1e6:.1f} ms | "
                 f"{r['gb_s']:.2f} | {r['ms_per_mib']:.3f} | {r['us_per_request']:.1f} | {mems} |")
    L.append(f"| **all** | | {scan_overall['bytes']} | {scan_overall['ns'] / 1e6:.1f} ms | "
             f"**{scan_overall['gb_s']:.2f}** | **{scan_overall['ms_per_mib']:.3f}** | | " + " | ".join("" for _ in concs) + " |")
    L.append("")
    L.append("## Targets")
    L.append("")
    L.append("Throughput ratios are medians of the per-round ratios; none is against the baseline (the first "
             "baseline targets are retired: no wasm filter that holds and reads the body reaches them here).")
    L.append("")
    L.append("| target | measured | wanted | |")
    L.append("| --- | --- | --- | --- |")
    for c in results:
        v = c["value"]
        shown = f"{v:.3f}" if isinstance(v, float) else str(v)
        L.append(f"| {c['target']} | {shown} | {c['want']} | {'met' if c['pass'] else '**not met**'} |")
    n_fail = sum(not c["pass"] for c in results)
    L.append("")
    L.append(f"{len(results) - n_fail} of {len(results)} targets met.")
    if "extproc" in settings.CONFIGS:
        L.append("")
        L.append("docs/performance.md says how the ext_proc peer follows the Go BBR and what it was spared.")
    L.append("")
    L.append("## Setup")
    L.append("")
    for k in ("command", "envoy", "wrk", "gateway", "upstream", "bodies", "rounds", "commit", "load"):
        L.append(f"- **{k}**: {meta[k]}")
    L.append("")
    L.append("```")
    L.append(meta["lscpu"])
    L.append("```")
    L.append("")
    return "\n".join(L)


def picker_rows(L: list[str], cells: dict, pos: str, sizes, concs, name: str = "bbr_picker") -> None:
    """bbr_picker (or its diagnostic): gateway CPU per request against bbr's, and the picks the
    filter counted."""
    L.append(f"### The endpoint picker ({name}), model {pos}")
    L.append("")
    L.append(f"Gateway CPU per request of {name} ÷ bbr's (above 1: the picker costs CPU), and "
             f"`bbr_endpoint_picked_total` / `bbr_endpoint_failed_over_total` grown during {name}'s "
             "recorded runs, against the requests wrk counted as answered (a run's last requests, cut off "
             "when it ends, are picked but not counted).")
    L.append("")
    L.append("| c | " + " | ".join(f"{size_label(s)} CPU ÷ bbr | {size_label(s)} picked / failed over / answered"
                                  for s in sizes) + " |")
    L.append("| --- | " + " | ".join("--- | ---" for _ in sizes) + " |")
    for conns in concs:
        row = []
        for s in sizes:
            c = cells[f"{pos}/{s}/{conns}"]["configs"]
            p, b = c[name], c["bbr"]
            row.append(fmt_ratio(p["gateway_cpu_us_per_req"] / b["gateway_cpu_us_per_req"])
                       if b["gateway_cpu_us_per_req"] else "n/a")
            row.append(f"{p.get('endpoint_picked', 0)} / {p.get('endpoint_failed_over', 0)} / {p.get('requests', 0)}")
        L.append(f"| {conns} | " + " | ".join(row) + " |")
    L.append("")


def add_extproc_steps(cells: dict, steps: dict[str, dict], positions, sizes, concs) -> None:
    """Puts the peer's steps timed alone (time_extproc_steps) into the extproc cells, in µs."""
    for pos in positions:
        for size in sizes:
            st = steps.get(f"{pos}/{size}")
            if not st:
                continue
            for conns in concs:
                c = cells[f"{pos}/{size}/{conns}"]["configs"]["extproc"]
                c["peer_decode_us"] = st["decode_ns"] / 1000
                c["peer_parse_us"] = st["parse_ns"] / 1000


def extproc_cpu_rows(L: list[str], cells: dict, pos: str, sizes, concs) -> None:
    """Where the ext_proc configuration's CPU goes, against the floor (a wasm filter that holds
    the body and copies it once) and bbr-wasm, per request."""
    head = "| µs per request | c | " + " | ".join(size_label(s) for s in sizes) + " |"
    L.append(f"### The ext_proc peer's CPU per request, split (µs), model {pos}")
    L.append("")
    L.append("Envoy: the gateway process while serving the extproc listener (HTTP, buffering, the "
             "gRPC client: framing the body into a protobuf message, HTTP/2 to the peer, the reply). "
             "Peer: the peer process (HTTP/2 and gRPC decoding, the JSON parse, the answer).")
    L.append("")
    L.append(head)
    L.append("| --- | --- | " + " | ".join("---" for _ in sizes) + " |")
    nan = float("nan")
    rows = [("ext_proc: Envoy", lambda c: c["configs"]["extproc"]["envoy_cpu_us_per_req"]),
            ("ext_proc: peer", lambda c: c["configs"]["extproc"].get("peer_cpu_us_per_req", nan)),
            ("… of it, protobuf decode (timed alone)", lambda c: c["configs"]["extproc"].get("peer_decode_us", nan)),
            ("… of it, JSON parse (timed alone)", lambda c: c["configs"]["extproc"].get("peer_parse_us", nan)),
            ("… the rest: HTTP/2, runtime, socket", lambda c: c["configs"]["extproc"].get("peer_cpu_us_per_req", nan)
             - c["configs"]["extproc"].get("peer_decode_us", nan) - c["configs"]["extproc"].get("peer_parse_us", nan)),
            ("ext_proc: total", lambda c: c["configs"]["extproc"]["gateway_cpu_us_per_req"]),
            ("bbr-wasm (Envoy)", lambda c: c["configs"]["bbr"]["gateway_cpu_us_per_req"])]
    if "wasm_route" in settings.CONFIGS:
        rows.append(("wasm_route floor (Envoy)", lambda c: c["configs"]["wasm_route"]["gateway_cpu_us_per_req"]))
    rows.append(("baseline (Envoy)", lambda c: c["configs"]["baseline"]["gateway_cpu_us_per_req"]))
    for label, get in rows:
        for conns in concs:
            L.append(f"| {label} | {conns} | " + " | ".join(
                f"{get(cells[f'{pos}/{s}/{conns}']):.1f}" for s in sizes) + " |")
    # The CPU ratio: what the throughput ratio would be if the one CPU they share were the
    # only bottleneck; steadier than requests per second on a shared machine.
    for conns in concs:
        L.append(f"| **ext_proc total / bbr-wasm** | {conns} | " + " | ".join(
            fmt_ratio(cells[f'{pos}/{s}/{conns}']["configs"]["extproc"]["gateway_cpu_us_per_req"]
                      / cells[f'{pos}/{s}/{conns}']["configs"]["bbr"]["gateway_cpu_us_per_req"]) for s in sizes) + " |")
    L.append("")


def chart(path: Path, meta: dict, cells: dict, positions, sizes, concs) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (bash scripts/bench-deps.sh); no chart"
    if "baseline" not in settings.CONFIGS:
        return "no baseline in BENCH_CONFIGS: no chart (its upper panels are ratios to the baseline)"
    pos = positions[0]
    colors = {"baseline": "#555555", "native": "#d62728", "bbr": "#1f77b4", "buffer": "#9467bd",
              "bbr_early": "#17becf", "bbr_alt": "#ff7f0e", "wasm_pass": "#bcbd22", "wasm_buffer": "#8c564b",
              "wasm_read": "#e377c2", "wasm_route": "#7f7f7f", "extproc": "#2ca02c", "bbr_noprefix": "#aec7e8",
              "bbr_picker": "#98df8a", "bbr_picker_noretry": "#c5b0d5"}
    fig, axes = plt.subplots(2, len(concs), figsize=(6.2 * len(concs), 9.5), squeeze=False)
    xs = list(range(len(sizes)))
    xl = [size_label(s) for s in sizes]
    for j, conns in enumerate(concs):
        ax = axes[0][j]
        ratios = [("native", "native_vs_baseline"), ("bbr", "bbr_vs_baseline")]
        if "buffer" in settings.CONFIGS:
            ratios.append(("buffer", "buffer_vs_baseline"))
        if "bbr_early" in settings.CONFIGS:
            ratios.append(("bbr_early", "bbr_early_vs_baseline"))
        if "bbr_alt" in settings.CONFIGS:
            ratios.append(("bbr_alt", "bbr_alt_vs_baseline"))
        ratios += [(f"wasm_{m}", f"wasm_{m}_vs_baseline") for m in FLOOR_MODES if f"wasm_{m}" in settings.CONFIGS]
        if "extproc" in settings.CONFIGS:
            ratios.append(("extproc", "extproc_vs_baseline"))
        series = {cfg: [cells[f"{pos}/{s}/{conns}"]["ratio"][key] for s in sizes] for cfg, key in ratios}
        for cfg, ys in series.items():
            ax.plot(xs, ys, marker="o", color=colors[cfg], label=SHORT[cfg])
            for i, (x, y) in enumerate(zip(xs, ys)):
                # The highest value at a size is labelled above its point, the others below.
                top = y >= max(v[i] for v in series.values())
                ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 7 if top else -13),
                            ha="center", fontsize=8, color=colors[cfg])
        ax.axhline(1.0, color=colors["baseline"], lw=1, label=SHORT["baseline"])
        ax.set_xticks(xs, xl)
        ax.set_ylim(0, 1.4 if len(series) <= 2 else 1.6)
        ax.set_title(f"Throughput vs baseline, concurrency {conns}")
        ax.set_ylabel("× baseline requests/s (higher is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right", ncol=3, framealpha=0.9)
        ax = axes[1][j]
        for cfg in settings.CONFIGS:
            p50 = [cells[f"{pos}/{s}/{conns}"]["configs"][cfg]["p50_ms"] for s in sizes]
            p99 = [cells[f"{pos}/{s}/{conns}"]["configs"][cfg]["p99_ms"] for s in sizes]
            ax.plot(xs, p50, marker="o", color=colors[cfg], label=f"{cfg} p50")
            ax.plot(xs, p99, marker="x", ls="--", color=colors[cfg], label=f"{cfg} p99")
        ax.set_yscale("log")
        ax.set_xticks(xs, xl)
        ax.set_title(f"Latency, concurrency {conns}")
        ax.set_ylabel("ms (log scale, lower is better)")
        ax.set_xlabel(f"request body (chat completion, model {pos})")
        ax.grid(alpha=0.3, which="both")
    # One legend for both latency panels, under them, where it hides no line.
    handles, labels = axes[1][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(2 * len(settings.CONFIGS), 8), fontsize=8, frameon=False)
    fig.suptitle(f"bbr-wasm vs the no-inspection baseline, native json_to_metadata"
                 + (", the ext_proc peer" if "extproc" in settings.CONFIGS else "") + "\n"
                 f"Envoy {meta['envoy_version']}, 1 worker; {meta['date']}, {meta['machine']}", fontsize=11)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def machine_info() -> dict:
    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
        except subprocess.SubprocessError:
            return ""

    lscpu = sh("lscpu | head -n 20")
    model = re.search(r"Model name:\s*(.+)", lscpu)
    return {
        "nproc": sh("nproc"),
        "lscpu": lscpu,
        "machine": f"{sh('nproc')} CPUs ({model.group(1).strip() if model else platform.processor()}), "
                   f"{platform.system()} {platform.release()}",
    }


# --------------------------------------------------------------------------------------


def class_markdown(rows: list[dict]) -> str:
    def x(v: Optional[float]) -> str:
        return "–" if v is None else fmt_ratio(v)
    alt = any(r["bbr_alt_vs_bbr"] is not None for r in rows)
    out = ["## Body classes (1 MiB, `model` last; `make corpus`)", "",
           "Each class is a cell like a size: every configuration, the same interleaved rounds. "
           f"The real-text target: bbr-wasm >= {CLASS_FLOOR_TARGET:.2f}x the wasm_route floor on every class.",
           "",
           "| class | c | bbr-wasm vs baseline | floor vs baseline | **bbr-wasm vs floor** | bbr-wasm vs native | "
           + ("BENCH_ALT_WASM build vs bbr-wasm | " if alt else "")
           + "scan GB/s in V8 | scan GB/s the target needs | target |",
           "| --- | --- | --- | --- | --- | --- | " + ("--- | " if alt else "") + "--- | --- | --- |"]
    for r in rows:
        verdict = {True: "met", False: "**NOT MET**", None: "–"}[r["floor_target_met"]]
        scan = "–" if r["scan_gb_s"] is None else f"{r['scan_gb_s']:.2f}"
        need = r.get("scan_needed_gb_s")
        needed = "–" if need is None else ("more than the CPU left" if need == float("inf") else f"{need:.1f}")
        out.append(f"| {r['class']} | {r['conns']} | {x(r['bbr_vs_baseline'])} | {x(r['floor_vs_baseline'])} | "
                   f"**{x(r['bbr_vs_floor'])}** | {x(r['bbr_vs_native'])} | "
                   + (f"{x(r['bbr_alt_vs_bbr'])} | " if alt else "") + f"{scan} | {needed} | {verdict} |")
    judged = [r for r in rows if r["floor_target_met"] is not None]
    if judged:
        worst = min(judged, key=lambda r: r["bbr_vs_floor"])
        met = sum(r["floor_target_met"] for r in judged)
        out += ["", f"bbr-wasm >= {CLASS_FLOOR_TARGET:.2f}x the floor: {met} of {len(judged)} cells "
                f"({'met' if met == len(judged) else 'NOT MET'}); worst: {worst['class']} at "
                f"c={worst['conns']}, {fmt_ratio(worst['bbr_vs_floor'])}.",
                "",
                "\"Scan GB/s the target needs\": from this cell's gateway CPU per request, the scan speed at which "
                f"bbr-wasm would cost the floor's / {CLASS_FLOOR_TARGET:.2f}, the rest of its work as measured. "
                "The per-cell figure moves with the floor's measured CPU. For scale, in V8 14.6 (`make bench-scan`; "
                "docs/body-classes.md): UTF-8 validation alone, which every validating scanner does on every "
                "block of text in Cyrillic, CJK or Arabic, runs at about 10 GB/s, and the string floor (that and "
                "finding the quotes) at about 8.7."]
    return "\n".join(out) + "\n"
