//! A server's own report of its load, read from its Prometheus `/metrics` page push-style:
//! [`MetricsReader::feed`] each chunk as it comes, then [`MetricsReader::finish`]. Memory is
//! bounded whatever the page: one line of at most [`MAX_LINE_BYTES`] is held, and the whole
//! page is refused past its cap.
//!
//! Three gauges, by name (built in: vLLM's and llama-server's; others configurable):
//! - waiting: requests queued for a sequence slot (`vllm:num_requests_waiting`,
//!   `llamacpp:requests_deferred`);
//! - running: requests in the running batch (`vllm:num_requests_running`,
//!   `llamacpp:requests_processing`);
//! - KV-cache usage, 0..1 (`vllm:kv_cache_usage_perc`, `llamacpp:kv_cache_usage_ratio`).
//!
//! Several series of one name (vLLM's data-parallel engines, one per `engine` label) add up
//! for the counts; the KV usage is their largest. A page without the waiting and running
//! gauges is no report: the picker falls back to its in-flight counts for that server.

use super::hosts::ServerLoad;

/// Built-in names of the waiting gauge.
pub const WAITING_NAMES: [&str; 2] = ["vllm:num_requests_waiting", "llamacpp:requests_deferred"];
/// Built-in names of the running gauge.
pub const RUNNING_NAMES: [&str; 2] = ["vllm:num_requests_running", "llamacpp:requests_processing"];
/// Built-in names of the KV-cache usage gauge (0..1).
pub const KV_NAMES: [&str; 2] = ["vllm:kv_cache_usage_perc", "llamacpp:kv_cache_usage_ratio"];
/// Longest line kept: a longer one is skipped, or refused if it is one of the gauges.
pub const MAX_LINE_BYTES: usize = 4096;
/// Default for `prefixAffinity.picker.serverMetrics.maxBytes`: a vLLM page is 20-60 KiB
/// (its histograms), llama-server's about 2 KiB.
pub const DEFAULT_METRICS_MAX_BYTES: usize = 256 * 1024;
/// Largest `prefixAffinity.picker.serverMetrics.maxBytes`.
pub const MAX_METRICS_MAX_BYTES: usize = 16 << 20;
/// Default for `prefixAffinity.picker.serverMetrics.intervalMs`: llm-d's endpoint picker
/// scrapes every 50 ms; 100 ms halves the calls and stays well below a request's time.
pub const DEFAULT_METRICS_INTERVAL_MS: u64 = 100;
/// Bounds of `prefixAffinity.picker.serverMetrics.intervalMs`.
pub const MIN_METRICS_INTERVAL_MS: u64 = 20;
pub const MAX_METRICS_INTERVAL_MS: u64 = 10_000;
/// Default for `prefixAffinity.picker.serverMetrics.timeoutMs`.
pub const DEFAULT_METRICS_TIMEOUT_MS: u64 = 500;
/// Default for `prefixAffinity.picker.serverMetrics.path`.
pub const DEFAULT_METRICS_PATH: &str = "/metrics";

/// The gauges' names (`prefixAffinity.picker.serverMetrics`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricNames {
    pub waiting: Vec<String>,
    pub running: Vec<String>,
    pub kv_usage: Vec<String>,
}

impl Default for MetricNames {
    fn default() -> Self {
        let own = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        MetricNames {
            waiting: own(&WAITING_NAMES),
            running: own(&RUNNING_NAMES),
            kv_usage: own(&KV_NAMES),
        }
    }
}

/// Where and how the servers' metrics are read (`prefixAffinity.picker.serverMetrics`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSource {
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub max_bytes: usize,
    pub names: MetricNames,
}

impl MetricsSource {
    /// A report older than this is not used (the picker falls back to in-flight counts).
    pub fn stale_ms(&self) -> u64 {
        (3 * self.interval_ms).max(self.interval_ms + self.timeout_ms)
    }
}

/// Why a page gave no report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadError {
    /// Past the page's cap.
    TooLarge,
    /// A gauge's line that does not parse (or is too long).
    Garbage,
    /// No waiting or no running gauge on the page.
    Missing,
}

impl LoadError {
    pub fn label(self) -> &'static str {
        match self {
            LoadError::TooLarge => "too_large",
            LoadError::Garbage => "garbage",
            LoadError::Missing => "missing",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Gauge {
    Waiting,
    Running,
    Kv,
}

/// Reads one `/metrics` page.
#[derive(Debug, Clone)]
pub struct MetricsReader<'a> {
    names: &'a MetricNames,
    cap: usize,
    seen: usize,
    line: Vec<u8>,
    /// The current line passed MAX_LINE_BYTES.
    long: bool,
    waiting: Option<f64>,
    running: Option<f64>,
    kv: Option<f64>,
    error: Option<LoadError>,
}

impl<'a> MetricsReader<'a> {
    pub fn new(names: &'a MetricNames, cap: usize) -> Self {
        MetricsReader {
            names,
            cap,
            seen: 0,
            line: Vec::new(),
            long: false,
            waiting: None,
            running: None,
            kv: None,
            error: None,
        }
    }

