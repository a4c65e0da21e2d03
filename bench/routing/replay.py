"""bench-routing's load generator: replays a workload through one or more gateways (open-loop
arrivals, a conversation's turn after its previous answer, background senders around the gateway)
and records one Outcome per request."""
from __future__ import annotations

import asyncio
import hashlib
import json
import random
from dataclasses import dataclass
from typing import Optional

import httpx

from settings import PATH
from strategies import KeySource, Strategy
from workloads import Req, Workload, body_of, prefix_group, text


@dataclass
class Outcome:
    status: int = 0
    ttft_ms: float = float("nan")       # the replica's (x-mock-ttft-ms)
    latency_ms: float = float("nan")    # the client's, request sent to response read
    done_at: float = 0.0
    backend: str = ""
    hit_tokens: int = 0
    echo_key: Optional[str] = None
    error: str = ""
    gateway: int = 0                    # which gateway process the client sent it to


async def send(client: httpx.AsyncClient, port: int, body: dict, headers: dict, t0: float) -> Outcome:
    out = Outcome()
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        r = await client.post(f"http://127.0.0.1:{port}{PATH}", content=json.dumps(body),
                              headers={"content-type": "application/json", **headers})
        out.latency_ms = (loop.time() - start) * 1000
        out.status = r.status_code
        out.backend = r.headers.get("x-mock-backend", "")
        out.hit_tokens = int(r.headers.get("x-mock-prefix-cache-hit-tokens", "0") or 0)
        out.echo_key = r.headers.get("x-echo-prefix-hash")
        out.ttft_ms = float(r.headers.get("x-mock-ttft-ms", "nan"))
    except (httpx.HTTPError, OSError, ValueError) as e:
        out.error = f"{type(e).__name__}: {e}"
    out.done_at = loop.time() - t0
    return out


async def replay(w: Workload, ports: list[int], strategy: Strategy, keys: KeySource,
                 background_port: int = 0, split: str = "alternate") -> tuple[list[Outcome], float]:
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as client:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        brng = random.Random(99)

        async def background(k: int) -> None:
            n = 0
            while not stop.is_set():   # bounded: ends with the replay
                body = body_of([{"role": "user", "content": f"{k} {n} " + text(brng, 4096)}])
                n += 1
                try:
                    await client.post(f"http://127.0.0.1:{background_port}{PATH}", json=body)
                except (httpx.HTTPError, OSError):
                    await asyncio.sleep(0.1)

        senders = [asyncio.create_task(background(k)) for k in range(w.background if background_port else 0)]
        if senders:
            await asyncio.sleep(2.0)   # the queue builds before the gateway's first request
        t0 = loop.time() + 0.05
        done: list[asyncio.Event] = [asyncio.Event() for _ in w.reqs]
        results: list[Optional[Outcome]] = [None] * len(w.reqs)

        async def one(i: int, r: Req) -> None:
            await asyncio.sleep(max(0.0, t0 + r.at - loop.time()))
            if r.after is not None:
                await done[r.after].wait()
            # Two gateways, split "alternate": request i to gateway i mod n, as an L4 balancer
            # spreading requests would; a tenant's or a conversation's requests cross gateways.
            # Split "prefix": every request of one prefix group to one gateway (a diagnostic: each
            # gateway's picker then sees all of a prefix's traffic, as with one gateway).
            if split == "prefix":
                g = int.from_bytes(hashlib.blake2b(prefix_group(w, r.body).encode(), digest_size=8).digest(),
                                   "big") % len(ports)
            else:
                g = i % len(ports)
            results[i] = await send(client, ports[g], r.body, keys.headers(r.body, strategy), t0)
            results[i].gateway = g
            done[i].set()

        await asyncio.gather(*(one(i, r) for i, r in enumerate(w.reqs)))
        wall = loop.time() - t0
        stop.set()
        await asyncio.gather(*senders)
    return [r or Outcome(error="not sent") for r in results], wall
