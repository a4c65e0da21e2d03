"""The bad-input matrix, through the real Envoy.

For every case: the exact status and OpenAI-style JSON error (or the right backend, for the
inputs that are valid after all); no request ever reaches a wrong backend (the mocks'
/mock/stats and the x-mock-backend response header); and the Wasm VM never fails or
restarts (WASM_VM_STATS in admin /stats, and no Wasm failure line in Envoy's log), checked
around every test by the `vm_never_fails` fixture.

Every body case is sent over a raw HTTP/1.1 socket (header names exactly as written here),
once without and once with each set of forged routing headers (FORGERIES: lower case,
UPPER CASE, duplicates): a forged header must never move a request to another pool.
Then: Expect: 100-continue, HTTP/2 with one-byte DATA frames (the h2 package), header names
in odd case, and multipart/form-data audio uploads.

The mock backend has no audio endpoints: a routed upload gets the mock's own 404 for an
unknown path, so routing is asserted by x-mock-backend and the echoed routing headers.
"""

from __future__ import annotations

import gzip
import json
import select
import socket
import time
from collections import Counter
from typing import Any, Optional

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import httpx
import pytest
from conftest import (
    BACKEND_OF,
    BASE_OF,
    LORA,
    PHI,
    QWEN,
    WASM_VM_STATS,
    log_size,
    parse_http1,
    wasm_failure_lines,
    wasm_vm_stats,
)

BASE_H = "x-gateway-base-model-name"
MODEL_H = "x-gateway-model-name"
MiB = 1024 * 1024
DEFAULT_MAX_BODY = 8 * MiB

# ---------------------------------------------------------------------------------------
# Guards around every test
# ---------------------------------------------------------------------------------------


# One keep-alive client for the many stats reads (hundreds of tests, four reads each).
_STATS_CLIENT = httpx.Client(timeout=5.0)


def _vm_stats(env) -> dict[str, int]:
    out = {name: -1 for name in WASM_VM_STATS}
    for line in _STATS_CLIENT.get(env.admin_url + "/stats?filter=^wasm\\.").text.splitlines():
        key, _, value = line.partition(": ")
        if key in out:
            out[key] = int(value)
    return out


@pytest.fixture(autouse=True)
def vm_never_fails(envoy):
    """The Wasm VM neither fails nor restarts while the test runs (conftest.WASM_VM_STATS,
    as wasm_vm_stats reads them, and no Wasm failure line in Envoy's log)."""
    before = _vm_stats(envoy)
    offset = log_size(envoy)
    yield
    assert envoy.proc.alive(), "Envoy died"
    assert _vm_stats(envoy) == before, "a Wasm VM was created, lost or reloaded"
    assert wasm_failure_lines(envoy, since=offset) == []


def test_vm_stats_are_there(envoy):
    """The stats the guard compares exist (a renamed stat would read -1 both times)."""
    stats = _vm_stats(envoy)
    assert stats == wasm_vm_stats(envoy)
    assert all(v >= 0 for v in stats.values()), stats
    assert stats["wasm.envoy.wasm.runtime.v8.active"] >= 1


def _served(backends) -> dict[str, Counter]:
    return {
        m.id: Counter(_STATS_CLIENT.get(f"{m.url}/mock/stats").json()["by_model"])
        for m in (backends.qwen, backends.phi)
    }


def _delta(before, after) -> dict[str, Counter]:
    out = {}
    for bid in after:
        c = Counter(after[bid])
        c.subtract(before[bid])
        out[bid] = +c
    return out


# ---------------------------------------------------------------------------------------
# Raw HTTP/1.1
# ---------------------------------------------------------------------------------------


def http1(
    port: int,
    body: bytes,
    headers: list[tuple[str, str]],
    path: str = "/v1/chat/completions",
    chunked: bool = False,
    chunk_size: int = 64 * 1024,
    timeout: float = 60.0,
) -> tuple[int, dict, bytes]:
    """One POST over a raw socket, Connection: close; header names exactly as given."""
    head = [f"POST {path} HTTP/1.1", "Host: gateway", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers]
    if chunked:
        head.append("Transfer-Encoding: chunked")
    elif not any(k.lower() == "content-length" for k, _ in headers):
        head.append(f"Content-Length: {len(body)}")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        try:
            if chunked:
                for i in range(0, len(body), chunk_size):
                    piece = body[i : i + chunk_size]
                    s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                s.sendall(b"0\r\n\r\n")
            else:
                s.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # Envoy answered early (413 at the headers) and closed: read the answer.
        data = _read_all(s, timeout)
    return parse_http1(data)


def _complete(data: bytes) -> bool:
    """A whole final HTTP/1.1 response is in `data` (1xx skipped; Content-Length or chunked).
    Envoy delays closing after a local reply (delayed_close_timeout, 1 s), so waiting for the
    close would make every refused request cost a second."""
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return False
        if head.startswith(b"HTTP/1.1 1"):
            data = rest
            continue
        break
    lines = head.decode("latin-1").lower().split("\r\n")
    hdrs = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    if "content-length" in hdrs:
        return len(rest) >= int(hdrs["content-length"].strip())
    if hdrs.get("transfer-encoding", "").strip() == "chunked":
        return rest.endswith(b"0\r\n\r\n")
    return False


def _read_all(s: socket.socket, timeout: float, data: bytes = b"") -> bytes:
    if _complete(data):
        return data
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            part = s.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            break
        if not part:
            break
        data += part
        if _complete(data):
            break
    return data


