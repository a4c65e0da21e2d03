"""istio/ in a real Envoy: the configuration istiod and the istio-agent would give the
gateway (istio_convert.py: Istio's gateway connection manager with the EnvoyFilter's patches,
bbr-wasm over ECDS from a file holding what the agent forwards), the bootstrap override that
reaches Envoy through the Gateway's parametersRef overlay (istio_deploy.py), running the module
pulled back from a real registry, with the HTTPRoutes as Envoy routes and one mock-vllm per
InferencePool. docs/istio-fidelity.md lists each emulated behaviour with its Istio source.

- The EnvoyFilter's filter configuration is accepted by the filter itself, and each model,
  and the adapter, reaches its pool.
- The overload manager of bbr/overload-bootstrap.yaml is live in Envoy (/config_dump), and a
  flood of held uploads stays within its bounds.
- A body that stops arriving is answered 408, although Istio turns the stream idle timeout off.
- A module the agent cannot pull or verify gives clients a JSON 503 router_unavailable, not a
  bare 500 or a 403.
- The WasmPlugin's pluginConfig, rendered the way istiod renders it, is accepted too, but
  without allow_on_headers_stop_iteration (which the WasmPlugin API cannot set) inspected
  requests hang: why istio/ uses the EnvoyFilter.
- A configuration the filter refuses is rejected over ECDS, with the filter's log line.
"""

from __future__ import annotations

import copy
import json
import socket
import time
import uuid
from typing import Optional

import httpx
import pytest
import yaml

import bbr_oci
import istio_convert as ic
import istio_deploy as idep
from conftest import LORA, PHI, QWEN, ROOT, all_docs, doc, free_port, launch_envoy, start_envoy, wait_for

REFUSED = "bbr-wasm: configuration refused:"
ACCEPTED = "bbr-wasm: configuration accepted"
HANG_SECONDS = 3.0
GATEWAY = "infra-pattern1-inference-gateway"


@pytest.fixture(scope="session")
def pulled_module(registry, oci_build, session_dir):
    """The module as the gateway would get it: pushed to a registry, pulled back, extracted
    the way Istio's fetcher extracts it."""
    ref = f"{registry.host}/llm-d/bbr-wasm:envoy-test"
    bbr_oci.push(oci_build, ref, insecure=True)
    pulled = bbr_oci.pull(ref, insecure=True)
    assert pulled.module == oci_build.module
    path = session_dir / "pulled-bbr_wasm.wasm"
    path.write_bytes(pulled.module)
    return str(path)


def _routes():
    return ic.routes_from_httproutes([d.body for d in all_docs() if d.body["kind"] == "HTTPRoute"])


def configmaps() -> list[dict]:
    return [d.body for d in all_docs() if d.body["kind"] == "ConfigMap"]


def gateway_deployment() -> dict:
    """The gateway's Deployment as istiod's deployment controller renders it from the Gateway."""
    return idep.render(doc("Gateway", GATEWAY), configmaps())


def agent_args() -> tuple[str, ...]:
    """The agent's Envoy flags for that Deployment, the bootstrap override (if it reaches the
    container) as --config-yaml."""
    return tuple(idep.agent_envoy_args(idep.bootstrap_override(gateway_deployment(), configmaps())))


def overload_bootstrap() -> dict:
    """custom_bootstrap.json of bbr/overload-bootstrap.yaml (the bootstrap override)."""
    return json.loads(doc("ConfigMap", "bbr-wasm-overload")["data"]["custom_bootstrap.json"])


def local_pull(module: str):
    """The agent's pull of a module that is there (the pin check is test_oci.py's; here the
    module is the fresh build, whatever the pins say)."""
    return lambda uri, sha256: (module, None)


