"""make bench-scan: the core's JSON scanner timed inside V8 (Node), per body class.

Builds nothing itself (the Makefile builds bench/scan-harness for wasm32-wasip1 with +simd128,
as the filter is built, and the body-class corpus with bench/corpus.py into target/corpus).
Runs the harness under Node's V8 on two sets of bodies, interleaved in one run, and prints GB/s
per body:
- the body classes of the corpus (1 MiB each: English, French, German, Spanish, Russian,
  Chinese, Japanese and Arabic prose, emoji chat, tool use, code, a base64 image, a long
  conversation, Russian as \\u escapes), with the real-text targets printed met / not met;
- the chat-completions bodies `make bench` sends (model first and last, 1 KiB to 4 MiB), a CJK
  body and a multipart audio upload.
Quick (about a minute) and repeatable, for comparing scanner changes.

A/B: BENCH_SCAN_ALT=/path/other/bbr-scan-bench.wasm runs that build too, alternating with this
one in BENCH_SCAN_ROUNDS rounds (default 4) of the same bodies, and prints per class the median
of the per-round ratios (this build's speed / the other's): side by side in one run, which on a
shared machine is the only comparison worth making.

Environment: BENCH_SIZES (default 1K,16K,256K,1M,4M), BENCH_SCAN_REPS (default 30),
BENCH_CORPUS (default target/corpus), BENCH_SCAN_ALT, BENCH_SCAN_ROUNDS, BENCH_NODE (the Node.js to
run: the Makefile's default is Node.js 26.12.1, whose V8 14.6 is the one Envoy 1.40 embeds).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf.bodies import chat_body  # noqa: E402
from perf.settings import MODEL, ROOT, MiB, env_list, parse_size, size_label  # noqa: E402

HARNESS = ROOT / "target" / "wasm32-wasip1" / "release" / "bbr-scan-bench.wasm"
RUNNER = ROOT / "bench" / "scan" / "run.mjs"
CORPUS = Path(os.environ.get("BENCH_CORPUS", ROOT / "target" / "corpus"))

# The real-text targets for the body classes in V8 (1 MiB bodies).
TARGET_EVERY_CLASS = 3.0  # GB/s, every class
TARGET_SPREAD = 0.5  # the slowest class at least this fraction of the fastest
TARGET_ENGLISH = 5.0  # GB/s, English prose


CJK_WORDS = ("数据", "模型", "推理", "服务", "集群", "请求", "路由", "上下文", "。", "，", "日本語の",
             "テキスト", "を", "要約", "してください", "「引用」", "、")


def cjk_body(size: int) -> bytes:
    """A chat-completions body of about `size` bytes whose messages are CJK text."""
    rng = random.Random(11)
    turns = []
    for n in range(8):
        words, length = [], 0
        while length < size // 8 - 64:
            w = rng.choice(CJK_WORDS)
            words.append(w)
            length += len(w.encode())
        turns.append({"role": "user" if n % 2 == 0 else "assistant", "content": "".join(words)})
    return json.dumps({"messages": turns, "max_tokens": 512, "model": MODEL}, ensure_ascii=False).encode()


def audio_body(size: int) -> bytes:
    """A /v1/audio/transcriptions upload: a file part of `size` random bytes, then `model`."""
    boundary = "bench-scan-boundary-7d3f"
    audio = random.Random(13).randbytes(size)
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + audio + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{MODEL}"
            f"\r\n--{boundary}--\r\n").encode()


def v8_of(node: str) -> str:
    """The V8 version of a Node.js binary (what decides the scanner's speed: docs/body-classes.md)."""
    return subprocess.run([node, "-p", "process.versions.v8"], capture_output=True, text=True).stdout.strip()


def run_harness(node: str, harness: Path, reps: int, files: list[str]) -> dict[str, dict]:
    out = subprocess.run([node, "--no-warnings", str(RUNNER), str(harness), str(reps), *files],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"bench-scan: harness {harness} failed ({out.returncode}):\n{out.stderr}")
    results = {}
    for line in out.stdout.splitlines():
        r = json.loads(line)
        if not r["found"]:
            raise SystemExit(f"bench-scan: {harness.name} did not find the model in {r['file']}")
        results[r["file"]] = r
    return results


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def corpus_classes() -> list[tuple[str, Path]]:
    manifest = CORPUS / "manifest.json"
    if not manifest.is_file():
        raise SystemExit(f"bench-scan: no corpus in {CORPUS}; run `make corpus`")
    classes = json.loads(manifest.read_text())["classes"]
    return [(cls, CORPUS / f"{cls}.json") for cls in classes]


# A class whose 16-byte blocks nearly all hold non-ASCII bytes: there UTF-8 validation alone is a
# bound on any validating scanner's speed.
NON_ASCII_BOUND_SHARE = 0.95


def non_ascii_block_share(body: bytes) -> float:
    """The share of the body's 16-byte blocks that hold a byte from 0x80 up."""
    blocks = [body[i:i + 16] for i in range(0, len(body) - 15, 16)]
    return sum(1 for b in blocks if max(b) >= 0x80) / max(1, len(blocks))


def print_classes(classes: list[tuple[str, Path]], results: dict[str, dict]) -> None:
    manifest = json.loads((CORPUS / "manifest.json").read_text())["classes"]
    print(f"Body classes ({CORPUS.relative_to(ROOT) if CORPUS.is_relative_to(ROOT) else CORPUS}, "
          f"1 MiB each, model last), median (best):")
    print(f"{'class':>18}  {'non-ASCII/KiB':>13}  {'escapes/KiB':>11}  {'GB/s':>12}  {'ms per MiB':>8}"
          f"  {'UTF-8 alone':>11}  {'string floor':>12}  {'scan/floor':>10}  {'non-ASCII blocks':>16}")
    speeds = {}
    ceilings = {}
    for cls, path in classes:
        r = results[str(path)]
        gbps = r["bytes"] / r["median_ns"]
        speeds[cls] = gbps
        alone = r["bytes"] / r["utf8_median_ns"]
        floor = r["bytes"] / r["floor_median_ns"]
        ceilings[cls] = (alone, floor, non_ascii_block_share(path.read_bytes()))
        m = manifest[cls]
        print(f"{cls:>18}  {m['non_ascii_chars_per_kib']:13.1f}  {m['escapes_per_kib']:11.1f}  "
              f"{gbps:6.2f} ({r['bytes'] / r['best_ns']:5.2f})  {r['median_ns'] / 1e6 * MiB / r['bytes']:8.3f}"
              f"  {alone:11.2f}  {floor:12.2f}  {gbps / floor:9.2f}x  {ceilings[cls][2]:15.0%}")
    slowest = min(speeds, key=speeds.get)
    fastest = max(speeds, key=speeds.get)
    spread = speeds[slowest] / speeds[fastest]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT MET"
    print("Real-text targets (V8, 1 MiB):")
    print(f"  every class >= {TARGET_EVERY_CLASS} GB/s: slowest {slowest} {speeds[slowest]:.2f} GB/s"
          f"  -> {verdict(speeds[slowest] >= TARGET_EVERY_CLASS)}")
    print(f"  slowest >= {TARGET_SPREAD}x fastest: {slowest} / {fastest} = {spread:.2f}x"
          f"  -> {verdict(spread >= TARGET_SPREAD)}")
    # Not the target, printed beside it: the base64 image is one long ASCII run, which the
    # scanner skips at about ten times the speed of any text, so the spread over the text
    # classes alone says more about how the cost follows content.
    text = {c: v for c, v in speeds.items() if c != "image"}
    if "image" in speeds and len(text) > 1:
        t_slow, t_fast = min(text, key=text.get), max(text, key=text.get)
        print(f"  (not the target) the same over the text classes, image left out: {t_slow} / {t_fast}"
              f" = {text[t_slow] / text[t_fast]:.2f}x")
    en = speeds.get("en", 0.0)
    print(f"  English prose >= {TARGET_ENGLISH} GB/s: {en:.2f} GB/s  -> {verdict(en >= TARGET_ENGLISH)}")
    # The ceilings (docs/body-classes.md): where nearly every 16-byte block holds non-ASCII
    # bytes, no validating scanner can skip the UTF-8 check on any of them, so UTF-8
    # validation alone bounds its speed, and the string floor (that plus finding the
    # unescaped quotes) bounds it closer, with these vector instructions and the best known
    # algorithm. Against the fastest class, that bounds the spread.
    bound = {c: (a, f) for c, (a, f, share) in ceilings.items() if share >= NON_ASCII_BOUND_SHARE}
    if bound:
        c = max(bound, key=lambda k: bound[k][1])
        print(f"  ceilings on the classes with non-ASCII in >= {NON_ASCII_BOUND_SHARE:.0%} of 16-byte blocks "
              f"({', '.join(sorted(bound))}): UTF-8 alone {max(a for a, _ in bound.values()):.2f} GB/s, "
              f"string floor {bound[c][1]:.2f} GB/s at best ({c});")
        print(f"           so the spread against {fastest} ({speeds[fastest]:.2f} GB/s) cannot pass "
              f"{bound[c][1] / speeds[fastest]:.2f}x")


def main() -> int:
    # The Makefile sets BENCH_NODE to the Node.js with Envoy's V8 (scripts/bench-deps.sh
    # --node-v8); BENCH_NODE=node runs the machine's own, to compare V8 versions.
    node = shutil.which(os.environ.get("BENCH_NODE") or "node")
    if not node:
        raise SystemExit("bench-scan: node not found (BENCH_NODE, or Debian: apt-get install nodejs)")
    if not HARNESS.is_file():
        raise SystemExit(f"bench-scan: {HARNESS.relative_to(ROOT)} is missing; run `make bench-scan`")
    sizes = [parse_size(s) for s in env_list("BENCH_SIZES", "1K,16K,256K,1M,4M")]
    reps = int(os.environ.get("BENCH_SCAN_REPS", "30"))
    alt = os.environ.get("BENCH_SCAN_ALT")
    classes = corpus_classes()
    with tempfile.TemporaryDirectory(prefix="bench-scan-") as tmp:
        files = {}
        for pos in ("first", "last"):
            for size in sizes:
                p = Path(tmp) / f"chat-{pos}-{size}.json"
                p.write_bytes(chat_body(size, pos))
                files[str(p)] = (pos, size)
        # Besides the bench's bodies (English prose, a few accents and CJK words): a 1 MiB chat
        # body in Chinese and Japanese, where nearly every byte is part of a 3-byte character.
        cjk = Path(tmp) / "chat-cjk.json"
        cjk.write_bytes(cjk_body(MiB))
        files[str(cjk)] = ("last", "cjk")
        # And a 4 MiB audio upload (multipart/form-data, random bytes as the file, `model` last),
        # which the filter reads with the multipart scanner.
        audio = Path(tmp) / "audio.multipart"
        audio.write_bytes(audio_body(4 * MiB))
        files[str(audio)] = ("last", "audio")
        paths = [str(p) for _, p in classes] + list(files)
        if alt:
            return ab(node, Path(alt), reps, classes, paths)
        results = run_harness(node, HARNESS, reps, paths)
    node_version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"Scanners in V8 {v8_of(node)} (node {node_version}; Envoy 1.40 embeds V8 14.6), 64 KiB windows, "
          f"{reps} repetitions, interleaved")
    print_classes(classes, results)
    print()
    print("make bench's bodies (English prose with a few accents and escapes), median (best):")
    print(f"{'body':>14}  {'model':>5}  {'GB/s':>12}  {'ms per MiB':>16}  {'with prefix capture':>20}")
    total_bytes = total_ns = total_capture_ns = 0
    for path, (pos, size) in files.items():
        r = results[path]
        gbps = r["bytes"] / r["median_ns"]
        ms_mib = r["median_ns"] / 1e6 * (1 << 20) / r["bytes"]
        label = {"cjk": "1 MiB CJK", "audio": "4 MiB audio"}.get(size) or size_label(size)
        capture_ratio = r["median_ns"] / r["capture_median_ns"]
        print(f"{label:>14}  {pos:>5}  {gbps:6.2f} ({r['bytes'] / r['best_ns']:4.2f})  "
              f"{ms_mib:7.3f} ({r['best_ns'] / 1e6 * (1 << 20) / r['bytes']:6.3f})  "
              f"{r['bytes'] / r['capture_median_ns']:6.2f} GB/s {capture_ratio:5.3f}x")
        if isinstance(size, int):  # "all" is over the bench's bodies, as make bench reports it
            total_bytes += r["bytes"]
            total_ns += r["median_ns"]
            total_capture_ns += r["capture_median_ns"]
    print(f"{'all':>14}  {'':>5}  {total_bytes / total_ns:6.2f}        "
          f"{total_ns / 1e6 * (1 << 20) / total_bytes:7.3f}   (target: >= 4 GB/s, <= 0.25 ms per MiB)")
    capture_ratio = total_ns / total_capture_ns
    print(f"prefix capture (prefixAffinity on, 2 KiB budget), same rounds: {total_bytes / total_capture_ns:.2f} GB/s, "
          f"{capture_ratio:.3f}x of the scanner alone: "
          f"{'met' if capture_ratio >= 0.95 else 'NOT MET'} (target: within 5 %)")
    return 0


