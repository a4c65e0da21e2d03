"""The endpoint picker in a real Envoy: the filter chooses the replica (prefixAffinity.picker:
prefix-cache and load scores, like llm-d's endpoint picker) and names it in
x-gateway-destination-endpoint; the shipped qwen-vllm cluster, with envoy/picker-lb-policy.yaml's
override_host policy (least request as the fallback) in place of MAGLEV, sends the request there.
Health checks and outlier detection are the shipped cluster's.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import (
    DEFAULT_FILTER_CONFIG,
    SHARED_DATA_WRITER,
    QWEN,
    burst,
    cluster,
    routes,
    set_cluster_endpoints,
    set_filter_config,
    tenant_system_prompt,
)

ROOT = Path(__file__).resolve().parents[2]
PICKER_POLICY = ROOT / "envoy" / "picker-lb-policy.yaml"
PICKER_HEADER = "x-gateway-destination-endpoint"
SEEN = "x-test-picked-endpoint"
REPLICAS = ("pick-1", "pick-2", "pick-3")
# Each answer takes this long, so that concurrent requests are in flight together.
TTFT_MS = 100


def use_picker_policy(c: dict, route_list: list[dict]) -> None:
    """envoy/picker-lb-policy.yaml: its cluster policy in place of the cluster's MAGLEV,
    everything else kept; its retry policy on the routes to that cluster, without hash_policy."""
    example = yaml.safe_load(PICKER_POLICY.read_text())
    c.pop("lb_policy", None)
    c.get("common_lb_config", {}).pop("consistent_hashing_lb_config", None)
    c.update(example["cluster"])
    for r in route_list:
        if r["route"].get("cluster") == c["name"]:
            r["route"].pop("hash_policy", None)
            r["route"].update(example["route"])


# Envoy workers in the tests of the shared table (below).
WORKERS = 2


def picker_envoy(mock_factory, envoy_factory, backends, ids, name, picker_extra=None, concurrency=WORKERS,
                 also=None, ttft_ms=5, loras=()):
    """Envoy with `concurrency` workers in front of fresh replicas `ids` (serving `loras`), the
    picker on qwen-vllm (then `also(config)`)."""
    replicas = [mock_factory(QWEN, rid, loras=loras, extra=("--ttft-ms", str(ttft_ms))) for rid in ids]
    endpoints = [f"127.0.0.1:{m.port}" for m in replicas]

    def mutate(cfg):
        c = cluster(cfg, "qwen-vllm")
        use_picker_policy(c, routes(cfg))
        set_cluster_endpoints(cfg, "qwen-vllm", [m.port for m in replicas])
        for r in routes(cfg):
            r.setdefault("response_headers_to_add", []).append(
                {"header": {"key": SEEN, "value": f"%REQ({PICKER_HEADER})%"}}
            )
        if also is not None:
            also(cfg)
        config = json.loads(json.dumps(DEFAULT_FILTER_CONFIG))
        picker = {"pools": [{"cluster": "qwen-vllm", "baseModels": [QWEN], "endpoints": endpoints}]}
        picker.update(picker_extra or {})
        config["prefixAffinity"] = {"enabled": True, "picker": picker}
        set_filter_config(cfg, config)

    env = envoy_factory({"qwen-vllm": replicas[0].port, "phi-vllm": backends.phi.port}, mutate=mutate,
                        name=name, concurrency=concurrency)
    return env, replicas


@pytest.fixture(scope="module")
def pool(mock_factory, envoy_factory, backends):
    return picker_envoy(mock_factory, envoy_factory, backends, REPLICAS, "picker", concurrency=1,
                        ttft_ms=TTFT_MS, loras=("qwen-sql-lora",))


def counter(env, name: str) -> int:
    """A bbr counter from the admin /stats page, whatever tag syntax Envoy prints around it."""
    values = [
        int(line.rpartition(": ")[2])
        for line in env.admin(f"/stats?filter={name}").splitlines()
        if name in line and line.rpartition(": ")[2].isdigit()
    ]
    assert len(values) == 1, env.admin(f"/stats?filter={name}")
    return values[0]


def port_of(replicas, backend_id: str) -> str:
    return next(f"127.0.0.1:{m.port}" for m in replicas if m.id == backend_id)


def chat(client: httpx.Client, messages: list[dict], **headers) -> httpx.Response:
    body = {"model": QWEN, "max_tokens": 2, "messages": messages}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def tenant_messages(tenant: int, question: str = "Where is my order?") -> list[dict]:
    return [{"role": "system", "content": tenant_system_prompt(tenant)}, {"role": "user", "content": question}]


def test_the_picked_endpoint_serves_and_health_checks_are_kept(pool):
    env, replicas = pool
    c = cluster(env.config, "qwen-vllm")
    assert "health_checks" in c and "outlier_detection" in c and "lb_policy" not in c
    with httpx.Client(base_url=env.url, timeout=30.0) as client:
        for tenant in range(6):
            r = chat(client, tenant_messages(tenant))
            assert r.status_code == 200, r.text[:300]
            # Envoy sent it where the filter said.
            assert r.headers[SEEN] == port_of(replicas, r.headers["x-mock-backend"])
        # A prompt under one block is picked by load alone: still picked.
        r = client.post("/v1/completions", json={"model": QWEN, "prompt": "short", "max_tokens": 2})
        assert r.status_code == 200
        assert r.headers[SEEN] == port_of(replicas, r.headers["x-mock-backend"])
    assert counter(env, "bbr_endpoint_picked_total") >= 7


def test_shared_prefix_lands_on_one_replica_and_tenants_spread(pool):
    env, _ = pool
    homes = {}
    with httpx.Client(base_url=env.url, timeout=30.0) as client:
        for tenant in range(10, 16):
            served = set()
            for q in range(6):
                r = chat(client, tenant_messages(tenant, f"Question number {q}?"))
                assert r.status_code == 200, r.text[:300]
                served.add(r.headers["x-mock-backend"])
            # Sequential requests: load always allows, so every question meets the same replica.
            assert len(served) == 1, (tenant, served)
            homes[tenant] = served.pop()
    # New prefixes go where the load is lowest, ties rotating: 6 tenants use all 3 replicas.
    assert set(homes.values()) == set(REPLICAS), homes


def test_a_burst_on_one_prefix_spreads_by_load(pool):
    env, _ = pool
    home, answers = burst(env.url, QWEN, tenant_messages(999, "Burst?"), requests=36, workers=12)
    where = [a.headers["x-mock-backend"] for a in answers]
    counts = {r: where.count(r) for r in REPLICAS}
    # 12 in flight over 3 replicas: the bound (1.25 x the mean) keeps the prefix's home at 5 at
    # a time, so the others take their share; without it all 36 would go home.
    assert counts[home] < 36 * 0.6, counts
    assert min(counts.values()) >= 36 * 0.15, counts


def test_unique_prompts_spread_like_least_request(pool):
    env, _ = pool
    with httpx.Client(base_url=env.url, timeout=60.0) as client:

        def unique(i):
            return chat(client, tenant_messages(5000 + i, "Unique?"))

        with ThreadPoolExecutor(max_workers=6) as ex:
            answers = list(ex.map(unique, range(30)))
    assert all(a.status_code == 200 for a in answers), [a.status_code for a in answers]
    where = [a.headers["x-mock-backend"] for a in answers]
    counts = {r: where.count(r) for r in REPLICAS}
    # No shared prefix: the load score alone, ties rotating; 30 over 3 replicas, 10 each give or
    # take what the timing of 6 concurrent clients shifts.
    assert max(counts.values()) - min(counts.values()) <= 6, counts


def test_a_forged_picker_header_is_ignored(pool):
    """A client cannot choose the replica by sending the picker header itself."""
    env, replicas = pool
    forged = f"127.0.0.1:{replicas[0].port}"
    with httpx.Client(base_url=env.url, timeout=30.0) as client:
        served = []
        for i in range(9):
            r = chat(client, tenant_messages(7000 + i, "Forged?"), **{"X-Gateway-Destination-Endpoint": forged})
            assert r.status_code == 200, r.text[:300]
            # The filter's own choice, which Envoy followed.
            assert r.headers[SEEN] == port_of(replicas, r.headers["x-mock-backend"])
            served.append(r.headers["x-mock-backend"])
        # New prefixes rotate over the replicas, whatever the client asked for.
        assert len(set(served)) == 3, served
        # The same on a request the filter does not route (an unknown path): removed, not followed.
        before = counter(env, "bbr_spoofed_header_removed_total")
        r = client.get("/v1/models", headers={PICKER_HEADER: forged})
        assert r.status_code == 200
        assert counter(env, "bbr_spoofed_header_removed_total") == before + 1


def test_a_killed_replica_falls_back_without_errors_beyond_in_flight(pool):
    """Kill the home of some tenants mid-run, under concurrent load. override_host follows the
    header even to a dead host (it does not check health, see envoy/picker-lb-policy.yaml), so
    the connect failure is retried once by the fallback (least request) elsewhere: the only
    errors are the requests the replica was serving when it died. Other tenants stay home, and
    the picker, seeing its picks served elsewhere, stops picking the dead replica."""
    env, replicas = pool
    workers = 4
    tenants = list(range(200, 212))
    with httpx.Client(base_url=env.url, timeout=30.0) as client:
        homes = {}
        for tenant in tenants:
            r = chat(client, tenant_messages(tenant))
            assert r.status_code == 200
            homes[tenant] = r.headers["x-mock-backend"]
        victim = next(m for m in replicas if m.id in set(homes.values()))
        assert 0 < sum(1 for h in homes.values() if h != victim.id), homes

        def one(i):
            tenant = tenants[i % len(tenants)]
            if i == 24:
                victim.kill()  # mid-run: up to `workers` requests are in flight
            r = chat(client, tenant_messages(tenant))
            return i, tenant, r.status_code, r.headers.get("x-mock-backend"), r.text[:200]

        with ThreadPoolExecutor(max_workers=workers) as ex:
            results = list(ex.map(one, range(72)))
    failed = [x for x in results if x[2] != 200]
    # Reset by the dying replica: Envoy answers 503 (not retried: the request had reached it).
    assert all(code == 503 for _, _, code, _, _ in failed), failed
    assert len(failed) <= workers, failed
    # After the kill, no answer came from the dead replica, and the other tenants mostly stayed
    # home (4 in flight over 3 replicas: the bound may spill one now and then).
    after = [(t, b) for i, t, code, b, _ in results if code == 200 and i >= 24 + workers]
    assert all(b != victim.id for _, b in after), after
    others = [(t, b) for t, b in after if homes[t] != victim.id]
    stayed = sum(1 for t, b in others if b == homes[t])
    assert stayed >= 0.75 * len(others), (stayed, len(others), others)
    # The rest of the pool kept serving: the last round was all answered.
    assert all(code == 200 for i, _, code, _, _ in results if i >= 72 - len(tenants)), results[-12:]

    # The picker saw its picks served elsewhere and set the dead replica aside (cooldownMs,
    # 10 s): a further round of every tenant, the dead replica's included, needs no retry.
    assert counter(env, "bbr_endpoint_failed_over_total") >= 1
    retries = env.stat("cluster.qwen-vllm.upstream_rq_retry")
    assert retries >= 1
    with httpx.Client(base_url=env.url, timeout=30.0) as client:
        for tenant in tenants:
            r = chat(client, tenant_messages(tenant))
            assert r.status_code == 200, r.text[:200]
            assert r.headers[SEEN] != f"127.0.0.1:{victim.port}"
            assert r.headers["x-mock-backend"] != victim.id
    assert env.stat("cluster.qwen-vllm.upstream_rq_retry") == retries


# --- Two Envoy workers: one table of what was sent where, shared through the host's shared data.

SHARED_REPLICAS = ("share-1", "share-2", "share-3")


def worker_connections(env) -> dict[int, int]:
    """Per Envoy worker, the connections its listener accepted (listener.<addr>.worker_<n>.*)."""
    out = {}
    for line in env.admin("/stats?filter=downstream_cx_total").splitlines():
        name, _, value = line.partition(": ")
        if name.startswith("listener.127.0.0.1_") and ".worker_" in name and value.strip().isdigit():
            out[int(name.split(".worker_")[1].split(".")[0])] = int(value)
    return out


def clients_on_workers(env, wanted: dict[int, int]) -> dict[int, list[httpx.Client]]:
    """wanted[w] kept-alive connections accepted by worker w: new connections (a GET /v1/models,
    which the filter answers itself) until each worker has its count. Which worker accepts is
    the kernel's choice, so this tries a bounded number of times."""
    on: dict[int, list[httpx.Client]] = {w: [] for w in wanted}
    for _ in range(60):
        before = worker_connections(env)
        c = env.client(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        assert c.get("/v1/models").status_code == 200
        after = worker_connections(env)
        took = [w for w in after if after[w] > before.get(w, 0)]
        assert len(took) == 1, (before, after)
        if len(on.get(took[0], wanted)) < wanted.get(took[0], 0):
            on[took[0]].append(c)
        else:
            c.close()
        if all(len(on[w]) == n for w, n in wanted.items()):
            return on
    raise AssertionError(f"60 connections did not give {wanted}: {worker_connections(env)}")


def client_on_each_worker(env) -> dict[int, httpx.Client]:
    """A kept-alive connection accepted by each worker (see clients_on_workers)."""
    return {w: cs[0] for w, cs in clients_on_workers(env, {w: 1 for w in range(WORKERS)}).items()}


@pytest.fixture(scope="module")
def shared_pool(mock_factory, envoy_factory, backends):
    return picker_envoy(mock_factory, envoy_factory, backends, SHARED_REPLICAS, "picker-shared")


def test_workers_send_a_shared_prefix_to_the_replica_either_chose(shared_pool):
    """Each Envoy worker runs its own VM and picker. Worker 1 first places a prompt of its own
    (so its tie-breaking no longer agrees with worker 0's), then six tenants are placed on
    worker 0's connection and asked again on worker 1's: each reaches the replica worker 0
    chose, because worker 1 reads what worker 0 sent where from the shared table. Without it
    worker 1 places them by its own rotation, a replica off. Then fresh connections, whichever
    worker takes them, reach the same homes."""
    env, _ = shared_pool
    on = client_on_each_worker(env)
    r = chat(on[1], tenant_messages(499, "Worker one's own prompt?"))
    assert r.status_code == 200, r.text[:300]
    tenants = range(400, 406)
    homes = {}
    for t in tenants:
        r = chat(on[0], tenant_messages(t))
        assert r.status_code == 200, r.text[:300]
        homes[t] = r.headers["x-mock-backend"]
    assert set(homes.values()) == set(SHARED_REPLICAS), homes
    moved = {}
    for t in tenants:
        r = chat(on[1], tenant_messages(t, "And another question?"))
        assert r.status_code == 200, r.text[:300]
        if r.headers["x-mock-backend"] != homes[t]:
            moved[t] = (homes[t], r.headers["x-mock-backend"])
    assert not moved, f"worker 1 sent tenants elsewhere than worker 0 (home, there): {moved}"
    before = worker_connections(env)
    for round_ in range(3):
        for t in tenants:
            with httpx.Client(base_url=env.url, timeout=30.0) as fresh:
                r = chat(fresh, tenant_messages(t, f"Fresh connection {round_}?"))
            assert r.status_code == 200, r.text[:300]
            assert r.headers["x-mock-backend"] == homes[t], (t, round_, homes[t], r.headers["x-mock-backend"])
    after = worker_connections(env)
    # 18 fresh connections: the test saw both workers take some (the kernel spreads them).
    assert all(after[w] > before.get(w, 0) for w in range(WORKERS)), (before, after)


@pytest.fixture(scope="module")
def one_slot_pool(mock_factory, envoy_factory, backends):
    return picker_envoy(mock_factory, envoy_factory, backends, ("slot-1", "slot-2", "slot-3"), "picker-one-slot",
                        picker_extra={"sharedSlots": 1})


def test_one_shared_slot_forgets_but_never_misroutes(one_slot_pool):
    """sharedSlots 1: every block of every prompt collides in one key, so each write takes the
    slot over from the last. A slot names a block only with its full hash, so what it forgets
    is placed by each worker's own picker: every request is answered and sent where the filter
    said, and a tenant asked again on the same worker still finds its home there."""
    env, replicas = one_slot_pool
    on = client_on_each_worker(env)
    for w, client in on.items():
        for t in range(600 + 10 * w, 606 + 10 * w):
            first = chat(client, tenant_messages(t))
            assert first.status_code == 200, first.text[:300]
            # Other tenants in between take the slot over.
            chat(on[1 - w], tenant_messages(t + 100))
            again = chat(client, tenant_messages(t, "Again?"))
            assert again.status_code == 200
            assert again.headers["x-mock-backend"] == first.headers["x-mock-backend"], t
    assert counter(env, "bbr_endpoint_picked_total") >= 36


# What the writer (tests/shared-data-writer) puts in every slot of a 4-slot table and in the
# first 4 rows of in-flight counts, again every 50 ms: no entry or row in any of them (text,
# nothing, an entry's length with other bytes, one more).
GARBAGE = ["garbage", "", "x" * 22, "y" * 23]


def with_garbage_writer(cfg: dict) -> None:
    """The test-only wasm service, under the filter's vm_id (Envoy keys shared data by vm_id
    alone), writing GARBAGE into the picker's 4 slots of qwen-vllm and its first 4 load rows."""
    value = "".join(f"bbr-wasm.picker.qwen-vllm.{slot}\t{g}\n" for slot, g in enumerate(GARBAGE))
    value += "".join(f"bbr-wasm.picker.qwen-vllm.load.{row}\t{g}\n" for row, g in enumerate(GARBAGE))
    cfg.setdefault("bootstrap_extensions", []).append({
        "name": "envoy.bootstrap.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.wasm.v3.WasmService",
            "singleton": True,
            "config": {
                "name": "shared-data-writer",
                "vm_config": {
                    "vm_id": "bbr",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(SHARED_DATA_WRITER)}},
                },
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": value},
            },
        },
    })