def check_error(status: int, headers: dict, body: bytes, want_status: int, code: str, param: Any = None) -> None:
    """The exact error shape of docs/CONTRACTS.md, and no backend in the response."""
    assert status == want_status, f"want {want_status} {code}, got {status}: {body[:300]!r}"
    assert headers.get("content-type", "").split(";")[0].strip() == "application/json", headers
    assert "x-mock-backend" not in headers, "the request reached a backend"
    doc = json.loads(body)
    assert set(doc) == {"error"}, doc
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", code, param), err


def check_routed(status: int, headers: dict, body: bytes, model: str, body_len: int) -> None:
    assert status == 200, f"{status} {body[:300]!r}"
    assert headers.get("x-mock-backend") == BACKEND_OF[model], headers
    assert headers.get("x-echo-base-model-name") == BASE_OF[model], headers
    assert headers.get("x-echo-model-name") == model, headers
    assert headers.get("x-echo-request-body-bytes") == str(body_len), "the body changed on the way"
    assert json.loads(body)["model"] == model


def check_reached(status: int, headers: dict, body: bytes, model: str, body_len: int) -> None:
    """Routed to the right pool, whose backend refused the body itself."""
    assert status == 400, f"{status} {body[:300]!r}"
    assert json.loads(body)["error"]["type"] == "Bad Request", body[:300]
    assert headers.get("x-mock-backend") == BACKEND_OF[model], headers
    assert headers.get("x-echo-base-model-name") == BASE_OF[model], headers
    assert headers.get("x-echo-model-name") == model, headers
    assert headers.get("x-echo-request-body-bytes") == str(body_len)


# ---------------------------------------------------------------------------------------
# The body cases
# ---------------------------------------------------------------------------------------

Q = QWEN.encode()
ROUTE = "route"


def err(code: str, status: int = 400, param: Optional[str] = None):
    if param is None and code in ("missing_model", "invalid_model", "duplicate_model", "model_not_found"):
        param = "model"
    return ("error", status, code, param)


def route(model: str):
    return (ROUTE, model)


REACHED = "reached"


def reached(model: str):
    """Valid for the filter and routed to the right pool, where the backend itself refuses it
    (mock-vllm, like vLLM's Python JSON parser, has a nesting limit far below 1024)."""
    return (REACHED, model)


def chat(model_json: bytes, rest: bytes = b'"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4') -> bytes:
    return b'{"model": ' + model_json + b", " + rest + b"}"


def _deep(depth: int, opener: bytes, closer: bytes) -> bytes:
    """`"x": <depth containers>` inside the top-level object (which is one more level)."""
    return b'{"model": "' + Q + b'", "x": ' + opener * depth + closer * depth + b"}"


def _deep_objects(depth: int) -> bytes:
    return b'{"model": "' + Q + b'", "x": ' + b'{"a": ' * (depth - 1) + b"{}" + b"}" * (depth - 1) + b"}"


def _string_body(n: int, model: bytes = Q) -> bytes:
    """A chat body whose content string makes the whole body exactly n bytes."""
    head = b'{"model": "' + model + b'", "messages": [{"role": "user", "content": "'
    tail = b'"}], "max_tokens": 4}'
    return head + b"a" * (n - len(head) - len(tail)) + tail


def _all_escaped(name: str) -> bytes:
    return b'"' + "".join(f"\\u{ord(c):04x}" for c in name).encode() + b'"'


