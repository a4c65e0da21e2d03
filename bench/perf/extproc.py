"""The ext_proc peer: the seeds' architecture beside bbr-wasm (a Rust peer of the Go Body
Based Router), started, pinned beside Envoy's worker, and timed step by step."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from .settings import MODEL, MiB, OTHER_MODEL, ROOT, START_TIMEOUT
from .processes import Envoy, Proc


EXTPROC_PEER = ROOT / "target" / "extproc-peer" / "release" / "bbr-extproc-peer"
# Envoy names its worker threads "wrk:worker_<n>" (/proc/<pid>/task/<tid>/comm).
ENVOY_WORKER_COMM = "wrk:worker_0"
# glibc malloc hands blocks of 128 KiB and more straight back to the kernel (mmap/munmap), so
# every large body the peer receives would be fresh pages, faulted in one by one: on this VM
# that is 5.2 ms of a 4 MiB body's 5.4 ms protobuf decode (measured with --time). Envoy
# (tcmalloc), V8's linear memory and Go's heap all keep their memory; so does the peer, with
# these two glibc tunables: no mmap below 64 MiB, no trim below 256 MiB.
EXTPROC_PEER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * MiB), "MALLOC_TRIM_THRESHOLD_": str(256 * MiB)}


def worker_cpus() -> set[int]:
    """The CPU for Envoy's one worker and the ext_proc peer: BENCH_WORKER_CPU, default the
    highest CPU this process may use."""
    allowed = os.sched_getaffinity(0)
    want = os.environ.get("BENCH_WORKER_CPU")
    cpu = int(want) if want else max(allowed)
    if cpu not in allowed:
        raise SystemExit(f"bench: BENCH_WORKER_CPU={cpu} is not among the allowed CPUs {sorted(allowed)}")
    return {cpu}


def pin_envoy_worker(gw: Envoy, cpus: set[int]) -> int:
    """Pins the gateway's worker thread to `cpus`; returns its thread id. Every listener is
    served by this one thread, so the pin is the same for all configurations; the peer runs
    on the same CPUs, so the ext_proc configuration cannot borrow the machine's other core
    for its parse while bbr-wasm does all its work on the worker."""
    for task in Path(f"/proc/{gw.proc.pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue
        if comm == ENVOY_WORKER_COMM:
            tid = int(task.name)
            os.sched_setaffinity(tid, cpus)
            return tid
    raise SystemExit(f"bench: no {ENVOY_WORKER_COMM} thread in the gateway Envoy (pid {gw.proc.pid})")


def start_extproc_peer(socket_path: Path, cpus: set[int], work: Path) -> Proc:
    """Starts bench/extproc-peer on a Unix socket, pinned to `cpus`; waits until it listens.
    It knows both pools' base models, as BBR's AdaptersStore would from its ConfigMaps."""
    if not EXTPROC_PEER.is_file():
        raise SystemExit(f"bench: {EXTPROC_PEER.relative_to(ROOT)} is missing; run `make bench` (it builds it)")
    proc = Proc("extproc-peer", [str(EXTPROC_PEER), "--listen", f"unix:{socket_path}",
                                 "--base-model", MODEL, "--base-model", OTHER_MODEL],
                work / "extproc-peer.log", cpus=cpus, env=EXTPROC_PEER_ENV)
    deadline = time.monotonic() + START_TIMEOUT
    while "ready " not in proc.text():
        if not proc.alive() or time.monotonic() > deadline:
            proc.stop()
            raise SystemExit(f"bench: the ext_proc peer did not start:\n{proc.tail()}")
        time.sleep(0.05)
    return proc


def time_extproc_steps(bodies: dict[tuple[str, int], Path], cpus: set[int]) -> dict[str, dict]:
    """The peer's two steps that can be timed alone, per body: the protobuf decode of the gRPC
    message carrying it and the full JSON parse (bbr-extproc-peer --time), on the same CPU
    and with the same allocator settings as the serving peer. Keyed "<position>/<size>"."""
    out: dict[str, dict] = {}
    for (pos, size), path in sorted(bodies.items()):
        iterations = max(10, (64 * MiB) // size)
        p = subprocess.run([str(EXTPROC_PEER), "--time", str(path), str(iterations)], capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, **EXTPROC_PEER_ENV), check=False,
                           preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        if p.returncode != 0:
            raise SystemExit(f"bench: bbr-extproc-peer --time failed: {p.stderr.strip()}")
        out[f"{pos}/{size}"] = json.loads(p.stdout)
    return out