@pytest.fixture(scope="module")
def garbage_pool(mock_factory, envoy_factory, backends):
    return picker_envoy(mock_factory, envoy_factory, backends, ("junk-1", "junk-2", "junk-3"), "picker-garbage",
                        picker_extra={"sharedSlots": 4}, also=with_garbage_writer)


def test_garbage_in_the_shared_table_leaves_each_worker_its_own_picker(garbage_pool):
    """Another writer keeps putting bytes that are no entry into every slot, and no row into the
    first rows of in-flight counts (the workers claim them, and their rows keep being
    overwritten). The filter reads them (bbr_endpoint_shared_unusable_total counts the slots),
    trusts none, and picks by each worker's own history and counts: no error, no trap (a
    trapped VM answers 503), every request sent where the filter said, and a tenant asked again
    on the same connection finds its home."""
    env, replicas = garbage_pool
    on = client_on_each_worker(env)
    answered = 0
    for w, client in on.items():
        for t in range(800 + 10 * w, 806 + 10 * w):
            first = chat(client, tenant_messages(t))
            again = chat(client, tenant_messages(t, "Again?"))
            for r in (first, again):
                assert r.status_code == 200, r.text[:300]
                assert r.headers[SEEN] == port_of(replicas, r.headers["x-mock-backend"])
                answered += 1
            assert again.headers["x-mock-backend"] == first.headers["x-mock-backend"], t
    assert counter(env, "bbr_endpoint_picked_total") == answered
    assert counter(env, "bbr_endpoint_shared_unusable_total") > 0


