"""A loopback HTTP/1.1 upstream that answers with scripted bytes, for the response accounting's
fault cases: answers mock-vllm cannot give (split at every byte, broken JSON, a stream cut in
the middle of an event, gzip, 100 MB).

The request header `x-fault` names the script (SCRIPTS); every answer closes its connection.
`x-fault: echo-request` answers with what arrived instead: the request's headers and its body
(chunked transfer decoded), for tests of what the gateway sends upstream.
`GET /health` answers 200 (Envoy's active health check). Writes go out with TCP_NODELAY, so a
script that sends one byte at a time is read by Envoy in many small reads.
"""

from __future__ import annotations

import gzip
import json
import socket
import socketserver
import threading
import time
from typing import Callable, Iterator

MODEL = "microsoft/Phi-3-mini-4k-instruct"


def completion(usage: dict | None, usage_first: bool = False) -> bytes:
    body: dict = {}
    if usage is not None and usage_first:
        body["usage"] = usage
    body.update(
        {
            "id": "cmpl-fault",
            "object": "text_completion",
            "created": 1,
            "model": MODEL,
            "choices": [{"index": 0, "text": " tok0 \"tok1\" \u00e9", "finish_reason": "length"}],
        }
    )
    if usage is not None and not usage_first:
        body["usage"] = usage
    return json.dumps(body).encode()


def event(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj)
    return f"data: {data}\n\n".encode()


def chat_stream(tokens: int, usage: dict | None) -> bytes:
    out = event({"object": "chat.completion.chunk", "model": MODEL,
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    for i in range(tokens):
        out += event({"object": "chat.completion.chunk", "model": MODEL,
                      "choices": [{"index": 0, "delta": {"content": f" tok{i}"}, "finish_reason": None}]})
    if usage is not None:
        out += event({"object": "chat.completion.chunk", "model": MODEL, "choices": [], "usage": usage})
    return out + event("[DONE]")


USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
         "prompt_tokens_details": {"cached_tokens": 5}}
HUGE_BYTES = 100 * 1024 * 1024

# name -> (content type, extra headers, body pieces, cut: close before the end)
Script = tuple[str, dict, Callable[[], Iterator[bytes]], bool]


def _whole(data: bytes) -> Callable[[], Iterator[bytes]]:
    return lambda: iter([data])


def _bytewise(data: bytes) -> Callable[[], Iterator[bytes]]:
    return lambda: (data[i : i + 1] for i in range(len(data)))


def _huge() -> Iterator[bytes]:
    head = b'{"choices":[{"index":0,"text":"'
    tail = b'"}],"usage":{"prompt_tokens":1,"completion_tokens":2}}'
    block = b"a" * (1024 * 1024)
    yield head
    left = HUGE_BYTES - len(head) - len(tail)
    while left > 0:
        n = min(left, len(block))
        yield block[:n]
        left -= n
    yield tail


STREAM = chat_stream(5, USAGE)

SCRIPTS: dict[str, Script] = {
    "split-json": ("application/json", {}, _bytewise(completion(USAGE)), False),
    "split-sse": ("text/event-stream", {}, _bytewise(STREAM), False),
    "usage-first": ("application/json", {}, _whole(completion(USAGE, usage_first=True)), False),
    "usage-absent": ("application/json", {}, _whole(completion(None)), False),
    "sse-usage-absent": ("text/event-stream", {}, _whole(chat_stream(5, None)), False),
    "broken-json": ("application/json", {}, _whole(b'{"choices":[{"text":"x"}],"usage":{"prompt_tokens":1,}}'), False),
    "sse-cut": ("text/event-stream", {}, _whole(STREAM[: STREAM.index(b'"usage"') + 3]), True),
    "gzip": ("application/json", {"content-encoding": "gzip"}, _whole(gzip.compress(completion(USAGE), mtime=0)), False),
    "huge": ("application/json", {}, _huge, False),
}


def body_of(name: str) -> bytes:
    """What the script sends as the body (for the tests' byte-for-byte comparison)."""
    return b"".join(SCRIPTS[name][2]())


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data:
            part = sock.recv(65536)
            if not part:
                return
            data += part
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            rest = self._chunked(sock, rest)
            if rest is None:
                return
        else:
            length = int(headers.get("content-length", "0"))
            while len(rest) < length:
                part = sock.recv(65536)
                if not part:
                    return
                rest += part
        fault = headers.get("x-fault")
        if fault == "echo-request":
            echo = json.dumps({"headers": headers, "body": rest.decode("latin-1")}).encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(echo), echo))
            return
        if fault not in SCRIPTS:
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
                         b"connection: close\r\n\r\n{}")
            return
        content_type, extra, pieces, cut = SCRIPTS[fault]
        out = f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\nconnection: close\r\n"
        out += "".join(f"{k}: {v}\r\n" for k, v in extra.items())
        out += "transfer-encoding: chunked\r\n\r\n"
        sock.sendall(out.encode())
        bytewise = fault.startswith("split")
        for piece in pieces():
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            if bytewise:
                time.sleep(0.0005)
        if cut:
            # The connection ends in the middle of an event, without the last chunk.
            sock.shutdown(socket.SHUT_RDWR)
            return
        sock.sendall(b"0\r\n\r\n")


    @staticmethod
    def _chunked(sock: socket.socket, data: bytes) -> bytes | None:
        """The decoded body of a chunked request whose first bytes are `data`."""
        body = b""
        while True:
            while b"\r\n" not in data:
                part = sock.recv(65536)
                if not part:
                    return None
                data += part
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(data) < size + 2:
                part = sock.recv(65536)
                if not part:
                    return None
                data += part
            if size == 0:
                return body
            body += data[:size]
            data = data[size + 2:]


class FaultUpstream:
    def __init__(self) -> None:
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
