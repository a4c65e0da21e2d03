"""The official OpenAI Python SDK (`openai` from PyPI) against the gateway.

Real clients parse what the gateway sends: completions, chat, streaming chat (with the
final usage chunk) for both base models and the LoRA adapter, the model list answered by the
filter, and every filter error surfacing as the SDK's typed exception with the OpenAI error
fields (`e.code`, `e.param`, `e.type`, `e.body`) filled in.

How the SDK is used here:
- `client.<resource>.with_raw_response.create(...)` gives the HTTP response (headers, to see
  which backend served it: `x-mock-backend`) and `.parse()` the typed object;
- a `Stream` keeps its HTTP response in `.response`;
- requests the typed methods cannot express (no `model`, a duplicated `model` key, broken
  JSON, another content type) go through `client.post(path, cast_to=..., content=bytes,
  options={"headers": ...})`, the SDK's own low-level call, which raises the same exceptions;
- a non-string `model` goes through `extra_body`, which the SDK merges over its own fields.

The SDK's exception for a status is chosen by `OpenAI._make_status_error`: 400 ->
BadRequestError, 404 -> NotFoundError, and 413 / 415, which have no class of their own, ->
APIStatusError itself. `e.body` is the `error` object of the response (the SDK unwraps it).

Every client has max_retries=0: the SDK would retry 408/409/429/5xx and connection errors.
"""

from __future__ import annotations

import time

import openai
import pytest
from conftest import BACKEND_OF, BASE_OF, LORA, PHI, PHI_ID, QWEN, QWEN_ID, Backends, backend_ports, totals
from openai.types import Completion

ITL_MS = 40  # the SDK pair's backends emit one token every 40 ms (no TTFT)
STREAM_TOKENS = 16
DEFAULT_MAX_BODY = 8 * 1024 * 1024
MODELS = [QWEN, PHI, LORA]


@pytest.fixture(scope="module")
def sdk_backends(mock_factory) -> Backends:
    """A pair of backends with a token delay, so a stream takes visible time."""
    return Backends(
        qwen=mock_factory(QWEN, QWEN_ID, loras=(LORA,), extra=("--itl-ms", str(ITL_MS))),
        phi=mock_factory(PHI, PHI_ID, extra=("--itl-ms", str(ITL_MS))),
    )


@pytest.fixture(scope="module")
def sdk_envoy(envoy_factory, sdk_backends):
    """envoy/envoy.yaml as shipped (default filter config), on the SDK pair."""
    return envoy_factory(backend_ports(sdk_backends), name="openai-sdk")


@pytest.fixture(scope="module")
def client(sdk_envoy):
    c = openai.OpenAI(base_url=sdk_envoy.url + "/v1", api_key="unused", max_retries=0, timeout=30.0)
    yield c
    c.close()


def _assert_served_by(headers, model: str) -> None:
    assert headers.get("x-mock-backend") == BACKEND_OF[model], dict(headers)
    assert headers.get("x-echo-base-model-name") == BASE_OF[model], dict(headers)
    assert headers.get("x-echo-model-name") == model, dict(headers)


def _assert_filter_error(e: openai.APIStatusError, status: int, code: str, param=None) -> None:
    """The SDK saw the filter's OpenAI error: status, code/param/type, and no backend."""
    assert e.status_code == status, e
    assert e.code == code, (e.code, e.body)
    assert e.param == param, (e.param, e.body)
    assert e.type == "invalid_request_error", e.body
    assert isinstance(e.body, dict) and e.body["code"] == code, e.body
    assert set(e.body) == {"message", "type", "param", "code"}, e.body
    assert e.message and e.body["message"] in e.message, e.message
    assert "x-mock-backend" not in e.response.headers, "the request reached a backend"


# ---------------------------------------------------------------------------------------
# Success paths
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_completion(client, model):
    raw = client.completions.with_raw_response.create(model=model, prompt="Say hello", max_tokens=3)
    assert raw.status_code == 200
    _assert_served_by(raw.headers, model)
    c = raw.parse()
    assert isinstance(c, Completion)
    assert c.object == "text_completion"
    assert c.model == model
    assert c.choices[0].text == "tok0 tok1 tok2"
    assert c.choices[0].finish_reason == "length"
    assert c.usage is not None and c.usage.completion_tokens == 3 and c.usage.prompt_tokens == 2


