"""Faults, through the real Envoy 1.40.

- A whole model down: every replica of a pool gone -> 503 no_healthy_upstream JSON, other
  models unaffected (one replica: test_errors.py; here a pool of two).
- Invalid configuration:
  - at start-up, Envoy refuses to start and logs one `bbr-wasm: configuration refused:
    <field>: <reason>` line (several bad configurations, and whatever the failure_policy);
  - pushed at run time through ECDS (a file-based `config_discovery` for the Wasm filter,
    as Istio pushes WasmPlugins): Envoy rejects the update
    (extension_config_discovery.http_filter.bbr.update_rejected / config_fail), and the
    previous configuration keeps serving, without one failed request; a good update (a new
    model) then takes effect.
- The Wasm VM fails to load:
  - a corrupt .wasm file at start-up: Envoy refuses to start, FAIL_CLOSED or FAIL_OPEN;
  - a corrupt .wasm pushed through ECDS: rejected like a bad configuration, the previous
    filter keeps serving, FAIL_CLOSED or FAIL_OPEN;
  - a module that only fails after start-up (remote code, fetched and found corrupt, so the
    plugin never loads): FAIL_CLOSED (and FAIL_RELOAD, the shipped policy) answer every
    request on the listener with Envoy's 503 (empty body); FAIL_OPEN lets every request
    through the filter untouched: no routing header is set, so inference requests get 404
    route_not_found, and a client-sent routing header is NOT removed and routes the request
    to the pool it names;
  - a VM that traps while serving (a hand-assembled stand-in module, standin_wasm.py, since
    bbr-wasm has no reachable trap): the trapping request gets a 503 under every policy;
    then FAIL_RELOAD (shipped) answers 503 during a back-off of about a second and then
    serves from a fresh VM, FAIL_CLOSED answers 503 for good, FAIL_OPEN skips the filter.
"""

from __future__ import annotations

import copy
import hashlib
import http.server
import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import (
    DEFAULT_FILTER_CONFIG,
    LORA,
    PHI,
    QWEN,
    WASM,
    WASM_FILTER,
    assert_openai_error,
    assert_routed,
    build_envoy_config,
    chat_body,
    cluster,
    completion_body,
    free_port,
    http_filters,
    routes,
    run_envoy_to_exit,
    start_envoy,
    start_mock,
    totals,
    wasm_plugin,
    wasm_vm_stats,
)
from standin_wasm import BODY, trap_module

REFUSED = "bbr-wasm: configuration refused: "
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
ECDS = "extension_config_discovery.http_filter.bbr."
# Not a Wasm module: the magic number and version, then garbage.
CORRUPT_WASM = b"\x00asm\x01\x00\x00\x00" + b"\xff this is not a wasm module \xff" * 8


@pytest.fixture(scope="module")
def corrupt_wasm(session_dir) -> Path:
    path = session_dir / "corrupt.wasm"
    path.write_bytes(CORRUPT_WASM)
    return path


# ---------------------------------------------------------------------------------------
# A whole model down
# ---------------------------------------------------------------------------------------


def test_every_replica_of_a_model_down(envoy_factory, session_dir):
    """Phi has two replicas; both die. Every Phi request gets Envoy's 503 JSON, over HTTP/1.1
    and HTTP/2, with or without a forged routing header; Qwen keeps working; nothing reaches
    a wrong pool."""
    qwen = start_mock(session_dir, QWEN, "qwen-a", loras=(LORA,))
    phi_a = start_mock(session_dir, PHI, "phi-a")
    phi_b = start_mock(session_dir, PHI, "phi-b")
    try:

        def two_phi(cfg):
            cluster(cfg, "phi-vllm")["load_assignment"]["endpoints"][0]["lb_endpoints"].append(
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": phi_b.port}}}}
            )

        env = envoy_factory({"qwen-vllm": qwen.port, "phi-vllm": phi_a.port}, mutate=two_phi, name="model-down")
        h1, h2 = env.client(), env.client(http2=True)
        # Both replicas serve. Requests without a prefix key get a random host (MAGLEV with no
        # hash): 30 tries miss one replica with probability 2 x 2^-30 (6 did, 1 run in ~30).
        seen = {h1.post("/v1/completions", json=completion_body(PHI)).headers["x-mock-backend"] for _ in range(30)}
        assert seen == {"phi-a", "phi-b"}, seen
        phi_a.kill()
        phi_b.kill()
        qwen_before = qwen.stats()["total"]
        for i in range(20):
            client = h2 if i % 2 else h1
            headers = {"x-gateway-base-model-name": QWEN} if i % 4 >= 2 else {}
            body = completion_body(PHI) if i % 3 else chat_body(PHI)
            path = "/v1/completions" if i % 3 else "/v1/chat/completions"
            r = client.post(path, json=body, headers=headers)
            assert_openai_error(r, 503, "no_healthy_upstream", type_="service_unavailable_error")
        assert qwen.stats()["total"] == qwen_before, "a Phi request reached the Qwen pool"
        assert_routed(h1.post("/v1/completions", json=completion_body(QWEN)), QWEN)
        assert_routed(h2.post("/v1/chat/completions", json=chat_body(LORA)), LORA)
    finally:
        for m in (qwen, phi_a, phi_b):
            m.stop()