CASES: dict[str, tuple[bytes, tuple]] = {
    # -- invalid UTF-8 (anywhere: outside strings, in keys, in the model, in the prompt) --
    "utf8_ff_in_prompt": (chat(b'"' + Q + b'"', b'"prompt": "\xff"'), err("invalid_json")),
    "utf8_overlong_slash_in_model": (chat(b'"Qwen\xc0\xafQwen2.5-3B-Instruct"'), err("invalid_json")),
    "utf8_encoded_surrogate": (chat(b'"' + Q + b'"', b'"prompt": "\xed\xa0\x80"'), err("invalid_json")),
    "utf8_above_u10ffff": (chat(b'"' + Q + b'"', b'"prompt": "\xf4\x90\x80\x80"'), err("invalid_json")),
    "utf8_truncated_sequence": (chat(b'"' + Q + b'"', b'"prompt": "\xe2\x82"'), err("invalid_json")),
    "utf8_lone_continuation": (chat(b'"' + Q + b'"', b'"prompt": "\x80"'), err("invalid_json")),
    "utf8_latin1_e_acute": (chat(b'"' + Q + b'"', b'"prompt": "caf\xe9"'), err("invalid_json")),
    "utf8_in_key": (b'{"mod\xffel": "' + Q + b'"}', err("invalid_json")),
    "utf8_outside_strings": (b'{\xff"model": "' + Q + b'"}', err("invalid_json")),
    "utf8_valid_multibyte_prompt": (
        chat(b'"' + Q + b'"', '"prompt": "caf\u00e9 \u65e5\u672c \U0001f389"'.encode()),
        route(QWEN),
    ),
    # -- truncated JSON, at every kind of place --
    "truncated_after_brace": (b"{", err("invalid_json")),
    "truncated_in_key": (b'{"mod', err("invalid_json")),
    "truncated_after_key": (b'{"model"', err("invalid_json")),
    "truncated_after_colon": (b'{"model":', err("invalid_json")),
    "truncated_in_model": (b'{"model": "Qwen/Qwen2.5', err("invalid_json")),
    "truncated_after_model": (b'{"model": "' + Q + b'"', err("invalid_json")),
    "truncated_after_comma": (b'{"model": "' + Q + b'",', err("invalid_json")),
    "truncated_in_nested": (b'{"model": "' + Q + b'", "messages": [{"role": "user"', err("invalid_json")),
    "truncated_mid_escape": (b'{"model": "Qwen\\', err("invalid_json")),
    "truncated_mid_unicode_escape": (b'{"model": "\\u00', err("invalid_json")),
    "truncated_mid_literal": (b'{"model": "' + Q + b'", "stream": tru', err("invalid_json")),
    "truncated_mid_number": (b'{"model": "' + Q + b'", "max_tokens": 1', err("invalid_json")),
    "empty_body": (b"", err("invalid_json")),
    # -- trailing data --
    "trailing_garbage": (chat(b'"' + Q + b'"') + b" x", err("invalid_json")),
    "trailing_brace": (chat(b'"' + Q + b'"') + b"}", err("invalid_json")),
    "trailing_second_document": (chat(b'"' + Q + b'"') + b'{"model": "' + PHI.encode() + b'"}', err("invalid_json")),
    "trailing_nul": (chat(b'"' + Q + b'"') + b"\x00", err("invalid_json")),
    "trailing_comma": (chat(b'"' + Q + b'"') + b",", err("invalid_json")),
    "trailing_whitespace_is_fine": (b" \r\n\t" + chat(b'"' + Q + b'"') + b" \r\n\t ", route(QWEN)),
    # -- byte-order marks --
    "utf8_bom": (b"\xef\xbb\xbf" + chat(b'"' + Q + b'"'), err("invalid_json")),
    "utf8_bom_after_whitespace": (b" \xef\xbb\xbf" + chat(b'"' + Q + b'"'), err("invalid_json")),
    "utf16le_bom_and_body": (b"\xff\xfe" + chat(b'"' + Q + b'"').decode().encode("utf-16-le"), err("invalid_json")),
    "bom_inside_a_string_is_fine": (chat(b'"' + Q + b'"', '"prompt": "\ufeffhi"'.encode()), route(QWEN)),
    # -- nesting: refused past 1024 levels (the top-level object is one), without recursion --
    "nesting_100000_arrays": (_deep(100_000, b"[", b"]"), err("invalid_json")),
    "nesting_100000_objects": (_deep_objects(100_000), err("invalid_json")),
    "nesting_100000_unclosed": (b'{"model": "' + Q + b'", "x": ' + b"[" * 100_000, err("invalid_json")),
    "nesting_100000_top_level_arrays": (b"[" * 100_000 + b"]" * 100_000, err("invalid_json")),
    "nesting_1024_levels_is_fine": (_deep(1023, b"[", b"]"), reached(QWEN)),
    "nesting_1025_levels": (_deep(1024, b"[", b"]"), err("invalid_json")),
    "model_after_1024_levels": (
        b'{"x": ' + b"[" * 1023 + b"]" * 1023 + b', "model": "' + LORA.encode() + b'"}',
        reached(LORA),
    ),
    # -- model written with escapes: decoded, then routed --
    "model_escaped_slash": (chat(b'"Qwen\\/Qwen2.5-3B-Instruct"'), route(QWEN)),
    "model_all_unicode_escapes": (chat(_all_escaped(QWEN)), route(QWEN)),
    "model_upper_hex_escape": (chat(b'"Qwen\\u002FQwen2.5-3B-Instruct"'), route(QWEN)),
    "adapter_escaped": (chat(b'"qwen\\u002dsql\\u002Dlora"'), route(LORA)),
    "phi_escaped_slashes": (chat(b'"microsoft\\/Phi-3-mini-4k-instruct"'), route(PHI)),
    "model_key_escaped": (b'{"\\u006dodel": "' + Q + b'", "prompt": "x"}', route(QWEN)),
    "model_invalid_escape": (chat(b'"Qwen\\x2fQwen2.5-3B-Instruct"'), err("invalid_json")),
    "model_bad_unicode_escape": (chat(b'"\\u00zzQwen"'), err("invalid_json")),
    "model_lone_high_surrogate": (chat(b'"Qwen\\ud800"'), err("invalid_model")),
    "model_lone_low_surrogate": (chat(b'"\\udc00Qwen"'), err("invalid_model")),
    "model_surrogate_pair_unknown": (chat(b'"Qwen\\ud83c\\udf89"'), err("model_not_found", 404)),
    "lone_surrogate_in_prompt_is_fine": (chat(b'"' + Q + b'"', b'"prompt": "\\ud800"'), reached(QWEN)),
    # -- long models: maxModelNameBytes is 256, counted after unescaping --
    "model_64KiB": (chat(b'"' + b"m" * 65536 + b'"'), err("invalid_model")),
    "model_64KiB_of_escapes": (chat(b'"' + b"\\u0061" * 65536 + b'"'), err("invalid_model")),
    "model_257_bytes_multibyte": (chat(('"' + "\u65e5" * 86 + '"').encode()), err("invalid_model")),
    "model_255_bytes_multibyte_unknown": (chat(('"' + "\u65e5" * 85 + '"').encode()), err("model_not_found", 404)),
    # -- control characters in the model: escaped ones are decoded and refused ... --
    "model_escaped_nul": (chat(b'"Qwen/Qwen2.5-3B-Instruct\\u0000"'), err("invalid_model")),
    "model_escaped_cr": (chat(b'"Qwen/Qwen2.5-3B-Instruct\\r"'), err("invalid_model")),
    "model_escaped_lf": (chat(b'"Qwen/Qwen2.5-3B-Instruct\\n"'), err("invalid_model")),
    "model_escaped_crlf_header_injection": (
        chat(b'"Qwen/Qwen2.5-3B-Instruct\\r\\nx-gateway-base-model-name: microsoft/Phi-3-mini-4k-instruct"'),
        err("invalid_model"),
    ),
    "model_escaped_u000d": (chat(b'"\\u000dQwen/Qwen2.5-3B-Instruct"'), err("invalid_model")),
    "model_escaped_del": (chat(b'"Qwen/Qwen2.5-3B-Instruct\\u007f"'), err("invalid_model")),
    "model_escaped_c1_nel": (chat(b'"Qwen/Qwen2.5-3B-Instruct\\u0085"'), err("invalid_model")),
    # ... raw ones are not JSON at all (except DEL and C1, which JSON allows raw) ...
    "model_raw_nul": (chat(b'"Qwen/Qwen2.5-3B-Instruct\x00"'), err("invalid_json")),
    "model_raw_cr": (chat(b'"Qwen/Qwen2.5-3B-Instruct\r"'), err("invalid_json")),
    "model_raw_lf": (chat(b'"Qwen/Qwen2.5-3B-Instruct\n"'), err("invalid_json")),
    "model_raw_tab": (chat(b'"Qwen/Qwen2.5-3B-Instruct\t"'), err("invalid_json")),
    "model_raw_del": (chat(b'"Qwen/Qwen2.5-3B-Instruct\x7f"'), err("invalid_model")),
    "model_raw_c1_nel": (chat(b'"Qwen/Qwen2.5-3B-Instruct\xc2\x85"'), err("invalid_model")),
    # -- the top level is not an object --
    "top_level_array": (b'[{"model": "' + Q + b'"}]', err("invalid_json")),
    "top_level_string": (b'"' + Q + b'"', err("invalid_json")),
    "top_level_number": (b"42", err("invalid_json")),
    "top_level_true": (b"true", err("invalid_json")),
    "top_level_null": (b"null", err("invalid_json")),
    "whitespace_only": (b" \r\n\t ", err("invalid_json")),
}