def envoyfilter_gateway(backends, tmp, module: str, mutate_typed_config=None, pull=None, envoyfilter=None):
    """(bootstrap, agent flags) of the gateway as istiod + the agent configure it from istio/.
    `mutate_typed_config` changes the extension config as istiod serves it; `pull` stands for the
    agent's fetch (default: the module is there)."""
    ef = envoyfilter or doc("EnvoyFilter", "bbr-wasm")
    ext = ic.extension_config(ef)
    if mutate_typed_config:
        mutate_typed_config(ext["typed_config"])
    served = ic.agent_convert(ext, pull or local_pull(module))
    ecds = tmp / f"ecds-{uuid.uuid4().hex[:8]}.yaml"
    ecds.write_text(yaml.safe_dump(ic.ecds_response([served]), sort_keys=False))
    listener = ic.apply_envoyfilter(ic.istio_gateway_listener(_routes(), free_port()), ef)
    listener = ic.ecds_from_file(listener, str(ecds))
    cfg = ic.istio_bootstrap(listener, {name: m.port for name, m in backends.items()}, free_port())
    return cfg, agent_args()


def wasmplugin_gateway(backends, module: str, plugin: dict) -> dict:
    """A WasmPlugin without a phase goes after Istio's authz filters (none here), so first."""
    tc = ic.wasmplugin_to_typed_config(plugin, module)
    listener = ic.istio_gateway_listener(_routes(), free_port())
    listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"].insert(
        0, {"name": tc["config"]["name"], "typed_config": tc}
    )
    return ic.istio_bootstrap(listener, {name: m.port for name, m in backends.items()}, free_port())


def config_dump(env, resource: Optional[str] = None) -> dict:
    q = f"?resource={resource}" if resource else ""
    return httpx.get(f"http://127.0.0.1:{env.admin_port}/config_dump{q}", timeout=5.0).json()


def hcm_of(cfg: dict) -> dict:
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def completion(model, **extra):
    return {"model": model, "prompt": "Hello", "max_tokens": 5, **extra}


def assert_reaches(resp: httpx.Response, model: str, pool: str, base: str) -> None:
    assert resp.status_code == 200, f"{resp.status_code} {resp.text[:300]}"
    assert resp.headers["x-mock-backend"] == pool, dict(resp.headers)
    assert resp.headers["x-echo-base-model-name"] == base
    assert resp.headers["x-echo-model-name"] == model
    assert resp.json()["model"] == model


@pytest.fixture(scope="module")
def gateway(envoy_bin, session_dir, backends, pulled_module):
    cfg, args = envoyfilter_gateway(backends, session_dir, pulled_module)
    env = start_envoy(envoy_bin, session_dir, cfg, "envoyfilter", args)
    yield env
    env.proc.stop()


def test_envoyfilter_config_is_accepted(gateway):
    log = gateway.proc.text()
    assert ACCEPTED in log and "2 base models, 1 adapters" in log, log[-2000:]


def test_each_model_and_the_adapter_reach_their_pool(gateway):
    with httpx.Client(base_url=gateway.url, timeout=10.0) as c:
        assert_reaches(c.post("/v1/completions", json=completion(QWEN)), QWEN, "qwen-pool", QWEN)
        assert_reaches(c.post("/v1/completions", json=completion(PHI)), PHI, "phi-pool", PHI)
        assert_reaches(c.post("/v1/completions", json=completion(LORA)), LORA, "qwen-pool", QWEN)
        chat = {"model": PHI, "messages": [{"role": "user", "content": "Hi"}]}
        assert_reaches(c.post("/v1/chat/completions", json=chat), PHI, "phi-pool", PHI)


def test_seed_verification_loop(gateway):
    """The seed's Step 7: 10 requests per model, each answer has .model. Expected 10/10."""
    with httpx.Client(base_url=gateway.url, timeout=10.0) as c:
        for model, pool in ((QWEN, "qwen-pool"), (PHI, "phi-pool")):
            ok = 0
            for _ in range(10):
                r = c.post("/v1/completions", json=completion(model), headers={"Content-Type": "application/json"})
                if r.status_code == 200 and r.json().get("model") == model and r.headers["x-mock-backend"] == pool:
                    ok += 1
            assert ok == 10, f"{model}: {ok}/10"


