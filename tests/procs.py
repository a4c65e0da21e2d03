"""Child processes for the tests and the benchmarks: the few rules every harness here keeps.

Each starter (tests/integration/conftest.py, tests/istio/conftest.py, bench/run.py,
bench/llm/bench_llm.py) keeps its own small process class for what only it needs; what they
share is here, once: a free loopback port, children that die with their parent, and stopping
by pid (SIGTERM, then SIGKILL).
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (bind to port 0 and let the kernel pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGKILL if its parent dies (even by SIGKILL), so no Envoy or mock
    outlives a killed test run or benchmark. Best effort elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def stop(popen: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; by pid, always. A no-op once it exited."""
    if popen.poll() is not None:
        return
    try:
        os.kill(popen.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.kill(popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        popen.wait(timeout=timeout)


def tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a log file, or why it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])
