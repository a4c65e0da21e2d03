"""istio/ in a real Envoy: the configuration istiod and the istio-agent would give the
gateway, built statically (istio_convert.py), running the module pulled back from a real
registry, with the HTTPRoutes as Envoy routes and one mock-vllm per InferencePool.

- The EnvoyFilter's filter configuration is accepted by the filter itself, and each model,
  and the adapter, reaches its pool.
- The WasmPlugin's pluginConfig, rendered the way istiod renders it, is accepted too, but
  without allow_on_headers_stop_iteration (which the WasmPlugin API cannot set) inspected
  requests hang: why istio/ uses the EnvoyFilter.
- A configuration the filter refuses stops Envoy from starting, with the filter's log line.
"""

from __future__ import annotations

import copy
import json
import sys
import time

import httpx
import pytest
import yaml

import bbr_oci
import istio_convert as ic
from conftest import LORA, PHI, QWEN, ROOT, all_docs, doc, free_port, launch_envoy, start_envoy

REFUSED = "bbr-wasm: configuration refused:"
ACCEPTED = "bbr-wasm: configuration accepted"
HANG_SECONDS = 3.0


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


def overload_bootstrap() -> dict:
    """custom_bootstrap.json of bbr/overload-bootstrap.yaml (the bootstrap override)."""
    return json.loads(doc("ConfigMap", "bbr-wasm-overload")["data"]["custom_bootstrap.json"])


def gateway_config(backends, http_filter: dict, listener_merge=None, hcm_merge=None, bootstrap_merge=None) -> dict:
    return ic.static_gateway(
        http_filter,
        _routes(),
        {name: m.port for name, m in backends.items()},
        listener_port=free_port(),
        admin_port=free_port(),
        listener_merge=listener_merge,
        hcm_merge=hcm_merge,
        bootstrap_merge=bootstrap_merge,
    )


def envoyfilter_gateway(backends, module: str, mutate_typed_config=None) -> dict:
    """The gateway as istiod + the agent would configure it from bbr/envoyfilter.yaml. The
    pin check is test_oci.py's; here the module is the fresh build, whatever the pins say."""
    ef = doc("EnvoyFilter", "bbr-wasm")
    tc = ic.agent_localize(ic.extension_config(ef)["typed_config"], module, manifest_digest=None)
    if mutate_typed_config:
        mutate_typed_config(tc)
    listener_merge = ic.one_patch(ef, "LISTENER")["patch"]["value"]
    hcm_merge = ic.one_patch(ef, "NETWORK_FILTER")["patch"]["value"]
    return gateway_config(backends, ic.http_filter_from_envoyfilter(ef, tc), listener_merge, hcm_merge, overload_bootstrap())


def wasmplugin_gateway(backends, module: str, plugin: dict) -> dict:
    tc = ic.wasmplugin_to_typed_config(plugin, module)
    return gateway_config(backends, {"name": tc["config"]["name"], "typed_config": tc})


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
    env = start_envoy(envoy_bin, session_dir, envoyfilter_gateway(backends, pulled_module), "envoyfilter")
    yield env
    env.proc.stop()


def test_envoyfilter_config_is_accepted(gateway):
    log = gateway.proc.log()
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


