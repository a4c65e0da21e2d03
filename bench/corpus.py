"""The body-class corpus: chat-completions bodies of the kinds real LLM traffic carries.

    python bench/corpus.py OUT_DIR [--size 1M] [--seed-size 4K]

Writes OUT_DIR/<class>.json (one body of exactly --size bytes per class, `model` last),
OUT_DIR/seeds/<class>.json (a --seed-size body per class, for the fuzzers and the differential
tests) and OUT_DIR/manifest.json (where each class's text comes from, and per class the
non-ASCII characters, backslash escapes and quotes per KiB). `make corpus` runs it into
target/corpus; `make bench-scan`, `make bench-core`, the differential tests and the fuzz smoke
run read it. Nothing it writes is committed: it is rebuilt from pinned sources.

Where the text comes from (real text written by people, never only generated words):
- Django 5.2.19 (PyPI wheel, pinned by version and sha256 below): the human translations in its
  gettext catalogues (`msgstr`, 13 catalogues per language: core and contrib apps) for French,
  German, Spanish, Russian, Chinese (zh_Hans), Japanese and Arabic; its admin JavaScript, HTML
  templates and CSS as source code; its English `msgid`s as English UI text.
- The seeds in ../shared/seeds (llm-d deployment guides in Markdown: real English with code
  blocks, YAML, quotes) and the Python documentation that ships with the interpreter
  (`pydoc_data.topics`, the language reference as prose) as English prose.
- The Python standard library (the interpreter running this script, whose version goes into the
  manifest) as real code: source files, and functions' signatures and docstrings for the tool
  definitions of the tool-use class.
What is generated: the order in which these texts are put together (seeded, deterministic), the
emoji sprinkled into the emoji chat (taken from the Unicode data the interpreter ships), and the
pixels of the base64 PNG (a valid PNG of noise: base64 of any bytes has the same alphabet).

Every class is built deterministically: the same sources give byte-identical bodies.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import inspect
import json
import os
import random
import re
import struct
import subprocess
import sys
import sysconfig
import unicodedata
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
MODEL = "Qwen/Qwen2.5-3B-Instruct"
KiB = 1024
MiB = 1024 * KiB

DJANGO_VERSION = "5.2.19"
DJANGO_WHEEL = f"django-{DJANGO_VERSION}-py3-none-any.whl"
DJANGO_SHA256 = "5965d974a5218a2b68a11dd1276434707f23886525c23f0598eccedaf4f4ca00"
LANGS = {"fr": "fr", "de": "de", "es": "es", "ru": "ru", "zh": "zh_Hans", "ja": "ja", "ar": "ar"}
SEEDS = Path(os.environ.get("BBR_SEEDS", ROOT.parent / "shared" / "seeds"))

# The classes, in the order they are printed. The first is the one the targets call English.
CLASSES = ["en", "fr", "de", "es", "ru", "zh", "ja", "ar", "emoji", "tool-use", "code", "image",
           "multi-turn", "ru-ascii-escaped"]
DESCRIPTIONS = {
    "en": "English prose: the seeds' Markdown guides and the Python language reference",
    "fr": "French: Django's French translations",
    "de": "German: Django's German translations",
    "es": "Spanish: Django's Spanish translations",
    "ru": "Russian: Django's Russian translations",
    "zh": "Chinese (simplified): Django's zh_Hans translations",
    "ja": "Japanese: Django's Japanese translations",
    "ar": "Arabic: Django's Arabic translations",
    "emoji": "English chat from the seeds with emoji, skin tones, ZWJ sequences and flags",
    "tool-use": "tool definitions (JSON schemas from stdlib signatures and docstrings), "
                "assistant tool_calls with JSON-string arguments, tool results as JSON strings",
    "code": "source code: Python standard library, Django's JavaScript, HTML templates and CSS",
    "image": "a user message with a base64 PNG data URL (about 750 KiB) and a question",
    "multi-turn": "a long conversation: many short turns of English, code and other languages",
    "ru-ascii-escaped": "Russian as Python's json.dumps sends it by default (ensure_ascii: "
                        "every Cyrillic letter a \\uXXXX escape)",
}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KM]?)", text.strip().upper())
    if not m:
        raise SystemExit(f"corpus: bad size {text!r} (e.g. 4K, 1M)")
    return int(m.group(1)) * {"": 1, "K": KiB, "M": MiB}[m.group(2)]


# ---------------------------------------------------------------------------------------------
# Sources


def django_wheel(cache: Path) -> zipfile.ZipFile:
    """The pinned Django wheel, downloaded once into `cache` by pip and checked by sha256."""
    path = cache / DJANGO_WHEEL
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != DJANGO_SHA256:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--no-deps", "--only-binary=:all:", "--dest", str(cache), f"django=={DJANGO_VERSION}"]
        if subprocess.run(cmd).returncode != 0 or not path.is_file():
            raise SystemExit(f"corpus: could not download {DJANGO_WHEEL} (is PyPI reachable?)")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != DJANGO_SHA256:
            path.unlink()
            raise SystemExit(f"corpus: {DJANGO_WHEEL} has sha256 {digest}, expected {DJANGO_SHA256}")
    return zipfile.ZipFile(path)


PO_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


def unescape_po(s: str) -> str:
    return s.replace('\\"', '"').replace("\\n", "\n").replace("\\t", "\t").replace("\\\\", "\\")


def translations(wheel: zipfile.ZipFile, lang: str) -> list[str]:
    """Every translated message of one language in Django's catalogues, in catalogue order."""
    out = []
    for name in sorted(wheel.namelist()):
        if f"/locale/{lang}/LC_MESSAGES/" in name and name.endswith(".po"):
            text = wheel.read(name).decode("utf-8")
            for _msgid, msgstr in po_entries_raw(text):
                out.append(unescape_po(msgstr))
    return out