def test_client_header_cannot_pick_the_pool(gateway):
    with httpx.Client(base_url=gateway.url, timeout=10.0) as c:
        r = c.post("/v1/completions", json=completion(PHI), headers={"X-Gateway-Base-Model-Name": QWEN})
        assert_reaches(r, PHI, "phi-pool", PHI)


def test_unknown_model_and_model_list(gateway):
    with httpx.Client(base_url=gateway.url, timeout=10.0) as c:
        r = c.post("/v1/completions", json=completion("gpt-4"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "x-mock-backend" not in r.headers
        listed = {m["id"]: m["parent"] for m in c.get("/v1/models").json()["data"]}
        assert listed == {QWEN: None, PHI: None, LORA: QWEN}


def test_envoy_errors_are_openai_json(gateway):
    """The NETWORK_FILTER patch gives the gateway envoy.yaml's local replies: a request the
    filter does not route (no routing header) gets Envoy's 404 as OpenAI JSON."""
    with httpx.Client(base_url=gateway.url, timeout=10.0) as c:
        r = c.get("/v1/completions")
        assert r.status_code == 404, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["code"] == "route_not_found"


ISTIO_ONLY_MAPPER_CODE = "router_unavailable"


def _is_istio_only(mapper: dict) -> bool:
    return mapper.get("body_format_override", {}).get("json_format", {}).get("error", {}).get("code") == ISTIO_ONLY_MAPPER_CODE


def test_local_replies_match_the_shipped_envoy_config():
    """One source of truth: the EnvoyFilter's mappers (but the Istio-only first one, for the
    agent's fallback), HTTP/2 caps and stream idle timeout are envoy/envoy.yaml's, and so is the
    overload protection of the bootstrap override (without the connection-count monitor, which
    Istio's bootstrap has already)."""
    shipped = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    hcm = shipped["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    patch = ic.one_patch(doc("EnvoyFilter", "bbr-wasm"), "NETWORK_FILTER")["patch"]["value"]
    mappers = patch["typed_config"]["local_reply_config"]["mappers"]
    assert _is_istio_only(mappers[0]) and not any(_is_istio_only(m) for m in mappers[1:])
    assert {"mappers": mappers[1:]} == hcm["local_reply_config"]
    assert patch["typed_config"]["http2_protocol_options"] == hcm["http2_protocol_options"]
    assert patch["typed_config"]["stream_idle_timeout"] == hcm["stream_idle_timeout"]
    om = copy.deepcopy(shipped["overload_manager"])
    om["resource_monitors"] = [m for m in om["resource_monitors"] if "downstream_connections" not in m["typed_config"]["@type"]]
    assert overload_bootstrap() == {"overload_manager": om, "memory_allocator_manager": shipped["memory_allocator_manager"]}


def test_overload_manager_reaches_the_gateway(gateway):
    """The bootstrap override reaches Envoy the way it does in a cluster (the Gateway's
    parametersRef overlay sets ISTIO_BOOTSTRAP_OVERRIDE and mounts the file; the agent passes it
    as --config-yaml), and Envoy runs with it: its /config_dump shows the merged overload
    manager, Istio's connection-count monitor and ours, every action and the load-shed point."""
    assert_overload_manager(gateway)


def assert_overload_manager(gateway) -> None:
    dump = config_dump(gateway)
    (boot,) = [c["bootstrap"] for c in dump["configs"] if c["@type"].endswith("BootstrapConfigDump")]
    om = boot.get("overload_manager", {})
    monitors = [m["name"] for m in om.get("resource_monitors", [])]
    assert monitors == ["envoy.resource_monitors.global_downstream_max_connections", "envoy.resource_monitors.fixed_heap"], om
    (heap,) = [m for m in om["resource_monitors"] if m["name"].endswith("fixed_heap")]
    want = overload_bootstrap()["overload_manager"]
    assert int(heap["typed_config"]["max_heap_size_bytes"]) == want["resource_monitors"][0]["typed_config"]["max_heap_size_bytes"]
    assert [a["name"] for a in om.get("actions", [])] == [a["name"] for a in want["actions"]]
    assert [p["name"] for p in om.get("loadshed_points", [])] == [p["name"] for p in want["loadshed_points"]]
    assert "memory_allocator_manager" in boot
    # The resource monitor is live: Envoy reports its pressure.
    stats = httpx.get(f"http://127.0.0.1:{gateway.admin_port}/stats?filter=overload.envoy.resource_monitors.fixed_heap", timeout=5.0).text
    assert "overload.envoy.resource_monitors.fixed_heap.pressure" in stats, stats


def test_gateway_memory_limit_fits_the_budget():
    """Istio gives the gateway container a 1 GiB memory limit by default (values.yaml
    global.proxy.resources); the overlay raises it so that the heap budget sits below about 60 %
    of it (README, "Overload")."""
    container = idep.proxy_container(gateway_deployment())
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    budget = overload_bootstrap()["overload_manager"]["resource_monitors"][0]["typed_config"]["max_heap_size_bytes"]
    assert budget <= 0.6 * int(limit[:-2]) * 1024 * 1024, (budget, limit)
    assert container["resources"]["requests"] == idep.DEFAULT_PROXY_RESOURCES["requests"]


def test_listener_patch_lets_long_prompts_through(gateway, envoy_bin, session_dir, backends, pulled_module):
    """The whole body is buffered while the filter reads it. With the LISTENER patch a 2 MiB
    body is routed; without it Envoy's default 1 MiB buffer limit answers 413 itself, before the
    filter's own 8 MiB limit could apply (the NETWORK_FILTER patch's 413 mapper turns Envoy's
    plain-text answer into JSON with its own message)."""
    body = json.dumps(completion(QWEN, prompt="x" * (2 * 1024 * 1024))).encode()
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=gateway.url, timeout=30.0) as c:
        assert_reaches(c.post("/v1/completions", content=body, headers=headers), QWEN, "qwen-pool", QWEN)

    ef = copy.deepcopy(doc("EnvoyFilter", "bbr-wasm"))
    ef["spec"]["configPatches"] = [p for p in ef["spec"]["configPatches"] if p["applyTo"] != "LISTENER"]
    cfg, args = envoyfilter_gateway(backends, session_dir, pulled_module, envoyfilter=ef)
    env = start_envoy(envoy_bin, session_dir, cfg, "no-listener-patch", args)
    try:
        with httpx.Client(base_url=env.url, timeout=30.0) as c:
            try:
                r = c.post("/v1/completions", content=body, headers=headers)
            except httpx.TransportError:
                return  # Envoy may also close the connection while the body is still coming
            assert r.status_code == 413, r.text[:200]
            assert "x-mock-backend" not in r.headers
            assert r.json()["error"]["message"] == "The request body is larger than this gateway accepts.", r.text[:200]
    finally:
        env.proc.stop()


# --------------------------------------------------------------------------------------
# A body that stops arriving, under Istio's stream_idle_timeout: 0s
# --------------------------------------------------------------------------------------

STALL_IDLE = "2s"


def stalled_upload(port: int, wait: float) -> bytes:
    """An inference request whose body stops after its first bytes: headers announce 4096 bytes,
    200 arrive, then nothing. Returns what Envoy answered within `wait` seconds (b"" if nothing)."""
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        "Content-Length: 4096\r\n\r\n"
    ).encode()
    body = json.dumps(completion(QWEN, prompt="x" * 4000)).encode()[:200]
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(head + body)
        s.settimeout(0.5)
        got = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                if b"\r\n\r\n" in got and got.endswith(b"}"):
                    break
                continue
            if not chunk:
                break
            got += chunk
        return got


def test_stalled_body_gets_408_under_istio_defaults(envoy_bin, session_dir, backends, pulled_module):
    """Istio builds every connection manager with stream_idle_timeout 0s (no timeout); the
    NETWORK_FILTER patch sets one, so a request whose body stops arriving is answered 408
    request_timeout (JSON) and its buffer freed. The test compresses time: whatever non-zero
    stream idle timeout the patched connection manager ends up with runs as 2 s; a zero one
    stays zero, and the request is then never answered."""
    cfg, args = envoyfilter_gateway(backends, session_dir, pulled_module)
    hcm = hcm_of(cfg)
    assert ic.istio_gateway_hcm([])["stream_idle_timeout"] == "0s"  # Istio's default, before the patch
    if hcm.get("stream_idle_timeout", "0s") not in ("0s", "0"):
        hcm["stream_idle_timeout"] = STALL_IDLE
    env = start_envoy(envoy_bin, session_dir, cfg, "stall", args)
    try:
        got = stalled_upload(env.port, wait=8.0)
        assert got, "no answer within 8 s to a body that stopped arriving (stream idle timeout off?)"
        status_line, _, rest = got.partition(b"\r\n")
        assert b" 408 " in status_line, got[:300]
        assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        stats = httpx.get(f"http://127.0.0.1:{env.admin_port}/stats?filter=downstream_rq_idle_timeout", timeout=5.0).text
        assert "downstream_rq_idle_timeout: 1" in stats, stats
    finally:
        env.proc.stop()


# --------------------------------------------------------------------------------------
# A module the agent cannot pull or verify
# --------------------------------------------------------------------------------------


def _ecds_dump(env) -> list[dict]:
    dump = config_dump(env, "ecds_filters")
    return [c["ecds_filter"] for c in dump.get("configs", [])]


def _assert_router_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, f"{r.status_code} {r.headers.get('content-type')} {r.text[:200]!r}"
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == "router_unavailable" and err["type"] == "service_unavailable_error", err
    assert "x-mock-backend" not in r.headers


@pytest.mark.parametrize("why", ["unreachable", "checksum"])
def test_unpullable_module_gets_router_unavailable(envoy_bin, session_dir, backends, registry, oci_build, why):
    """The agent cannot fetch the module (registry unreachable) or the image's digest is not the
    pinned sha256 (the tag was pushed again): it forwards, under the filter's name, an RBAC filter
    that denies everything (FAIL_CLOSED). The HTTP_FILTER patch accepts that type, so Envoy loads
    it, and the client gets a JSON 503 router_unavailable for every request, not a 403
    "RBAC: access denied" (which reads as "you may not") nor a bare 500 (flag NFCF, what Envoy
    answers when it rejects the fallback's type)."""
    if why == "unreachable":
        ref = f"127.0.0.1:{free_port()}/llm-d/bbr-wasm:0.1.0"  # nothing listens there

        def pull(uri, sha256):
            p = bbr_oci.pull(ref, insecure=True)
            return "/nonexistent", p.manifest_digest
    else:
        other = bbr_oci.package(oci_build.module + b"\x00\x05\x04test", bbr_oci.crate_version())
        ref = f"{registry.host}/llm-d/bbr-wasm:pushed-again"
        bbr_oci.push(other, ref, insecure=True)
        module_path = session_dir / "pushed-again.wasm"

        def pull(uri, sha256):
            p = bbr_oci.pull(ref, insecure=True)
            module_path.write_bytes(p.module)
            return str(module_path), p.manifest_digest

    def pin_real_build(tc):
        tc["config"]["vm_config"]["code"]["remote"]["sha256"] = oci_build.manifest_digest

    cfg, args = envoyfilter_gateway(backends, session_dir, "", mutate_typed_config=pin_real_build, pull=pull)
    env = start_envoy(envoy_bin, session_dir, cfg, f"unpullable-{why}", args)
    try:
        with httpx.Client(base_url=env.url, timeout=10.0) as c:
            _assert_router_unavailable(c.post("/v1/completions", json=completion(QWEN)))
            _assert_router_unavailable(c.get("/v1/models"))
            _assert_router_unavailable(c.get("/health"))
        # Envoy runs the agent's fallback under the filter's name (not "no filter configuration").
        ecds = _ecds_dump(env)
        assert [e["name"] for e in ecds] == ["bbr-wasm"], ecds
        assert ecds[0]["typed_config"]["@type"] == ic.RBAC_TYPE, ecds
        assert ecds[0]["typed_config"]["rules_stat_prefix"] == "wasm-default-deny", ecds
    finally:
        env.proc.stop()


def test_policy_denials_keep_their_403(envoy_bin, session_dir, backends, pulled_module):
    """Only the agent's fallback is turned into router_unavailable: with the module loaded, an
    RBAC denial further down the chain (as an Istio AuthorizationPolicy gives, after the
    bbr-wasm.passed marker) stays Envoy's own 403."""
    cfg, args = envoyfilter_gateway(backends, session_dir, pulled_module)
    filters = hcm_of(cfg)["http_filters"]
    assert [f["name"] for f in filters[:2]] == ["bbr-wasm", "bbr-wasm.passed"], [f["name"] for f in filters]
    authz = {"name": "envoy.filters.http.rbac", "typed_config": {"@type": ic.RBAC_TYPE, "rules": {"action": "ALLOW"}}}
    filters.insert(2, authz)
    env = start_envoy(envoy_bin, session_dir, cfg, "authz-deny", args)
    try:
        with httpx.Client(base_url=env.url, timeout=10.0) as c:
            r = c.post("/v1/completions", json=completion(PHI))
            assert r.status_code == 403 and r.text == "RBAC: access denied", (r.status_code, r.text[:200])
    finally:
        env.proc.stop()


def test_wasmplugin_config_is_accepted_but_requests_hang(envoy_bin, session_dir, backends, pulled_module):
    """istiod's rendering of wasmplugin/wasmplugin.yaml: the filter accepts the pluginConfig,
    but without allow_on_headers_stop_iteration an inspected request never gets an answer,
    while the same configuration with the flag routes it."""
    plugin = doc("WasmPlugin", "bbr-wasm")
    cfg = wasmplugin_gateway(backends, pulled_module, plugin)
    assert "allow_on_headers_stop_iteration" not in json.dumps(cfg)
    env = start_envoy(envoy_bin, session_dir, cfg, "wasmplugin")
    try:
        assert ACCEPTED in env.proc.text()
        with httpx.Client(base_url=env.url, timeout=10.0) as c:
            assert c.get("/v1/models").status_code == 200  # answered at the headers: fine
            with pytest.raises(httpx.TimeoutException):
                c.post("/v1/completions", json=completion(QWEN), timeout=HANG_SECONDS)
    finally:
        env.proc.stop()

    cfg = wasmplugin_gateway(backends, pulled_module, plugin)
    cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0][
        "typed_config"
    ]["config"]["allow_on_headers_stop_iteration"] = True
    env = start_envoy(envoy_bin, session_dir, cfg, "wasmplugin-with-flag")
    try:
        with httpx.Client(base_url=env.url, timeout=10.0) as c:
            assert_reaches(c.post("/v1/completions", json=completion(LORA)), LORA, "qwen-pool", QWEN)
    finally:
        env.proc.stop()