    /// The next bytes of the page. Stops reading at the first error (it is kept for finish).
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.error.is_some() {
            return;
        }
        self.seen = self.seen.saturating_add(chunk.len());
        if self.seen > self.cap {
            self.error = Some(LoadError::TooLarge);
            return;
        }
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = rest.split_at(nl);
            self.push(head);
            self.end_line();
            rest = tail.get(1..).unwrap_or(&[]);
            if self.error.is_some() {
                return;
            }
        }
        self.push(rest);
    }

    /// The report, once the page has ended.
    pub fn finish(mut self) -> Result<ServerLoad, LoadError> {
        if self.error.is_none() && (!self.line.is_empty() || self.long) {
            self.end_line();
        }
        if let Some(e) = self.error {
            return Err(e);
        }
        let (Some(waiting), Some(running)) = (self.waiting, self.running) else {
            return Err(LoadError::Missing);
        };
        let count = |v: f64| v.clamp(0.0, f64::from(u32::MAX)) as u32;
        Ok(ServerLoad {
            waiting: count(waiting),
            running: count(running),
            kv_milli: self.kv.map(|k| (k.clamp(0.0, 1.0) * 1000.0).round() as u16),
        })
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.long {
            return;
        }
        if self.line.len() + bytes.len() > MAX_LINE_BYTES {
            // Keep the start: enough to tell whether the line is one of ours.
            let room = MAX_LINE_BYTES.saturating_sub(self.line.len());
            self.line
                .extend_from_slice(bytes.get(..room).unwrap_or(bytes));
            self.long = true;
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn gauge_of(&self, name: &[u8]) -> Option<Gauge> {
        let is = |names: &[String]| names.iter().any(|n| n.as_bytes() == name);
        if is(&self.names.waiting) {
            Some(Gauge::Waiting)
        } else if is(&self.names.running) {
            Some(Gauge::Running)
        } else if is(&self.names.kv_usage) {
            Some(Gauge::Kv)
        } else {
            None
        }
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        let long = std::mem::replace(&mut self.long, false);
        let text = trim(&line);
        if text.is_empty() || text.first() == Some(&b'#') {
            return;
        }
        let name_end = text
            .iter()
            .position(|&b| b == b'{' || b == b' ' || b == b'\t')
            .unwrap_or(text.len());
        let Some(gauge) = text.get(..name_end).and_then(|n| self.gauge_of(n)) else {
            return;
        };
        if long {
            self.error = Some(LoadError::Garbage);
            return;
        }
        match text.get(name_end..).and_then(sample_value) {
            Some(v) => {
                let slot = match gauge {
                    Gauge::Waiting => &mut self.waiting,
                    Gauge::Running => &mut self.running,
                    Gauge::Kv => &mut self.kv,
                };
                *slot = Some(match (gauge, *slot) {
                    (Gauge::Kv, Some(old)) => old.max(v),
                    (_, Some(old)) => old + v,
                    (_, None) => v,
                });
            }
            None => self.error = Some(LoadError::Garbage),
        }
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    bytes.get(start..end).unwrap_or(&[])
}

/// The value of a sample line after its name: optional `{labels}` (quoted values may hold
/// `}` and escapes), then the value, then an optional timestamp. A finite value >= 0.
fn sample_value(rest: &[u8]) -> Option<f64> {
    let mut at = 0;
    if rest.first() == Some(&b'{') {
        let mut quoted = false;
        let mut escaped = false;
        at = 1;
        loop {
            let &b = rest.get(at)?;
            at += 1;
            if escaped {
                escaped = false;
            } else if quoted {
                match b {
                    b'\\' => escaped = true,
                    b'"' => quoted = false,
                    _ => {}
                }
            } else {
                match b {
                    b'"' => quoted = true,
                    b'}' => break,
                    _ => {}
                }
            }
        }
    }
    let after = std::str::from_utf8(rest.get(at..)?).ok()?;
    let mut fields = after.split_ascii_whitespace();
    let value: f64 = fields.next()?.parse().ok()?;
    // A timestamp may follow; anything more is not a sample.
    if let Some(ts) = fields.next() {
        ts.parse::<i64>().ok()?;
    }
    if fields.next().is_some() || !value.is_finite() || value < 0.0 {
        return None;
    }
    Some(value)
}
