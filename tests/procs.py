"""Child processes for the tests and the benchmarks: the few rules every harness here keeps.

One process class for all of them (`Child`): output to a log file, a child that dies with its
parent, stopping by pid (SIGTERM, then SIGKILL). The starters (tests/integration/conftest.py,
tests/istio/conftest.py, bench/perf/processes.py, bench/routing/gateway.py,
bench/llm/llmbench/servers.py) add only what they alone need. Also here: a free loopback port
and a plain GET.
"""
from __future__ import annotations

import ctypes
import functools
import http.client
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional


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


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET http://127.0.0.1:<port><path>: (status, body as text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


def wait_live(child: "Child", admin: int, timeout: float) -> None:
    """Waits until the Envoy `child` says LIVE on its admin port's /ready. If it exits first, or
    is not LIVE within `timeout` seconds (then it is stopped), raises RuntimeError with why and
    the end of its log."""
    deadline = time.monotonic() + timeout
    while True:
        if not child.alive():
            raise RuntimeError(f"Envoy exited at start:\n{child.tail()}")
        try:
            if http_get(admin, "/ready", 1.0)[1].strip() == "LIVE":
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            child.stop()
            raise RuntimeError(f"Envoy not ready in {timeout:.0f}s:\n{child.tail()}")
        time.sleep(0.1)


class Child:
    """A child process: stdout and stderr appended to `log` after a `$ <command line>` line (or
    stdout to a pipe, `stdout_pipe`, for a server that prints its bound port), killed if this
    process dies (`die_with_parent`), stopped by pid (`stop`). `cpus`: the CPUs all its threads
    may run on (None: any); `env`: its whole environment (None: this one's); `append`: false
    starts the log afresh."""

    def __init__(self, name: str, argv: list[str], log: Path, *, cwd: Optional[Path] = None,
                 env: Optional[dict[str, str]] = None, cpus: Optional[set[int]] = None,
                 stdout_pipe: bool = False, stop_timeout: float = 10.0, append: bool = True):
        self.name, self.argv, self.log_path, self.stop_timeout = name, argv, Path(log), stop_timeout
        self._log = open(log, "ab" if append else "wb", buffering=0)
        self._log.write(("$ " + " ".join(str(a) for a in argv) + "\n").encode())

        def preexec() -> None:  # pragma: no cover - runs in the child before exec
            die_with_parent()
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        self.popen = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log if stdout_pipe else subprocess.STDOUT,
            preexec_fn=preexec if os.name == "posix" else None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        """The whole log so far ("" if it cannot be read)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 30) -> str:
        return tail(self.log_path, n)

    def wait_exit(self, timeout: float) -> Optional[int]:
        """Its exit code, or None if it still runs after `timeout` seconds."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def cpu_seconds(self) -> float:
        """utime + stime of the process (all threads), from /proc; NaN once it is gone."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after `stop_timeout` seconds; by pid, always. Idempotent."""
        stop(self.popen, self.stop_timeout)
        if self.popen.stdout:
            self.popen.stdout.close()
        if not self._log.closed:
            self._log.close()