def _rejected_over_ecds(envoy_bin, session_dir, cfg, args, name) -> str:
    """A configuration Envoy refuses over ECDS: the update is rejected (the previous one would
    keep serving; a gateway that never had one has no filter configuration), Envoy keeps running,
    and every request gets router_unavailable (flag NFCF). Returns Envoy's log."""
    env = start_envoy(envoy_bin, session_dir, cfg, name, args)
    try:
        wait_for(lambda: "config update rejected" in env.proc.text(), 10.0, "the rejected ECDS update", env.proc)
        with httpx.Client(base_url=env.url, timeout=10.0) as c:
            _assert_router_unavailable(c.post("/v1/completions", json=completion(QWEN)))
        assert env.proc.alive()
        return env.proc.text()
    finally:
        env.proc.stop()


def test_broken_envoyfilter_configuration_is_rejected(envoy_bin, session_dir, backends, pulled_module):
    """The filter refuses the configuration (its log line names why); over ECDS that rejects the
    update instead of stopping Envoy."""

    def duplicate(tc):
        models = {"models": [{"name": QWEN}, {"name": QWEN}]}
        tc["config"]["configuration"]["value"] = json.dumps(models)

    cfg, args = envoyfilter_gateway(backends, session_dir, pulled_module, duplicate)
    log = _rejected_over_ecds(envoy_bin, session_dir, cfg, args, "ef-broken")
    assert REFUSED in log and "duplicate name" in log, log[-3000:]


