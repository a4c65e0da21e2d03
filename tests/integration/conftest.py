"""Fixtures for the Envoy integration tests.

Everything runs on loopback: two (or more) mock-vllm backends on free ports, and Envoy
started from envoy/envoy.yaml with its ports, cluster endpoints and .wasm path rewritten.
Processes (tests/procs.py's Child) die with pytest and are killed by pid at teardown; every
wait has a deadline. On a failing test the tail of each running process's log is attached
to the report.

Needs `make build` first (target/wasm32-wasip1/release/bbr_wasm.wasm and
target/release/mock-vllm); nothing is skipped: a missing artefact fails with that hint.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import procs  # noqa: E402  (tests/procs.py)
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "bbr_wasm.wasm"
MOCK = ROOT / "target" / "release" / "mock-vllm"
# Test-only: writes given bytes into Envoy's shared data (the picker's fault tests).
SHARED_DATA_WRITER = ROOT / "target" / "wasm32-wasip1" / "release" / "shared_data_writer.wasm"
ENVOY_YAML = ROOT / "envoy" / "envoy.yaml"
ENVOY_K8S_YAML = ROOT / "envoy" / "envoy-k8s.yaml"
ENVOY_BIN_SCRIPT = ROOT / "scripts" / "envoy-bin.sh"

QWEN = "Qwen/Qwen2.5-3B-Instruct"
PHI = "microsoft/Phi-3-mini-4k-instruct"
LORA = "qwen-sql-lora"
QWEN_ID = "qwen-a"
PHI_ID = "phi-a"
BASE_OF = {QWEN: QWEN, LORA: QWEN, PHI: PHI}
BACKEND_OF = {QWEN: QWEN_ID, LORA: QWEN_ID, PHI: PHI_ID}

WASM_FILTER = "envoy.filters.http.wasm"
DEFAULT_FILTER_CONFIG = {
    "models": [
        {"name": QWEN, "adapters": [LORA]},
        {"name": PHI},
    ]
}

START_TIMEOUT = 30.0  # seconds for a process to come up
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
LOG_TAIL_LINES = 60

# Every process started by these fixtures, for the failure report and the final sweep.
_RUNNING: list["Proc"] = []
_RUNNING_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------
# Prerequisites
# --------------------------------------------------------------------------------------


def _require_artifacts() -> None:
    missing = [str(p.relative_to(ROOT)) for p in (WASM, MOCK, SHARED_DATA_WRITER) if not p.is_file()]
    if missing:
        pytest.fail(
            "integration tests need the built filter and mock backend; missing: "
            + ", ".join(missing)
            + ". Run `make build` first.",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def envoy_bin() -> str:
    """The Envoy binary from scripts/envoy-bin.sh ($ENVOY_BIN, func-e, or .venv)."""
    try:
        out = subprocess.run(
            ["bash", str(ENVOY_BIN_SCRIPT)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("scripts/envoy-bin.sh did not finish in 10 minutes", pytrace=False)
    path = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if out.returncode != 0 or not path:
        pytest.fail(
            f"scripts/envoy-bin.sh found no Envoy (exit {out.returncode}):\n{out.stderr}"
            "\nRun `make venv` (or set ENVOY_BIN).",
            pytrace=False,
        )
    return path


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


# free_port, die_with_parent (the children die with pytest, even if it is SIGKILLed) and the
# stop sequence are shared with the Istio tests and the benchmarks: tests/procs.py.
free_port = procs.free_port
_die_with_parent = procs.die_with_parent


class Proc(procs.Child):
    """A test's child process (tests/procs.py: output to a log file, killed with pytest, stopped
    by pid), run from the repository's root; stopped at the latest when the session ends."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path = ROOT):
        super().__init__(name, argv, log_path, cwd=cwd, stop_timeout=STOP_TIMEOUT)
        with _RUNNING_LOCK:
            _RUNNING.append(self)

    def tail(self, n: int = LOG_TAIL_LINES) -> str:
        return super().tail(n)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; by pid, always."""
        super().stop()
        with _RUNNING_LOCK:
            if self in _RUNNING:
                _RUNNING.remove(self)

    def kill(self) -> None:
        """SIGKILL by pid: a backend that dies without warning."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=STOP_TIMEOUT)
        self.stop()

    def fail(self, why: str) -> None:
        tail = self.tail()
        self.stop()
        pytest.fail(f"{self.name}: {why}\n--- last lines of {self.log_path} ---\n{tail}", pytrace=False)