def test_local_replies_match_the_shipped_envoy_config():
    """One source of truth: the EnvoyFilter's mappers and HTTP/2 caps are envoy/envoy.yaml's,
    and so is the overload protection of the bootstrap override (without the connection-count
    monitor, which Istio's bootstrap has already)."""
    shipped = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    hcm = shipped["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    patch = ic.one_patch(doc("EnvoyFilter", "bbr-wasm"), "NETWORK_FILTER")["patch"]["value"]
    assert patch["typed_config"]["local_reply_config"] == hcm["local_reply_config"]
    assert patch["typed_config"]["http2_protocol_options"] == hcm["http2_protocol_options"]
    om = copy.deepcopy(shipped["overload_manager"])
    om["resource_monitors"] = [m for m in om["resource_monitors"] if "downstream_connections" not in m["typed_config"]["@type"]]
    assert overload_bootstrap() == {"overload_manager": om, "memory_allocator_manager": shipped["memory_allocator_manager"]}
    gw = doc("Gateway", "infra-pattern1-inference-gateway")
    assert gw["spec"]["infrastructure"]["annotations"]["sidecar.istio.io/bootstrapOverride"] == "bbr-wasm-overload"


def test_listener_patch_lets_long_prompts_through(gateway, envoy_bin, session_dir, backends, pulled_module):
    """The whole body is buffered while the filter reads it. With the LISTENER patch a 2 MiB
    body is routed; without it Envoy's default 1 MiB buffer limit answers 413 itself (plain
    text, before the filter's own 8 MiB limit could apply)."""
    body = json.dumps(completion(QWEN, prompt="x" * (2 * 1024 * 1024))).encode()
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=gateway.url, timeout=30.0) as c:
        assert_reaches(c.post("/v1/completions", content=body, headers=headers), QWEN, "qwen-pool", QWEN)

    ef = doc("EnvoyFilter", "bbr-wasm")
    tc = ic.agent_localize(ic.extension_config(ef)["typed_config"], pulled_module, manifest_digest=None)
    cfg = gateway_config(backends, ic.http_filter_from_envoyfilter(ef, tc), listener_merge=None)
    env = start_envoy(envoy_bin, session_dir, cfg, "no-listener-patch")
    try:
        with httpx.Client(base_url=env.url, timeout=30.0) as c:
            try:
                r = c.post("/v1/completions", content=body, headers=headers)
            except httpx.TransportError:
                return  # Envoy may also close the connection while the body is still coming
            assert r.status_code == 413, r.text[:200]
            assert "x-mock-backend" not in r.headers
            assert not r.headers.get("content-type", "").startswith("application/json"), r.text[:200]
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
        assert ACCEPTED in env.proc.log()
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


def _refused(envoy_bin, session_dir, cfg, name) -> str:
    proc = launch_envoy(envoy_bin, session_dir, cfg, name)
    code = proc.wait_exit(timeout=30.0)
    log = proc.log()
    proc.stop()
    assert code is not None, f"Envoy kept running with a configuration the filter refuses:\n{log[-2000:]}"
    assert code != 0, log[-2000:]
    assert REFUSED in log, log[-3000:]
    return log


def test_broken_envoyfilter_configuration_stops_envoy(envoy_bin, session_dir, backends, pulled_module):
    def duplicate(tc):
        models = {"models": [{"name": QWEN}, {"name": QWEN}]}
        tc["config"]["configuration"]["value"] = json.dumps(models)

    log = _refused(envoy_bin, session_dir, envoyfilter_gateway(backends, pulled_module, duplicate), "ef-broken")
    assert "duplicate name" in log


def test_broken_wasmplugin_config_stops_envoy(envoy_bin, session_dir, backends, pulled_module):
    plugin = copy.deepcopy(doc("WasmPlugin", "bbr-wasm"))
    plugin["spec"]["pluginConfig"]["unknownModel"] = "drop"
    log = _refused(envoy_bin, session_dir, wasmplugin_gateway(backends, pulled_module, plugin), "wp-broken")
    assert "unknownModel" in log or "unknown variant" in log


def test_envoy_rejects_a_typo_in_the_envoyfilter_patch(envoy_bin, session_dir, backends, pulled_module):
    """The patch value is opaque to the CRD schema (preserve-unknown-fields); Envoy's own
    parser is the check: a misspelt PluginConfig field is refused."""

    def typo(tc):
        tc["config"]["allow_on_header_stop_iteration"] = tc["config"].pop("allow_on_headers_stop_iteration")

    cfg = envoyfilter_gateway(backends, pulled_module, typo)
    proc = launch_envoy(envoy_bin, session_dir, cfg, "ef-typo")
    code = proc.wait_exit(timeout=30.0)
    log = proc.log()
    proc.stop()
    assert code not in (None, 0), log[-2000:]
    assert "allow_on_header_stop_iteration" in log, log[-2000:]


# --------------------------------------------------------------------------------------
# A flood of held uploads against the gateway as Istio configures it (issue 12)
# --------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("protocol", ["http1", "http2"])
def test_flood_of_held_uploads(envoy_bin, session_dir, backends, pulled_module, protocol):
    """The EnvoyFilter + the bootstrap override, under 300 held 8 MB uploads: the same checks
    and bounds as tests/integration/test_overload.py (see there for the figures behind them)."""
    import flood

    env = start_envoy(envoy_bin, session_dir, envoyfilter_gateway(backends, pulled_module), f"istio-flood-{protocol}")
    admin = f"http://127.0.0.1:{env.admin_port}"

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