def _refused(envoy_bin, session_dir, cfg, name) -> str:
    proc = launch_envoy(envoy_bin, session_dir, cfg, name)
    code = proc.wait_exit(timeout=30.0)
    log = proc.text()
    proc.stop()
    assert code is not None, f"Envoy kept running with a configuration the filter refuses:\n{log[-2000:]}"
    assert code != 0, log[-2000:]
    assert REFUSED in log, log[-3000:]
    return log


def test_broken_wasmplugin_config_stops_envoy(envoy_bin, session_dir, backends, pulled_module):
    """(The WasmPlugin form is emulated inline, not over ECDS: only the filter's refusal is
    checked here.)"""
    plugin = copy.deepcopy(doc("WasmPlugin", "bbr-wasm"))
    plugin["spec"]["pluginConfig"]["unknownModel"] = "drop"
    log = _refused(envoy_bin, session_dir, wasmplugin_gateway(backends, pulled_module, plugin), "wp-broken")
    assert "unknownModel" in log or "unknown variant" in log


def test_a_misspelt_flag_is_ignored_and_requests_hang(envoy_bin, session_dir, backends, pulled_module):
    """Nothing on the way refuses a misspelt PluginConfig field: the CRD schema keeps the patch
    value opaque (preserve-unknown-fields), istiod parses patches leniently and drops unknown
    fields (a warning at `kubectl apply` only), and Envoy accepts unknown fields in dynamic
    configuration with a warning (the agent does not pass --reject-unknown-dynamic-fields). The
    filter then loads without allow_on_headers_stop_iteration and inspected requests hang: only
    the routing tests above, which would hang too, prove the shipped spelling."""

    def typo(tc):
        tc["config"]["allow_on_header_stop_iteration"] = tc["config"].pop("allow_on_headers_stop_iteration")

    cfg, args = envoyfilter_gateway(backends, session_dir, pulled_module, typo)
    env = start_envoy(envoy_bin, session_dir, cfg, "ef-typo", args)
    try:
        log = env.proc.text()
        assert ACCEPTED in log and "allow_on_header_stop_iteration" in log and "Unknown field" in log, log[-2000:]
        with httpx.Client(base_url=env.url, timeout=10.0) as c:
            with pytest.raises(httpx.TimeoutException):
                c.post("/v1/completions", json=completion(QWEN), timeout=HANG_SECONDS)
    finally:
        env.proc.stop()