# --------------------------------------------------------------------------------------
# mock-vllm
# --------------------------------------------------------------------------------------


@dataclass
class Mock:
    proc: Proc
    model: str
    loras: list[str]
    id: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict:
        r = httpx.get(f"{self.url}/mock/stats", timeout=5.0)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        self.proc.stop()

    def kill(self) -> None:
        self.proc.kill()


def start_mock(
    tmp_dir: Path,
    model: str,
    id: str,
    loras: tuple[str, ...] = (),
    port: Optional[int] = None,
    extra: tuple[str, ...] = (),
) -> Mock:
    """Starts target/release/mock-vllm on 127.0.0.1 and waits for its 'listening' line."""
    _require_artifacts()
    port = port or free_port()
    argv = [str(MOCK), "--listen", f"127.0.0.1:{port}", "--model", model, "--id", id]
    for lora in loras:
        argv += ["--lora", lora]
    argv += list(extra)
    log = tmp_dir / f"mock-{id}-{port}.log"
    proc = Proc(name=f"mock-vllm {id}", argv=argv, log_path=log)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not proc.alive():
            proc.fail(f"exited with status {proc.popen.returncode} before listening")
        if re.search(r"listening", proc.text().split("\n", 1)[-1]):
            break
        time.sleep(0.05)
    else:
        proc.fail(f"no 'listening' line within {START_TIMEOUT:.0f}s")
    return Mock(proc=proc, model=model, loras=list(loras), id=id, port=port)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bbr-integration")


@pytest.fixture(scope="session")
def mock_factory(session_dir) -> Callable[..., Mock]:
    """start(model, id, loras=(), port=None, extra=()) -> Mock; stopped at session end."""
    started: list[Mock] = []

    def start(*args, **kwargs) -> Mock:
        m = start_mock(session_dir, *args, **kwargs)
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


@dataclass
class Backends:
    qwen: Mock
    phi: Mock

    def by_id(self) -> dict[str, Mock]:
        return {self.qwen.id: self.qwen, self.phi.id: self.phi}

    def stats(self) -> dict[str, dict]:
        return {self.qwen.id: self.qwen.stats(), self.phi.id: self.phi.stats()}


@pytest.fixture(scope="session")
def backends(mock_factory) -> Backends:
    """The shared pair: Qwen (+ qwen-sql-lora) as qwen-a, Phi as phi-a."""
    return Backends(
        qwen=mock_factory(QWEN, QWEN_ID, loras=(LORA,)),
        phi=mock_factory(PHI, PHI_ID),
    )


# --------------------------------------------------------------------------------------
# Envoy
# --------------------------------------------------------------------------------------


def load_envoy_yaml(path: Path = ENVOY_YAML) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def hcm(cfg: dict) -> dict:
    """The HttpConnectionManager typed_config of the (single) listener."""
    listener = cfg["static_resources"]["listeners"][0]
    for f in listener["filter_chains"][0]["filters"]:
        if f["name"] == "envoy.filters.network.http_connection_manager":
            return f["typed_config"]
    raise AssertionError("no http_connection_manager in the listener")


def http_filters(cfg: dict) -> list[dict]:
    return hcm(cfg)["http_filters"]


def wasm_plugin(cfg: dict) -> dict:
    """The wasm filter's envoy.extensions.wasm.v3.PluginConfig."""
    for f in http_filters(cfg):
        if f["name"] == WASM_FILTER:
            return f["typed_config"]["config"]
    raise AssertionError(f"no {WASM_FILTER} filter")


def set_filter_config(cfg: dict, filter_config: dict) -> None:
    wasm_plugin(cfg)["configuration"]["value"] = json.dumps(filter_config)


