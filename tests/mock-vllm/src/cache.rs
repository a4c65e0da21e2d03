//! Simulated automatic prefix caching (vLLM's APC) and a one-prefill-at-a-time engine, so
//! that routing benchmarks measure something real: where a prompt lands decides whether its
//! prefix is already cached, and a replica that gets too much traffic queues.
//!
//! The model, and where it departs from vLLM:
//! - Tokens are approximated as 4 bytes of prompt text (no tokenizer). A prompt of n bytes has
//!   ceil(n / 4) tokens; a block is `block_tokens` tokens (vLLM's default block size is 16).
//! - The prompt is captured as the gateway's prefix key captures it: completions `prompt`
//!   (a string, or the first element of an array when it is a string); chat: for each message,
//!   its role, "\n", its text content (a string, or the concatenated `text` of
//!   `{"type":"text"}` parts; other parts such as images are skipped), "\n".
//! - Full blocks are chain-hashed like vLLM's block hashes: h0 = xxh64(model name, seed 0),
//!   h(i) = xxh64(h(i-1) as 8 little-endian bytes ++ block bytes, seed 0). A partial last block
//!   is never cached (vLLM caches full blocks only).
//! - The cache is an LRU of block hashes with a capacity in blocks. A request hits the longest
//!   run of its leading blocks that are cached; vLLM always recomputes at least the last
//!   prompt token, so hits are at most prompt tokens - 1. After its prefill every full block of
//!   the prompt is cached, the prompt's first block as the most recently used (vLLM frees a
//!   request's blocks tail first, so a prefix outlives its tail). Blocks held by running
//!   requests are not pinned, unlike vLLM's: the cache and the running batch do not compete.
//! - Timing (only with a prefill rate): a request waits for one of `max_num_seqs` sequence
//!   slots, then for the replica's single prefill slot (FIFO), prefills its uncached tokens at
//!   `prefill_tokens_per_s`, frees the prefill slot and decodes in parallel with the others at
//!   the fixed inter-token latency (vLLM's decode step slows as the batch grows; this one does
//!   not, and there is no chunked prefill mixing prefill into decode steps).
//! - Counters with vLLM's names: `vllm:prefix_cache_queries_total` (prompt tokens looked up)
//!   and `vllm:prefix_cache_hits_total` (of those, tokens found cached).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use xxhash_rust::xxh64::xxh64;

use crate::openai::Endpoint;

/// Prompt bytes per simulated token.
pub const BYTES_PER_TOKEN: u64 = 4;

// ---------------------------------------------------------------------------
// Pure parts: capture, hashing, the LRU

/// The prompt text as the model server would see it (see the module comment), or `None` when
/// the body has none (no `prompt`/`messages`, token-id prompts, not JSON).
pub fn capture_prompt(ep: Endpoint, body: &[u8]) -> Option<Vec<u8>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    match ep {
        Endpoint::Completions => match v.get("prompt")? {
            Value::String(s) => Some(s.as_bytes().to_vec()),
            Value::Array(a) => a.first()?.as_str().map(|s| s.as_bytes().to_vec()),
            _ => None,
        },
        Endpoint::Chat => {
            let msgs = v.get("messages")?.as_array()?;
            let mut out = Vec::new();
            for m in msgs {
                if let Some(role) = m.get("role").and_then(Value::as_str) {
                    out.extend_from_slice(role.as_bytes());
                }
                out.push(b'\n');
                match m.get("content") {
                    Some(Value::String(s)) => out.extend_from_slice(s.as_bytes()),
                    Some(Value::Array(parts)) => {
                        for p in parts {
                            if p.get("type").and_then(Value::as_str) == Some("text") {
                                if let Some(t) = p.get("text").and_then(Value::as_str) {
                                    out.extend_from_slice(t.as_bytes());
                                }
                            }
                        }
                    }
                    _ => {}
                }
                out.push(b'\n');
            }
            Some(out)
        }
    }
}

