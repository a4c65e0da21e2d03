"""bench-routing's strategies (how a replica is chosen: an Envoy lb_policy or the filter's picker,
and their settings) and the prefix key's source (the filter's configuration per strategy, the
client's header)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from settings import (BLOCK_BYTES, DEFAULT_HBF, DEFAULT_LB, DEFAULT_PICKER_BALANCE, DEFAULT_PREFIX_BLOCKS,
                      HEADER, KEY_BLOCK_BYTES, MODEL)
import prefix_key  # bench/routing/prefix_key.py


@dataclass(frozen=True)
class Strategy:
    name: str
    lb: str                             # ROUND_ROBIN, LEAST_REQUEST, MAGLEV, RING_HASH, PICKER
    hbf: Optional[int] = None           # hash_balance_factor (picker: balanceFactor) in percent; None: unbounded
    prefix_blocks: Optional[int] = None  # the key's prefixBlocks (hashing strategies only)
    lru_matched: bool = False           # picker: lruBlocks = the replica's cache, in key blocks
    load_weight: Optional[int] = None   # picker: loadWeight (None: the filter's default, 2)
    kv_weight: Optional[int] = None     # picker: kvWeight (None: the filter's default, 2)
    metrics: bool = False               # picker: hosts from Envoy's admin, the servers' own load
    consistent: bool = True             # picker: consistentPlacement (False: a new prefix placed by load alone)

    @property
    def hashed(self) -> bool:
        return self.lb in ("MAGLEV", "RING_HASH")

    @property
    def picker(self) -> bool:
        return self.lb == "PICKER"


MAIN = (
    Strategy("round_robin", "ROUND_ROBIN"),
    Strategy("least_request", "LEAST_REQUEST"),
    Strategy("affinity", DEFAULT_LB, DEFAULT_HBF, DEFAULT_PREFIX_BLOCKS),
    Strategy("picker", "PICKER", DEFAULT_PICKER_BALANCE),
    Strategy("picker_metrics", "PICKER", DEFAULT_PICKER_BALANCE, metrics=True),
)
HEAD_TO_HEAD = ("affinity", "picker")    # the strategies the targets are checked for


def variants() -> tuple[Strategy, ...]:
    """Affinity with one setting changed at a time: bounded load, the hash table, the key."""
    out = [Strategy(f"affinity_hbf_{h or 'none'}", DEFAULT_LB, h, DEFAULT_PREFIX_BLOCKS)
           for h in (None, 125, 150, 200) if h != DEFAULT_HBF]
    out.append(Strategy("affinity_ring_hash", "RING_HASH", DEFAULT_HBF, DEFAULT_PREFIX_BLOCKS))
    out += [Strategy(f"affinity_blocks_{n}", DEFAULT_LB, DEFAULT_HBF, n)
            for n in (2, 4, 16, 32) if n != DEFAULT_PREFIX_BLOCKS]
    out += [Strategy(f"picker_bf_{b or 'none'}", "PICKER", b)
            for b in (None, 110, 150, 200) if b != DEFAULT_PICKER_BALANCE]
    out.append(Strategy("picker_lru_matched", "PICKER", DEFAULT_PICKER_BALANCE, lru_matched=True))
    out.append(Strategy("picker_load_weight_1", "PICKER", DEFAULT_PICKER_BALANCE, load_weight=1))
    # The picker before consistent placement (a new prefix placed by load alone), to compare side by side.
    out.append(Strategy("picker_by_load", "PICKER", DEFAULT_PICKER_BALANCE, consistent=False))
    # The server-metrics picker without the KV-cache score: its share of what the reports change.
    out.append(Strategy("picker_metrics_kv_0", "PICKER", DEFAULT_PICKER_BALANCE, metrics=True, kv_weight=0))
    out.append(Strategy("picker_metrics_by_load", "PICKER", DEFAULT_PICKER_BALANCE, metrics=True, consistent=False))
    return tuple(out)


class KeySource:
    """Where the x-gateway-prefix-hash header comes from: the filter ("filter") or, until the
    filter computes it, the load generator ("client", prefix_key.py). The only place that knows."""

    def __init__(self, mode: str):
        assert mode in ("filter", "client")
        self.mode = mode

    def filter_config(self, strategy: Strategy, endpoints: list[str], cache_blocks: int) -> dict:
        cfg: dict = {"models": [{"name": MODEL}]}
        if self.mode == "filter" and strategy.hashed:
            cfg["prefixAffinity"] = {"enabled": True, "header": HEADER, "blockBytes": KEY_BLOCK_BYTES,
                                     "prefixBlocks": strategy.prefix_blocks}
        if strategy.picker:
            # The filter always chooses here, whatever the key source: the picker needs the
            # prompt's blocks, which only the filter reads.
            picker: dict = {"balanceFactor": strategy.hbf,
                            "pools": [{"cluster": strategy.name, "baseModels": [MODEL], "endpoints": endpoints}]}
            if strategy.metrics:
                # The shipped switch's sources: the hosts and their health from Envoy's admin,
                # each server's waiting/running/KV from its /metrics (every 50 ms, as llm-d's EPP).
                picker["hosts"] = {"intervalMs": 100}
                picker["serverMetrics"] = {"intervalMs": 50}
                del picker["pools"][0]["endpoints"]
            if strategy.load_weight is not None:
                picker["loadWeight"] = strategy.load_weight
            if strategy.kv_weight is not None:
                picker["kvWeight"] = strategy.kv_weight
            if not strategy.consistent:
                picker["consistentPlacement"] = False
            if strategy.lru_matched:
                # What the replica can hold, in the picker's 256-byte blocks.
                picker["lruBlocks"] = max(1, math.ceil(cache_blocks * BLOCK_BYTES / KEY_BLOCK_BYTES))
            cfg["prefixAffinity"] = {"enabled": True, "blockBytes": KEY_BLOCK_BYTES, "picker": picker}
        return cfg

    def expected(self, body: dict, strategy: Strategy) -> Optional[str]:
        if not strategy.hashed:
            return None
        return prefix_key.prefix_key(MODEL, body, KEY_BLOCK_BYTES, strategy.prefix_blocks)

    def headers(self, body: dict, strategy: Strategy) -> dict[str, str]:
        key = self.expected(body, strategy) if self.mode == "client" else None
        return {HEADER: key} if key else {}
