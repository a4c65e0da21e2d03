"""Fixtures for the real-model tests: llama.cpp's llama-server running SmolLM2-135M-Instruct,
two replicas behind one cluster, next to the mock-vllm pools, behind Envoy with bbr-wasm.

The server is built once (scripts/llama-deps.sh, through tests/llama_pool.py: about 6 minutes
the first time on 2 cores, then cached in .venv-llama) and started once per session. Envoy,
the mocks and the process handling (free loopback ports, stop by pid, log tails on failure)
are the integration suite's own, loaded from tests/integration/conftest.py under another
module name so that both suites keep their `conftest`.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import llama_pool  # noqa: E402  (tests/llama_pool.py)

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

SMOL = llama_pool.MODEL
QWEN, PHI, LORA = integration.QWEN, integration.PHI, integration.LORA
# Model loading plus the first /health answer; the model file is ~100 MB.
LLAMA_START_TIMEOUT = 60.0


@dataclass
class Replica:
    proc: integration.Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> dict[str, float]:
        """llama-server's /metrics (llamacpp:* names, without the prefix) as numbers."""
        r = httpx.get(self.url + "/metrics", timeout=10.0)
        r.raise_for_status()
        out = {}
        for line in r.text.splitlines():
            m = re.match(r"^llamacpp:(\w+) (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def work(self) -> float:
        """A counter that any request the server handled moves: llama_decode() calls."""
        return self.metrics()["n_decode_total"]


@pytest.fixture(scope="session")
def llama_server() -> str:
    """The built llama-server (scripts/llama-deps.sh); fails with the build's output."""
    try:
        return llama_pool.install()
    except (RuntimeError, OSError) as e:
        pytest.fail(f"could not install llama-server: {e}", pytrace=False)


def start_replica(server: str, tmp_dir: Path, name: str, port: int = 0, **kwargs) -> Replica:
    port = port or integration.free_port()
    argv = llama_pool.server_argv(server, port, **kwargs)
    proc = integration.Proc(name=f"llama-server {name}", argv=argv, log_path=tmp_dir / f"llama-{name}.log")
    deadline = time.monotonic() + LLAMA_START_TIMEOUT
    while True:
        if not proc.alive():
            proc.fail(f"exited with status {proc.popen.returncode} during start-up")
        if llama_pool.healthy(port):
            return Replica(proc=proc, port=port)
        if time.monotonic() > deadline:
            proc.fail(f"/health not 200 within {LLAMA_START_TIMEOUT:.0f}s")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def replicas(llama_server, session_dir) -> list[Replica]:
    started = [start_replica(llama_server, session_dir, f"smollm-{i}") for i in range(2)]
    yield started
    for r in started:
        r.proc.stop()


# Test-only: each answer from the SmolLM2 pool names the replica that served it, so the tests
# can tell the two apart (llama-server's own answer does not say). Not in the shipped config:
# it would show clients the addresses of the servers.
UPSTREAM_HEADER = "x-test-upstream"


def _with_pool(ports: list[int]):
    def mutate(cfg: dict) -> None:
        llama_pool.add_pool(cfg, ports)
        route = next(r for r in integration.routes(cfg) if r.get("name") == llama_pool.ROUTE)
        route["response_headers_to_add"] = [
            {"header": {"key": UPSTREAM_HEADER, "value": "%UPSTREAM_REMOTE_ADDRESS%"}}
        ]

    return mutate


@pytest.fixture(scope="session")
def gateway(envoy_factory, backends, replicas) -> integration.Envoy:
    """Envoy from envoy/envoy.yaml with the SmolLM2 pool added (tests/llama_pool.py), on the
    shared mock pools and the two llama-server replicas; every host healthy before it returns."""
    return envoy_factory(
        integration.backend_ports(backends), mutate=_with_pool([r.port for r in replicas]), name="llama"
    )


def smol_work(replicas: list[Replica]) -> float:
    return sum(r.work() for r in replicas)