def po_entries_raw(text: str) -> list[tuple[str, str]]:
    """(msgid, msgstr) as written in the catalogue (escapes kept; see `unescape_po`)."""
    entries: list[tuple[str, str]] = []
    msgid: str | None = None
    msgstr = ""
    field = None
    for line in text.splitlines() + ['msgid ""']:
        line = line.strip()
        if line.startswith("msgid "):
            if msgid and msgstr:
                entries.append((msgid, msgstr))
            msgid, msgstr, field = "", "", "id"
            line = line[len("msgid "):]
        elif line.startswith(("msgstr ", "msgstr[0] ")):
            field = "str"
            line = line.split(" ", 1)[1]
        elif not line.startswith('"'):
            field = None if not line.startswith("#") and line else field
            continue
        for m in PO_STRING.finditer(line):
            if field == "id":
                msgid = (msgid or "") + m.group(1)
            elif field == "str":
                msgstr += m.group(1)
    return entries


def english_ui(wheel: zipfile.ZipFile) -> list[str]:
    """Django's English source messages (the msgids of its French catalogues)."""
    out = []
    for name in sorted(wheel.namelist()):
        if "/locale/fr/LC_MESSAGES/" in name and name.endswith(".po"):
            out += [unescape_po(i) for i, _ in po_entries_raw(wheel.read(name).decode("utf-8"))]
    return out