# 10 MB strings and a 7 MiB one: separate (each is sent once per forgery set, not per
# transport variant), see test_big_strings below.
BIG_CASES: dict[str, tuple[bytes, tuple]] = {
    "string_10MB": (_string_body(10_000_000), ("error", 413, "request_too_large", None)),
    "string_7MiB": (_string_body(7 * MiB, model=PHI.encode()), route(PHI)),
}


def _forge(expect: tuple) -> str:
    """A forged routing value that would move the request to the wrong pool."""
    if expect[0] in (ROUTE, REACHED) and BASE_OF[expect[1]] == PHI:
        return QWEN
    return PHI


FORGERIES: dict[str, Any] = {
    "no_forgery": lambda v: [],
    "forged_lower": lambda v: [(BASE_H, v), (MODEL_H, v)],
    "forged_upper": lambda v: [(BASE_H.upper(), v), (MODEL_H.upper(), v)],
    "forged_mixed_and_duplicated": lambda v: [("X-Gateway-Base-Model-Name", v), ("x-GATEWAY-base-MODEL-name", v)],
}

JSON_CT = [("Content-Type", "application/json")]


def send_and_check(envoy, backends, body: bytes, expect: tuple, headers, **kw) -> None:
    before = _served(backends)
    status, resp_headers, resp = http1(envoy.port, body, headers, **kw)
    delta = _delta(before, _served(backends))
    if expect[0] == ROUTE:
        model = expect[1]
        check_routed(status, resp_headers, resp, model, len(body))
        want = {bid: Counter() for bid in delta}
        want[BACKEND_OF[model]][model] = 1
        assert delta == want, f"backends saw {delta}"
    elif expect[0] == REACHED:
        check_reached(status, resp_headers, resp, expect[1], len(body))
        assert all(not c for c in delta.values()), delta  # the mocks count 200s only
    else:
        _, want_status, code, param = expect
        check_error(status, resp_headers, resp, want_status, code, param)
        assert all(not c for c in delta.values()), f"a backend received a refused request: {delta}"


@pytest.mark.parametrize("forgery", list(FORGERIES))
@pytest.mark.parametrize("case", list(CASES))
def test_body_case(envoy, backends, case, forgery):
    body, expect = CASES[case]
    headers = JSON_CT + FORGERIES[forgery](_forge(expect))
    send_and_check(envoy, backends, body, expect, headers)


@pytest.mark.parametrize(
    "case", ["nesting_100000_arrays", "utf8_bom", "model_escaped_slash", "model_raw_lf", "model_64KiB"]
)
def test_body_case_chunked_in_small_pieces(envoy, backends, case):
    """The same verdicts when the body arrives in 997-byte chunks (many body callbacks)."""
    body, expect = CASES[case]
    send_and_check(
        envoy, backends, body, expect, JSON_CT + FORGERIES["forged_upper"](_forge(expect)), chunked=True, chunk_size=997
    )


# Envoy's own 413 races the filter's: Envoy adds each newly read piece of body to the
# buffered body, and answers a plain-text "Payload Too Large" itself when that passes
# per_connection_buffer_limit_bytes (8 MiB + 64 KiB), BEFORE the filter is called with the
# piece. The filter's JSON 413 wins only if some body callback lands between 8 MiB and
# 8 MiB + 64 KiB; a read that brings more than 64 KiB across that window skips it. Bodies
# with Content-Length are refused at the headers and never race. Reported with a reproducer
# and a local_reply_config fix (a mapper for status 413); until envoy.yaml has it:
def _big_params():
    for case in BIG_CASES:
        for transport in ("content_length", "chunked", "http2"):
            # Streamed 10 MB bodies can cross Envoy's own buffer limit before the filter sees the
            # read; envoy.yaml's 413 local_reply mapper makes that answer the same JSON.
            yield pytest.param(case, transport, id=f"{case}-{transport}")


