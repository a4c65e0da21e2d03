"""A real model server as one more pool of the gateway: llama.cpp's llama-server running
SmolLM2-135M-Instruct (scripts/llama-deps.sh builds and fetches both).

Shared by `make run BACKEND=llama` (scripts/run-local.sh calls the command line below),
the real-model tests (tests/llama) and `make bench-llm BACKEND=llama` (bench/llm/bench_llm.py),
so that all three run the same servers behind the same Envoy configuration.

What differs from the mock-vllm pools, and why:
- llama-server ignores the request's `model` and answers with its `--alias`. Every replica
  gets the pool's model name as its alias, so a response's `model` says which pool answered:
  a request for another model that reached this pool comes back as SmolLM2, and a SmolLM2
  request that reached a mock pool comes back with the mock's `x-mock-backend` header.
- Its /health answers 503 while the model loads and 200 once it can serve: the cluster's
  active health check uses it as it is.
- Each replica gets one thread (`--threads 1`): the machines this runs on have two cores, and
  two replicas that each take both would time-slice every token.

Command line (for scripts/run-local.sh):
  python tests/llama_pool.py envoy-config IN.yaml OUT.yaml PORT[,PORT...]
      writes IN.yaml with the SmolLM2 pool added (route, cluster, filter's model list)
  python tests/llama_pool.py argv PORT
      prints one replica's command line, NUL-separated (after building it if needed)
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
DEPS_SCRIPT = ROOT / "scripts" / "llama-deps.sh"
MODEL_FILE = ROOT / ".venv-llama" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

# The Hugging Face name of the model: what clients send, the alias every replica answers with.
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CLUSTER = "smollm-llama"
ROUTE = "smollm"
# Context per slot. Prompts longer than this get llama-server's own 400
# (exceed_context_size_error), which the tests check passes through unchanged.
CONTEXT_TOKENS = 2048
# Prompts kept in host memory after their slot is reused (llama-server's default is 8 GiB,
# far more than a test machine should give two replicas).
CACHE_RAM_MIB = 256


def install(timeout: float = 1800.0) -> str:
    """Builds llama-server and extracts the model unless both are current (scripts/llama-deps.sh);
    returns the server's path. About 6 minutes the first time on 2 cores, instant after."""
    out = subprocess.run(
        ["bash", str(DEPS_SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    path = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if out.returncode != 0 or not path or not MODEL_FILE.is_file():
        raise RuntimeError(f"scripts/llama-deps.sh failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return path


def server_argv(
    server: str,
    port: int,
    parallel: int = 2,
    context_tokens: int = CONTEXT_TOKENS,
    cache_ram_mib: int = CACHE_RAM_MIB,
    threads: int = 1,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """One replica on 127.0.0.1:port. `parallel` slots share `parallel x context_tokens`."""
    return [
        server,
        "--model", str(MODEL_FILE),
        "--alias", MODEL,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--ctx-size", str(parallel * context_tokens),
        "--parallel", str(parallel),
        "--threads", str(threads),
        "--threads-batch", str(threads),
        "--cache-ram", str(cache_ram_mib),
        # Prometheus metrics on /metrics (llamacpp:* names): the tests read its counters.
        "--metrics",
        # No web UI: this is an API server behind a gateway.
        "--no-webui",
        *extra,
    ]


def healthy(port: int, timeout: float = 2.0) -> bool:
    """Whether the replica on 127.0.0.1:port can serve: llama-server's /health answers 503
    while the model loads and 200 once it is ready (stdlib only: every venv can call it)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:  # refused, reset, timed out, or an HTTP error status (urllib raises those)
        return False


def _hcm(cfg: dict) -> dict:
    listener = cfg["static_resources"]["listeners"][0]
    for f in listener["filter_chains"][0]["filters"]:
        if f["name"] == "envoy.filters.network.http_connection_manager":
            return f["typed_config"]
    raise ValueError("no http_connection_manager in the first listener")


def add_pool(cfg: dict, ports: list[int], template_cluster: str = "phi-vllm") -> None:
    """Adds the SmolLM2 pool to a gateway config built from envoy/envoy.yaml: the model in the
    filter's model list, a route on x-gateway-base-model-name like the other pools', and a
    cluster with the same health checks, outlier detection and limits as `template_cluster`,
    one endpoint per replica port."""
    hcm = _hcm(cfg)
    wasm = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm")
    plugin = wasm["typed_config"]["config"]
    filter_config = json.loads(plugin["configuration"]["value"])
    if all(m["name"] != MODEL for m in filter_config["models"]):
        filter_config["models"].append({"name": MODEL})
    plugin["configuration"]["value"] = json.dumps(filter_config, separators=(",", ":"))

    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    template_route = next(r for r in routes if r["route"].get("cluster") == template_cluster)
    route = copy.deepcopy(template_route)
    route["name"] = ROUTE
    route["match"]["headers"] = [
        {"name": h["name"], "string_match": {"exact": MODEL}} for h in template_route["match"]["headers"]
    ]
    route["route"]["cluster"] = CLUSTER
    routes[:] = [r for r in routes if r.get("name") != ROUTE] + [route]

    clusters = cfg["static_resources"]["clusters"]
    template = next(c for c in clusters if c["name"] == template_cluster)
    cluster = copy.deepcopy(template)
    cluster["name"] = CLUSTER
    cluster["load_assignment"] = {
        "cluster_name": CLUSTER,
        "endpoints": [
            {
                "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
                    for p in ports
                ]
            }
        ],
    }
    # llama-server (cpp-httplib) closes the connection after every streamed response while it
    # advertises keep-alive (`Keep-Alive: timeout=5, max=100`, no `Connection: close`; seen here
    # with a plain HTTP client: the request after a stream on the same connection fails). Envoy
    # would put that connection back in its pool and send the next request into the closing
    # socket: a 503 (UC) for a client that did nothing wrong. One request per connection avoids
    # the race; a new loopback or LAN connection costs nothing next to an inference.
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"max_requests_per_connection": 1},
            "explicit_http_config": {"http_protocol_options": {}},
        }
    }
    clusters[:] = [c for c in clusters if c["name"] != CLUSTER] + [cluster]


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "envoy-config":
        import yaml  # the project venv has it (tests/requirements.txt)

        src, dst, ports = argv[1], argv[2], [int(p) for p in argv[3].split(",")]
        cfg = yaml.safe_load(Path(src).read_text())
        add_pool(cfg, ports)
        Path(dst).write_text(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    if len(argv) == 2 and argv[0] == "argv":
        server = install()
        sys.stdout.write("\0".join(server_argv(server, int(argv[1]))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
