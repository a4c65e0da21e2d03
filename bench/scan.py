"""make bench-scan: the core's JSON scanner timed inside V8 (Node), on the bodies of make bench.

Builds nothing itself (the Makefile builds bench/scan-harness for wasm32-wasip1 with +simd128,
as the filter is built), writes the chat-completions bodies `make bench` sends (model first and
last, 1 KiB to 4 MiB), runs the harness under Node's V8 and prints GB/s per body. Quick (under
a minute) and repeatable, for comparing scanner changes; the figure checked against issue 5's
target is the one `make bench` reads from the filter inside Envoy.

Environment: BENCH_SIZES (default 1K,16K,256K,1M,4M), BENCH_SCAN_REPS (default 30).
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
from run import MODEL, ROOT, MiB, chat_body, env_list, parse_size, size_label  # noqa: E402

HARNESS = ROOT / "target" / "wasm32-wasip1" / "release" / "bbr-scan-bench.wasm"
RUNNER = ROOT / "bench" / "scan" / "run.mjs"


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


def main() -> int:
    node = shutil.which("node")
    if not node:
        raise SystemExit("bench-scan: node not found (Debian: apt-get install nodejs)")
    if not HARNESS.is_file():
        raise SystemExit(f"bench-scan: {HARNESS.relative_to(ROOT)} is missing; run `make bench-scan`")
    sizes = [parse_size(s) for s in env_list("BENCH_SIZES", "1K,16K,256K,1M,4M")]
    reps = int(os.environ.get("BENCH_SCAN_REPS", "30"))
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
        out = subprocess.run([node, "--no-warnings", str(RUNNER), str(HARNESS), str(reps), *files],
                             capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise SystemExit(f"bench-scan: harness failed ({out.returncode}):\n{out.stderr}")
    print(f"Scanners in V8 (node {subprocess.run([node, '--version'], capture_output=True, text=True).stdout.strip()}), "
          f"64 KiB windows, {reps} repetitions, median (best):")
    print(f"{'body':>14}  {'model':>5}  {'GB/s':>12}  {'ms per MiB':>16}  {'with prefix capture':>20}")
    total_bytes = total_ns = total_capture_ns = 0
    for line in out.stdout.splitlines():
        r = json.loads(line)
        pos, size = files[r["file"]]
        if not r["found"]:
            raise SystemExit(f"bench-scan: the scanner did not find the model in the {pos} {size} body")
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
          f"{total_ns / 1e6 * (1 << 20) / total_bytes:7.3f}   (issue 5 wants >= 4 GB/s, <= 0.25 ms per MiB)")
    capture_ratio = total_ns / total_capture_ns
    print(f"prefix capture (prefixAffinity on, 2 KiB budget), same rounds: {total_bytes / total_capture_ns:.2f} GB/s, "
          f"{capture_ratio:.3f}x of the scanner alone: "
          f"{'met' if capture_ratio >= 0.95 else 'NOT MET'} (issue 15: within 5 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