@pytest.fixture(scope="module")
def slow_pool(mock_factory, envoy_factory, backends):
    # Answers take 2 s: requests stay in flight while the test looks.
    return picker_envoy(mock_factory, envoy_factory, backends, ("slow-1", "slow-2", "slow-3"), "picker-load",
                        ttft_ms=2000)


def test_workers_see_each_others_requests_in_flight(slow_pool):
    """Worker 0 has two unique prompts in flight, on two replicas (the least loaded, ties
    rotating). Worker 1 then places a third unique prompt: the replica with nothing in flight,
    because it reads worker 0's counts from the shared data. Alone it would see three idle
    replicas and take the first (its rotation starts there), one worker 0 is using."""
    env, replicas = slow_pool
    on = clients_on_workers(env, {0: 2, 1: 1})
    with ThreadPoolExecutor(max_workers=2) as ex:
        busy = [ex.submit(chat, on[0][k], tenant_messages(900 + k, "Slow?")) for k in range(2)]
        # Both picked and forwarded (each answer takes 2 s).
        time.sleep(0.5)
        third = chat(on[1][0], tenant_messages(950, "Where do I go?"))
        answers = [f.result() for f in busy]
    for r in answers + [third]:
        assert r.status_code == 200, r.text[:300]
        assert r.headers[SEEN] == port_of(replicas, r.headers["x-mock-backend"])
    used = {r.headers["x-mock-backend"] for r in answers}
    assert len(used) == 2, used
    assert third.headers["x-mock-backend"] not in used, (used, third.headers["x-mock-backend"])
