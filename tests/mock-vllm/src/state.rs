//! Shared server state: configuration, the served models (adapters load and unload at run
//! time), and lock-free counters.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
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

/// One served model (the base, or a LoRA adapter) and its counters. Held in an `Arc`, so a
/// request in flight keeps its adapter's counters even if the adapter is unloaded meanwhile.
pub struct Slot {
    pub name: String,
    /// vLLM's `root` in /v1/models: the base model's name, an adapter's path.
    pub root: String,
    /// Inference requests answered 200 (reset by /mock/stats/reset).
    served: AtomicU64,
    /// In-flight inference requests.
    running: AtomicI64,
}

impl Slot {
    fn new(name: String, root: String) -> Arc<Slot> {
        Arc::new(Slot {
            name,
            root,
            served: AtomicU64::new(0),
            running: AtomicI64::new(0),
        })
    }
}

/// Why `load_adapter` / `unload_adapter` refused, with vLLM's status, type and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
}

pub struct State {
    pub id: String,
    pub id_header: HeaderValue,
    base: Arc<Slot>,
    /// LoRA adapters in load order (vLLM lists them so); loaded and unloaded at run time.
    adapters: RwLock<Vec<Arc<Slot>>>,
    pub ttft: Duration,
    pub itl: Duration,
    pub max_model_len: u64,
    total: AtomicU64,
    /// Finished requests by `Finish` (never reset, like a Prometheus counter).
    success: [AtomicU64; 3],
    seq: AtomicU64,
    boot: u64,
    /// The simulated prefix cache and prefill queue (inert unless configured).
    pub engine: Engine,
}

impl State {
    /// `models[0]` is the base model, the rest are adapters served from the start.
    pub fn new(
        id: String,
        models: Vec<String>,
        ttft: Duration,
        itl: Duration,
        max_model_len: u64,
    ) -> Result<State, String> {
        let id_header = HeaderValue::from_str(&id)
            .map_err(|_| format!("id '{id}' is not a valid header value"))?;
        let mut names = models.into_iter();
        let base = names.next().ok_or("no base model")?;
        // The mock has no adapter files: a start-up adapter's root is its own name.
        let adapters = names.map(|n| Slot::new(n.clone(), n)).collect();
        let boot = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Ok(State {
            id,
            id_header,
            base: Slot::new(base.clone(), base),
            adapters: RwLock::new(adapters),
            ttft,
            itl,
            max_model_len,
            total: AtomicU64::new(0),
            success: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            seq: AtomicU64::new(0),
            boot,
            engine: Engine::new(Default::default()),
        })
    }

    /// Replaces the (inert) default engine.
    pub fn with_engine(mut self, engine: Engine) -> State {
        self.engine = engine;
        self
    }

    pub fn base(&self) -> &str {
        &self.base.name
    }

