"""Processes: Envoy started and stopped by pid, and plain HTTP helpers against it."""

from __future__ import annotations

import http.client
import json
import os
import sys
from pathlib import Path
from typing import Optional

import yaml

from .settings import PATH, ROOT, START_TIMEOUT, STOP_TIMEOUT

sys.path.insert(0, str(ROOT / "tests"))
import procs  # noqa: E402  (tests/procs.py)


# A free port, children that die with the bench (no Envoy outlives a killed bench), stopping
# by pid: tests/procs.py, shared with the tests.
free_port = procs.free_port


class Proc(procs.Child):
    """A bench process (tests/procs.py's `Child`) run from the repository's root. cpus: the
    CPUs all its threads may run on (None: any); env: added to the bench's environment."""

    def __init__(self, name: str, argv: list[str], log: Path, cpus: Optional[set[int]] = None,
                 env: Optional[dict[str, str]] = None):
        super().__init__(name, argv, log, cwd=ROOT, env=dict(os.environ, **env) if env else None, cpus=cpus,
                         stop_timeout=STOP_TIMEOUT)


http_get = procs.http_get


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
        try:
            procs.wait_live(self.proc, self.admin, START_TIMEOUT)
        except RuntimeError as e:
            raise SystemExit(f"bench: {name} {e}") from None

    def stats(self, regex: str) -> dict[str, int]:
        status, text = http_get(self.admin, f"/stats?format=json&filter={regex}")
        if status != 200:
            raise RuntimeError(f"{self.name} admin /stats: {status}")
        return {s["name"]: s["value"] for s in json.loads(text).get("stats", []) if "value" in s}
