//! Shared server state: immutable configuration plus lock-free counters.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::header::HeaderValue;
use serde_json::{json, Map, Value};

use crate::cache::Engine;

/// vLLM's default `--max-num-seqs`: requests past this many in flight count as waiting.
pub const MAX_NUM_SEQS: i64 = 256;

/// How a finished request ended, as in vLLM's `FinishReason` (label `finished_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop = 0,
    Length = 1,
    Abort = 2,
}

impl Finish {
    pub const ALL: [Finish; 3] = [Finish::Stop, Finish::Length, Finish::Abort];

    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Abort => "abort",
        }
    }
}

pub struct State {
    pub id: String,
    pub id_header: HeaderValue,
    /// Served model names; index 0 is the base model, the rest are LoRA adapters.
    pub models: Vec<String>,
    index: HashMap<String, usize>,
    pub ttft: Duration,
    pub itl: Duration,
    pub max_model_len: u64,
    /// Inference requests answered 200, per model index (reset by /mock/stats/reset).
    served: Vec<AtomicU64>,
    total: AtomicU64,
    /// In-flight inference requests per model index.
    running: Vec<AtomicI64>,
    /// Finished requests by `Finish` (never reset, like a Prometheus counter).
    success: [AtomicU64; 3],
    seq: AtomicU64,
    boot: u64,
    /// The simulated prefix cache and prefill queue (inert unless configured).
    pub engine: Engine,
}

impl State {
    pub fn new(
        id: String,
        models: Vec<String>,
        ttft: Duration,
        itl: Duration,
        max_model_len: u64,
    ) -> Result<State, String> {
        let id_header = HeaderValue::from_str(&id)
            .map_err(|_| format!("id '{id}' is not a valid header value"))?;
        let index = models
            .iter()
            .enumerate()
            .map(|(i, m)| (m.clone(), i))
            .collect();
        let n = models.len();
        let boot = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Ok(State {
            id,
            id_header,
            index,
            ttft,
            itl,
            max_model_len,
            served: (0..n).map(|_| AtomicU64::new(0)).collect(),
            total: AtomicU64::new(0),
            running: (0..n).map(|_| AtomicI64::new(0)).collect(),
            success: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            seq: AtomicU64::new(0),
            boot,
            models,
            engine: Engine::new(Default::default()),
        })
    }

    /// Replaces the (inert) default engine.
    pub fn with_engine(mut self, engine: Engine) -> State {
        self.engine = engine;
        self
    }

    pub fn base(&self) -> &str {
        &self.models[0]
    }

