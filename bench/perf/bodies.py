"""The bodies `make bench` posts: chat-completions JSON of exact sizes, and the corpus's body
classes (`make corpus`) for BENCH_CLASSES."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from .settings import KiB, MODEL, ROOT, env_list


WORDS = (
    "the model gateway routes each request by the model field of its body while the "
    "prompt carries most of the bytes context window tokens retrieval augmented generation "
    "document section summary answer question customer support ticket invoice contract "
    "clause table figure latency throughput kubernetes cluster replica adapter lora base "
    "weights inference server stream chunk response assistant user system please explain "
    "why how what when where which compare translate rewrite improve concise detailed "
    "example function variable error stack trace log line database query index"
).split()
# A little non-ASCII and a few escapes, as real prompts have: accents, typographic
# punctuation, CJK, and quotes/newlines/tabs/backslashes that JSON escapes.
EXTRAS = ("naïve", "café", "résumé", "Zürich", "—", "“quoted”", "数据", "模型", "→",
          '"as is"', "C:\\temp\\in.txt", "line\nbreak", "tab\there")


def prose(rng: random.Random, nbytes: int) -> str:
    out: list[str] = []
    n = 0
    sentence = 0
    while n < nbytes:
        w = rng.choice(EXTRAS) if rng.random() < 0.03 else rng.choice(WORDS)
        sentence += 1
        if sentence > rng.randint(8, 20):
            w += "." + ("\n\n" if rng.random() < 0.15 else "")
            sentence = 0
        out.append(w)
        n += len(w.encode()) + 1
    return " ".join(out)


def chat_body(size: int, model_position: str, seed: int = 5) -> bytes:
    """A chat-completions request of exactly `size` bytes, `model` first or last.

    A system prompt, then user/assistant turns (more of them as the body grows, each a long
    message), then the sampling parameters. The last user message is padded or trimmed
    (ASCII) to reach the exact size.
    """
    rng = random.Random(seed * 1_000_003 + size)
    turns = max(2, min(2 + size // (16 * KiB), 32))
    fixed = 400  # the rest of the document, roughly
    per_turn = max(16, (size - fixed) // turns)
    messages = [{"role": "system", "content": "You are a helpful assistant. " + prose(rng, min(per_turn, 600))}]
    for i in range(turns - 1):
        role = "user" if i % 2 == 0 else "assistant"
        messages.append({"role": role, "content": prose(rng, per_turn)})
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": prose(rng, 64)})
    params = {"temperature": 0.7, "top_p": 0.95, "max_tokens": 512, "stream": False,
              "stop": ["\n\nUser:"], "user": "bench-client-0001"}

    def encode() -> bytes:
        doc: dict[str, Any] = {}
        if model_position == "first":
            doc["model"] = MODEL
        doc["messages"] = messages
        doc.update(params)
        if model_position == "last":
            doc["model"] = MODEL
        return json.dumps(doc, ensure_ascii=False).encode()

    last = messages[-1]
    body = encode()
    while len(body) > size:  # trim whole characters, then pad back up below
        over = len(body) - size
        last["content"] = last["content"][: max(0, len(last["content"]) - max(1, over))]
        body = encode()
        if not last["content"] and len(body) > size:
            raise SystemExit(f"bench: cannot build a {size}-byte body: the fixed part is larger")
    while len(body) < size:
        last["content"] += "x" * (size - len(body))  # ASCII: one byte each, never escaped
        body = encode()
    assert len(body) == size, (len(body), size)
    doc = json.loads(body)
    assert doc["model"] == MODEL and (list(doc)[0] == "model") == (model_position == "first")
    return body



CORPUS = Path(os.environ.get("BENCH_CORPUS", ROOT / "target" / "corpus"))

CLASS_PREFIX = "class:"

def body_classes() -> list[str]:
    """The classes BENCH_CLASSES asks for, checked against the corpus manifest."""
    wanted = env_list("BENCH_CLASSES", "")
    if not wanted:
        return []
    manifest = CORPUS / "manifest.json"
    if not manifest.is_file():
        raise SystemExit(f"bench: BENCH_CLASSES needs the corpus in {CORPUS}; run `make corpus`")
    known = list(json.loads(manifest.read_text())["classes"])
    if wanted == ["all"]:
        return known
    for c in wanted:
        if c not in known:
            raise SystemExit(f"bench: BENCH_CLASSES: unknown class {c!r}; known: {', '.join(known)}")
    return wanted