# ---------------------------------------------------------------------------------------
# Invalid configuration at start-up
# ---------------------------------------------------------------------------------------

BAD_CONFIGS = {
    "no_models": ('{"models": []}', "models: must list at least one model"),
    "duplicate_name": (
        json.dumps({"models": [{"name": QWEN, "adapters": [LORA]}, {"name": LORA}]}),
        f'models[0].adapters[0]: duplicate name "{LORA}", already at models[1].name',
    ),
    "unknown_key": ('{"models": [{"name": "a"}], "modelz": []}', "unknown field `modelz`"),
    "empty_name": ('{"models": [{"name": ""}]}', "models[0].name: must not be empty"),
    "name_with_whitespace": ('{"models": [{"name": " a"}]}', "models[0].name: must not start or end with whitespace"),
    "bad_unknown_model_policy": ('{"models": [{"name": "a"}], "unknownModel": "drop"}', "unknown variant `drop`"),
    "max_body_zero": ('{"models": [{"name": "a"}], "maxBodyBytes": 0}', "maxBodyBytes: must be between 1 and"),
    "bad_header_name": (
        '{"models": [{"name": "a"}], "baseModelHeader": "x bad"}',
        'baseModelHeader: must be a valid HTTP header name, got "x bad"',
    ),
    "same_headers": (
        '{"models": [{"name": "a"}], "modelHeader": "x-gateway-base-model-name"}',
        "modelHeader: must differ from baseModelHeader",
    ),
    "multipart_path_outside_prefixes": (
        '{"models": [{"name": "a"}], "pathPrefixes": ["/v2/"]}',
        'multipartPaths[0]: "/v1/audio/transcriptions" is under none of pathPrefixes',
    ),
    "not_json": ('{"models": [', "EOF while parsing"),
    "empty": ("", "no configuration: `models` is required"),
}


@pytest.mark.parametrize("policy", ["FAIL_RELOAD", "FAIL_OPEN"])
@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configuration_refused_at_start_up(envoy_bin, session_dir, case, policy):
    """Envoy exits during start-up, with one clear line naming the field. failure_policy
    does not change that: a configuration the plugin refuses is an invalid Envoy config."""
    value, reason = BAD_CONFIGS[case]

    def mutate(cfg):
        wasm_plugin(cfg)["configuration"]["value"] = value
        wasm_plugin(cfg)["failure_policy"] = policy

    cfg, _, _ = build_envoy_config({"qwen-vllm": free_port(), "phi-vllm": free_port()}, mutate)
    status, log = run_envoy_to_exit(envoy_bin, session_dir, cfg, f"bad-config-{case}")
    assert status is not None and status != 0, f"Envoy started with a bad configuration:\n{log[-2000:]}"
    refused = [line for line in log.splitlines() if REFUSED in line]
    assert len(refused) == 1, refused or log[-3000:]
    assert reason in refused[0].split(REFUSED, 1)[1], refused[0]
    assert "Unable to create Wasm plugin bbr" in log