def seed_paragraphs() -> list[str]:
    files = sorted(SEEDS.glob("*.txt")) if SEEDS.is_dir() else []
    if not files:
        raise SystemExit(f"corpus: no seeds in {SEEDS} (set BBR_SEEDS to the seeds folder)")
    paras = []
    for f in files:
        paras += [p.strip() for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return paras


def python_docs() -> list[str]:
    """The Python language reference as shipped with the interpreter (pydoc_data.topics)."""
    from pydoc_data.topics import topics
    paras = []
    for key in sorted(topics):
        paras += [p.strip() for p in topics[key].split("\n\n") if p.strip()]
    return paras


STDLIB = Path(sysconfig.get_paths()["stdlib"])
STDLIB_MODULES = ["json/decoder.py", "json/encoder.py", "http/client.py", "email/message.py",
                  "asyncio/base_events.py", "asyncio/streams.py", "argparse.py", "pathlib.py",
                  "subprocess.py", "logging/__init__.py", "urllib/parse.py", "shutil.py",
                  "tarfile.py", "zipfile.py", "textwrap.py", "difflib.py", "csv.py",
                  "dataclasses.py", "functools.py", "collections/__init__.py", "typing.py",
                  "statistics.py", "fractions.py", "decimal.py", "heapq.py", "bisect.py"]


def stdlib_sources() -> list[tuple[str, str]]:
    out = []
    for rel in STDLIB_MODULES:
        p = STDLIB / rel
        if p.is_file():
            out.append((f"Lib/{rel}", p.read_text(encoding="utf-8")))
    if not out:
        raise SystemExit(f"corpus: no standard library sources under {STDLIB}")
    return out


def django_sources(wheel: zipfile.ZipFile) -> list[tuple[str, str]]:
    """Django's own JavaScript (not the vendored minified libraries), templates and CSS."""
    out = []
    for name in sorted(wheel.namelist()):
        if "/vendor/" in name or name.endswith(".min.js"):
            continue
        if name.endswith((".js", ".html", ".css")):
            out.append((name, wheel.read(name).decode("utf-8")))
    return out


# ---------------------------------------------------------------------------------------------
# Bodies


def encode(doc: dict[str, Any], ascii_only: bool = False) -> bytes:
    # json.dumps with ensure_ascii=False and ", "/": " separators: what the OpenAI Python SDK
    # (via httpx) and most clients send, raw UTF-8 for every language.
    return json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8")


def request(messages: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"messages": messages}
    doc.update(extra or {})
    doc.update({"temperature": 0.7, "max_tokens": 1024, "stream": False, "model": MODEL})
    return doc


def fill(make_messages: Callable[[random.Random], list[dict[str, Any]]], pad: Callable[[random.Random], str],
         size: int, seed: int, extra: dict[str, Any] | None = None, ascii_only: bool = False) -> bytes:
    """A body of exactly `size` bytes: the messages `make_messages` yields until the body would
    pass `size`, then a last user message of `pad` text, trimmed by characters and padded with
    spaces to the exact size."""
    rng = random.Random(seed)
    messages: list[dict[str, Any]] = []
    tail: dict[str, Any] = {"role": "user", "content": ""}
    while True:
        batch = make_messages(rng)
        if len(encode(request(messages + batch + [tail], extra), ascii_only)) > size:
            break
        messages += batch
    messages.append(tail)
    text = ""
    while len(encode(request(messages, extra), ascii_only)) < size:
        text += pad(rng) + "\n\n"
        tail["content"] = text
    # Trim whole characters until it fits, then pad with spaces to the exact size.
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        tail["content"] = text[:mid]
        if len(encode(request(messages, extra), ascii_only)) <= size:
            lo = mid
        else:
            hi = mid - 1
    tail["content"] = text[:lo]
    body = encode(request(messages, extra), ascii_only)
    tail["content"] += " " * (size - len(body))
    body = encode(request(messages, extra), ascii_only)
    if len(body) != size:
        raise SystemExit(f"corpus: built {len(body)} bytes instead of {size}")
    return body


def paragraphs_of(sentences: list[str], rng: random.Random, target: int) -> str:
    """Sentences taken in a shuffled run from a random start, joined into ~target characters."""
    out, n = [], 0
    i = rng.randrange(len(sentences))
    step = 1 if rng.random() < 0.5 else -1
    while n < target:
        s = sentences[i % len(sentences)].strip()
        i += step if rng.random() < 0.9 else rng.randrange(len(sentences))
        if not s:
            continue
        out.append(s)
        n += len(s) + 1
        if rng.random() < 0.12:
            out.append("\n\n")
    return " ".join(out).replace(" \n\n ", "\n\n")


def prose_class(sentences: list[str], system: str) -> Callable[[random.Random], list[dict[str, Any]]]:
    first = [True]

    def make(rng: random.Random) -> list[dict[str, Any]]:
        msgs = []
        if first[0]:
            first[0] = False
            msgs.append({"role": "system", "content": system})
        msgs.append({"role": "user", "content": paragraphs_of(sentences, rng, rng.randrange(300, 4000))})
        msgs.append({"role": "assistant", "content": paragraphs_of(sentences, rng, rng.randrange(800, 12000))})
        return msgs
    return make


def emoji_pool() -> list[str]:
    singles = [chr(c) for r in [(0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF),
                                (0x1F900, 0x1F9FF), (0x2600, 0x26FF)]
               for c in range(*r) if unicodedata.category(chr(c)) == "So" and unicodedata.name(chr(c), "")]
    zwj = ["\U0001F469\u200D\U0001F4BB", "\U0001F468\u200D\U0001F469\u200D\U0001F467",
           "\U0001F3F3\uFE0F\u200D\U0001F308", "\u2764\uFE0F\u200D\U0001F525"]
    tones = [e + chr(t) for e in ["\U0001F44D", "\U0001F44B", "\U0001F64F", "\U0001F44F"]
             for t in range(0x1F3FB, 0x1F400)]
    flags = [chr(0x1F1E6 + ord(a) - 65) + chr(0x1F1E6 + ord(b) - 65)
             for a, b in ["FR", "DE", "ES", "JP", "CN", "US", "BR", "IN", "EG", "UA"]]
    return singles + zwj * 8 + tones + flags * 4


def emoji_text(sentences: list[str], pool: list[str], rng: random.Random, target: int) -> str:
    words = paragraphs_of(sentences, rng, target).split(" ")
    out = []
    for w in words:
        out.append(w)
        if rng.random() < 0.3:
            out.append("".join(rng.choice(pool) for _ in range(rng.choice([1, 1, 1, 2, 3]))))
    return " ".join(out)


def json_type(annotation: Any, default: Any) -> str:
    for t, name in [(bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                    (list, "array"), (dict, "object")]:
        if annotation is t or (default is not inspect.Parameter.empty and type(default) is t):
            return name
    return "string"


def stdlib_tools() -> list[dict[str, Any]]:
    """Tool definitions for public stdlib functions: name, docstring, a JSON schema of the
    parameters (types from annotations and defaults)."""
    import difflib, json as json_mod, os.path, shutil, statistics, textwrap, urllib.parse
    tools = []
    for mod in [os.path, shutil, textwrap, difflib, statistics, urllib.parse, json_mod]:
        for name, fn in sorted(vars(mod).items()):
            if name.startswith("_") or not inspect.isfunction(fn) or not fn.__doc__:
                continue
            try:
                sig = inspect.signature(fn)
            except (TypeError, ValueError):
                continue
            props, required = {}, []
            for p in sig.parameters.values():
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                props[p.name] = {"type": json_type(p.annotation, p.default),
                                 "description": f"The `{p.name}` argument of {mod.__name__}.{name}."}
                if p.default is not inspect.Parameter.empty and isinstance(p.default, (int, float, str, bool)):
                    props[p.name]["default"] = p.default
                if p.default is inspect.Parameter.empty:
                    required.append(p.name)
            tools.append({"type": "function", "function": {
                "name": f"{mod.__name__.replace('.', '_')}_{name}",
                "description": inspect.cleandoc(fn.__doc__),
                "parameters": {"type": "object", "properties": props, "required": required,
                               "additionalProperties": False}}})
    return tools


def tool_use_class(wheel: zipfile.ZipFile, sources: list[tuple[str, str]], english: list[str], size: int):
    # As many tool definitions as fit in a sixth of the body (about 60 at 1 MiB; agents send
    # dozens), the rest is the conversation.
    tools: list[dict[str, Any]] = []
    for tool in stdlib_tools():
        if len(json.dumps(tools + [tool])) > size // 6:
            break
        tools.append(tool)
    records = []  # real data for tool results: Django's catalogue entries
    for lang in ["fr", "de", "ja"]:
        for name in sorted(wheel.namelist()):
            if f"/locale/{lang}/LC_MESSAGES/" in name and name.endswith(".po"):
                for i, s in po_entries_raw(wheel.read(name).decode("utf-8")):
                    records.append({"catalogue": name, "language": lang, "msgid": unescape_po(i),
                                    "msgstr": unescape_po(s), "fuzzy": False})
    counter = [0]

    def make(rng: random.Random) -> list[dict[str, Any]]:
        msgs: list[dict[str, Any]] = [{"role": "user", "content": paragraphs_of(english, rng, rng.randrange(100, 600))}]
        calls = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            counter[0] += 1
            tool = rng.choice(tools)["function"]
            args = {k: (rng.choice(english)[:80] if v["type"] == "string" else
                        rng.randrange(0, 500) if v["type"] == "integer" else
                        rng.random() if v["type"] == "number" else rng.random() < 0.5 if v["type"] == "boolean" else
                        [rng.randrange(100) for _ in range(5)])
                    for k, v in tool["parameters"]["properties"].items()}
            calls.append({"id": f"call_{counter[0]:08x}", "type": "function",
                          "function": {"name": tool["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
        msgs.append({"role": "assistant", "content": None, "tool_calls": calls})
        for c in calls:
            kind = rng.random()
            if kind < 0.6:
                start = rng.randrange(len(records))
                result: Any = {"status": "ok", "count": 0, "items": records[start:start + rng.randrange(3, 40)]}
                result["count"] = len(result["items"])
            else:
                path, src = rng.choice(sources)
                lines = src.splitlines()
                a = rng.randrange(len(lines))
                result = {"path": path, "start_line": a + 1, "lines": lines[a:a + rng.randrange(10, 80)]}
            msgs.append({"role": "tool", "tool_call_id": c["id"], "content": json.dumps(result, ensure_ascii=False)})
        msgs.append({"role": "assistant", "content": paragraphs_of(english, rng, rng.randrange(200, 1200))})
        return msgs
    return make, {"tools": tools, "tool_choice": "auto"}


def code_class(sources: list[tuple[str, str]], english: list[str]):
    def make(rng: random.Random) -> list[dict[str, Any]]:
        path, src = rng.choice(sources)
        lines = src.splitlines()
        a = rng.randrange(max(1, len(lines) - 40))
        snippet = "\n".join(lines[a:a + rng.randrange(40, 400)])
        lang = {"py": "python", "js": "javascript", "html": "html", "css": "css"}[path.rsplit(".", 1)[1]]
        return [{"role": "user", "content": f"Here is `{path}`:\n\n```{lang}\n{snippet}\n```\n\n"
                 + paragraphs_of(english, rng, rng.randrange(60, 300))},
                {"role": "assistant", "content": paragraphs_of(english, rng, rng.randrange(100, 600))
                 + f"\n\n```{lang}\n" + "\n".join(lines[a:a + rng.randrange(5, 60)]) + "\n```"}]
    return make


def png_noise(width: int, height: int, seed: int) -> bytes:
    """A valid RGB PNG of seeded noise (noise does not compress, so it is ~3 bytes a pixel)."""
    rng = random.Random(seed)
    raw = b"".join(b"\x00" + rng.randbytes(width * 3) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def image_body(size: int, english: list[str], seed: int) -> bytes:
    rng = random.Random(seed)
    question = paragraphs_of(english, rng, 400)
    doc = request([{"role": "user", "content": [{"type": "text", "text": question},
                                                {"type": "image_url", "image_url": {"url": ""}}]}])
    room = size - len(encode(doc)) - len("data:image/png;base64,")
    # The largest square noise PNG whose base64 fits, then the question padded to the exact size.
    side = int(((room * 3 // 4) / 3) ** 0.5) + 1
    while True:
        png = png_noise(side, side, seed)
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        if len(url) <= room or side <= 1:
            break
        side -= 1
    doc["messages"][0]["content"][1]["image_url"]["url"] = url
    doc["messages"][0]["content"][0]["text"] += " " * (size - len(encode(doc)))
    body = encode(doc)
    if len(body) != size:
        raise SystemExit(f"corpus: image body is {len(body)} bytes, not {size}")
    return body


def multi_turn_class(english: list[str], others: list[list[str]], sources: list[tuple[str, str]]):
    def make(rng: random.Random) -> list[dict[str, Any]]:
        msgs = []
        for _ in range(10):
            pick = rng.random()
            if pick < 0.6:
                text = paragraphs_of(english, rng, rng.randrange(20, 700))
            elif pick < 0.8:
                text = paragraphs_of(rng.choice(others), rng, rng.randrange(20, 400))
            else:
                path, src = rng.choice(sources)
                lines = src.splitlines()
                a = rng.randrange(len(lines))
                text = "Why does this fail?\n```\n" + "\n".join(lines[a:a + rng.randrange(3, 30)]) + "\n```"
            msgs.append({"role": "user", "content": text})
            msgs.append({"role": "assistant", "content": paragraphs_of(english, rng, rng.randrange(50, 1500))})
        return msgs
    return make


def stats(body: bytes) -> dict[str, float]:
    text = body.decode("utf-8")
    kib = len(body) / KiB
    return {"bytes": len(body),
            "non_ascii_chars_per_kib": round(sum(1 for c in text if ord(c) > 127) / kib, 1),
            "escapes_per_kib": round(len(re.findall(rb"\\.", body)) / kib, 1),
            "quotes_per_kib": round(body.count(b'"') / kib, 1)}


def build(size: int, cache: Path) -> dict[str, bytes]:
    wheel = django_wheel(cache)
    english = seed_paragraphs() + python_docs()
    ui_english = english_ui(wheel)
    langs = {cls: translations(wheel, lang) for cls, lang in LANGS.items()}
    py = stdlib_sources()
    dj = django_sources(wheel)
    system = "You are a helpful assistant. Answer in the language of the question."
    bodies: dict[str, bytes] = {}
    seed = 1
    for cls in CLASSES:
        seed += 1
        if cls == "en":
            bodies[cls] = fill(prose_class(english, system), lambda r: paragraphs_of(english, r, 2000), size, seed)
        elif cls in LANGS:
            t = langs[cls]
            bodies[cls] = fill(prose_class(t, system), lambda r, t=t: paragraphs_of(t, r, 2000), size, seed)
        elif cls == "ru-ascii-escaped":
            t = langs["ru"]
            bodies[cls] = fill(prose_class(t, system), lambda r: paragraphs_of(t, r, 2000), size, seed,
                               ascii_only=True)
        elif cls == "emoji":
            pool = emoji_pool()
            chat = english + ui_english

            def make_emoji(r: random.Random) -> list[dict[str, Any]]:
                return [{"role": "user", "content": emoji_text(chat, pool, r, r.randrange(40, 400))},
                        {"role": "assistant", "content": emoji_text(chat, pool, r, r.randrange(100, 900))}]
            bodies[cls] = fill(make_emoji, lambda r: emoji_text(chat, pool, r, 500), size, seed)
        elif cls == "tool-use":
            make, extra = tool_use_class(wheel, py + dj, english, size)
            bodies[cls] = fill(make, lambda r: paragraphs_of(english, r, 500), size, seed, extra)
        elif cls == "code":
            bodies[cls] = fill(code_class(py + dj, english), lambda r: paragraphs_of(english, r, 500), size, seed)
        elif cls == "image":
            bodies[cls] = image_body(size, english, seed)
        elif cls == "multi-turn":
            make = multi_turn_class(english, list(langs.values()), py + dj)
            bodies[cls] = fill(make, lambda r: paragraphs_of(english, r, 300), size, seed)
    for cls, body in bodies.items():
        doc = json.loads(body)
        if doc.get("model") != MODEL:
            raise SystemExit(f"corpus: the {cls} body lost its model")
    return bodies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", default="1M")
    ap.add_argument("--seed-size", default="4K")
    ap.add_argument("--cache", type=Path, default=ROOT / "target" / "corpus-cache")
    args = ap.parse_args()
    size, seed_size = parse_size(args.size), parse_size(args.seed_size)
    bodies = build(size, args.cache)
    seeds = build(seed_size, args.cache)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seeds").mkdir(exist_ok=True)
    manifest: dict[str, Any] = {"size": size, "seed_size": seed_size, "model": MODEL,
                                "sources": {"django": f"{DJANGO_WHEEL} sha256:{DJANGO_SHA256}",
                                            "python": sys.version.split()[0],
                                            "seeds": sorted(p.name for p in SEEDS.glob("*.txt"))},
                                "classes": {}}
    for cls in CLASSES:
        (args.out / f"{cls}.json").write_bytes(bodies[cls])
        (args.out / "seeds" / f"{cls}.json").write_bytes(seeds[cls])
        manifest["classes"][cls] = {"description": DESCRIPTIONS[cls], **stats(bodies[cls]),
                                    "sha256": hashlib.sha256(bodies[cls]).hexdigest()}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(f"corpus: {len(CLASSES)} classes of {size} bytes in {args.out}")
    print(f"{'class':>18}  {'non-ASCII/KiB':>13}  {'escapes/KiB':>11}  {'quotes/KiB':>10}")
    for cls in CLASSES:
        s = manifest["classes"][cls]
        print(f"{cls:>18}  {s['non_ascii_chars_per_kib']:13.1f}  {s['escapes_per_kib']:11.1f}  {s['quotes_per_kib']:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