@pytest.mark.parametrize("model", MODELS)
def test_chat(client, model):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Say hello"}], max_completion_tokens=2
    )
    _assert_served_by(raw.headers, model)
    chat = raw.parse()
    assert chat.object == "chat.completion"
    assert chat.model == model
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == "tok0 tok1"
    assert chat.usage is not None and chat.usage.completion_tokens == 2


@pytest.mark.parametrize("model", MODELS)
def test_streaming_chat(client, model):
    """Chunks arrive while the backend is still generating, and the usage chunk comes last."""
    t0 = time.monotonic()
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count please"}],
        max_tokens=STREAM_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    _assert_served_by(stream.response.headers, model)
    assert stream.response.headers["content-type"].startswith("text/event-stream")
    arrivals, chunks = [], []
    with stream:
        for chunk in stream:
            arrivals.append(time.monotonic() - t0)
            chunks.append(chunk)
    total = time.monotonic() - t0

    assert all(c.object == "chat.completion.chunk" and c.model == model for c in chunks)
    assert len({c.id for c in chunks}) == 1, "one completion id across the stream"
    # vLLM's shape: a role chunk, one chunk per token, then the usage chunk (no choices).
    assert chunks[0].choices[0].delta.role == "assistant"
    token_chunks = [c for c in chunks[1:] if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in token_chunks)
    assert text.split() == [f"tok{i}" for i in range(STREAM_TOKENS)], text
    assert token_chunks[-1].choices[0].finish_reason == "length"
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None, usage
    assert usage.usage.completion_tokens == STREAM_TOKENS
    assert usage.usage.prompt_tokens == 2
    assert usage.usage.total_tokens == STREAM_TOKENS + 2

    # The backend takes (STREAM_TOKENS - 1) * ITL; the first token must not wait for the end.
    min_total = (STREAM_TOKENS - 1) * ITL_MS / 1000 * 0.8
    assert total >= min_total, f"stream took {total:.2f}s: the backend delay did not apply"
    first_token = arrivals[1]
    assert first_token < total / 2, f"first token after {first_token:.2f}s of {total:.2f}s: buffered?"


def test_streaming_without_usage(client):
    """Without stream_options, no usage chunk: every chunk after the role chunk has a choice."""
    with client.chat.completions.create(
        model=PHI, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True
    ) as stream:
        chunks = list(stream)
    assert all(c.choices for c in chunks), chunks
    assert "".join(c.choices[0].delta.content for c in chunks[1:]).split() == ["tok0", "tok1", "tok2"]
    assert all(c.usage is None for c in chunks)


def test_models_list(client, sdk_backends):
    before = totals(sdk_backends)
    raw = client.models.with_raw_response.list()
    assert "x-mock-backend" not in raw.headers, "answered by a backend, not the filter"
    models = list(raw.parse())
    assert {m.id for m in models} == set(MODELS)
    by_id = {m.id: m for m in models}
    for m in models:
        assert m.object == "model" and m.owned_by == "bbr-wasm" and m.created > 1_600_000_000
    # root and parent are not in the SDK's Model type: pydantic keeps them as extra fields.
    assert (by_id[QWEN].parent, by_id[PHI].parent, by_id[LORA].parent) == (None, None, QWEN)
    assert by_id[LORA].root == QWEN
    # The plain call (a SyncPage) lists the same models in the same order.
    assert [m.id for m in client.models.list()] == [m.id for m in models]
    assert totals(sdk_backends) == before


# ---------------------------------------------------------------------------------------
# Errors: typed exceptions
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_unknown_model_is_not_found_error(client, sdk_backends, api):
    before = totals(sdk_backends)
    with pytest.raises(openai.NotFoundError) as info:
        if api == "completions":
            client.completions.create(model="gpt-4o", prompt="hi", max_tokens=1)
        else:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    _assert_filter_error(info.value, 404, "model_not_found", param="model")
    assert "gpt-4o" in info.value.message
    assert totals(sdk_backends) == before


