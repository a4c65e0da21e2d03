"""Fixtures for the Istio tests: the manifests in istio/, the CRD schemas, the OCI artifact
(scripts/oci.sh build), a local OCI registry (Debian's docker-registry), mock-vllm backends
and a real Envoy.

Every process is started here (tests/procs.py's Child) on 127.0.0.1 free ports, stopped by pid
(SIGTERM, then SIGKILL), and every wait has a deadline. Nothing is skipped: a missing
prerequisite fails with the command that provides it.

Environment:
  BBR_CRDS_DIR         the CRD schemas (default: ../shared/schemas/crds beside the repository)
  DOCKER_REGISTRY_BIN  the registry binary (default: docker-registry on PATH, apt package
                       docker-registry)
  ENVOY_BIN            see scripts/envoy-bin.sh
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx
import pytest
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bbr_oci  # noqa: E402
sys.path.insert(0, str(HERE.parent))
import procs  # noqa: E402  (tests/procs.py)
import k8s_schema  # noqa: E402

ROOT = HERE.parents[1]
ISTIO = ROOT / "istio"
MOCK = ROOT / "target" / "release" / "mock-vllm"
OCI_SCRIPT = ROOT / "scripts" / "oci.sh"
ENVOY_BIN_SCRIPT = ROOT / "scripts" / "envoy-bin.sh"

QWEN = "Qwen/Qwen2.5-3B-Instruct"
PHI = "microsoft/Phi-3-mini-4k-instruct"
LORA = "qwen-sql-lora"

START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0

_RUNNING: list["Proc"] = []


def crds_dir() -> Path:
    env = os.environ.get("BBR_CRDS_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "schemas" / "crds"


free_port = procs.free_port  # tests/procs.py, shared with the other harnesses


def manifest_files() -> list[Path]:
    """Every YAML file in istio/ that holds Kubernetes objects (not the kustomizations)."""
    return [p for p in k8s_schema.yaml_files(ISTIO) if p.name != "kustomization.yaml"]


def all_docs() -> list[k8s_schema.Doc]:
    return list(k8s_schema.iter_docs(manifest_files()))


def doc(kind: str, name: str) -> dict:
    hits = [d.body for d in all_docs() if d.body.get("kind") == kind and d.body["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind} {name} in istio/, found {len(hits)}"
    return hits[0]


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


class Proc(procs.Child):
    """A child process of these tests (tests/procs.py), stopped at the latest at the session's
    end."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path = ROOT,
                 env: Optional[dict] = None):
        super().__init__(name, argv, log_path, cwd=cwd, env=env, stop_timeout=STOP_TIMEOUT)
        _RUNNING.append(self)

    def tail(self, n: int = 60) -> str:
        return super().tail(n)

    def stop(self) -> None:
        super().stop()
        if self in _RUNNING:
            _RUNNING.remove(self)

    def fail(self, why: str) -> None:
        tail = self.tail()
        self.stop()
        pytest.fail(f"{self.name}: {why}\n--- {self.log_path} ---\n{tail}", pytrace=False)


def wait_for(pred, timeout: float, what: str, proc: Optional[Proc] = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and not proc.alive():
            proc.fail(f"exited with status {proc.popen.returncode} while waiting for {what}")
        try:
            if pred():
                return
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() > deadline:
            if proc is not None:
                proc.fail(f"no {what} within {timeout:.0f}s")
            pytest.fail(f"no {what} within {timeout:.0f}s", pytrace=False)
        time.sleep(0.05)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bbr-istio")


# --------------------------------------------------------------------------------------
# Schemas, the OCI artifact
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def validator() -> k8s_schema.Validator:
    d = crds_dir()
    if not d.is_dir():
        pytest.fail(f"CRD schemas not found at {d}; set BBR_CRDS_DIR (CI: ../shared/schemas/crds)", pytrace=False)
    return k8s_schema.Validator(d)


@pytest.fixture(scope="session")
def oci_build() -> bbr_oci.Artifact:
    """A fresh reproducible build (scripts/oci.sh build) and its OCI packaging."""
    try:
        out = subprocess.run(
            ["bash", str(OCI_SCRIPT), "build"], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail("scripts/oci.sh build did not finish in 15 minutes", pytrace=False)
    if out.returncode != 0:
        pytest.fail(f"scripts/oci.sh build failed ({out.returncode}):\n{out.stderr[-4000:]}", pytrace=False)
    module = (ROOT / "target" / "oci" / "bbr_wasm.wasm").read_bytes()
    return bbr_oci.package(module, bbr_oci.crate_version())


@pytest.fixture(scope="session")
def module_path(oci_build) -> Path:
    return ROOT / "target" / "oci" / "bbr_wasm.wasm"


# --------------------------------------------------------------------------------------
# A local OCI registry
# --------------------------------------------------------------------------------------


def registry_bin() -> str:
    b = os.environ.get("DOCKER_REGISTRY_BIN") or shutil.which("docker-registry")
    if not b:
        pytest.fail("docker-registry not found: apt-get install -y docker-registry (or set DOCKER_REGISTRY_BIN)", pytrace=False)
    return b


@dataclass
class Registry:
    proc: Proc
    host: str  # 127.0.0.1:PORT


@pytest.fixture(scope="session")
def registry(session_dir) -> Registry:
    """Our own registry process (never the package's system service): storage in a tmp dir,
    plain HTTP on a free loopback port, stopped by pid at the end."""
    port = free_port()
    d = session_dir / f"registry-{port}"
    d.mkdir()
    cfg = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(d / "data")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": uuid.uuid4().hex},
    }
    (d / "config.yml").write_text(yaml.safe_dump(cfg))
    # The registry reads REGISTRY_* variables as config overrides: none from outside.
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    proc = Proc("docker-registry", [registry_bin(), "serve", str(d / "config.yml")], d / "registry.log", env=env)
    wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1.0).status_code == 200, START_TIMEOUT, "registry /v2/", proc)
    yield Registry(proc=proc, host=f"127.0.0.1:{port}")
    proc.stop()