    pub fn model_index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// A request id unique within this process (and very likely across processes).
    pub fn next_request_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{:08x}", self.boot, n)
    }

    /// Counts an inference request answered 200 (called when the response starts).
    pub fn count_served(&self, model: usize) {
        self.served[model].fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_finished(&self, f: Finish) {
        self.success[f as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Marks one request of `model` in flight until the guard is dropped.
    pub fn start_inflight(self: &Arc<Self>, model: usize) -> InflightGuard {
        self.running[model].fetch_add(1, Ordering::Relaxed);
        InflightGuard {
            state: Arc::clone(self),
            model,
        }
    }

    pub fn reset_stats(&self) {
        for c in &self.served {
            c.store(0, Ordering::Relaxed);
        }
        self.total.store(0, Ordering::Relaxed);
    }

    /// `{"id": ID, "total": N, "by_model": {"<model>": N}}`; every served model is listed.
    pub fn stats_json(&self) -> Value {
        let mut by_model = Map::new();
        for (m, c) in self.models.iter().zip(&self.served) {
            by_model.insert(m.clone(), json!(c.load(Ordering::Relaxed)));
        }
        json!({
            "id": self.id,
            "total": self.total.load(Ordering::Relaxed),
            "by_model": by_model,
        })
    }

    fn inflight_total(&self) -> i64 {
        self.running
            .iter()
            .map(|c| c.load(Ordering::Relaxed).max(0))
            .sum()
    }

    /// Prometheus text exposition with vLLM's metric names and labels.
    pub fn metrics_text(&self) -> String {
        let (running, waiting) = self.engine.gauges().unwrap_or_else(|| {
            let inflight = self.inflight_total();
            let running = inflight.min(MAX_NUM_SEQS);
            (running, inflight - running)
        });
        let kv = running as f64 / MAX_NUM_SEQS as f64;
        let labels = format!("model_name=\"{}\",engine=\"0\"", escape_label(self.base()));
        let mut out = String::with_capacity(2048);
        let _ = writeln!(
            out,
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
             # TYPE vllm:num_requests_running gauge\n\
             vllm:num_requests_running{{{labels}}} {}",
            float(running as f64)
        );
        let _ = writeln!(
            out,
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
             # TYPE vllm:num_requests_waiting gauge\n\
             vllm:num_requests_waiting{{{labels}}} {}",
            float(waiting as f64)
        );
        let _ = writeln!(
            out,
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
             # TYPE vllm:kv_cache_usage_perc gauge\n\
             vllm:kv_cache_usage_perc{{{labels}}} {}",
            float(kv)
        );
        let _ = writeln!(
            out,
            "# HELP vllm:request_success_total Count of successfully processed requests.\n\
             # TYPE vllm:request_success_total counter"
        );
        for f in Finish::ALL {
            let _ = writeln!(
                out,
                "vllm:request_success_total{{{labels},finished_reason=\"{}\"}} {}",
                f.as_str(),
                float(self.success[f as usize].load(Ordering::Relaxed) as f64)
            );
        }
        if self.models.len() > 1 {
            // vLLM exports this only when LoRA is enabled; the value is a timestamp.
            let running: Vec<&str> = self.models[1..]
                .iter()
                .zip(&self.running[1..])
                .filter(|(_, c)| c.load(Ordering::Relaxed) > 0)
                .map(|(m, _)| m.as_str())
                .collect();
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            let _ = writeln!(
                out,
                "# HELP vllm:lora_requests_info Running stats on lora requests.\n\
                 # TYPE vllm:lora_requests_info gauge\n\
                 vllm:lora_requests_info{{max_lora=\"{}\",waiting_lora_adapters=\"\",running_lora_adapters=\"{}\"}} {}",
                self.models.len() - 1,
                escape_label(&running.join(",")),
                float(now)
            );
        }
        out.push_str(&self.engine.metrics_text(&labels));
        out
    }
}

/// Decrements the in-flight gauge of one model when dropped.
pub struct InflightGuard {
    state: Arc<State>,
    model: usize,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.state.running[self.model].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Prometheus float formatting as prometheus_client prints it (`3.0`, `0.25`).
fn float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

fn escape_label(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn state() -> Arc<State> {
        Arc::new(
            State::new(
                "b1".into(),
                vec!["base".into(), "sql".into(), "chat".into()],
                Duration::ZERO,
                Duration::ZERO,
                4096,
            )
            .unwrap(),
        )
    }

    #[test]
    fn stats_count_and_reset() {
        let s = state();
        assert_eq!(
            s.stats_json(),
            json!({"id": "b1", "total": 0, "by_model": {"base": 0, "sql": 0, "chat": 0}})
        );
        s.count_served(0);
        s.count_served(1);
        s.count_served(1);
        assert_eq!(
            s.stats_json(),
            json!({"id": "b1", "total": 3, "by_model": {"base": 1, "sql": 2, "chat": 0}})
        );
        s.reset_stats();
        assert_eq!(s.stats_json()["total"], json!(0));
        assert_eq!(s.stats_json()["by_model"]["sql"], json!(0));
    }

    #[test]
    fn metrics_text_shape() {
        let s = state();
        let g1 = s.start_inflight(0);
        let g2 = s.start_inflight(1);
        s.count_finished(Finish::Length);
        let m = s.metrics_text();
        assert!(
            m.contains("# TYPE vllm:num_requests_running gauge\n"),
            "{m}"
        );
        assert!(
            m.contains("vllm:num_requests_running{model_name=\"base\",engine=\"0\"} 2.0\n"),
            "{m}"
        );
        assert!(
            m.contains("vllm:num_requests_waiting{model_name=\"base\",engine=\"0\"} 0.0\n"),
            "{m}"
        );
        assert!(
            m.contains("vllm:kv_cache_usage_perc{model_name=\"base\",engine=\"0\"} 0.0078125\n"),
            "{m}"
        );
        assert!(
            m.contains("# TYPE vllm:request_success_total counter\n"),
            "{m}"
        );
        assert!(m.contains(
            "vllm:request_success_total{model_name=\"base\",engine=\"0\",finished_reason=\"length\"} 1.0\n"
        ));
        assert!(m.contains(
            "vllm:request_success_total{model_name=\"base\",engine=\"0\",finished_reason=\"stop\"} 0.0\n"
        ));
        assert!(
            m.contains("max_lora=\"2\",waiting_lora_adapters=\"\",running_lora_adapters=\"sql\"}"),
            "{m}"
        );
        drop(g1);
        drop(g2);
        let m = s.metrics_text();
        assert!(
            m.contains("vllm:num_requests_running{model_name=\"base\",engine=\"0\"} 0.0\n"),
            "{m}"
        );
        assert!(m.contains("running_lora_adapters=\"\"}"), "{m}");
    }

    #[test]
    fn waiting_past_max_num_seqs() {
        let s = state();
        let guards: Vec<_> = (0..MAX_NUM_SEQS + 3).map(|_| s.start_inflight(0)).collect();
        let m = s.metrics_text();
        assert!(
            m.contains("vllm:num_requests_running{model_name=\"base\",engine=\"0\"} 256.0\n"),
            "{m}"
        );
        assert!(
            m.contains("vllm:num_requests_waiting{model_name=\"base\",engine=\"0\"} 3.0\n"),
            "{m}"
        );
        assert!(
            m.contains("vllm:kv_cache_usage_perc{model_name=\"base\",engine=\"0\"} 1.0\n"),
            "{m}"
        );
        drop(guards);
    }

    #[test]
    fn request_ids_unique() {
        let s = state();
        assert_ne!(s.next_request_id(), s.next_request_id());
    }

    #[test]
    fn label_escaping_and_floats() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(float(3.0), "3.0");
        assert_eq!(float(0.5), "0.5");
    }
}