def _post_raw(client: openai.OpenAI, content: bytes, content_type: str = "application/json", **headers):
    """POST /v1/completions with a body the typed methods cannot build."""
    return client.post(
        "/completions",
        cast_to=Completion,
        content=content,
        options={"headers": {"Content-Type": content_type, **headers}},
    )


BAD_REQUESTS = {
    # name: (how to send it, code, param)
    "empty_model": (lambda c: c.completions.create(model="", prompt="hi"), "invalid_model", "model"),
    "model_not_a_string": (
        lambda c: c.chat.completions.create(model=QWEN, messages=[], extra_body={"model": 42}),
        "invalid_model",
        "model",
    ),
    "model_with_newline": (
        lambda c: c.completions.create(model="qwen\n", prompt="hi"),
        "invalid_model",
        "model",
    ),
    "model_too_long": (  # maxModelNameBytes is 256
        lambda c: c.completions.create(model="m" * 257, prompt="hi"),
        "invalid_model",
        "model",
    ),
    "missing_model": (
        lambda c: c.post("/completions", cast_to=Completion, body={"prompt": "hi", "max_tokens": 1}),
        "missing_model",
        "model",
    ),
    "duplicate_model": (
        lambda c: _post_raw(c, f'{{"model": "{PHI}", "prompt": "hi", "model": "{QWEN}"}}'.encode()),
        "duplicate_model",
        "model",
    ),
    "invalid_json": (
        lambda c: _post_raw(c, f'{{"model": "{QWEN}", "prompt": '.encode()),
        "invalid_json",
        None,
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_error(client, sdk_backends, case):
    send, code, param = BAD_REQUESTS[case]
    before = totals(sdk_backends)
    with pytest.raises(openai.BadRequestError) as info:
        send(client)
    _assert_filter_error(info.value, 400, code, param=param)
    assert totals(sdk_backends) == before


def test_request_too_large_is_api_status_error(client, sdk_backends):
    """A prompt of 8 MiB (the default maxBodyBytes) makes a body over the limit. The SDK sends it
    with a Content-Length, the filter answers 413 at the headers, and the SDK, which has no class
    for 413, raises APIStatusError itself."""
    before = totals(sdk_backends)
    prompt = "a" * DEFAULT_MAX_BODY
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=QWEN, prompt=prompt, max_tokens=1)
    assert type(info.value) is openai.APIStatusError, type(info.value)
    _assert_filter_error(info.value, 413, "request_too_large")
    assert int(info.value.response.request.headers["content-length"]) > DEFAULT_MAX_BODY
    assert totals(sdk_backends) == before


@pytest.mark.parametrize(
    "content_type, headers",
    [
        ("text/plain", {}),
        ("application/x-www-form-urlencoded", {}),
        ("application/json", {"Content-Encoding": "gzip"}),
    ],
    ids=["text_plain", "form_urlencoded", "gzip_encoding"],
)
def test_unsupported_media_type_is_api_status_error(client, sdk_backends, content_type, headers):
    before = totals(sdk_backends)
    with pytest.raises(openai.APIStatusError) as info:
        _post_raw(client, f'{{"model": "{QWEN}", "prompt": "hi"}}'.encode(), content_type, **headers)
    assert type(info.value) is openai.APIStatusError, type(info.value)
    assert info.value.response.request.headers["content-type"] == content_type
    _assert_filter_error(info.value, 415, "unsupported_media_type")
    assert totals(sdk_backends) == before


def test_async_client_same_behaviour(sdk_envoy):
    """AsyncOpenAI: a routed chat and a typed 404, on the same gateway."""
    import asyncio

    async def run():
        async with openai.AsyncOpenAI(base_url=sdk_envoy.url + "/v1", api_key="unused", max_retries=0) as ac:
            raw = await ac.chat.completions.with_raw_response.create(
                model=LORA, messages=[{"role": "user", "content": "x"}], max_tokens=1
            )
            _assert_served_by(raw.headers, LORA)
            assert raw.parse().model == LORA
            with pytest.raises(openai.NotFoundError) as info:
                await ac.completions.create(model="nope", prompt="x")
            _assert_filter_error(info.value, 404, "model_not_found", param="model")

    asyncio.run(run())
