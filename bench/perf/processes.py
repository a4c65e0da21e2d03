"""Processes: Envoy started and stopped by pid, and plain HTTP helpers against it."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from .settings import PATH, ROOT, START_TIMEOUT, STOP_TIMEOUT

sys.path.insert(0, str(ROOT / "tests"))
import procs  # noqa: E402  (tests/procs.py)


# A free port, children that die with the bench (no Envoy outlives a killed bench), stopping
# by pid: tests/procs.py, shared with the tests.
free_port = procs.free_port


class Proc:
    def __init__(self, name: str, argv: list[str], log: Path, cpus: Optional[set[int]] = None,
                 env: Optional[dict[str, str]] = None):
        """cpus: the CPUs the process (all its threads) may run on; None: any. env: added to
        the bench's environment."""
        self.name, self.argv, self.log = name, argv, log
        self._log = open(log, "ab", buffering=0)

        def preexec() -> None:  # pragma: no cover - runs in the child before exec
            procs.die_with_parent()
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        self.popen = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, preexec_fn=preexec,
                                      env=dict(os.environ, **env) if env else None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """utime + stime of the process (all threads), from /proc."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        procs.stop(self.popen, STOP_TIMEOUT)
        self._log.close()

    def tail(self, n: int = 30) -> str:
        return procs.tail(self.log, n)


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


def http_post(port: int, body: bytes, headers: dict[str, str], timeout: float = 30.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", PATH, body=body, headers={"Content-Type": "application/json", **headers})
        r = conn.getresponse()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
    finally:
        conn.close()


class Envoy:
    def __init__(self, name: str, bin_: str, config: dict, ports: dict[str, int], work: Path):
        self.name, self.ports = name, ports
        self.admin = ports["admin"]
        cfg_path = work / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.config_path = cfg_path
        self.proc = Proc(name, [bin_, "-c", str(cfg_path), "--concurrency", "1",
                                "--use-dynamic-base-id", "--base-id-path", str(work / f"{name}.base-id"),
                                "--log-level", "warn"], work / f"{name}.log")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if not self.proc.alive():
                raise SystemExit(f"bench: {name} Envoy exited at start:\n{self.proc.tail()}")
            try:
                if http_get(self.admin, "/ready", 1.0)[1].strip() == "LIVE":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.proc.stop()
                raise SystemExit(f"bench: {name} Envoy not ready in {START_TIMEOUT:.0f}s:\n{self.proc.tail()}")
            time.sleep(0.1)

    def stats(self, regex: str) -> dict[str, int]:
        status, text = http_get(self.admin, f"/stats?format=json&filter={regex}")
        if status != 200:
            raise RuntimeError(f"{self.name} admin /stats: {status}")
        return {s["name"]: s["value"] for s in json.loads(text).get("stats", []) if "value" in s}