/// Simulated prompt tokens of `bytes` bytes of text.
pub fn prompt_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(BYTES_PER_TOKEN)
}

/// The chained hash of every full `block_bytes` block of `prompt`, seeded with the model name.
pub fn block_hashes(model: &str, prompt: &[u8], block_bytes: usize) -> Vec<u64> {
    if block_bytes == 0 {
        return Vec::new();
    }
    let mut h = xxh64(model.as_bytes(), 0);
    let mut buf = Vec::with_capacity(8 + block_bytes);
    prompt
        .chunks_exact(block_bytes)
        .map(|block| {
            buf.clear();
            buf.extend_from_slice(&h.to_le_bytes());
            buf.extend_from_slice(block);
            h = xxh64(&buf, 0);
            h
        })
        .collect()
}

/// An LRU set of block hashes holding at most `capacity` blocks (0: caches nothing).
#[derive(Debug, Default)]
pub struct Lru {
    capacity: usize,
    tick: u64,
    /// hash -> last use.
    stamp: HashMap<u64, u64>,
    /// last use -> hash, oldest first.
    order: BTreeMap<u64, u64>,
}

impl Lru {
    pub fn new(capacity: usize) -> Lru {
        Lru {
            capacity,
            ..Lru::default()
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.stamp.len()
    }

    pub fn clear(&mut self) {
        self.stamp.clear();
        self.order.clear();
    }

    /// How many of the leading `hashes` are cached (a block counts only if all before it do:
    /// its hash chains over them).
    pub fn cached_prefix(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.stamp.contains_key(h))
            .count()
    }

    /// Caches `hashes` (one prompt's blocks, in order): the first becomes the most recently
    /// used, so eviction takes a prompt's tail before its prefix. Evicts the least recently
    /// used past the capacity.
    pub fn insert(&mut self, hashes: &[u64]) {
        if self.capacity == 0 {
            return;
        }
        for &h in hashes.iter().rev() {
            self.tick += 1;
            if let Some(old) = self.stamp.insert(h, self.tick) {
                self.order.remove(&old);
            }
            self.order.insert(self.tick, h);
        }
        while self.stamp.len() > self.capacity {
            let Some((_, h)) = self.order.pop_first() else {
                break;
            };
            self.stamp.remove(&h);
        }
    }
}

/// Tokens a prompt of `tokens` tokens finds cached when `cached_blocks` leading blocks of
/// `block_tokens` are: at most `tokens - 1` (the last token is always recomputed).
pub fn hit_tokens(tokens: u64, cached_blocks: usize, block_tokens: u64) -> u64 {
    (cached_blocks as u64)
        .saturating_mul(block_tokens)
        .min(tokens.saturating_sub(1))
}

/// Time to prefill `tokens` uncached tokens at `rate` tokens/s (zero when there is no rate).
pub fn prefill_time(tokens: u64, rate: u64) -> Duration {
    if rate == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(tokens as f64 / rate as f64)
}

// ---------------------------------------------------------------------------
// The engine: counters, gauges, and the prefill slot

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Tokens per cached block.
    pub block_tokens: u64,
    /// LRU capacity in blocks (0: no prefix caching).
    pub cache_blocks: usize,
    /// Prefill rate; 0 turns the timing model off (no queueing, TTFT is --ttft-ms alone).
    pub prefill_tokens_per_s: u64,
    /// Sequences running at once (prefilling or decoding) under the timing model.
    pub max_num_seqs: usize,
    /// `--max-num-seqs` was given: requests queue for a slot even without a prefill rate.
    pub queue: bool,
    /// Requests kept in the engine from outside the gateway (`--background-load`), each
    /// holding a sequence slot for `background_ms`, then replaced by the next.
    pub background: usize,
    pub background_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_tokens: 16,
            cache_blocks: 0,
            prefill_tokens_per_s: 0,
            max_num_seqs: 256,
            queue: false,
            background: 0,
            background_ms: 1000,
        }
    }
}