@pytest.mark.parametrize("policy", ["FAIL_CLOSED", "FAIL_OPEN", "FAIL_RELOAD"])
def test_corrupt_wasm_refused_at_start_up(envoy_bin, session_dir, corrupt_wasm, policy):
    """A corrupt .wasm file: Envoy does not start, whatever the failure_policy (FAIL_OPEN
    only applies to a VM that fails after the configuration was accepted)."""

    def mutate(cfg):
        wasm_plugin(cfg)["vm_config"]["code"]["local"]["filename"] = str(corrupt_wasm)
        wasm_plugin(cfg)["failure_policy"] = policy

    cfg, _, _ = build_envoy_config({"qwen-vllm": free_port(), "phi-vllm": free_port()}, mutate)
    status, log = run_envoy_to_exit(envoy_bin, session_dir, cfg, f"corrupt-wasm-{policy}")
    assert status is not None and status != 0, log[-2000:]
    assert "Failed to parse corrupted Wasm module" in log
    assert "Plugin bbr failed to load" in log
    assert "Unable to create Wasm plugin bbr" in log


# ---------------------------------------------------------------------------------------
# Configuration pushed at run time: file-based ECDS
# ---------------------------------------------------------------------------------------

NEW_MODEL = "mistralai/Mistral-7B-Instruct-v0.3"