@pytest.mark.parametrize("forgery", list(FORGERIES))
@pytest.mark.parametrize("case,transport", list(_big_params()))
def test_big_strings(envoy, backends, case, transport, forgery):
    """10 MB in one string: over the default 8 MiB maxBodyBytes, 413 (at the headers with
    Content-Length, as the bytes stream in when chunked or over HTTP/2). 7 MiB: routed,
    the body intact."""
    body, expect = BIG_CASES[case]
    forged = FORGERIES[forgery](_forge(expect))
    if transport != "http2":
        send_and_check(envoy, backends, body, expect, JSON_CT + forged, chunked=transport == "chunked")
        return
    before = _served(backends)
    status, headers, resp, reset, _ = h2_post(
        envoy.port, body, [("content-type", "application/json")] + [(k.lower(), v) for k, v in forged], 16384
    )
    delta = _delta(before, _served(backends))
    if expect[0] == ROUTE:
        assert reset is None
        check_routed(status, headers, resp, expect[1], len(body))
        assert delta[BACKEND_OF[expect[1]]] == Counter({expect[1]: 1})
        assert sum(sum(c.values()) for c in delta.values()) == 1
    else:
        assert reset in (None, h2.errors.ErrorCodes.NO_ERROR)
        check_error(status, headers, resp, *expect[1:])
        assert all(not c for c in delta.values())


# ---------------------------------------------------------------------------------------
# Content-Encoding: refused with 415 (the decision: no decompression in the gateway)
# ---------------------------------------------------------------------------------------

_PLAIN = chat(b'"' + Q + b'"')

