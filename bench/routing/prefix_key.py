"""The gateway's prefix key, computed independently of the filter (pure Python, no packages).

The picker's design defines it (docs/prefix-affinity.md): capture the prompt as the model server sees it (completions: `prompt`, a
string or the first element of an array when it is a string; chat: for each message its role,
"\n", its text content, "\n"), split it into `block_bytes` blocks, h = xxh64(model, seed 0),
then for each complete block h = xxh64(h as 8 little-endian bytes ++ block, seed 0); the key
is h after min(prefix_blocks, complete blocks) blocks, 16 lowercase hex digits. A prompt
shorter than one block has no key.

make bench-routing uses it two ways: as the key source when the filter does not compute keys
yet (the load generator sends the header itself), and as a cross-check of the filter's key
when it does (mock-vllm echoes the header it received as x-echo-prefix-hash).

    python bench/routing/prefix_key.py      (self-test against published XXH64 values)
"""
from __future__ import annotations

import struct
from typing import Optional

_M = (1 << 64) - 1
P1 = 0x9E3779B185EBCA87
P2 = 0xC2B2AE3D27D4EB4F
P3 = 0x165667B19E3779F9
P4 = 0x85EBCA77C2B2AE63
P5 = 0x27D4EB2F165667C5


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M


def _round(acc: int, lane: int) -> int:
    acc = (acc + lane * P2) & _M
    return (_rotl(acc, 31) * P1) & _M


def _merge(acc: int, val: int) -> int:
    acc ^= _round(0, val)
    return (acc * P1 + P4) & _M


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 as specified in xxhash's doc/xxhash_spec.md."""
    n = len(data)
    i = 0
    if n >= 32:
        v1 = (seed + P1 + P2) & _M
        v2 = (seed + P2) & _M
        v3 = seed & _M
        v4 = (seed - P1) & _M
        while i + 32 <= n:
            a, b, c, d = struct.unpack_from("<4Q", data, i)
            v1, v2, v3, v4 = _round(v1, a), _round(v2, b), _round(v3, c), _round(v4, d)
            i += 32
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _M
        for v in (v1, v2, v3, v4):
            h = _merge(h, v)
    else:
        h = (seed + P5) & _M
    h = (h + n) & _M
    while i + 8 <= n:
        (k,) = struct.unpack_from("<Q", data, i)
        h ^= _round(0, k)
        h = (_rotl(h, 27) * P1 + P4) & _M
        i += 8
    if i + 4 <= n:
        (k,) = struct.unpack_from("<I", data, i)
        h ^= (k * P1) & _M
        h = (_rotl(h, 23) * P2 + P3) & _M
        i += 4
    while i < n:
        h ^= (data[i] * P5) & _M
        h = (_rotl(h, 11) * P1) & _M
        i += 1
    h ^= h >> 33
    h = (h * P2) & _M
    h ^= h >> 29
    h = (h * P3) & _M
    h ^= h >> 32
    return h


def capture_chat(messages: list) -> bytes:
    out = bytearray()
    for m in messages:
        role = m.get("role")
        if isinstance(role, str):
            out += role.encode()
        out += b"\n"
        content = m.get("content")
        if isinstance(content, str):
            out += content.encode()
        elif isinstance(content, list):
            for p in content:
                if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                    out += p["text"].encode()
        out += b"\n"
    return bytes(out)


def capture(body: dict) -> Optional[bytes]:
    """The prompt bytes of an OpenAI body (chat when it has `messages`)."""
    if "messages" in body:
        return capture_chat(body["messages"]) if isinstance(body["messages"], list) else None
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt.encode()
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0].encode()
    return None


def block_chain(model: str, prompt: bytes, block_bytes: int, max_blocks: Optional[int] = None) -> list[int]:
    """The chained hash after each complete block (at most max_blocks of them)."""
    h = xxh64(model.encode(), 0)
    out = []
    nblocks = len(prompt) // block_bytes
    if max_blocks is not None:
        nblocks = min(nblocks, max_blocks)
    for b in range(nblocks):
        h = xxh64(struct.pack("<Q", h) + prompt[b * block_bytes:(b + 1) * block_bytes], 0)
        out.append(h)
    return out


def prefix_key(model: str, body: dict, block_bytes: int = 256, prefix_blocks: int = 4) -> Optional[str]:
    """The header value the filter sets for this body, or None (no header)."""
    prompt = capture(body)
    if prompt is None:
        return None
    chain = block_chain(model, prompt, block_bytes, prefix_blocks)
    return f"{chain[-1]:016x}" if chain else None


def _self_test() -> None:
    # Published XXH64 values (seed 0), and a 100-byte input that takes the 32-byte-stripe path.
    assert xxh64(b"") == 0xEF46DB3751D8E999
    assert xxh64(b"a") == 0xD24EC4F1A98C6E5B
    assert xxh64(b"abc") == 0x44BC2CF5AD770999
    chain = block_chain("m", b"a" * 600, 256)
    print("block_chain('m', 'a'*600, 256):", ", ".join(f"0x{h:016x}" for h in chain))
    body = {"model": "m", "messages": [{"role": "system", "content": "x" * 300}]}
    print("prefix_key chat 300 x:", prefix_key("m", body))
    print("ok")


if __name__ == "__main__":
    _self_test()