def filter_config_with(**overrides: Any) -> dict:
    c = copy.deepcopy(DEFAULT_FILTER_CONFIG)
    c.update(overrides)
    return c


def insert_before_wasm(cfg: dict, http_filter: dict) -> None:
    filters = http_filters(cfg)
    idx = next(i for i, f in enumerate(filters) if f["name"] == WASM_FILTER)
    filters.insert(idx, http_filter)


def cluster(cfg: dict, name: str) -> dict:
    for c in cfg["static_resources"]["clusters"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no cluster {name}")


def set_cluster_port(cfg: dict, name: str, port: int) -> None:
    for group in cluster(cfg, name)["load_assignment"]["endpoints"]:
        for ep in group["lb_endpoints"]:
            ep["endpoint"]["address"]["socket_address"]["port_value"] = port


def set_cluster_endpoints(cfg: dict, name: str, ports: list[int]) -> None:
    """One loopback endpoint per port in cluster `name` (a pool of several replicas)."""
    cluster(cfg, name)["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}} for p in ports
    ]


def routes(cfg: dict) -> list[dict]:
    return hcm(cfg)["route_config"]["virtual_hosts"][0]["routes"]


def tenant_system_prompt(tenant: int) -> str:
    """A tenant's ~3 KiB system prompt (12 blocks of 256 bytes), distinct per tenant from its
    first block on: the prefix affinity and picker tests' shared prefixes."""
    return f"You are the support assistant of tenant {tenant}. " + " ".join(
        f"Rule {i}: answer politely, cite the manual section {tenant}.{i}, and never guess." for i in range(40)
    )


def burst(base_url: str, model: str, messages: list[dict], requests: int, workers: int) -> tuple[str, list[httpx.Response]]:
    """One request with `messages` to learn its replica (x-mock-backend), then `requests` more
    from `workers` threads at once: the home replica and the burst's answers."""
    body = {"model": model, "max_tokens": 8, "messages": messages}
    with httpx.Client(base_url=base_url, timeout=60.0) as client:
        first = client.post("/v1/chat/completions", json=body)
        assert first.status_code == 200, first.text[:300]
        with ThreadPoolExecutor(max_workers=workers) as ex:
            answers = list(ex.map(lambda _: client.post("/v1/chat/completions", json=body), range(requests)))
    assert all(a.status_code == 200 for a in answers), [a.status_code for a in answers]
    return first.headers["x-mock-backend"], answers


@dataclass
class Envoy:
    proc: Proc
    port: int
    admin_port: int
    config_path: Path
    config: dict
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def client(self, http2: bool = False, **kwargs: Any) -> httpx.Client:
        """An httpx client for the listener; http2=True speaks h2c with prior knowledge."""
        kwargs.setdefault("timeout", 30.0)
        if http2:
            c = httpx.Client(base_url=self.url, http1=False, http2=True, **kwargs)
        else:
            c = httpx.Client(base_url=self.url, **kwargs)
        self.clients.append(c)
        return c

    def async_client(self, http2: bool = False, **kwargs: Any) -> httpx.AsyncClient:
        """As `client`, for asyncio (use it as `async with`)."""
        kwargs.setdefault("timeout", 30.0)
        if http2:
            return httpx.AsyncClient(base_url=self.url, http1=False, http2=True, **kwargs)
        return httpx.AsyncClient(base_url=self.url, **kwargs)

    def admin(self, path: str) -> str:
        return httpx.get(self.admin_url + path, timeout=5.0).text

    def stat(self, name: str) -> int:
        """One counter or gauge from the admin /stats page."""
        for line in self.admin("/stats?filter=^" + re.escape(name) + "$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        raise AssertionError(f"no stat {name}")

    def health_flags(self, cluster_name: str) -> list[str]:
        """health_flags of each host of a cluster, from the admin /clusters page."""
        out = []
        for line in self.admin("/clusters").splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == cluster_name and parts[2] == "health_flags":
                out.append(parts[3])
        return out

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        self.proc.stop()


def _hosts_health(env: Envoy) -> dict[str, str]:
    """cluster::host -> health_flags from the admin /clusters page."""
    out = {}
    for line in env.admin("/clusters").splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[2] == "health_flags":
            out[f"{parts[0]}::{parts[1]}"] = parts[3]
    return out


def _wait_ready(env: Envoy, wait_healthy: bool) -> None:
    """Until Envoy is LIVE and its listener accepts, then (wait_healthy) until every upstream
    host passed its health check; fails the test with Envoy's log tail otherwise."""
    proc, deadline = env.proc, time.monotonic() + START_TIMEOUT
    while True:
        if not proc.alive():
            proc.fail(f"exited with status {proc.popen.returncode} during start-up (config {env.config_path})")
        if time.monotonic() > deadline:
            proc.fail(f"not ready within {START_TIMEOUT:.0f}s (config {env.config_path})")
        try:
            if env.admin("/ready").strip() == "LIVE":
                with socket.create_connection(("127.0.0.1", env.port), timeout=1.0):
                    pass
                break
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.1)
    while wait_healthy:
        health = _hosts_health(env)
        if health and all(v == "healthy" for v in health.values()):
            break
        if time.monotonic() > deadline:
            proc.fail(f"hosts not healthy within {START_TIMEOUT:.0f}s: {health}")
        time.sleep(0.1)


def start_envoy(
    envoy_bin: str,
    tmp_dir: Path,
    ports: dict[str, int],
    mutate: Optional[Callable[[dict], None]] = None,
    name: str = "envoy",
    wait_healthy: bool = True,
    concurrency: int = 1,
) -> Envoy:
    """Starts Envoy from envoy/envoy.yaml with:

    - listener and admin on free loopback ports,
    - cluster `<name>` pointed at 127.0.0.1:ports[name] (e.g. {"qwen-vllm": 8001}),
    - the .wasm path made absolute,
    - then `mutate(config)` for the test's own changes.

    Waits until admin /ready says LIVE, the listener accepts connections and (with
    wait_healthy) every host passed its first health check.
    """
    cfg, port, admin_port = build_envoy_config(ports, mutate)
    tag = f"{name}-{uuid.uuid4().hex[:8]}"
    config_path = tmp_dir / f"{tag}.yaml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    argv = envoy_argv(envoy_bin, tmp_dir, config_path, tag, concurrency)
    proc = Proc(name=f"Envoy ({name})", argv=argv, log_path=tmp_dir / f"{tag}.log")
    env = Envoy(proc=proc, port=port, admin_port=admin_port, config_path=config_path, config=cfg)
    _wait_ready(env, wait_healthy)
    return env


@pytest.fixture(scope="session")
def envoy_factory(envoy_bin, session_dir) -> Callable[..., Envoy]:
    """start(ports, mutate=None, name=..., wait_healthy=True, concurrency=1) -> Envoy; stopped at
    session end."""
    started: list[Envoy] = []

    def start(ports: dict[str, int], mutate=None, name: str = "envoy", wait_healthy: bool = True,
              concurrency: int = 1) -> Envoy:
        env = start_envoy(envoy_bin, session_dir, ports, mutate=mutate, name=name, wait_healthy=wait_healthy,
                          concurrency=concurrency)
        started.append(env)
        return env

    yield start
    for env in started:
        env.stop()


def backend_ports(b: Backends) -> dict[str, int]:
    return {"qwen-vllm": b.qwen.port, "phi-vllm": b.phi.port}


@pytest.fixture(scope="module")
def upstream():
    """A scripted upstream (fault_upstream.py) for the module's tests, in the Phi pool's place."""
    import fault_upstream

    u = fault_upstream.FaultUpstream()
    yield u
    u.stop()


@pytest.fixture(scope="session")
def envoy(envoy_factory, backends) -> Envoy:
    """envoy/envoy.yaml as shipped (default filter config), on the shared backends."""
    return envoy_factory(backend_ports(backends), name="default")


@pytest.fixture(scope="session")
def envoy_passthrough(envoy_factory, backends) -> Envoy:
    """unknownModel = passthrough."""
    return envoy_factory(
        backend_ports(backends),
        mutate=lambda c: set_filter_config(c, filter_config_with(unknownModel="passthrough")),
        name="passthrough",
    )


# --------------------------------------------------------------------------------------
# Helpers for tests
# --------------------------------------------------------------------------------------


def completion_body(model: Any, **extra: Any) -> dict:
    body = {"model": model, "prompt": "Say hello", "max_tokens": 4}
    body.update(extra)
    return body


def chat_body(model: Any, **extra: Any) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 4}
    body.update(extra)
    return body