ENCODINGS = {
    "gzip_real_body": (gzip.compress(_PLAIN), [("Content-Encoding", "gzip")], err("unsupported_media_type", 415)),
    "gzip_upper_case": (gzip.compress(_PLAIN), [("CONTENT-ENCODING", "GZIP")], err("unsupported_media_type", 415)),
    "gzip_plain_body": (_PLAIN, [("Content-Encoding", "gzip")], err("unsupported_media_type", 415)),
    "deflate": (_PLAIN, [("Content-Encoding", "deflate")], err("unsupported_media_type", 415)),
    "br": (_PLAIN, [("Content-Encoding", "br")], err("unsupported_media_type", 415)),
    "gzip_then_identity": (_PLAIN, [("Content-Encoding", "gzip, identity")], err("unsupported_media_type", 415)),
    "identity": (_PLAIN, [("Content-Encoding", "identity")], route(QWEN)),
    "identity_upper_case": (_PLAIN, [("content-encoding", "IDENTITY")], route(QWEN)),
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
@pytest.mark.parametrize("case", list(ENCODINGS))
def test_content_encoding(envoy, backends, case, forgery):
    body, extra, expect = ENCODINGS[case]
    send_and_check(envoy, backends, body, expect, JSON_CT + extra + FORGERIES[forgery](_forge(expect)))


# ---------------------------------------------------------------------------------------
# Header names (and media types) in odd case
# ---------------------------------------------------------------------------------------

ODD_HEADERS = {
    "content_type_all_caps": ([("CONTENT-TYPE", "APPLICATION/JSON")], route(QWEN)),
    "content_type_mixed_with_charset": ([("cOnTeNt-TyPe", "Application/Json; Charset=UTF-8")], route(QWEN)),
    "content_type_text_plain_caps": ([("CONTENT-TYPE", "TEXT/PLAIN")], err("unsupported_media_type", 415)),
    "content_length_caps": ([("Content-Type", "application/json"), ("CONTENT-LENGTH", str(len(_PLAIN)))], route(QWEN)),
    "content_length_caps_over_limit": (
        [("Content-Type", "application/json"), ("CONTENT-LENGTH", str(DEFAULT_MAX_BODY + 1))],
        ("error", 413, "request_too_large", None),
    ),
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
@pytest.mark.parametrize("case", list(ODD_HEADERS))
def test_header_names_in_odd_case(envoy, backends, case, forgery):
    headers, expect = ODD_HEADERS[case]
    send_and_check(envoy, backends, _PLAIN, expect, headers + FORGERIES[forgery](_forge(expect)))


def test_transfer_encoding_in_odd_case(envoy, backends):
    """TRANSFER-ENCODING: CHUNKED, written by hand."""
    before = _served(backends)
    with socket.create_connection(("127.0.0.1", envoy.port), timeout=30) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHOST: gw\r\nCONTENT-TYPE: APPLICATION/JSON\r\n"
            b"TRANSFER-ENCODING: CHUNKED\r\nCONNECTION: close\r\nX-GATEWAY-BASE-MODEL-NAME: "
            + QWEN.encode()
            + b"\r\n\r\n"
        )
        body = json.dumps({"model": PHI, "prompt": "hi", "max_tokens": 4}).encode()
        s.sendall(b"%X\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        status, headers, resp = parse_http1(_read_all(s, 30))
    check_routed(status, headers, resp, PHI, len(body))
    assert _delta(before, _served(backends))[BACKEND_OF[PHI]] == Counter({PHI: 1})


# ---------------------------------------------------------------------------------------
# Expect: 100-continue
# ---------------------------------------------------------------------------------------


def _expect_continue(port: int, body: bytes, extra: list[tuple[str, str]], content_length: Optional[int] = None):
    """Sends the headers with Expect: 100-continue, waits for the interim answer, then the
    body. Returns (interim status line or None, final status, headers, body)."""
    cl = len(body) if content_length is None else content_length
    if not any(k.lower() == "content-type" for k, _ in extra):
        extra = [("Content-Type", "application/json"), *extra]
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
        f"Content-Length: {cl}\r\nExpect: 100-continue\r\nConnection: close\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in extra)
        + "\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode())
        s.settimeout(10)
        first = b""
        while b"\r\n\r\n" not in first:
            part = s.recv(65536)
            if not part:
                break
            first += part
        interim = None
        if first.startswith(b"HTTP/1.1 100"):
            interim, _, first = first.partition(b"\r\n\r\n")
            interim = interim.decode()
            try:
                s.sendall(body)
            except (BrokenPipeError, ConnectionResetError):
                pass
            s.settimeout(30)
            first = _read_all(s, 30, first)
        else:
            first = _read_all(s, 10, first)
    status, headers, resp = parse_http1(first)
    return interim, status, headers, resp


@pytest.mark.parametrize("forgery", list(FORGERIES))
@pytest.mark.parametrize(
    "case",
    ["model_escaped_slash", "adapter_escaped", "truncated_in_model", "utf8_bom", "model_64KiB", "top_level_array"],
)
def test_expect_100_continue(envoy, backends, case, forgery):
    """Envoy answers `100 Continue` itself, then the filter decides on the body as usual."""
    body, expect = CASES[case]
    before = _served(backends)
    interim, status, headers, resp = _expect_continue(envoy.port, body, FORGERIES[forgery](_forge(expect)))
    assert interim == "HTTP/1.1 100 Continue", interim
    delta = _delta(before, _served(backends))
    if expect[0] == ROUTE:
        check_routed(status, headers, resp, expect[1], len(body))
        assert sum(sum(c.values()) for c in delta.values()) == 1 and delta[BACKEND_OF[expect[1]]][expect[1]] == 1
    else:
        check_error(status, headers, resp, *expect[1:])
        assert all(not c for c in delta.values())


@pytest.mark.parametrize(
    "content_type,content_length,status,code",
    [
        ("application/json", DEFAULT_MAX_BODY + 1, 413, "request_too_large"),
        ("text/plain", None, 415, "unsupported_media_type"),
    ],
    ids=["content_length_over_limit", "text_plain"],
)
def test_expect_100_continue_refused_at_the_headers(envoy, backends, content_type, content_length, status, code):
    """Refused at the headers, with Expect: 100-continue: Envoy has already sent its own
    `100 Continue` (it answers Expect itself, before the filters run), then the filter's
    JSON error follows at once; the client need not send the body (this one does, and it is
    ignored)."""
    before = _served(backends)
    interim, st, headers, resp = _expect_continue(
        envoy.port, b"x" * 1024, [("Content-Type", content_type), (BASE_H, QWEN)], content_length=content_length
    )
    assert interim == "HTTP/1.1 100 Continue", interim
    check_error(st, headers, resp, status, code)
    assert all(not c for c in _delta(before, _served(backends)).values())


# ---------------------------------------------------------------------------------------
# HTTP/2: many tiny DATA frames
# ---------------------------------------------------------------------------------------


CONNECTION_CLOSED = -1  # h2_post's reset value when the connection closed without an error code


def h2_post(
    port: int,
    body: bytes,
    headers: list[tuple[str, str]],
    frame: int = 1,
    path: str = "/v1/chat/completions",
    timeout: float = 60.0,
    validate: bool = True,
) -> tuple[Optional[int], dict, bytes, Optional[int], int]:
    """One h2c (prior knowledge) POST whose body goes out in DATA frames of `frame` bytes.
    Returns (status, headers, body, reset error code or None, DATA frames sent)."""
    config = h2.config.H2Configuration(
        client_side=True,
        header_encoding="utf-8",
        validate_outbound_headers=validate,
        normalize_outbound_headers=validate,
    )
    conn = h2.connection.H2Connection(config=config)
    status: Optional[int] = None
    resp_headers: dict = {}
    resp = b""
    reset: Optional[int] = None
    ended = False
    sent_frames = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        sid = conn.get_next_available_stream_id()
        req = [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", "gateway")]
        conn.send_headers(sid, req + headers, end_stream=not body)
        s.sendall(conn.data_to_send())

        def pump(wait: float) -> None:
            nonlocal status, resp, reset, ended
            ready, _, _ = select.select([s], [], [], wait)
            if not ready:
                return
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:  # the connection is gone: a reset without an HTTP/2 error code
                if reset is None and status is None:
                    reset = CONNECTION_CLOSED
                ended = True
                return
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    resp_headers.update({k: v for k, v in ev.headers})
                    status = int(resp_headers[":status"])
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    resp += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    ended = True
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    # After a complete early answer (a refusal while the body is still being
                    # sent) Envoy resets the stream with NO_ERROR: "stop sending".
                    reset, ended = ev.error_code, True
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    reset, ended = ev.error_code, True
            out = conn.data_to_send()
            if out:
                s.sendall(out)

        pos = 0
        while pos < len(body) and not ended:
            batch = 0
            while pos < len(body) and batch < 256:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if window <= 0:
                    break
                n = min(frame, window, len(body) - pos)
                try:
                    conn.send_data(sid, body[pos : pos + n], end_stream=pos + n == len(body))
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    ended = True
                    break
                pos += n
                sent_frames += 1
                batch += 1
            try:
                s.sendall(conn.data_to_send())
            except (BrokenPipeError, ConnectionResetError):
                break
            pump(0 if batch else 0.5)
        deadline = time.monotonic() + timeout
        while not ended and time.monotonic() < deadline:
            pump(0.5)
    return status, resp_headers, resp, reset, sent_frames


H2_CASES = [
    "model_escaped_slash",
    "adapter_escaped",
    "phi_escaped_slashes",
    "model_after_1024_levels",
    "utf8_valid_multibyte_prompt",
    "truncated_in_model",
    "truncated_after_comma",
    "trailing_garbage",
    "utf8_bom",
    "utf8_ff_in_prompt",
    "nesting_1025_levels",
    "model_escaped_nul",
    "model_raw_lf",
    "model_64KiB",
    "model_lone_high_surrogate",
    "top_level_array",
]


def _padded(body: bytes) -> bytes:
    """Bodies of a few hundred bytes grow to about 2 KiB (more frames) where JSON allows:
    whitespace before the body is valid JSON, so it changes no verdict."""
    return b" " * max(0, 2048 - len(body)) + body


@pytest.mark.parametrize("forgery", ["no_forgery", "forged_lower"])
@pytest.mark.parametrize("case", H2_CASES)
def test_http2_one_byte_data_frames(envoy, backends, case, forgery):
    body, expect = CASES[case]
    if case != "utf8_bom":  # a BOM must stay the first byte
        body = _padded(body)
    frame = 1 if len(body) <= 8192 else 1024  # the 64 KiB model: 1 KiB frames (still 70 of them)
    forged = [(k.lower(), v) for k, v in FORGERIES[forgery](_forge(expect))]
    before = _served(backends)
    status, headers, resp, reset, frames = h2_post(
        envoy.port, body, [("content-type", "application/json")] + forged, frame
    )
    delta = _delta(before, _served(backends))
    # The answer is complete; a refusal that came before the whole body was sent is followed
    # by RST_STREAM NO_ERROR (RFC 9113 8.1), nothing else.
    assert reset in (None, h2.errors.ErrorCodes.NO_ERROR), f"stream reset (error {reset}) after {frames} frames"
    if reset is not None:
        assert expect[0] == "error" and frames < -(-len(body) // frame), "reset after a routed request"
    if expect[0] == ROUTE:
        assert frames == -(-len(body) // frame)
        check_routed(status, headers, resp, expect[1], len(body))
        assert sum(sum(c.values()) for c in delta.values()) == 1 and delta[BACKEND_OF[expect[1]]][expect[1]] == 1
    elif expect[0] == REACHED:
        check_reached(status, headers, resp, expect[1], len(body))
        assert all(not c for c in delta.values())
    else:
        check_error(status, headers, resp, *expect[1:])
        assert all(not c for c in delta.values())


def test_http2_upper_case_header_name_is_refused_by_envoy(envoy, backends):
    """HTTP/2 forbids upper-case header names: Envoy refuses such a request itself (a
    malformed request), whatever the filter would have done. Nothing reaches a backend."""
    body = chat(b'"' + Q + b'"')
    before = _served(backends)
    status, headers, resp, reset, _ = h2_post(
        envoy.port, body, [("content-type", "application/json"), (BASE_H.upper(), PHI)], frame=64, validate=False
    )
    # Envoy's codec treats it as a protocol error and drops the connection.
    assert (status, reset) == (None, CONNECTION_CLOSED), (status, reset, headers, resp[:200])
    assert all(not c for c in _delta(before, _served(backends)).values())


# ---------------------------------------------------------------------------------------
# multipart/form-data audio uploads
# ---------------------------------------------------------------------------------------

BOUNDARY = "----bbr-wasm-boundary-7MA4YWxkTrZu0gW"
AUDIO = bytes(range(256)) * 64 + b"\r\n--not-the-boundary\r\n" + b"\r\n------bbr" * 10  # 16 KiB + near-misses


def form(parts: list[tuple[str, bytes, Optional[str]]], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    """A multipart/form-data body: parts of (name, value, filename or None)."""
    out = b""
    for name, value, filename in parts:
        disp = f'form-data; name="{name}"'
        if filename:
            disp += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if filename:
            out += b"Content-Type: audio/wav\r\n"
        out += b"\r\n" + value + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return out


def mp_ct(boundary: str = BOUNDARY) -> list[tuple[str, str]]:
    return [("Content-Type", f"multipart/form-data; boundary={boundary}")]


TRANSCRIBE = "/v1/audio/transcriptions"
TRANSLATE = "/v1/audio/translations"

MULTIPART_CASES: dict[str, tuple[str, list, bytes, tuple]] = {
    "model_first": (TRANSCRIBE, mp_ct(), form([("model", Q, None), ("file", AUDIO, "a.wav")]), route(QWEN)),
    "model_after_the_file": (
        TRANSCRIBE,
        mp_ct(),
        form([("file", AUDIO, "a.wav"), ("language", b"en", None), ("model", PHI.encode(), None)]),
        route(PHI),
    ),
    "adapter_translations": (
        TRANSLATE,
        mp_ct(),
        form([("file", AUDIO, "a.wav"), ("model", LORA.encode(), None)]),
        route(LORA),
    ),
    "quoted_boundary_odd_case": (
        TRANSCRIBE,
        [("CONTENT-TYPE", f'Multipart/Form-Data; BOUNDARY="{BOUNDARY}"')],
        form([("model", Q, None), ("file", AUDIO, "a.wav")]),
        route(QWEN),
    ),
    "preamble_and_epilogue": (
        TRANSCRIBE,
        mp_ct(),
        b"this is a preamble\r\n" + form([("model", Q, None), ("file", AUDIO, "a.wav")]) + b"epilogue",
        route(QWEN),
    ),
    "missing_model_field": (
        TRANSCRIBE,
        mp_ct(),
        form([("file", AUDIO, "a.wav"), ("language", b"en", None)]),
        err("missing_model"),
    ),
    "empty_model_field": (
        TRANSCRIBE,
        mp_ct(),
        form([("model", b"", None), ("file", AUDIO, "a.wav")]),
        err("invalid_model"),
    ),
    "model_field_with_crlf": (TRANSCRIBE, mp_ct(), form([("model", Q + b"\r\nx", None)]), err("invalid_model")),
    "model_field_64KiB": (TRANSCRIBE, mp_ct(), form([("model", b"m" * 65536, None)]), err("invalid_model")),
    "two_model_fields": (
        TRANSCRIBE,
        mp_ct(),
        form([("model", Q, None), ("file", AUDIO, "a.wav"), ("model", PHI.encode(), None)]),
        err("duplicate_model"),
    ),
    "unknown_model_field": (TRANSCRIBE, mp_ct(), form([("model", b"whisper-1", None)]), err("model_not_found", 404)),
    "no_boundary_parameter": (
        TRANSCRIBE,
        [("Content-Type", "multipart/form-data")],
        form([("model", Q, None)]),
        err("invalid_multipart"),
    ),
    "empty_boundary": (
        TRANSCRIBE,
        [("Content-Type", "multipart/form-data; boundary=")],
        form([("model", Q, None)]),
        err("invalid_multipart"),
    ),
    "boundary_too_long": (
        TRANSCRIBE,
        mp_ct("b" * 71),
        form([("model", Q, None)], boundary="b" * 71),
        err("invalid_multipart"),
    ),
    "boundary_bad_character": (
        TRANSCRIBE,
        [("Content-Type", "multipart/form-data; boundary=abc{def")],
        form([("model", Q, None)], boundary="abc{def"),
        err("invalid_multipart"),
    ),
    "boundary_unterminated_quote": (
        TRANSCRIBE,
        [("Content-Type", f'multipart/form-data; boundary="{BOUNDARY}')],
        form([("model", Q, None)]),
        err("invalid_multipart"),
    ),
    "body_uses_another_boundary": (
        TRANSCRIBE,
        mp_ct(),
        form([("model", Q, None), ("file", AUDIO, "a.wav")], boundary="something-else"),
        err("invalid_multipart"),
    ),
    "truncated_in_the_file_part": (
        TRANSCRIBE,
        mp_ct(),
        form([("model", Q, None), ("file", AUDIO, "a.wav")])[: -len(f"--{BOUNDARY}--\r\n") - 100],
        err("invalid_multipart"),
    ),
    "truncated_in_part_headers": (
        TRANSCRIBE,
        mp_ct(),
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; na".encode(),
        err("invalid_multipart"),
    ),
    "no_closing_boundary": (TRANSCRIBE, mp_ct(), form([("model", Q, None)], close=False), err("invalid_multipart")),
    "garbage_after_a_boundary": (
        TRANSCRIBE,
        mp_ct(),
        f"--{BOUNDARY}xyz\r\n".encode() + form([("model", Q, None)]),
        err("invalid_multipart"),
    ),
    "multipart_on_a_json_path": (
        "/v1/chat/completions",
        mp_ct(),
        form([("model", Q, None)]),
        err("unsupported_media_type", 415),
    ),
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
@pytest.mark.parametrize("case", list(MULTIPART_CASES))
def test_multipart_upload(envoy, backends, case, forgery):
    path, ct, body, expect = MULTIPART_CASES[case]
    headers = ct + FORGERIES[forgery](_forge(expect))
    before = _served(backends)
    status, resp_headers, resp = http1(envoy.port, body, headers, path=path)
    delta = _delta(before, _served(backends))
    if expect[0] == ROUTE:
        model = expect[1]
        # The mock has no audio endpoints: its 404 for an unknown path, from the right pool.
        assert status == 404, (status, resp[:300])
        assert json.loads(resp)["error"]["type"] == "NotFoundError"
        assert resp_headers.get("x-mock-backend") == BACKEND_OF[model], resp_headers
        assert resp_headers.get("x-echo-base-model-name") == BASE_OF[model], resp_headers
        assert resp_headers.get("x-echo-model-name") == model, resp_headers
        assert resp_headers.get("x-echo-request-body-bytes") == str(len(body))
    else:
        check_error(status, resp_headers, resp, *expect[1:])
    assert all(not c for c in delta.values())  # the mocks count completions and chat only


@pytest.mark.parametrize("case", ["model_after_the_file", "truncated_in_the_file_part", "missing_model_field"])
def test_multipart_chunked_and_http2(envoy, backends, case):
    """The same uploads chunked over HTTP/1.1 (333-byte chunks) and over HTTP/2 (64-byte
    DATA frames)."""
    path, ct, body, expect = MULTIPART_CASES[case]
    status, headers, resp = http1(envoy.port, body, ct, path=path, chunked=True, chunk_size=333)
    h2_status, h2_headers, h2_resp, reset, _ = h2_post(envoy.port, body, [(k.lower(), v) for k, v in ct], 64, path=path)
    assert reset is None
    for st, hd, rs in ((status, headers, resp), (h2_status, h2_headers, h2_resp)):
        if expect[0] == ROUTE:
            assert st == 404 and hd.get("x-mock-backend") == BACKEND_OF[expect[1]], (st, hd)
            assert hd.get("x-echo-model-name") == expect[1]
        else:
            check_error(st, hd, rs, *expect[1:])
