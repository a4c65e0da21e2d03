"""Counters read before and after each GuideLLM run: the mocks' /mock/stats and Envoy's
per-cluster upstream 2xx; from their difference, where a model's requests went."""

from __future__ import annotations

import json
from typing import Optional


from .settings import BACKEND
from .servers import http_get, vllm_success

def snapshot(mock_ports: dict[str, int], admin_port: int, vllm_port: Optional[int] = None) -> dict:
    mocks = {bid: json.loads(http_get(f"http://127.0.0.1:{p}/mock/stats")) for bid, p in mock_ports.items()}
    clusters = {}
    for line in http_get(
        f"http://127.0.0.1:{admin_port}/stats?filter=^cluster\\.[a-z-]+\\.upstream_rq_2xx$"
    ).splitlines():
        key, _, value = line.partition(": ")
        clusters[key.split(".")[1]] = int(value)
    return {"mocks": mocks, "clusters": clusters, "vllm": vllm_success(vllm_port) if vllm_port else None}


def routing(model: str, before: dict, after: dict) -> dict:
    """Where the requests of one run landed, from the counter deltas."""
    own_id, _, own_cluster = BACKEND[model]
    backend_totals = {
        bid: after["mocks"][bid]["total"] - before["mocks"][bid]["total"] for bid in after["mocks"]
    }
    cluster_2xx = {c: after["clusters"].get(c, 0) - before["clusters"].get(c, 0) for c in after["clusters"]}
    misrouted = sum(n for bid, n in backend_totals.items() if bid != own_id)
    if own_id in after["mocks"]:
        correct = after["mocks"][own_id]["by_model"].get(model, 0) - before["mocks"][own_id]["by_model"].get(
            model, 0
        )
        # A request counted on the right backend under another model name would also be wrong.
        misrouted += backend_totals[own_id] - correct
    else:
        # llama-server answers whatever `model` says, so its pool's count is Envoy's 2xx for
        # its cluster; the mocks (which count every request) must not have moved. vLLM answers
        # with the requested name and refuses (404) any it does not serve: the same count.
        correct = cluster_2xx.get(own_cluster, 0)
    backend_totals[own_id] = backend_totals.get(own_id, cluster_2xx.get(own_cluster, 0))
    vllm_done = None
    if before.get("vllm") is not None and after.get("vllm") is not None:
        vllm_done = after["vllm"] - before["vllm"]
    return {
        "correct": correct,
        "misrouted": misrouted,
        # vLLM's request_success_total delta (BACKEND=vllm): every request it finished.
        "vllm_success": vllm_done,
        "backend_totals": backend_totals,
        "cluster_2xx": cluster_2xx,
        "own_cluster": own_cluster,
    }