class EcdsGateway:
    """Envoy whose bbr-wasm filter comes from ECDS (a watched file), with a route and a
    cluster already in place for NEW_MODEL (routes would come from RDS in a real setup)."""

    def __init__(self, envoy_bin, session_dir, ports: dict[str, int], new_port: int, concurrency: int = 2):
        self.dir = session_dir / f"ecds-{time.monotonic_ns()}"
        self.dir.mkdir()
        self.path = self.dir / "bbr-filter.yaml"
        base_cfg, _, _ = build_envoy_config(ports)
        self.plugin = copy.deepcopy(wasm_plugin(base_cfg))
        self.push(DEFAULT_FILTER_CONFIG, wait=False)

        def mutate(cfg):
            cfg["node"] = {"id": "bbr-ecds-test", "cluster": "bbr-ecds-test"}  # ECDS needs both
            filters = http_filters(cfg)
            i = next(i for i, f in enumerate(filters) if f["name"] == WASM_FILTER)
            filters[i] = {
                "name": "bbr",
                "config_discovery": {
                    "config_source": {
                        "path_config_source": {"path": str(self.path), "watched_directory": {"path": str(self.dir)}}
                    },
                    "type_urls": [WASM_TYPE],
                },
            }
            new_cluster = copy.deepcopy(cluster(cfg, "phi-vllm"))
            new_cluster["name"] = new_cluster["load_assignment"]["cluster_name"] = "new-vllm"
            new_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
                "port_value"
            ] = new_port
            cfg["static_resources"]["clusters"].append(new_cluster)
            new_route = copy.deepcopy(routes(cfg)[-1])
            new_route["name"] = "new"
            new_route["match"]["headers"][0]["string_match"]["exact"] = NEW_MODEL
            new_route["route"]["cluster"] = "new-vllm"
            routes(cfg).append(new_route)

        self.env = start_envoy(envoy_bin, session_dir, ports, mutate, "ecds", True, concurrency)

    def plugin_with(self, filter_config, **plugin_fields) -> dict:
        plugin = copy.deepcopy(self.plugin)
        plugin["configuration"]["value"] = (
            filter_config if isinstance(filter_config, str) else json.dumps(filter_config)
        )
        for k, v in plugin_fields.items():
            if k == "code_file":
                plugin["vm_config"]["code"]["local"]["filename"] = str(v)
            else:
                plugin[k] = v
        return plugin

    def stats(self) -> dict[str, int]:
        out = {}
        for line in self.env.admin("/stats?filter=^" + ECDS.replace(".", "\\.")).splitlines():
            key, _, value = line.partition(": ")
            if key.startswith(ECDS) and value.strip().lstrip("-").isdigit():
                out[key[len(ECDS) :]] = int(value)
        return out

    def push(self, filter_config, wait: bool = True, **plugin_fields) -> dict[str, int]:
        """Writes the filter's TypedExtensionConfig atomically (write, then rename into the
        watched directory), and waits until Envoy has accepted or rejected it. Returns the
        ECDS stats after."""
        doc = {
            "resources": [
                {
                    "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                    "name": "bbr",
                    "typed_config": {"@type": WASM_TYPE, "config": self.plugin_with(filter_config, **plugin_fields)},
                }
            ]
        }
        before = self.stats() if wait else {}
        tmp = self.dir / f".{self.path.name}.tmp"
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        os.replace(tmp, self.path)
        if not wait:
            return {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            after = self.stats()
            if after.get("update_attempt", 0) > before.get("update_attempt", 0) and (
                after.get("update_success", 0) > before.get("update_success", 0)
                or after.get("update_rejected", 0) > before.get("update_rejected", 0)
            ):
                return after
            time.sleep(0.05)
        raise AssertionError(f"Envoy did not take up the ECDS update: {self.stats()}")


class Traffic:
    """Requests in a loop on a background thread (keep-alive HTTP/1.1), each checked to be a
    200 from the right backend: a config update must not fail or misroute a single one."""

    def __init__(self, url: str, backend_of: dict[str, str]):
        self.url = url
        self.backend_of = backend_of
        self.sent = 0
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        models = list(self.backend_of)
        with httpx.Client(base_url=self.url, timeout=30.0) as c:
            while not self._stop.is_set():
                model = models[self.sent % len(models)]
                try:
                    r = c.post("/v1/completions", json=completion_body(model))
                    ok = r.status_code == 200 and r.headers.get("x-mock-backend") == self.backend_of[model]
                    if not ok:
                        self.bad.append(f"{model}: {r.status_code} {r.headers.get('x-mock-backend')} {r.text[:200]}")
                except httpx.HTTPError as e:
                    self.bad.append(f"{model}: {e!r}")
                self.sent += 1

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def ecds_backends(session_dir):
    qwen = start_mock(session_dir, QWEN, "qwen-a", loras=(LORA,))
    phi = start_mock(session_dir, PHI, "phi-a")
    new = start_mock(session_dir, NEW_MODEL, "new-a")
    yield qwen, phi, new
    for m in (qwen, phi, new):
        m.stop()


@pytest.fixture()
def ecds(envoy_bin, session_dir, ecds_backends):
    qwen, phi, new = ecds_backends
    gw = EcdsGateway(envoy_bin, session_dir, {"qwen-vllm": qwen.port, "phi-vllm": phi.port}, new.port)
    yield gw
    gw.env.stop()


def _log_since(env, offset: int) -> str:
    with open(env.proc.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", errors="replace")


RUNTIME_BAD = {
    "no_models": ('{"models": []}', {}, REFUSED + "models: must list at least one model"),
    "duplicate_name": (
        json.dumps({"models": [{"name": QWEN}, {"name": QWEN}]}),
        {},
        REFUSED + f'models[1].name: duplicate name "{QWEN}"',
    ),
    "unknown_key": ('{"models": [{"name": "a"}], "adapters": ["x"]}', {}, REFUSED + "unknown field `adapters`"),
    "not_json": ("{", {}, REFUSED + "EOF while parsing"),
}


def test_ecds_bad_configurations_rejected_previous_keeps_serving(ecds, ecds_backends):
    """Each bad configuration pushed at run time is rejected (update_rejected, config_fail)
    with the plugin's line in the log; the accepted configuration keeps serving, without a
    single failed request; then a good configuration with a new model takes effect."""
    qwen, phi, new = ecds_backends
    env = ecds.env
    client = env.client()
    assert_routed(client.post("/v1/completions", json=completion_body(QWEN)), QWEN)
    r = client.post("/v1/completions", json=completion_body(NEW_MODEL))
    assert_openai_error(r, 404, "model_not_found", param="model")
    stats0 = ecds.stats()
    assert stats0["update_success"] == 1 and stats0["update_rejected"] == 0

    backend_of = {QWEN: qwen.id, LORA: qwen.id, PHI: phi.id}
    with Traffic(env.url, backend_of) as traffic:
        for n, (case, (value, fields, line)) in enumerate(RUNTIME_BAD.items(), 1):
            offset = env.proc.log_path.stat().st_size
            after = ecds.push(value, **fields)
            assert after["update_rejected"] == n and after["config_fail"] == n, (case, after)
            assert after["update_success"] == 1, (case, after)
            log = _log_since(env, offset)
            assert line in log, (case, log[-2000:])
            assert "Filesystem config update rejected: Unable to create Wasm plugin bbr" in log, case
            # The previous configuration still answers, on every worker.
            for _ in range(4):
                assert_routed(client.post("/v1/completions", json=completion_body(PHI)), PHI)
                r = client.post("/v1/completions", json=completion_body(NEW_MODEL))
                assert_openai_error(r, 404, "model_not_found", param="model")
        time.sleep(0.3)
        # A good update: the new model, with the routes already in place.
        models = DEFAULT_FILTER_CONFIG["models"] + [{"name": NEW_MODEL}]
        after = ecds.push({"models": models})
        assert after["update_success"] == 2, after
        time.sleep(0.3)
    assert traffic.sent > 20 and traffic.bad == [], (traffic.sent, traffic.bad[:5])
    for _ in range(4):  # both workers
        r = client.post("/v1/completions", json=completion_body(NEW_MODEL))
        assert r.status_code == 200 and r.headers["x-mock-backend"] == new.id, r.text
        assert r.headers["x-echo-base-model-name"] == NEW_MODEL
    listed = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert listed == {QWEN, LORA, PHI, NEW_MODEL}
    assert env.proc.alive()


@pytest.mark.parametrize("policy", ["FAIL_CLOSED", "FAIL_OPEN"])
def test_ecds_corrupt_wasm_rejected_previous_keeps_serving(ecds, corrupt_wasm, policy):
    """A corrupt module pushed at run time is rejected like a bad configuration, whatever
    its failure_policy; the running filter keeps routing and stripping forged headers."""
    env = ecds.env
    client = env.client()
    vm_before = wasm_vm_stats(env)
    offset = env.proc.log_path.stat().st_size
    after = ecds.push(DEFAULT_FILTER_CONFIG, code_file=corrupt_wasm, failure_policy=policy)
    assert after["update_rejected"] == 1 and after["config_fail"] == 1 and after["update_success"] == 1, after
    log = _log_since(env, offset)
    assert "Failed to parse corrupted Wasm module" in log
    assert "Filesystem config update rejected: Unable to create Wasm plugin bbr" in log
    for _ in range(4):
        assert_routed(client.post("/v1/completions", json=completion_body(LORA)), LORA)
        r = client.post("/v1/completions", json=completion_body(QWEN), headers={"x-gateway-base-model-name": PHI})
        assert_routed(r, QWEN)
    # The running VMs are untouched (the rejected module never got one).
    vm_after = wasm_vm_stats(env)
    assert vm_after["wasm.envoy.wasm.runtime.v8.active"] == vm_before["wasm.envoy.wasm.runtime.v8.active"]
    assert vm_after["wasm.bbr.vm_reload"] == 0


# ---------------------------------------------------------------------------------------
# A VM that fails after start-up: fail-closed vs fail-open
# ---------------------------------------------------------------------------------------


def assert_wasm_failed_503(r: httpx.Response) -> None:
    """What a client gets from a filter whose VM failed (fail closed, or FAIL_RELOAD's back-off):
    Envoy's local 503 (response code details wasm_fail_stream). It carries no response flag,
    so envoy.yaml's catch-all 503 mapper is what turns it into OpenAI JSON."""
    assert r.status_code == 503, (r.status_code, r.text)
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    assert r.json()["error"]["code"] == "gateway_unavailable", r.text
    assert "x-mock-backend" not in r.headers


class CodeServer:
    """Serves one byte string over HTTP on loopback: Envoy's remote Wasm code source."""

    def __init__(self, payload: bytes):
        payload_ = payload

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("content-length", str(len(payload_)))
                self.end_headers()
                self.wfile.write(payload_)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.sha256 = hashlib.sha256(payload).hexdigest()
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("policy", ["FAIL_CLOSED", "FAIL_RELOAD", "FAIL_OPEN"])
def test_vm_that_never_loads_fail_closed_or_open(envoy_bin, session_dir, backends, policy):
    """The plugin's code is fetched at start-up (vm_config.code.remote) and is corrupt, so
    Envoy starts but the plugin has no VM. What clients get then depends on failure_policy."""
    server = CodeServer(CORRUPT_WASM)
    try:

        def remote_code(cfg):
            plugin = wasm_plugin(cfg)
            plugin["failure_policy"] = policy
            plugin["vm_config"]["code"] = {
                "remote": {
                    "http_uri": {
                        "uri": f"http://127.0.0.1:{server.port}/bbr.wasm",
                        "cluster": "wasm-code",
                        "timeout": "5s",
                    },
                    "sha256": server.sha256,
                    "retry_policy": {"num_retries": 0},
                }
            }
            code_cluster = {
                "name": "wasm-code",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": "wasm-code",
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {"address": "127.0.0.1", "port_value": server.port}
                                        }
                                    }
                                }
                            ]
                        }
                    ],
                },
            }
            cfg["static_resources"]["clusters"].append(code_cluster)

        ports = {"qwen-vllm": backends.qwen.port, "phi-vllm": backends.phi.port}
        env = start_envoy(envoy_bin, session_dir, ports, remote_code, f"no-vm-{policy}", True, 2)
        try:
            log = env.proc.text()
            assert "Failed to parse corrupted Wasm module" in log and "Plugin bbr failed to load" in log
            stats = wasm_vm_stats(env)
            assert stats["wasm.envoy.wasm.runtime.v8.active"] == 0 and stats["wasm.wasm_vm_count"] == 0, stats
            assert env.stat("wasm.remote_load_fetch_successes") == 1
            client, h2 = env.client(), env.client(http2=True)
            before = totals(backends)
            if policy in ("FAIL_CLOSED", "FAIL_RELOAD"):
                # Every request that reaches the filter: Envoy's own 503, with an empty body
                # (no response flag, so no local_reply mapper of envoy.yaml applies).
                for c in (client, h2):
                    for r in (
                        c.post("/v1/completions", json=completion_body(QWEN)),
                        c.post(
                            "/v1/completions", json=completion_body(QWEN), headers={"x-gateway-base-model-name": PHI}
                        ),
                        c.get("/v1/models"),
                        c.get("/anything"),
                    ):
                        assert_wasm_failed_503(r)
                assert totals(backends) == before
            else:
                # FAIL_OPEN: requests pass the filter untouched. No routing header is set, so
                # an inference request has no route: 404 route_not_found ...
                for c in (client, h2):
                    r = c.post("/v1/completions", json=completion_body(QWEN))
                    assert_openai_error(r, 404, "route_not_found")
                    # ... GET /v1/models is not answered by the filter any more ...
                    assert_openai_error(c.get("/v1/models"), 404, "route_not_found")
                    # ... and a bad body is not refused by the filter either ...
                    r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
                    assert_openai_error(r, 404, "route_not_found")
                assert totals(backends) == before
                # ... and a client-sent routing header is NOT removed: it picks the pool.
                # The security trade-off of fail-open: a client chooses where its request goes.
                r = client.post(
                    "/v1/completions",
                    json=completion_body(PHI),
                    headers={"x-gateway-base-model-name": PHI, "x-gateway-model-name": PHI},
                )
                assert r.status_code == 200 and r.headers["x-mock-backend"] == backends.phi.id, r.text
                r = client.post(
                    "/v1/completions", json=completion_body(QWEN), headers={"x-gateway-base-model-name": PHI}
                )
                assert r.status_code == 404 and r.headers["x-mock-backend"] == backends.phi.id, r.text
                assert "does not exist" in r.json()["error"]["message"]  # the wrong pool's answer
        finally:
            env.stop()
    finally:
        server.close()