pub struct Engine {
    cfg: EngineConfig,
    lru: Mutex<Lru>,
    prefill: tokio::sync::Mutex<()>,
    seqs: Arc<Semaphore>,
    queries: AtomicU64,
    hits: AtomicU64,
    waiting: Arc<AtomicI64>,
    running: Arc<AtomicI64>,
}

/// One gauge counted up while this lives.
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    fn up(g: &Arc<AtomicI64>) -> Gauge {
        g.fetch_add(1, Ordering::Relaxed);
        Gauge(Arc::clone(g))
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request past its prefill: holds its sequence slot (and the running gauge) until dropped,
/// i.e. until its response is complete or abandoned.
pub struct Admitted {
    /// Read by the tests only; the counters carry it to /metrics.
    #[cfg_attr(not(test), allow(dead_code))]
    pub prompt_tokens: u64,
    pub hit_tokens: u64,
    _seq: Option<OwnedSemaphorePermit>,
    _running: Option<Gauge>,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Engine {
        Engine {
            cfg,
            lru: Mutex::new(Lru::new(cfg.cache_blocks)),
            prefill: tokio::sync::Mutex::new(()),
            seqs: Arc::new(Semaphore::new(cfg.max_num_seqs.max(1))),
            queries: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            waiting: Arc::new(AtomicI64::new(0)),
            running: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Whether requests queue for a sequence slot: with a prefill rate, background load, or an
    /// explicit `--max-num-seqs` (then a prefill takes no time).
    pub fn timed(&self) -> bool {
        self.cfg.prefill_tokens_per_s > 0 || self.cfg.background > 0 || self.cfg.queue
    }

    /// Sequences that run at once.
    pub fn max_num_seqs(&self) -> usize {
        self.cfg.max_num_seqs
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, Lru> {
        // A panic while holding it cannot leave the LRU half-updated in a harmful way.
        self.lru.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Empties the cache (vLLM's POST /reset_prefix_cache). Counters keep counting.
    pub fn reset_cache(&self) {
        self.lru().clear();
    }

    /// Looks the prompt up, counts it, and returns (prompt tokens, hit tokens, its blocks).
    fn lookup(&self, model: &str, prompt: &[u8]) -> (u64, u64, Vec<u64>) {
        let block_bytes = (self.cfg.block_tokens * BYTES_PER_TOKEN) as usize;
        let hashes = block_hashes(model, prompt, block_bytes);
        let tokens = prompt_tokens(prompt.len());
        let cached = self.lru().cached_prefix(&hashes);
        let hit = hit_tokens(tokens, cached, self.cfg.block_tokens);
        self.queries.fetch_add(tokens, Ordering::Relaxed);
        self.hits.fetch_add(hit, Ordering::Relaxed);
        (tokens, hit, hashes)
    }

    /// Admits one request: under the timing model it queues for a sequence slot and the
    /// prefill slot, then prefills its uncached tokens; without it, it only updates the cache.
    /// Dropping the future (the client left) releases whatever it holds.
    pub async fn admit(&self, model: &str, prompt: Option<&[u8]>) -> Admitted {
        let prompt = prompt.unwrap_or_default();
        if !self.timed() {
            let (tokens, hit, hashes) = self.lookup(model, prompt);
            self.lru().insert(&hashes);
            return Admitted {
                prompt_tokens: tokens,
                hit_tokens: hit,
                _seq: None,
                _running: None,
            };
        }
        let waiting = Gauge::up(&self.waiting);
        // The semaphore is never closed, so this cannot fail; if it did, run unslotted.
        let seq = Arc::clone(&self.seqs).acquire_owned().await.ok();
        let slot = self.prefill.lock().await;
        drop(waiting);
        let running = Gauge::up(&self.running);
        let (tokens, hit, hashes) = self.lookup(model, prompt);
        let t = prefill_time(tokens - hit, self.cfg.prefill_tokens_per_s);
        if !t.is_zero() {
            tokio::time::sleep(t).await;
        }
        self.lru().insert(&hashes);
        drop(slot);
        Admitted {
            prompt_tokens: tokens,
            hit_tokens: hit,
            _seq: seq,
            _running: Some(running),
        }
    }

    /// (running, waiting) under the timing model; `None` without it.
    pub fn gauges(&self) -> Option<(i64, i64)> {
        self.timed().then(|| {
            (
                self.running.load(Ordering::Relaxed).max(0),
                self.waiting.load(Ordering::Relaxed).max(0),
            )
        })
    }

    /// Blocks cached now.
    #[cfg(test)]
    pub fn cached_blocks(&self) -> usize {
        self.lru().len()
    }

    /// The prefix-cache counters in Prometheus text, with `labels` on each sample.
    pub fn metrics_text(&self, labels: &str) -> String {
        let mut out = String::with_capacity(512);
        let _ = writeln!(
            out,
            "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.\n\
             # TYPE vllm:prefix_cache_queries_total counter\n\
             vllm:prefix_cache_queries_total{{{labels}}} {}.0",
            self.queries.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.\n\
             # TYPE vllm:prefix_cache_hits_total counter\n\
             vllm:prefix_cache_hits_total{{{labels}}} {}.0",
            self.hits.load(Ordering::Relaxed)
        );
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn xxh64_reference_values() {
        // The published XXH64 test values (seed 0): the crate is the hash we think it is.
        assert_eq!(xxh64(b"", 0), 0xef46_db37_51d8_e999);
        assert_eq!(xxh64(b"a", 0), 0xd24e_c4f1_a98c_6e5b);
        assert_eq!(xxh64(b"abc", 0), 0x44bc_2cf5_ad77_0999);
        // Bytes 0..100 (the 32-byte-stripe path), as bench/routing/prefix_key.py computes it.
        let bytes: Vec<u8> = (0..100).collect();
        assert_eq!(xxh64(&bytes, 0), 0x6ac1_e580_3216_6597);
    }

    #[test]
    fn block_chain_matches_an_independent_computation() {
        // Values from bench/routing/prefix_key.py (a pure-Python XXH64), computed for
        // model "m" and the prompt "a" * 600 with 256-byte blocks: 2 full blocks.
        let hs = block_hashes("m", &[b'a'; 600], 256);
        assert_eq!(hs.len(), 2);
        let h0 = xxh64(b"m", 0);
        let mut b1 = h0.to_le_bytes().to_vec();
        b1.extend_from_slice(&[b'a'; 256]);
        assert_eq!(hs[0], xxh64(&b1, 0));
        let mut b2 = hs[0].to_le_bytes().to_vec();
        b2.extend_from_slice(&[b'a'; 256]);
        assert_eq!(hs[1], xxh64(&b2, 0));
        assert_eq!(hs, PY_VECTOR.to_vec());
        // Shorter than a block: no blocks. Another model: other hashes.
        assert!(block_hashes("m", &[b'a'; 255], 256).is_empty());
        assert_ne!(block_hashes("n", &[b'a'; 600], 256), hs);
        assert!(block_hashes("m", b"abc", 0).is_empty());
    }

    /// See block_chain_matches_an_independent_computation.
    const PY_VECTOR: [u64; 2] = [0xef13_7c3f_7869_4c94, 0xafd0_64d2_add4_ceaf];

    #[test]
    fn capture_table() {
        let cases: &[(Endpoint, &str, Option<&str>)] = &[
            (
                Endpoint::Completions,
                r#"{"prompt":"hello"}"#,
                Some("hello"),
            ),
            (
                Endpoint::Completions,
                r#"{"prompt":["first","second"]}"#,
                Some("first"),
            ),
            (Endpoint::Completions, r#"{"prompt":[1,2,3]}"#, None),
            (Endpoint::Completions, r#"{"model":"m"}"#, None),
            (Endpoint::Completions, "not json", None),
            (
                Endpoint::Chat,
                r#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi \"you\""}]}"#,
                Some("system\nbe brief\nuser\nhi \"you\"\n"),
            ),
            (
                Endpoint::Chat,
                r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"b"}]}]}"#,
                Some("user\nab\n"),
            ),
            (
                Endpoint::Chat,
                r#"{"messages":[{"role":"assistant","content":null}]}"#,
                Some("assistant\n\n"),
            ),
            (Endpoint::Chat, r#"{"messages":"x"}"#, None),
        ];
        for (ep, body, want) in cases {
            let got = capture_prompt(*ep, body.as_bytes());
            assert_eq!(
                got.as_deref(),
                want.map(str::as_bytes),
                "{body}: got {:?}",
                got.as_ref()
                    .map(|g| String::from_utf8_lossy(g).into_owned())
            );
        }
    }

    #[test]
    fn tokens_and_hits() {
        assert_eq!(prompt_tokens(0), 0);
        assert_eq!(prompt_tokens(1), 1);
        assert_eq!(prompt_tokens(8), 2);
        assert_eq!(prompt_tokens(9), 3);
        // 3 cached blocks of 16 = 48 tokens, but a fully cached prompt recomputes its last.
        assert_eq!(hit_tokens(100, 3, 16), 48);
        assert_eq!(hit_tokens(48, 3, 16), 47);
        assert_eq!(hit_tokens(0, 0, 16), 0);
        assert_eq!(prefill_time(1000, 10_000), Duration::from_millis(100));
        assert_eq!(prefill_time(1000, 0), Duration::ZERO);
    }

    #[test]
    fn lru_prefix_hits_and_eviction_order() {
        let mut c = Lru::new(4);
        assert_eq!(c.cached_prefix(&[1, 2, 3]), 0);
        c.insert(&[1, 2, 3]);
        assert_eq!(c.len(), 3);
        assert_eq!(c.cached_prefix(&[1, 2, 3, 4]), 3);
        // A block is only a hit when every block before it is.
        assert_eq!(c.cached_prefix(&[9, 2, 3]), 0);
        // Over capacity: the oldest prompt's tail goes first (3), then its middle (2).
        c.insert(&[10, 11]);
        assert_eq!(c.len(), 4);
        assert_eq!(c.cached_prefix(&[1, 2, 3]), 2);
        c.insert(&[12]);
        assert_eq!(c.cached_prefix(&[1, 2, 3]), 1);
        assert_eq!(c.cached_prefix(&[10, 11]), 2);
        // Using a prefix again makes it the newest: 10, 11 are evicted before 1.
        c.insert(&[1]);
        c.insert(&[20, 21]);
        assert_eq!(c.cached_prefix(&[1]), 1);
        assert_eq!(c.cached_prefix(&[10]), 0);
        // A prompt longer than the cache keeps its first blocks.
        c.insert(&[30, 31, 32, 33, 34, 35]);
        assert_eq!(c.cached_prefix(&[30, 31, 32, 33, 34, 35]), 4);
        c.clear();
        assert_eq!(c.len(), 0);
        let mut off = Lru::new(0);
        off.insert(&[1]);
        assert_eq!(off.cached_prefix(&[1]), 0);
    }

    fn engine(cache_blocks: usize, rate: u64, seqs: usize) -> Arc<Engine> {
        Arc::new(Engine::new(EngineConfig {
            block_tokens: 16,
            cache_blocks,
            prefill_tokens_per_s: rate,
            max_num_seqs: seqs,
            ..EngineConfig::default()
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn untimed_counts_hits_and_resets() {
        let e = engine(100, 0, 4);
        let p = vec![b'x'; 64 * 3 + 10]; // 3 full blocks, 51 tokens
        let a = e.admit("m", Some(&p)).await;
        assert_eq!((a.prompt_tokens, a.hit_tokens), (51, 0));
        let a = e.admit("m", Some(&p)).await;
        assert_eq!((a.prompt_tokens, a.hit_tokens), (51, 48));
        // The same text for another model shares nothing.
        let a = e.admit("other", Some(&p)).await;
        assert_eq!(a.hit_tokens, 0);
        let m = e.metrics_text("engine=\"0\"");
        assert!(
            m.contains("vllm:prefix_cache_queries_total{engine=\"0\"} 153.0\n"),
            "{m}"
        );
        assert!(
            m.contains("vllm:prefix_cache_hits_total{engine=\"0\"} 48.0\n"),
            "{m}"
        );
        assert_eq!(e.gauges(), None);
        e.reset_cache();
        assert_eq!(e.cached_blocks(), 0);
        assert_eq!(e.admit("m", Some(&p)).await.hit_tokens, 0);
        assert_eq!(e.admit("m", None).await.prompt_tokens, 0);
    }

    /// Runs `n` admissions of `prompt` at once; returns each one's admission time.
    async fn burst(e: &Arc<Engine>, n: usize, prompt: &[u8]) -> Vec<Duration> {
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..n {
            let e = Arc::clone(e);
            let p = prompt.to_vec();
            tasks.push(tokio::spawn(async move {
                let a = e.admit("m", Some(&p)).await;
                let t = start.elapsed();
                // Hold the sequence slot a while, as a decoding request does.
                tokio::time::sleep(Duration::from_secs(1)).await;
                drop(a);
                t
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn prefill_is_serial_and_uses_the_cache() {
        // 1000 tokens/s; a 400-token prompt (1600 bytes = 25 blocks of 16 tokens).
        let e = engine(1000, 1000, 8);
        let p = vec![b'y'; 1600];
        let t = burst(&e, 3, &p).await;
        // The first prefills all 400 tokens (0.4 s); the next two queue behind it and then hit
        // 399 of 400 tokens: 1 ms each.
        assert_eq!(t[0], Duration::from_millis(400));
        assert_eq!(t[1], Duration::from_millis(401));
        assert_eq!(t[2], Duration::from_millis(402));
        // Without a cache each one pays the whole prefill, one after the other.
        let e = engine(0, 1000, 8);
        let t = burst(&e, 3, &p).await;
        assert_eq!(
            t,
            vec![
                Duration::from_millis(400),
                Duration::from_millis(800),
                Duration::from_millis(1200)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sequence_slots_bound_the_batch_and_gauges_follow() {
        // 2 slots; prompts of 4 bytes (1 token: 1 ms). The third request waits for a slot,
        // which frees when the first finishes decoding (1 s after admission).
        let e = engine(0, 1000, 2);
        let probe = {
            let e = Arc::clone(&e);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                e.gauges()
            })
        };
        let t = burst(&e, 3, b"zzzz").await;
        assert_eq!(t[0], Duration::from_millis(1));
        assert_eq!(t[1], Duration::from_millis(2));
        assert_eq!(t[2], Duration::from_millis(1002));
        // Half a second in: two running (decoding), one waiting.
        assert_eq!(probe.await.unwrap(), Some((2, 1)));
        assert_eq!(e.gauges(), Some((0, 0)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_request_frees_its_place() {
        let e = engine(0, 1000, 1);
        let p = vec![b'q'; 4000]; // 1000 tokens: 1 s of prefill
        let first = {
            let e = Arc::clone(&e);
            let p = p.clone();
            tokio::spawn(async move { e.admit("m", Some(&p)).await.prompt_tokens })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        // A second request queues, then its client goes away.
        let second = {
            let e = Arc::clone(&e);
            let p = p.clone();
            tokio::spawn(async move { e.admit("m", Some(&p)).await.prompt_tokens })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(e.gauges(), Some((1, 1)));
        second.abort();
        let _ = second.await;
        assert_eq!(e.gauges(), Some((1, 0)));
        assert_eq!(first.await.unwrap(), 1000);
        assert_eq!(e.gauges(), Some((0, 0)));
    }
}
