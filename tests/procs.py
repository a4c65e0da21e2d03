"""Child processes for the tests and the benchmarks: the few rules every harness here keeps.

Each starter (tests/integration/conftest.py, tests/istio/conftest.py, bench/run.py,
bench/llm/bench_llm.py) keeps its own small process class for what only it needs; what they
share is here, once: a free loopback port, children that die with their parent, and stopping
by pid (SIGTERM, then SIGKILL).
"""
from __future__ import annotations

import ctypes
import functools
import os
import random
import signal
import socket
import subprocess
from pathlib import Path


# Ports this process has already handed out. The kernel may give the same port to two binds to
# port 0 in a row once the first socket is closed; a fresh-clone CI run once got Envoy's admin
# port and its listener port equal ("cannot bind '127.0.0.1:56247': Address already in use").
_handed_out: set[int] = set()
_rng = random.SystemRandom()


@functools.cache
def _ephemeral_range() -> tuple[int, int] | None:
    """Linux's range for ports the kernel picks itself (connect() and bind to port 0)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return None


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free TCP port on 127.0.0.1 that no earlier call in this process returned.

    Where the kernel's ephemeral range is known and leaves room below it (Linux: 32768-60999 by
    default), the port is drawn at random from 20000 up to that range: the kernel never gives
    such a port to an outgoing connection, so a client's or Envoy's upstream connection cannot
    take it between this call and the server's bind. Elsewhere, bind to port 0."""
    rng = _ephemeral_range()
    if rng is not None and rng[0] > 21000:
        for _ in range(2000):
            port = _rng.randrange(20000, rng[0])
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise OSError("no free loopback port found")


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