def ab(node: str, alt: Path, reps: int, classes: list[tuple[str, Path]], paths: list[str]) -> int:
    """This build and `alt`, alternating round by round; per body the median of the ratios."""
    if not alt.is_file():
        raise SystemExit(f"bench-scan: BENCH_SCAN_ALT={alt} is not a file")
    rounds = int(os.environ.get("BENCH_SCAN_ROUNDS", "4"))
    per_round = max(3, reps // rounds)
    ratios: dict[str, list[float]] = {p: [] for p in paths}
    speeds: dict[str, dict[str, list[float]]] = {"this": {p: [] for p in paths}, "alt": {p: [] for p in paths}}
    for n in range(rounds):
        # Alternate which build goes first, so neither always runs on a warmer machine.
        order = [("this", HARNESS), ("alt", alt)] if n % 2 == 0 else [("alt", alt), ("this", HARNESS)]
        got = {name: run_harness(node, h, per_round, paths) for name, h in order}
        for p in paths:
            a = got["this"][p]["bytes"] / got["this"][p]["median_ns"]
            b = got["alt"][p]["bytes"] / got["alt"][p]["median_ns"]
            speeds["this"][p].append(a)
            speeds["alt"][p].append(b)
            ratios[p].append(a / b)
    print(f"A/B in V8 {v8_of(node)}: this build ({HARNESS.relative_to(ROOT)}) vs BENCH_SCAN_ALT ({alt}), "
          f"{rounds} alternating rounds of {per_round} interleaved repetitions; GB/s medians over rounds")
    print(f"{'body':>18}  {'this GB/s':>9}  {'alt GB/s':>8}  {'this/alt':>8}  (per-round ratios)")
    names = {str(p): cls for cls, p in classes}
    for p in paths:
        label = names.get(p, Path(p).name)
        print(f"{label:>18}  {median(speeds['this'][p]):9.2f}  {median(speeds['alt'][p]):8.2f}  "
              f"{median(ratios[p]):7.2f}x  ({', '.join(f'{r:.2f}' for r in ratios[p])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
