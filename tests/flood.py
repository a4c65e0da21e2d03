"""A flood of slow large uploads against a gateway, for the overload tests (integration and
Istio): hundreds of 8 MB bodies that each hold back their last bytes, over HTTP/1.1 (one
connection per upload) or HTTP/2 (many streams on a few connections), while a prober sends
small, normal requests and a sampler reads Envoy's resident memory from /proc.

Everything is bounded: the flood starts its uploads over `ramp_seconds`, holds what Envoy
still holds until `hold_seconds` after the ramp, then closes every connection; each small
request has a timeout; the sampler stops with the flood. Only loopback addresses are used.

Each upload ends in one of these outcomes (Flood.outcomes counts them):
  reset            the connection (HTTP/1.1) or the stream (HTTP/2: RST_STREAM, GOAWAY) was
                   closed by Envoy before any response byte
  held             still open and unanswered when the flood ended (the client closed it)
  json:<status>:<code>   an OpenAI-style JSON error answer
  other:<status>   any other answer (never expected: not an OpenAI error)
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httpx

MIB = 1024 * 1024
UPLOAD_BYTES = 8_000_000  # "8 MB": under the filter's maxBodyBytes (8 MiB), so never a 413
HOLD_BACK_BYTES = 16  # the last bytes of each body are never sent
CHUNK = 256 * 1024


def upload_body(model: str, size: int = UPLOAD_BYTES) -> bytes:
    """A valid completion request of exactly `size` bytes: once complete it would be routed."""
    head = json.dumps({"model": model, "max_tokens": 1, "prompt": ""})[:-2]  # ... "prompt": "
    tail = '"}'
    return (head + "x" * (size - len(head) - len(tail)) + tail).encode()


def classify(status: int, headers: dict, body: bytes) -> str:
    ctype = headers.get("content-type", "").split(";")[0].strip()
    if ctype == "application/json":
        try:
            err = json.loads(body)["error"]
            if set(err) == {"message", "type", "param", "code"}:
                return f"json:{status}:{err['code']}"
        except (ValueError, KeyError, TypeError):
            pass
    return f"other:{status}"


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler:
    """Envoy's resident memory every `interval` seconds in a thread; `peak` is the highest."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            try:
                rss = rss_bytes(self.pid)
            except (OSError, RuntimeError):
                return  # the process is gone: the test sees that for itself
            self.peak = max(self.peak, rss)
            self.samples.append((time.monotonic() - t0, rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------------------
# HTTP/1.1: one connection per upload
# --------------------------------------------------------------------------------------


async def _h1_upload(port: int, body: bytes, end: float, path: str) -> str:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return "reset"  # refused at accept
    head = (
        f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    view = memoryview(body)[: len(body) - HOLD_BACK_BYTES]

    async def send() -> None:
        writer.write(head)
        for i in range(0, len(view), CHUNK):
            writer.write(view[i : i + CHUNK])
            await writer.drain()

    async def answer() -> str:
        data = b""
        while True:
            part = await reader.read(65536)
            if not part:
                break
            data += part
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                lines = data[:head_end].decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
                length = int(headers.get("content-length", "-1"))
                if length >= 0 and len(data) >= head_end + 4 + length:
                    status = int(lines[0].split()[1])
                    return classify(status, headers, data[head_end + 4 : head_end + 4 + length])
        return "reset" if not data else "other:truncated"

    sender = asyncio.ensure_future(send())
    reading = asyncio.ensure_future(answer())
    try:
        done, _ = await asyncio.wait({reading}, timeout=max(0.0, end - time.monotonic()))
        if reading in done:
            try:
                return reading.result()
            except (ConnectionError, OSError):
                return "reset"
        return "held"
    finally:
        for t in (sender, reading):
            t.cancel()
        await asyncio.gather(sender, reading, return_exceptions=True)
        writer.transport.abort()


# --------------------------------------------------------------------------------------
# HTTP/2: many streams on few connections (h2c with prior knowledge)
# --------------------------------------------------------------------------------------


@dataclass
class _Stream:
    sent: int = 0
    status: Optional[int] = None
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    outcome: Optional[str] = None


async def _h2_connection(
    port: int, streams_wanted: int, body: bytes, end: float, path: str, settings_seen: list
) -> list[str]:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return ["reset"] * streams_wanted
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    streams: dict[int, _Stream] = {}
    changed = asyncio.Event()
    closed = False
    limit = len(body) - HOLD_BACK_BYTES

    def finish_all(outcome: str) -> None:
        for s in streams.values():
            if s.outcome is None:
                s.outcome = outcome

    def handle(events) -> None:
        nonlocal closed
        for ev in events:
            if isinstance(ev, h2.events.RemoteSettingsChanged):
                cap = ev.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                if cap is not None:
                    settings_seen.append(cap.new_value)
            elif isinstance(ev, h2.events.ResponseReceived):
                s = streams[ev.stream_id]
                s.headers = dict(ev.headers)
                s.status = int(s.headers.get(":status", "0"))
            elif isinstance(ev, h2.events.DataReceived):
                streams[ev.stream_id].body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                s = streams[ev.stream_id]
                s.outcome = classify(s.status or 0, s.headers, s.body)
            elif isinstance(ev, h2.events.StreamReset):
                s = streams.get(ev.stream_id)
                if s is not None and s.outcome is None:
                    s.outcome = "reset" if s.status is None else classify(s.status, s.headers, s.body)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                closed = True
                finish_all("reset")
        changed.set()

    async def read_loop() -> None:
        nonlocal closed
        try:
            while not closed:
                data = await reader.read(65536)
                if not data:
                    break
                handle(conn.receive_data(data))
                out = conn.data_to_send()
                if out:
                    writer.write(out)
        except (ConnectionError, OSError, h2.exceptions.ProtocolError):
            pass
        closed = True
        finish_all("reset")
        changed.set()

    async def send_loop() -> None:
        # Wait for the server's SETTINGS, so the stream cap is known before streams open.
        while not settings_seen and not closed and time.monotonic() < end:
            changed.clear()
            await asyncio.wait_for(changed.wait(), timeout=max(0.01, end - time.monotonic()))
        headers = [
            (":method", "POST"), (":scheme", "http"), (":authority", "gateway"), (":path", path),
            ("content-type", "application/json"), ("content-length", str(len(body))),
        ]
        view = memoryview(body)
        while not closed and time.monotonic() < end:
            # Open what the server's cap allows (h2 enforces SETTINGS_MAX_CONCURRENT_STREAMS).
            while len(streams) < streams_wanted and conn.open_outbound_streams < conn.remote_settings.max_concurrent_streams:
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, headers)
                streams[sid] = _Stream()
            progressed = False
            for sid, s in streams.items():
                if s.outcome is not None or s.sent >= limit:
                    continue
                try:
                    n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, limit - s.sent)
                    if n > 0:
                        conn.send_data(sid, view[s.sent : s.sent + n].tobytes())
                        s.sent += n
                        progressed = True
                except h2.exceptions.StreamClosedError:
                    if s.outcome is None:
                        s.outcome = "reset"
            out = conn.data_to_send()
            if out:
                writer.write(out)
                await writer.drain()
            if not progressed:
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), timeout=max(0.01, end - time.monotonic()))
                except asyncio.TimeoutError:
                    pass

    reading = asyncio.ensure_future(read_loop())
    sending = asyncio.ensure_future(send_loop())
    try:
        await asyncio.wait({reading, sending}, timeout=max(0.0, end - time.monotonic()), return_when=asyncio.ALL_COMPLETED)
    finally:
        for t in (reading, sending):
            t.cancel()
        await asyncio.gather(reading, sending, return_exceptions=True)
        writer.transport.abort()
    out = [s.outcome or "held" for s in streams.values()]
    return out + ["not-opened"] * (streams_wanted - len(out))


