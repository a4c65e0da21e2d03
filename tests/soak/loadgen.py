"""wrk as the load generator of the soak and fail-over tests, with exact accounting.

`run_wrk` drives tests/soak/soak.lua: every wrk thread sends exactly `quota` inference
requests cycling through the request kinds, reads every answer, then writes a done file and
stops; the harness ends wrk with SIGINT as soon as all threads are done (wrk's -d is only
the upper bound). Nothing is left in flight, so the client's per-kind counts can be compared
exactly with what the mock backends and Envoy counted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import httpx
import pytest

HERE = Path(__file__).resolve().parent
LUA = HERE / "soak.lua"


def wrk_bin() -> str:
    path = shutil.which("wrk")
    if not path:
        pytest.fail(
            "the soak tests need wrk (HTTP load generator): apt-get install wrk",
            pytrace=False,
        )
    return path


@dataclass(frozen=True)
class Kind:
    """One kind of request the load cycles through."""

    path: str
    model: str
    base: str
    backends: tuple[str, ...]  # backend ids allowed to answer it
    body: bytes


def make_kinds(models: dict[str, tuple[str, tuple[str, ...]]]) -> list[Kind]:
    """For each model {name: (base, backends)}: a completion and a chat request, each body of
    a length no other kind has (the mock echoes the length back; see soak.lua)."""
    kinds: list[Kind] = []
    lengths: set[int] = set()
    for model, (base, backends) in models.items():
        for path in ("/v1/completions", "/v1/chat/completions"):
            if path == "/v1/completions":
                doc = {"model": model, "prompt": "Say hello", "max_tokens": 4}
            else:
                doc = {"model": model, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 4}
            body = json.dumps(doc).encode()
            pad = 0
            while len(body) + pad in lengths:
                pad += 1
            if pad:
                doc["user"] = "x" * pad  # "user": OpenAI's end-user id field; ignored by the mock
                body = json.dumps(doc).encode()
                while len(body) in lengths:
                    doc["user"] += "x"
                    body = json.dumps(doc).encode()
            lengths.add(len(body))
            kinds.append(Kind(path, model, base, tuple(backends), body))
    return kinds


@dataclass
class WrkResult:
    raw: dict
    wall_s: float
    completed_by_harness: bool  # every thread reported done before the time limit
    stdout: str
    sent_by_kind: list[int] = field(default_factory=list)
    ok_by_kind: list[int] = field(default_factory=list)

    @property
    def n_sent(self) -> int:
        return sum(t["n_sent"] for t in self.raw["threads"])

    @property
    def n_recv(self) -> int:
        return sum(t["n_recv"] for t in self.raw["threads"])

    @property
    def statuses(self) -> Counter:
        c: Counter = Counter()
        for t in self.raw["threads"]:
            c.update({int(k): v for k, v in (t["statuses"] or {}).items()})
        return c

    def total(self, key: str) -> int:
        return sum(t[key] for t in self.raw["threads"])

    @property
    def by_backend(self) -> Counter:
        c: Counter = Counter()
        for t in self.raw["threads"]:
            c.update(t["by_backend"] or {})
        return c

    def latency_ms(self, pct: float) -> float:
        key = {50: "50", 90: "90", 99: "99", 99.9: "99.9"}[pct]
        return self.raw["latency_us"]["percentiles"][key] / 1000.0

    @property
    def rps(self) -> float:
        return self.n_recv / (self.raw["duration_us"] / 1e6)


def _as_list(v) -> list[int]:
    # Lua arrays arrive as JSON arrays; an empty one would be an object.
    if isinstance(v, dict):
        return [v[k] for k in sorted(v, key=int)]
    return list(v)


def run_wrk(
    url: str,
    kinds: list[Kind],
    quota_per_thread: int,
    tmp_dir: Path,
    threads: int = 2,
    connections: int = 64,
    max_seconds: int = 120,
    on_tick: Optional[Callable[[float], None]] = None,
    tag: str = "wrk",
) -> WrkResult:
    """Runs wrk until every thread has sent and read `quota_per_thread` requests, or until
    `max_seconds`. `on_tick(elapsed_s)` is called about every 50 ms meanwhile."""
    assert quota_per_thread % len(kinds) == 0, "each thread must cycle through the kinds whole"
    assert connections % threads == 0
    run_dir = tmp_dir / f"{tag}-{time.monotonic_ns()}"
    run_dir.mkdir()
    spec = run_dir / "kinds.tsv"
    with open(spec, "w") as f:
        for i, k in enumerate(kinds, 1):
            body = k.body.decode()
            assert "\t" not in body and "\n" not in body
            f.write(f"{i}\t{k.path}\t{k.model}\t{k.base}\t{','.join(k.backends)}\t{body}\n")
    out_path = run_dir / "wrk.out"
    argv = [
        wrk_bin(),
        "-t", str(threads),
        "-c", str(connections),
        "-d", f"{max_seconds}s",
        "--timeout", "30s",
        "-s", str(LUA),
        url,
        "--", str(quota_per_thread), str(run_dir), str(spec),
    ]  # fmt: skip
    from bbr_integration import _die_with_parent

    with open(out_path, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    start = time.monotonic()
    completed = False
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - start
            if on_tick is not None:
                on_tick(elapsed)
            if len(list(run_dir.glob("done-*"))) == threads:
                completed = True
                break
            if elapsed > max_seconds + 30:
                break
            time.sleep(0.05)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # wrk stops its threads, prints, runs done()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    wall = time.monotonic() - start
    stdout = out_path.read_text(errors="replace")
    line = next((ln for ln in stdout.splitlines() if ln.startswith("SOAK-RESULT ")), None)
    if line is None:
        pytest.fail(f"wrk printed no SOAK-RESULT line (exit {proc.returncode}):\n{stdout[-3000:]}", pytrace=False)
    raw = json.loads(line[len("SOAK-RESULT ") :])
    res = WrkResult(raw=raw, wall_s=wall, completed_by_harness=completed, stdout=stdout)
    n = len(kinds)
    res.sent_by_kind = [0] * n
    res.ok_by_kind = [0] * n
    for t in raw["threads"]:
        for i, v in enumerate(_as_list(t["sent"])):
            res.sent_by_kind[i] += v
        for i, v in enumerate(_as_list(t["ok"])):
            res.ok_by_kind[i] += v
    return res


class MemorySampler:
    """Samples Envoy's admin /memory `allocated` (bytes, tcmalloc) every `period` seconds."""

    def __init__(self, admin_url: str, period: float = 1.0):
        self.admin_url = admin_url
        self.period = period
        self.samples: list[tuple[float, int, int]] = []  # (t, allocated, heap_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = 0.0

    def _run(self) -> None:
        with httpx.Client(timeout=5.0) as c:
            while not self._stop.is_set():
                try:
                    m = c.get(self.admin_url + "/memory").json()
                    self.samples.append((time.monotonic() - self._t0, int(m["allocated"]), int(m["heap_size"])))
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                self._stop.wait(self.period)

    def elapsed(self) -> float:
        """Seconds since the sampler started, on the samples' clock."""
        return time.monotonic() - self._t0

    def __enter__(self) -> "MemorySampler":
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
