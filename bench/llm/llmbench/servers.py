"""The processes of a run (mocks, llama-server, vLLM, Envoy), always stopped by pid, and their
configuration."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

import yaml

from .settings import llama_pool, procs, vllm_pool  # tests/*.py, on sys.path by settings
from .settings import ENVOY_YAML, MOCK, ROOT, RUN_DIR, START_TIMEOUT, STOP_TIMEOUT, SetupError, WASM, say

class Proc(procs.Child):
    """A run's process (tests/procs.py), its log started afresh; vLLM's engine and worker
    processes (`leftovers`, found once it is up) are killed after it if they outlive it."""

    def __init__(self, name: str, argv: list[str], log: Path, env: Optional[dict] = None):
        super().__init__(name, argv, log, cwd=ROOT, env=env, stop_timeout=STOP_TIMEOUT, append=False)
        self.leftovers: list[int] = []

    def stop(self) -> None:
        super().stop()
        if self.leftovers:
            time.sleep(1.0)
            left = vllm_pool.kill_leftovers(self.leftovers)
            if left:
                say(f"{self.name} left processes {left} after it stopped; killed them")


free_port = procs.free_port  # tests/procs.py, shared with the tests and make bench


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # loopback only
        return r.read().decode()


def wait_until(proc: Proc, what: str, check, timeout: float = START_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise SetupError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
        try:
            got = check()
            if got:
                return got
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SetupError(f"{proc.name}: no {what} within {timeout:.0f}s:\n{proc.tail()}")
        time.sleep(0.1)


def start_mock(model: str, backend_id: str, loras: list[str], ttft: int, itl: int) -> tuple[Proc, int]:
    argv = [str(MOCK), "--listen", "127.0.0.1:0", "--model", model, "--id", backend_id]
    for lora in loras:
        argv += ["--lora", lora]
    argv += ["--ttft-ms", str(ttft), "--itl-ms", str(itl)]
    proc = Proc(f"mock-vllm {backend_id}", argv, RUN_DIR / f"mock-{backend_id}.log")

    def bound_port() -> Optional[int]:
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", proc.text())
        return int(m.group(1)) if m else None

    port = wait_until(proc, "'listening' line", bound_port)
    say(f"started {proc.name} (pid {proc.pid}) on 127.0.0.1:{port}: ttft {ttft} ms, itl {itl} ms")
    return proc, port


def envoy_config(port: int, admin_port: int, cluster_ports: dict[str, int]) -> dict:
    """envoy/envoy.yaml as shipped, with free loopback ports and the absolute .wasm path."""
    cfg = yaml.safe_load(ENVOY_YAML.read_text())
    cfg["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=admin_port)
    listener = cfg["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=port)
    hcm = next(
        f["typed_config"]
        for f in listener["filter_chains"][0]["filters"]
        if f["name"] == "envoy.filters.network.http_connection_manager"
    )
    wasm = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm")
    wasm["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(WASM)
    for c in cfg["static_resources"]["clusters"]:
        if c["name"] in cluster_ports:
            for group in c["load_assignment"]["endpoints"]:
                for ep in group["lb_endpoints"]:
                    ep["endpoint"]["address"]["socket_address"]["port_value"] = cluster_ports[c["name"]]
    return cfg


def start_llama(server: str, i: int) -> tuple[Proc, int]:
    """One llama-server replica on a free port, once its /health says 200 (model loaded)."""
    port = free_port()
    proc = Proc(f"llama-server {i}", llama_pool.server_argv(server, port), RUN_DIR / f"llama-{i}.log")

    wait_until(proc, "/health 200", lambda: llama_pool.healthy(port))
    say(f"started {proc.name} (pid {proc.pid}) on 127.0.0.1:{port}")
    return proc, port


def start_vllm(vllm: str) -> tuple[Proc, int, float]:
    """One vLLM on a free port, once its /health says 200 (engine up: 90-100 s on two idle
    cores); returns the seconds that took too."""
    port = free_port()
    env = dict(os.environ)
    env.update(vllm_pool.server_env())
    t0 = time.monotonic()
    proc = Proc("vLLM", vllm_pool.server_argv(vllm, port), RUN_DIR / "vllm.log", env=env)
    say(f"starting vLLM (pid {proc.pid}) on 127.0.0.1:{port}; 90-100 s on two idle cores (log {proc.log_path})")
    wait_until(proc, "/health 200", lambda: vllm_pool.healthy(port), timeout=vllm_pool.START_TIMEOUT)
    took = time.monotonic() - t0
    say(f"vLLM ready after {took:.0f} s")
    proc.leftovers = vllm_pool.descendants(proc.pid)  # its engine and worker (see vllm_pool)
    proc.stop_timeout = vllm_pool.STOP_TIMEOUT
    return proc, port, took


def vllm_success(port: int) -> float:
    """vLLM's own count of finished requests (every model and adapter it serves)."""
    total = 0.0
    for line in http_get(f"http://127.0.0.1:{port}/metrics").splitlines():
        if line.startswith("vllm:request_success_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def start_envoy(
    envoy_bin: str,
    cluster_ports: dict[str, int],
    llama_ports: Optional[list[int]] = None,
    vllm_ports: Optional[list[int]] = None,
) -> tuple[Proc, int, int]:
    port, admin_port = free_port(), free_port()
    cfg_path = RUN_DIR / "envoy.yaml"
    cfg = envoy_config(port, admin_port, cluster_ports)
    if llama_ports:
        llama_pool.add_pool(cfg, llama_ports)
    if vllm_ports:
        vllm_pool.add_pool(cfg, vllm_ports)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    argv = [
        envoy_bin,
        "-c",
        str(cfg_path),
        "--concurrency",
        "2",
        "--use-dynamic-base-id",
        "--base-id-path",
        str(RUN_DIR / "envoy.base-id"),
        "--log-level",
        "warning",
    ]
    proc = Proc("Envoy", argv, RUN_DIR / "envoy.log")
    admin = f"http://127.0.0.1:{admin_port}"

    def ready() -> bool:
        if http_get(admin + "/ready").strip() != "LIVE":
            return False
        flags = [ln for ln in http_get(admin + "/clusters").splitlines() if "::health_flags::" in ln]
        want = 2 + len(llama_ports or []) + len(vllm_ports or [])
        return len(flags) >= want and all(ln.endswith("::healthy") for ln in flags)

    wait_until(proc, "ready listener and healthy hosts", ready)
    say(f"started Envoy (pid {proc.pid}) on 127.0.0.1:{port}, admin {admin_port}")
    return proc, port, admin_port