# --------------------------------------------------------------------------------------
# The prober: small, normal requests during the flood
# --------------------------------------------------------------------------------------


@dataclass
class Probe:
    ok: int = 0
    failures: Counter = field(default_factory=Counter)

    @property
    def sent(self) -> int:
        return self.ok + sum(self.failures.values())

    @property
    def rate(self) -> float:
        return self.ok / self.sent if self.sent else 0.0


def _probe_loop(url: str, request: Callable[[httpx.Client], httpx.Response], stop: threading.Event, probe: Probe) -> None:
    # A fresh connection per request: every probe goes through accept, headers and body
    # under the flood, as a new client would.
    while not stop.is_set():
        with httpx.Client(base_url=url, timeout=10.0, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            try:
                r = request(c)
            except httpx.HTTPError as e:
                probe.failures[f"transport:{type(e).__name__}"] += 1
                continue
        if r.status_code == 200:
            probe.ok += 1
        else:
            probe.failures[classify(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)] += 1
        stop.wait(0.02)


# --------------------------------------------------------------------------------------
# The flood
# --------------------------------------------------------------------------------------


@dataclass
class Flood:
    outcomes: Counter
    probe: Probe
    peak_rss: int
    rss_before: int
    max_concurrent_streams: list  # what the server advertised, per HTTP/2 connection
    seconds: float
    samples: list

    def summary(self) -> str:
        return (
            f"outcomes {dict(self.outcomes)}; small requests {self.probe.ok}/{self.probe.sent} ok "
            f"({100 * self.probe.rate:.1f} %), failures {dict(self.probe.failures)}; "
            f"RSS before {self.rss_before / MIB:.0f} MiB, peak {self.peak_rss / MIB:.0f} MiB; {self.seconds:.1f} s"
        )


def run_flood(
    port: int,
    envoy_pid: int,
    model: str,
    probe_request: Callable[[httpx.Client], httpx.Response],
    uploads: int,
    http2_connections: int = 0,
    ramp_seconds: float = 2.0,
    hold_seconds: float = 4.0,
    path: str = "/v1/completions",
) -> Flood:
    """`uploads` held uploads: over HTTP/1.1 (one connection each) when http2_connections is 0,
    else spread over that many HTTP/2 connections. Returns the outcomes, the prober's results
    and Envoy's peak RSS."""
    body = upload_body(model)
    url = f"http://127.0.0.1:{port}"
    rss_before = rss_bytes(envoy_pid)
    probe, stop = Probe(), threading.Event()
    settings_seen: list = []
    t0 = time.monotonic()
    end = t0 + ramp_seconds + hold_seconds

    async def main() -> list[str]:
        tasks = []
        if http2_connections:
            per = [uploads // http2_connections + (i < uploads % http2_connections) for i in range(http2_connections)]
            for i, n in enumerate(per):
                tasks.append(asyncio.ensure_future(_h2_connection(port, n, body, end, path, settings_seen)))
                await asyncio.sleep(ramp_seconds / http2_connections)
            results = await asyncio.gather(*tasks)
            return [o for r in results for o in r]
        for i in range(uploads):
            tasks.append(asyncio.ensure_future(_h1_upload(port, body, end, path)))
            await asyncio.sleep(ramp_seconds / uploads)
        return list(await asyncio.gather(*tasks))

    prober = threading.Thread(target=_probe_loop, args=(url, probe_request, stop, probe), daemon=True)
    with RssSampler(envoy_pid) as sampler:
        prober.start()
        try:
            outcomes = asyncio.run(main())
        finally:
            stop.set()
            prober.join(timeout=15)
    return Flood(
        outcomes=Counter(outcomes),
        probe=probe,
        peak_rss=sampler.peak,
        rss_before=rss_before,
        max_concurrent_streams=settings_seen,
        seconds=time.monotonic() - t0,
        samples=sampler.samples,
    )


def wait_rss_below(pid: int, limit: int, timeout: float) -> tuple[bool, int, float]:
    """Polls Envoy's RSS until it is under `limit`: (reached, last RSS, seconds waited)."""
    t0 = time.monotonic()
    while True:
        rss = rss_bytes(pid)
        if rss < limit:
            return True, rss, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return False, rss, time.monotonic() - t0
        time.sleep(0.25)


def envoy_pid_ok(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")