# --------------------------------------------------------------------------------------
# mock-vllm and Envoy
# --------------------------------------------------------------------------------------


@dataclass
class Mock:
    proc: Proc
    id: str
    port: int


def start_mock(tmp: Path, model: str, id: str, loras: tuple[str, ...] = ()) -> Mock:
    if not MOCK.is_file():
        pytest.fail(f"{MOCK} is missing: cargo build --release -p mock-vllm (make build)", pytrace=False)
    port = free_port()
    argv = [str(MOCK), "--listen", f"127.0.0.1:{port}", "--model", model, "--id", id]
    for lora in loras:
        argv += ["--lora", lora]
    proc = Proc(f"mock-vllm {id}", argv, tmp / f"mock-{id}-{port}.log")
    wait_for(lambda: re.search(r"listening", proc.text().split("\n", 1)[-1]) is not None, START_TIMEOUT, "listening line", proc)
    return Mock(proc, id, port)


@pytest.fixture(scope="session")
def backends(session_dir):
    """qwen-pool's stand-in (Qwen + qwen-sql-lora) and phi-pool's, by InferencePool name."""
    mocks = {
        "qwen-pool": start_mock(session_dir, QWEN, "qwen-pool", (LORA,)),
        "phi-pool": start_mock(session_dir, PHI, "phi-pool"),
    }
    yield mocks
    for m in mocks.values():
        m.proc.stop()


@pytest.fixture(scope="session")
def envoy_bin() -> str:
    out = subprocess.run(["bash", str(ENVOY_BIN_SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    path = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if out.returncode != 0 or not path:
        pytest.fail(f"scripts/envoy-bin.sh found no Envoy ({out.returncode}):\n{out.stderr}\nRun `make venv`.", pytrace=False)
    return path


@dataclass
class Envoy:
    proc: Proc
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def launch_envoy(envoy_bin: str, tmp: Path, config: dict, name: str, extra_args: tuple[str, ...] = ()) -> Proc:
    """`extra_args`: what the istio-agent adds (istio_deploy.agent_envoy_args), e.g. the
    bootstrap override as --config-yaml."""
    tag = f"{name}-{uuid.uuid4().hex[:8]}"
    path = tmp / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [
        envoy_bin, "-c", str(path), "--concurrency", "1", "--use-dynamic-base-id",
        "--base-id-path", str(tmp / f"{tag}.base-id"), "--log-level", "info", *extra_args,
    ]
    return Proc(f"Envoy ({name})", argv, tmp / f"{tag}.log", cwd=tmp)


def start_envoy(envoy_bin: str, tmp: Path, config: dict, name: str, extra_args: tuple[str, ...] = ()) -> Envoy:
    """Starts Envoy and waits until admin /ready says LIVE and the listener accepts."""
    port = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    admin = config["admin"]["address"]["socket_address"]["port_value"]
    proc = launch_envoy(envoy_bin, tmp, config, name, extra_args)

    def ready() -> bool:
        if httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=1.0).text.strip() != "LIVE":
            return False
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True

    wait_for(ready, START_TIMEOUT, "LIVE", proc)
    return Envoy(proc, port, admin)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for p in list(_RUNNING):
            report.sections.append((f"{p.name} log tail ({p.log_path})", p.tail()))
    return report


def pytest_sessionfinish(session, exitstatus):
    for p in list(_RUNNING):
        p.stop()
