"""Where the scanner spends its time inside V8, instruction by instruction.

Runs bench/scan's harness on one body under `perf record` with Node's --print-wasm-code, then
maps every sample's address to the wasm function V8 compiled there (the printed code carries
absolute addresses) and prints the functions by samples and the hottest instructions of one
of them. A machine-code view is what the scanner's changes were judged on: V8 rebuilding
vector constants from immediates inside a loop, or spilling them, is visible only here
(docs/body-classes.md).

    make bench-scan                     # builds the harness and fetches Node with Envoy's V8
    python3 bench/scan/profile.py target/corpus/zh.json [--reps 300] [--function ModelScanner4feed]

Needs `perf` (Debian: linux-perf). Only samples of Node's main thread are counted; "other" is
code outside the wasm module (the harness's copies, Node itself).
"""
from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "target" / "wasm32-wasip1" / "release" / "bbr-scan-bench.wasm"
RUNNER = ROOT / "bench" / "scan" / "run.mjs"


def node_with_envoys_v8() -> str:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "bench-deps.sh"), "--node-v8"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def functions(dump: str) -> list[tuple[int, int, str, str, str]]:
    """(start, end, name, compiler, text) of every function in --print-wasm-code's output."""
    out = []
    for section in dump.split("--- WebAssembly code ---"):
        name = re.search(r"^name: (\S+)", section, re.M)
        compiler = re.search(r"^compiler: (\S+)", section, re.M)
        addresses = re.findall(r"^0x([0-9a-f]+)\s", section, re.M)
        if name and addresses:
            out.append((int(addresses[0], 16), int(addresses[-1], 16) + 16, name.group(1),
                        compiler.group(1) if compiler else "?", section))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("body", help="a body file, e.g. target/corpus/zh.json")
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--function", default="ModelScanner4feed",
                        help="part of the mangled name of the function to show instructions of")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    if not shutil.which("perf"):
        raise SystemExit("profile: perf not found (Debian: apt-get install linux-perf)")
    if not HARNESS.is_file():
        raise SystemExit("profile: no harness; run `make bench-scan` first")
    node = node_with_envoys_v8()
    body = str(Path(args.body).resolve())
    with tempfile.TemporaryDirectory(prefix="scan-profile-") as tmp:
        data = Path(tmp) / "perf.data"
        with open(Path(tmp) / "code.txt", "w") as code:
            subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4999", "-o", str(data), "--",
                            node, "--no-warnings", "--print-wasm-code", str(RUNNER), str(HARNESS),
                            str(args.reps), body], stdout=code, stderr=subprocess.DEVNULL, check=True)
        dump = (Path(tmp) / "code.txt").read_text(errors="replace")
        script = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,ip"],
                                capture_output=True, text=True, check=True).stdout
    samples = collections.Counter()
    for line in script.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "node-MainThread":
            samples[int(parts[1], 16)] += 1
    funcs = functions(dump)
    by_function: collections.Counter = collections.Counter()
    by_address: collections.Counter = collections.Counter()
    for address, n in samples.items():
        for start, end, name, compiler, _ in funcs:
            if start <= address < end:
                by_function[(name, compiler)] += n
                by_address[address] += n
                break
        else:
            by_function[("other", "")] += n
    total = sum(samples.values())
    print(f"{total} samples of Node's main thread, V8 code printed for {len(funcs)} functions")
    for (name, compiler), n in by_function.most_common(12):
        print(f"{n:7d} {n / max(1, total):6.1%}  {compiler:9} {name[:100]}")
    for start, end, name, compiler, text in funcs:
        if args.function in name and compiler.startswith("Turbo"):
            rows = []
            for line in text.splitlines():
                m = re.match(r"^0x([0-9a-f]+)\s", line)
                if m:
                    rows.append((by_address.get(int(m.group(1), 16), 0), line[:120]))
            print(f"\nhottest instructions of {name} ({compiler}):")
            for n, line in sorted(rows, key=lambda r: -r[0])[:args.top]:
                print(f"{n:6d} {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
