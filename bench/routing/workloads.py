"""bench-routing's workloads: the request sequences replayed against every strategy (tenants,
conversations, control, background), their open-loop arrival times, and the oracle (one infinite
cache seeing the whole sequence) with the working set the cache capacities are multiples of."""
from __future__ import annotations

import copy
import hashlib
import random
import statistics
from dataclasses import dataclass
from typing import Optional

from settings import BLOCK_BYTES, BLOCK_TOKENS, MAX_TOKENS, MODEL, PREFILL_TOKENS_PER_S, REPLICAS, UTILISATION
import prefix_key  # bench/routing/prefix_key.py


_SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "da", "xu", "qe", "zo", "fa",
              "gi", "hu", "ja", "be", "co", "wy", "ol", "an", "er", "is", "um"]


def text(rng: random.Random, nbytes: int) -> str:
    """Random pseudo-words: unrelated texts share no 64-byte block."""
    words = []
    n = 0
    while n < nbytes:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
        words.append(w)
        n += len(w) + 1
    return " ".join(words)[:nbytes]


@dataclass
class Req:
    at: float                 # seconds after the start
    body: dict
    after: Optional[int]      # index of a request that must have answered first (previous turn)


@dataclass
class Workload:
    name: str
    description: str
    reqs: list[Req]
    rate: float = 0.0
    working_set_blocks: int = 0
    oracle_hit_rate: float = 0.0
    prompt_tokens_mean: float = 0.0
    background: int = 0        # direct senders to replica-0 during the replay


def body_of(messages: list[dict]) -> dict:
    # Not streamed: the replica reports its TTFT (x-mock-ttft-ms, simulated time), so the
    # client's own CPU shortage on a shared 2-core machine does not enter the figures, and one
    # response body instead of MAX_TOKENS events keeps Envoy's and the client's work small.
    return {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS}


def tokens_of(body: dict) -> int:
    return -(-len(prefix_key.capture(body)) // 4)


def pace(reqs_bodies: list[dict], rng: random.Random) -> tuple[list[float], float]:
    """Poisson arrival times for the bodies, at the rate that makes the pool's no-cache prefill
    load UTILISATION."""
    mean_s = statistics.mean(tokens_of(b) for b in reqs_bodies) / PREFILL_TOKENS_PER_S
    rate = UTILISATION * REPLICAS / mean_s
    t, out = 0.0, []
    for _ in reqs_bodies:
        t += rng.expovariate(rate)
        out.append(t)
    return out, rate


def tenants_workload(n: int, rng: random.Random) -> Workload:
    tenants = 24
    preamble = "Company policy. " + text(rng, 496)      # shared by every tenant: 2 key blocks
    prompts = [preamble + " " + text(rng, 3584) for _ in range(tenants)]
    weights = [1.0 / (i + 1) ** 0.6 for i in range(tenants)]
    bodies = []
    for _ in range(n):
        t = rng.choices(range(tenants), weights)[0]
        bodies.append(body_of([{"role": "system", "content": prompts[t]},
                               {"role": "user", "content": text(rng, rng.randint(80, 400))}]))
    times, rate = pace(bodies, rng)
    return Workload("tenants", f"{tenants} tenants, 4 KiB system prompts opening with a shared 512-byte "
                    "preamble, 80-400-byte questions, Zipf(0.6) popularity",
                    [Req(t, b, None) for t, b in zip(times, bodies)], rate)


def conversations_workload(n_conv: int, turns: int, rng: random.Random) -> Workload:
    system = "You are the assistant of an online shop. " + text(rng, 1500)   # every conversation
    convs = [[{"role": "system", "content": system}] for _ in range(n_conv)]
    left = [turns] * n_conv
    order = []                 # (conversation, body) in arrival order
    while any(left):
        c = rng.choices(range(n_conv), [l for l in left])[0]
        convs[c].append({"role": "user", "content": text(rng, rng.randint(150, 600))})
        order.append((c, body_of(copy.deepcopy(convs[c]))))
        # The assistant's answer as the client will send it back next turn.
        convs[c].append({"role": "assistant", "content": text(rng, rng.randint(300, 900))})
        left[c] -= 1
    times, rate = pace([b for _, b in order], rng)
    last: dict[int, int] = {}
    reqs = []
    for i, ((c, b), t) in enumerate(zip(order, times)):
        reqs.append(Req(t, b, last.get(c)))
        last[c] = i
    return Workload("conversations", f"{n_conv} conversations x {turns} turns, one shared 1.5 KiB system "
                    "prompt, 150-600-byte user turns, 300-900-byte answers sent back",
                    reqs, rate)


def control_workload(n: int, rng: random.Random) -> Workload:
    bodies = [body_of([{"role": "system", "content": text(rng, 4096)},
                       {"role": "user", "content": text(rng, rng.randint(80, 400))}]) for _ in range(n)]
    times, rate = pace(bodies, rng)
    return Workload("control", "no shared prefixes: a unique 4 KiB system prompt per request",
                    [Req(t, b, None) for t, b in zip(times, bodies)], rate)


# Background load: direct senders to replica-0, around the gateway, in a closed loop for the
# whole replay; each a unique 4 KiB prompt (a prefill of ~1024 tokens) and MAX_TOKENS tokens.
BACKGROUND_SENDERS = 12


def background_workload(n: int, rng: random.Random) -> Workload:
    w = tenants_workload(n, rng)
    w.name = "background"
    w.description = (f"the tenants workload while replica-0 also serves {BACKGROUND_SENDERS} closed-loop "
                     "clients of its own (unique 4 KiB prompts), which the gateway does not see")
    w.background = BACKGROUND_SENDERS
    return w


def oracle(w: Workload) -> None:
    """One infinite cache with the mock's accounting (16-token blocks, last token recomputed),
    and the working set: the distinct blocks that some later request finds cached."""
    seen: set[bytes] = set()
    reused: set[bytes] = set()
    queries = hits = 0
    for r in w.reqs:
        prompt = prefix_key.capture(r.body)
        tokens = -(-len(prompt) // 4)
        h = hashlib.blake2b(MODEL.encode(), digest_size=16).digest()
        cached_run, still = 0, True
        chain = []
        for i in range(len(prompt) // BLOCK_BYTES):
            h = hashlib.blake2b(h + prompt[i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES], digest_size=16).digest()
            chain.append(h)
            if still and h in seen:
                cached_run += 1
                reused.add(h)
            else:
                still = False
        queries += tokens
        hits += min(cached_run * BLOCK_TOKENS, max(tokens - 1, 0))
        seen.update(chain)
    w.oracle_hit_rate = hits / queries if queries else 0.0
    w.working_set_blocks = len(reused)
    w.prompt_tokens_mean = queries / len(w.reqs)


def prefix_group(w: Workload, body: dict) -> str:
    """The prefix a request shares with others: its tenant's system prompt (tenants, background),
    its conversation's first user turn (conversations); control shares nothing."""
    msgs = body["messages"]
    if w.name == "conversations":
        return msgs[1]["content"]
    if w.name == "control":
        return msgs[0]["content"] + msgs[-1]["content"]
    return msgs[0]["content"]