    fn adapters(&self) -> Vec<Arc<Slot>> {
        match self.adapters.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Every served model, base first, then adapters in load order.
    pub fn slots(&self) -> Vec<Arc<Slot>> {
        let mut all = vec![Arc::clone(&self.base)];
        all.extend(self.adapters());
        all
    }

    pub fn lookup(&self, name: &str) -> Option<Arc<Slot>> {
        self.slots().into_iter().find(|s| s.name == name)
    }

    /// vLLM's `POST /v1/load_lora_adapter` (OpenAIServingModels.load_lora_adapter). The mock
    /// has no engine, so any non-empty path loads.
    pub fn load_adapter(
        &self,
        name: &str,
        path: &str,
        load_inplace: bool,
    ) -> Result<String, AdapterError> {
        if name.is_empty() || path.is_empty() {
            return Err(AdapterError {
                status: 400,
                kind: "InvalidUserInput",
                message: "Both 'lora_name' and 'lora_path' must be provided.".into(),
            });
        }
        let mut adapters = match self.adapters.write() {
            Ok(a) => a,
            Err(poisoned) => poisoned.into_inner(),
        };
        let existing = adapters.iter().position(|s| s.name == name);
        // vLLM does not check the base model's name; the mock must, since it looks models
        // up by name (vLLM would serve the base under that name, so it is "loaded" already).
        if (existing.is_some() && !load_inplace) || name == self.base.name {
            return Err(AdapterError {
                status: 400,
                kind: "InvalidUserInput",
                message: format!(
                    "The lora adapter '{name}' has already been loaded. If you want to load the \
                     adapter in place, set 'load_inplace' to True."
                ),
            });
        }
        let slot = Slot::new(name.to_string(), path.to_string());
        match existing {
            Some(i) => adapters[i] = slot,
            None => adapters.push(slot),
        }
        Ok(format!(
            "Success: LoRA adapter '{name}' added successfully."
        ))
    }

    /// vLLM's `POST /v1/unload_lora_adapter`.
    pub fn unload_adapter(&self, name: &str) -> Result<String, AdapterError> {
        if name.is_empty() {
            return Err(AdapterError {
                status: 400,
                kind: "InvalidUserInput",
                message: "'lora_name' needs to be provided to unload a LoRA adapter.".into(),
            });
        }
        let mut adapters = match self.adapters.write() {
            Ok(a) => a,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Some(i) = adapters.iter().position(|s| s.name == name) else {
            return Err(AdapterError {
                status: 404,
                kind: "NotFoundError",
                message: format!("The lora adapter '{name}' cannot be found."),
            });
        };
        adapters.remove(i);
        Ok(format!(
            "Success: LoRA adapter '{name}' removed successfully."
        ))
    }

    /// A request id unique within this process (and very likely across processes).
    pub fn next_request_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{:08x}", self.boot, n)
    }

    /// Counts an inference request answered 200 (called when the response starts).
    pub fn count_served(&self, model: &Slot) {
        model.served.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_finished(&self, f: Finish) {
        self.success[f as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Marks one request of `model` in flight until the guard is dropped.
    pub fn start_inflight(&self, model: &Arc<Slot>) -> InflightGuard {
        model.running.fetch_add(1, Ordering::Relaxed);
        InflightGuard {
            slot: Arc::clone(model),
        }
    }

    pub fn reset_stats(&self) {
        for s in self.slots() {
            s.served.store(0, Ordering::Relaxed);
        }
        self.total.store(0, Ordering::Relaxed);
    }

    /// `{"id": ID, "total": N, "by_model": {"<model>": N}}`; every served model is listed.
    pub fn stats_json(&self) -> Value {
        let mut by_model = Map::new();
        for s in self.slots() {
            by_model.insert(s.name.clone(), json!(s.served.load(Ordering::Relaxed)));
        }
        json!({
            "id": self.id,
            "total": self.total.load(Ordering::Relaxed),
            "by_model": by_model,
        })
    }

    fn inflight_total(&self) -> i64 {
        self.slots()
            .iter()
            .map(|s| s.running.load(Ordering::Relaxed).max(0))
            .sum()
    }

    /// Prometheus text exposition with vLLM's metric names and labels.
    pub fn metrics_text(&self) -> String {
        let (running, waiting) = self.engine.gauges().unwrap_or_else(|| {
            let inflight = self.inflight_total();
            let running = inflight.min(MAX_NUM_SEQS);
            (running, inflight - running)
        });
        // vLLM's KV cache holds the running sequences' blocks: the share of the sequence slots
        // in use stands for it (each sequence's blocks taken as equal).
        let kv = (running as f64 / self.engine.max_num_seqs().max(1) as f64).min(1.0);
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
        let adapters = self.adapters();
        if !adapters.is_empty() {
            // vLLM exports this only when LoRA is enabled; the value is a timestamp.
            let running: Vec<&str> = adapters
                .iter()
                .filter(|s| s.running.load(Ordering::Relaxed) > 0)
                .map(|s| s.name.as_str())
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
                adapters.len(),
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
    slot: Arc<Slot>,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.slot.running.fetch_sub(1, Ordering::Relaxed);
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
        s.count_served(&s.lookup("base").unwrap());
        s.count_served(&s.lookup("sql").unwrap());
        s.count_served(&s.lookup("sql").unwrap());
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
        let g1 = s.start_inflight(&s.lookup("base").unwrap());
        let g2 = s.start_inflight(&s.lookup("sql").unwrap());
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
        let guards: Vec<_> = (0..MAX_NUM_SEQS + 3)
            .map(|_| s.start_inflight(&s.lookup("base").unwrap()))
            .collect();
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
    fn adapters_load_and_unload_like_vllm() {
        let s = state();
        let names = |s: &State| s.slots().iter().map(|x| x.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            s.load_adapter("new", "/adapters/new", false),
            Ok("Success: LoRA adapter 'new' added successfully.".to_string())
        );
        assert_eq!(names(&s), ["base", "sql", "chat", "new"]);
        assert_eq!(s.lookup("new").unwrap().root, "/adapters/new");
        let cases: &[(&str, &str, u16, &str, &str)] = &[
            ("", "/p", 400, "InvalidUserInput", "Both 'lora_name' and 'lora_path' must be provided."),
            ("x", "", 400, "InvalidUserInput", "Both 'lora_name' and 'lora_path' must be provided."),
            ("new", "/p", 400, "InvalidUserInput", "The lora adapter 'new' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True."),
            ("base", "/p", 400, "InvalidUserInput", "The lora adapter 'base' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True."),
        ];
        for (name, path, status, kind, message) in cases {
            let e = s.load_adapter(name, path, false).unwrap_err();
            assert_eq!(
                (e.status, e.kind, e.message.as_str()),
                (*status, *kind, *message)
            );
        }
        // In place: same position, new path.
        assert!(s.load_adapter("new", "/v2", true).is_ok());
        assert_eq!(s.lookup("new").unwrap().root, "/v2");
        assert_eq!(
            s.unload_adapter("sql"),
            Ok("Success: LoRA adapter 'sql' removed successfully.".to_string())
        );
        assert_eq!(names(&s), ["base", "chat", "new"]);
        let e = s.unload_adapter("sql").unwrap_err();
        assert_eq!(
            (e.status, e.kind, e.message.as_str()),
            (
                404,
                "NotFoundError",
                "The lora adapter 'sql' cannot be found."
            )
        );
        let e = s.unload_adapter("").unwrap_err();
        assert_eq!((e.status, e.kind), (400, "InvalidUserInput"));
        let e = s.unload_adapter("base").unwrap_err();
        assert_eq!(e.status, 404);
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