def test_shipped_failure_policy_is_fail_reload():
    """envoy/envoy.yaml keeps FAIL_RELOAD (see its comment): a VM that traps is replaced for
    the next request; a VM that never loaded fails closed (test above)."""
    cfg, _, _ = build_envoy_config({})
    assert wasm_plugin(cfg)["failure_policy"] == "FAIL_RELOAD"
    assert Path(wasm_plugin(cfg)["vm_config"]["code"]["local"]["filename"]) == WASM


# ---------------------------------------------------------------------------------------
# A VM that traps at run time: FAIL_RELOAD (shipped), FAIL_CLOSED, FAIL_OPEN
# ---------------------------------------------------------------------------------------

POISON_HEADERS = 40  # the stand-in module traps on a request with more headers than this
POISON = {f"x-pad-{i}": "1" for i in range(POISON_HEADERS + 10)}


@pytest.mark.parametrize("policy", ["FAIL_RELOAD", "FAIL_CLOSED", "FAIL_OPEN"])
def test_vm_that_traps_at_run_time(envoy_bin, session_dir, backends, policy):
    """bbr-wasm has no reachable trap, so a stand-in module (standin_wasm.py) answers 200
    itself and traps on a request with many headers. The trapping request gets Envoy's 503
    (empty body) under every policy; after it:
    - FAIL_RELOAD: requests get that 503 while the reload backs off (wasm.bbr.vm_reload_backoff),
      then the first request after the back-off gets a fresh VM (vm_reload_success) and is
      served normally again;
    - FAIL_CLOSED: every later request gets the 503, for good (until Envoy restarts or the
      filter config changes);
    - FAIL_OPEN: every later request skips the filter: unrouted (404 route_not_found), and a
      client-sent routing header routes it (the fail-open trade-off)."""
    module = session_dir / "standin-trap.wasm"
    module.write_bytes(trap_module(POISON_HEADERS))

    def standin(cfg):
        wasm_plugin(cfg)["vm_config"]["code"]["local"]["filename"] = str(module)
        wasm_plugin(cfg)["failure_policy"] = policy

    ports = {"qwen-vllm": backends.qwen.port, "phi-vllm": backends.phi.port}
    env = start_envoy(envoy_bin, session_dir, ports, standin, f"trap-{policy}", True, 1)
    try:
        client = env.client()
        before = totals(backends)

        def post(headers=None):
            return client.post("/v1/completions", json=completion_body(PHI), headers=headers or {})

        r = post()
        assert (r.status_code, r.content) == (200, BODY), r.text
        r = post(POISON)
        assert_wasm_failed_503(r)
        assert "Function: proxy_on_request_headers failed: Uncaught RuntimeError: unreachable" in env.proc.text()
        stats = wasm_vm_stats(env)
        if policy == "FAIL_RELOAD":
            r = post()
            assert_wasm_failed_503(r)  # no reload yet: the back-off
            assert wasm_vm_stats(env)["wasm.bbr.vm_reload_backoff"] >= 1
            t0, failed = time.monotonic(), 1
            while True:
                r = post()
                if r.status_code == 200:
                    break
                assert_wasm_failed_503(r)
                failed += 1
                assert time.monotonic() - t0 < 15, "the VM was not reloaded"
                time.sleep(0.05)
            print(
                f"\nFAIL_RELOAD: served again {time.monotonic() - t0:.2f} s after the trap; {failed} requests got 503"
            )
            assert r.content == BODY
            after = wasm_vm_stats(env)
            assert after["wasm.bbr.vm_reload_success"] == 1
            assert after["wasm.envoy.wasm.runtime.v8.created"] == stats["wasm.envoy.wasm.runtime.v8.created"] + 1
            assert after["wasm.envoy.wasm.runtime.v8.active"] == stats["wasm.envoy.wasm.runtime.v8.active"]
            for _ in range(3):
                r = post()
                assert (r.status_code, r.content) == (200, BODY)
        elif policy == "FAIL_CLOSED":
            time.sleep(1.5)  # longer than FAIL_RELOAD's back-off: nothing comes back
            for headers in ({}, {"x-gateway-base-model-name": PHI}):
                assert_wasm_failed_503(post(headers))
            assert client.get("/v1/models").status_code == 503
            assert wasm_vm_stats(env)["wasm.bbr.vm_reload_success"] == 0
        else:
            r = post()
            assert_openai_error(r, 404, "route_not_found")
            r = post({"x-gateway-base-model-name": PHI})
            assert r.status_code == 200 and r.headers["x-mock-backend"] == backends.phi.id, r.text
            assert wasm_vm_stats(env)["wasm.bbr.vm_reload_success"] == 0
        if policy != "FAIL_OPEN":
            assert totals(backends) == before, "a request reached a backend"
    finally:
        env.stop()
