"""A tiny proxy-wasm module (ABI 0.2.1), assembled byte by byte, for the run-time failure
tests of test_faults.py: it answers every request itself with a 200 "stand-in module: ok"
(proxy_send_local_response), except a request with more than `poison_headers` headers,
on which proxy_on_request_headers executes `unreachable`: a trap, as a bug in a real
filter would cause. bbr-wasm itself has no reachable trap, so this stands in for one.
"""

from __future__ import annotations

BODY = b"stand-in module: ok"
_BODY_AT = 1024  # where the data segment puts BODY in linear memory
I32 = 0x7F


def _uleb(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _sleb(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if (n == 0 and not b & 0x40) or (n == -1 and b & 0x40):
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def _vec(items: list[bytes]) -> bytes:
    return _uleb(len(items)) + b"".join(items)


def _name(s: str) -> bytes:
    return _uleb(len(s)) + s.encode()


def _section(section_id: int, payload: bytes) -> bytes:
    return bytes([section_id]) + _uleb(len(payload)) + payload


def _functype(params: list[int], results: list[int]) -> bytes:
    return b"\x60" + _vec([bytes([p]) for p in params]) + _vec([bytes([r]) for r in results])


def _i32(n: int) -> bytes:
    return b"\x41" + _sleb(n)  # i32.const


def trap_module(poison_headers: int) -> bytes:
    types = [
        _functype([], []),  # 0
        _functype([I32], [I32]),  # 1
        _functype([I32, I32], []),  # 2
        _functype([I32, I32], [I32]),  # 3
        _functype([I32, I32, I32], [I32]),  # 4
        _functype([I32], []),  # 5
        _functype([I32] * 8, [I32]),  # 6: proxy_send_local_response
    ]
    imports = [_name("env") + _name("proxy_send_local_response") + b"\x00" + _uleb(6)]  # function 0
    on_request_headers = (
        # if num_headers > poison_headers { unreachable }
        b"\x20\x01" + _i32(poison_headers) + b"\x4b" + b"\x04\x40" + b"\x00" + b"\x0b"
        # proxy_send_local_response(200, "", BODY, no extra headers, grpc_status -1); drop
        + _i32(200) + _i32(0) + _i32(0) + _i32(_BODY_AT) + _i32(len(BODY)) + _i32(0) + _i32(0) + _i32(-1)
        + b"\x10" + _uleb(0) + b"\x1a"
        # return Pause (1)
        + _i32(1)
    )  # fmt: skip
    funcs = [  # (export name, type index, body)
        ("proxy_abi_version_0_2_1", 0, b""),
        ("proxy_on_memory_allocate", 1, _i32(4096)),  # never called: the module reads nothing
        ("proxy_on_context_create", 2, b""),
        ("proxy_on_vm_start", 3, _i32(1)),
        ("proxy_on_configure", 3, _i32(1)),
        ("proxy_on_request_headers", 4, on_request_headers),
        ("proxy_on_done", 1, _i32(1)),
        ("proxy_on_delete", 5, b""),
        ("proxy_on_log", 5, b""),
    ]
    exports = [_name("memory") + b"\x02" + _uleb(0)]
    exports += [_name(name) + b"\x00" + _uleb(i + 1) for i, (name, _, _) in enumerate(funcs)]
    codes = []
    for _, _, body in funcs:
        code = b"\x00" + body + b"\x0b"  # no locals; end
        codes.append(_uleb(len(code)) + code)
    data = [b"\x00" + _i32(_BODY_AT) + b"\x0b" + _uleb(len(BODY)) + BODY]
    return (
        b"\x00asm\x01\x00\x00\x00"
        + _section(1, _vec(types))
        + _section(2, _vec(imports))
        + _section(3, _vec([_uleb(t) for _, t, _ in funcs]))
        + _section(5, _vec([b"\x00" + _uleb(2)]))  # memory: 2 pages, no maximum
        + _section(7, _vec(exports))
        + _section(10, _vec(codes))
        + _section(11, _vec(data))
    )