def assert_routed(resp: httpx.Response, model: str) -> None:
    """A 200 from the right backend, with the routing headers the filter set."""
    assert resp.status_code == 200, f"{resp.status_code} {resp.text[:500]}"
    assert resp.headers.get("x-mock-backend") == BACKEND_OF[model], dict(resp.headers)
    assert resp.headers.get("x-echo-base-model-name") == BASE_OF[model], dict(resp.headers)
    assert resp.headers.get("x-echo-model-name") == model, dict(resp.headers)
    assert resp.json()["model"] == model


def assert_openai_error(
    resp: httpx.Response, status: int, code: str, type_: str = "invalid_request_error", param: Any = None
) -> dict:
    """The exact OpenAI error shape of CONTRACTS.md, and no backend in the response."""
    assert resp.status_code == status, f"want {status} {code}, got {resp.status_code}: {resp.text[:500]}"
    assert resp.headers.get("content-type", "").split(";")[0].strip() == "application/json", dict(resp.headers)
    assert "x-mock-backend" not in resp.headers, "the request reached a backend"
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"] == type_, err
    assert err["code"] == code, err
    assert err["param"] == param, err
    return err


def totals(b: Backends) -> dict[str, int]:
    return {i: s["total"] for i, s in b.stats().items()}


# --------------------------------------------------------------------------------------
# Reporting and the final sweep
# --------------------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        with _RUNNING_LOCK:
            procs = list(_RUNNING)
        for p in procs:
            report.sections.append((f"{p.name} log tail ({p.log_path})", p.tail()))
    return report