# --------------------------------------------------------------------------------------
# A flood of held uploads against the gateway as Istio configures it
# --------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("protocol", ["http1", "http2"])
def test_flood_of_held_uploads(envoy_bin, session_dir, backends, pulled_module, protocol):
    """The EnvoyFilter + the bootstrap override, under 300 held 8 MB uploads: the same checks
    and bounds as tests/integration/test_overload.py (see there for the figures behind them)."""
    import flood

    cfg, args = envoyfilter_gateway(backends, session_dir, pulled_module)
    env = start_envoy(envoy_bin, session_dir, cfg, f"istio-flood-{protocol}", args)
    admin = f"http://127.0.0.1:{env.admin_port}"
    # What bounds the flood besides the filter: the overload manager, which must be in Envoy.
    assert_overload_manager(env)

    def stats(prefix: str) -> dict:
        out = {}
        for line in httpx.get(f"{admin}/stats?filter=^{prefix}", timeout=5.0).text.splitlines():
            k, _, v = line.partition(": ")
            if v.lstrip("-").isdigit():
                out[k] = int(v)
        return out

    def allocated() -> int:
        return int(httpx.get(f"{admin}/memory", timeout=5.0).json()["allocated"])

    def probe(c: httpx.Client) -> httpx.Response:
        r = c.post("/v1/completions", json=completion(PHI))
        if r.status_code == 200:
            assert_reaches(r, PHI, "phi-pool", PHI)
        return r

    try:
        vm_before, alloc_before = stats("wasm\\."), allocated()
        f = flood.run_flood(
            env.port, env.proc.popen.pid, QWEN, probe, uploads=300,
            http2_connections=3 if protocol == "http2" else 0, ramp_seconds=2.0, hold_seconds=6.0,
        )
        print(f"\n[istio {protocol} flood] {f.summary()}")
        assert env.proc.alive(), f.summary()
        assert f.peak_rss <= (1 << 30) + FLOOD_MARGIN[protocol], f.summary()
        # The filter's held-body budget (maxHeldBodyBytes, 256 MiB per worker by default; one
        # worker here) bounds both protocols well below the overload manager's budget.
        assert f.peak_rss <= f.rss_before + 256 * flood.MIB + 192 * flood.MIB, f.summary()
        assert f.outcomes.get("json:503:gateway_overloaded", 0) > 0, f"the filter shed nothing: {f.summary()}"
        assert set(f.outcomes) <= {"reset", "held", "json:503:gateway_overloaded", "json:408:request_timeout"}, f.summary()
        assert f.probe.sent >= 3 and f.probe.rate >= FLOOD_MIN_SUCCESS[protocol], f.summary()
        assert set(f.probe.failures) <= {"json:503:gateway_overloaded"}, f.summary()
        if protocol == "http2":
            assert f.max_concurrent_streams == [100, 100, 100]
        assert stats("wasm\\.") == vm_before, "the wasm VM was replaced or failed"
        deadline = time.monotonic() + 30
        while stats("wasmcustom\\.bbr_bodies_in_progress").get("wasmcustom.bbr_bodies_in_progress") != 0:
            assert time.monotonic() < deadline, "the filter still holds requests of the closed flood"
            time.sleep(0.2)
        while allocated() > alloc_before + 64 * flood.MIB:
            assert time.monotonic() < deadline, f"heap in use {allocated() / flood.MIB:.0f} MiB after the flood"
            time.sleep(0.5)
        print(f"[istio {protocol} flood] after: heap in use {allocated() / flood.MIB:.0f} MiB, RSS {flood.rss_bytes(env.proc.popen.pid) / flood.MIB:.0f} MiB")
        with httpx.Client(base_url=env.url, timeout=10.0) as c:
            for _ in range(5):
                assert_reaches(c.post("/v1/completions", json=completion(PHI)), PHI, "phi-pool", PHI)
    finally:
        env.proc.stop()


# The bounds of tests/integration/test_overload.py (MARGIN, MIN_SUCCESS), for a 1 GiB budget.
FLOOD_MARGIN = {"http2": 256 * 1024 * 1024, "http1": 1280 * 1024 * 1024}
FLOOD_MIN_SUCCESS = {"http2": 0.95, "http1": 0.95}