def pytest_sessionfinish(session, exitstatus):
    # Whatever a fixture could not stop (an error during set-up): stop it now, by pid.
    with _RUNNING_LOCK:
        procs = list(_RUNNING)
    for p in procs:
        p.stop()


def read_http1_until_close(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Reads a `Connection: close` response to its end and parses it (see parse_http1)."""
    data = b""
    while True:
        part = sock.recv(65536)
        if not part:
            break
        data += part
    return parse_http1(data)


def parse_http1(data: bytes) -> tuple[int, dict, bytes]:
    """Status, lower-cased headers and body of a raw HTTP/1.1 response (1xx skipped,
    chunked bodies decoded, Content-Length honoured)."""
    # Skip interim 1xx responses (100 Continue).
    while True:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if 100 <= status < 200:
            data = rest
            continue
        break
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, buf = b"", rest
        while buf:
            size_line, _, buf = buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body, buf = body + buf[:size], buf[size + 2 :]
        rest = body
    elif "content-length" in headers:
        rest = rest[: int(headers["content-length"])]
    return status, headers, rest


# --------------------------------------------------------------------------------------
# Envoy variants (bad input, faults, soak): more worker threads, ECDS, start-up failures.
# start_envoy above stays as it is; these build the same config the same way.
# --------------------------------------------------------------------------------------

# The Wasm runtime and plugin stats that show a VM failing, being replaced or reloaded
# (Envoy 1.40, admin /stats). Counters must not move while requests are served;
# the gauges must not change.
WASM_VM_STATS = (
    "wasm.envoy.wasm.runtime.v8.created",  # counter: every VM created (base, canary, per worker)
    "wasm.envoy.wasm.runtime.v8.active",  # gauge: VMs alive
    "wasm.wasm_vm_count",  # gauge: VMs alive, process-wide
    "wasm.bbr.vm_reload",  # counters of failure_policy FAIL_RELOAD: a failed VM replaced
    "wasm.bbr.vm_reload_success",
    "wasm.bbr.vm_reload_failure",
    "wasm.bbr.vm_reload_backoff",
)


def wasm_vm_stats(env: "Envoy") -> dict[str, int]:
    """The WASM_VM_STATS of one Envoy (a missing stat reads as -1, so a change shows)."""
    out = {name: -1 for name in WASM_VM_STATS}
    for line in env.admin("/stats?filter=^wasm\\.").splitlines():
        key, _, value = line.partition(": ")
        if key in out:
            out[key] = int(value)
    return out


# Lines Envoy logs when a Wasm VM fails (proxy-wasm host): "Wasm VM failed <why>", a trap
# ("Function: proxy_on_... failed: Uncaught RuntimeError: unreachable") or a plugin that
# could not be (re)loaded.
WASM_FAILURE_LOG = re.compile(r"Wasm VM failed|Function: \S+ failed|failed to load|Plugin .* failed|RuntimeError")


def log_size(env: "Envoy") -> int:
    """The current size of Envoy's log file, for wasm_failure_lines(env, since=...)."""
    try:
        return env.proc.log_path.stat().st_size
    except OSError:
        return 0


def wasm_failure_lines(env: "Envoy", since: int = 0) -> list[str]:
    """Wasm failure lines in Envoy's log, from byte offset `since` on."""
    with open(env.proc.log_path, "rb") as f:
        f.seek(since)
        text = f.read().decode("utf-8", errors="replace")
    return [line for line in text.splitlines() if WASM_FAILURE_LOG.search(line)]


def build_envoy_config(
    ports: dict[str, int], mutate: Optional[Callable[[dict], None]] = None
) -> tuple[dict, int, int]:
    """envoy/envoy.yaml with free listener/admin ports, cluster ports and the absolute .wasm
    path (as start_envoy does), then mutate(config). Returns (config, port, admin_port)."""
    _require_artifacts()
    cfg = load_envoy_yaml()
    port, admin_port = free_port(), free_port()
    cfg["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=admin_port)
    listener = cfg["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=port)
    wasm_plugin(cfg)["vm_config"]["code"]["local"]["filename"] = str(WASM)
    for cluster_name, cluster_port in ports.items():
        set_cluster_port(cfg, cluster_name, cluster_port)
    # The endpoint picker's loopback cluster to Envoy's own admin follows the admin's port.
    if any(c["name"] == "bbr-envoy-admin" for c in cfg["static_resources"]["clusters"]):
        set_cluster_port(cfg, "bbr-envoy-admin", admin_port)
    if mutate is not None:
        mutate(cfg)
    return cfg, port, admin_port


def envoy_argv(envoy_bin: str, tmp_dir: Path, config_path: Path, tag: str, concurrency: int) -> list[str]:
    return [
        envoy_bin,
        "-c",
        str(config_path),
        "--concurrency",
        str(concurrency),
        # Several Envoys run at once: each picks its own shared-memory base id.
        "--use-dynamic-base-id",
        "--base-id-path",
        str(tmp_dir / f"{tag}.base-id"),
        "--log-level",
        "info",
    ]


def run_envoy_to_exit(
    envoy_bin: str, tmp_dir: Path, cfg: dict, name: str, timeout: float = START_TIMEOUT
) -> tuple[Optional[int], str]:
    """Runs Envoy on a config that should make it exit during start-up. Returns (exit status,
    log); the status is None if it was still running after `timeout` (then it is killed)."""
    tag = f"{name}-{uuid.uuid4().hex[:8]}"
    config_path = tmp_dir / f"{tag}.yaml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = Proc(
        name=f"Envoy ({name})",
        argv=envoy_argv(envoy_bin, tmp_dir, config_path, tag, 1),
        log_path=tmp_dir / f"{tag}.log",
    )
    status = proc.wait_exit(timeout)
    log = proc.text()
    proc.stop()
    return status, log
