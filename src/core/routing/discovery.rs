//! Model discovery: what each pool's `/v1/models` says it serves, as plain data.
//!
//! The adapter polls every pool on a timer (`dispatch_http_call`) and hands each answer here:
//! [`parse_models`] reads the body (size-capped, strict about shape), [`PoolState::apply_models`]
//! or [`PoolState::apply_failure`] update what the pool is known to serve, and [`RoutingView`]
//! merges the static `models` with every pool into the one table requests are routed by.
//! Nothing here knows about timers or the host, so all of it is tested natively and as wasm.

use super::errors::Rejection;
pub use super::table::Pool;
use super::table::{model_name_problem, Router, ServedModel, UnknownModel};
use crate::core::json::scanner::Step;
use serde::Deserialize;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

/// Largest `/v1/models` body accepted from a pool. vLLM lists a few hundred bytes per model, so
/// 1 MiB is thousands of adapters; a bigger answer is a misconfigured path, not a model list,
/// and it is refused before it is copied into the VM.
pub const MAX_MODELS_BODY_BYTES: usize = 1024 * 1024;

/// One entry of a `/v1/models` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    /// The base model of an adapter (vLLM's `parent`); `None` for a base model.
    pub parent: Option<String>,
}

/// Why a poll taught us nothing. The adapter maps host results to these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollFailure {
    /// The call could not be made, or ended without a response.
    Unreachable(String),
    /// A response other than 200 (Envoy answers 503 when no replica is up, 504 on timeout).
    Status(u32),
    /// A body over [`MAX_MODELS_BODY_BYTES`].
    TooLarge { size: usize },
    /// Not JSON, or not an OpenAI model list.
    Malformed(String),
}

impl PollFailure {
    /// The `outcome` label of the poll counter.
    pub fn outcome(&self) -> PollOutcome {
        match self {
            PollFailure::Unreachable(_) => PollOutcome::Unreachable,
            PollFailure::Status(_) => PollOutcome::HttpError,
            PollFailure::TooLarge { .. } => PollOutcome::TooLarge,
            PollFailure::Malformed(_) => PollOutcome::Malformed,
        }
    }
}

impl fmt::Display for PollFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PollFailure::Unreachable(why) => write!(f, "no response ({why})"),
            PollFailure::Status(504) => {
                f.write_str("HTTP 504 (Envoy's answer when timeoutMs passes)")
            }
            PollFailure::Status(503) => f.write_str("HTTP 503 (no replica of the pool is up)"),
            PollFailure::Status(code) => write!(f, "HTTP {code}"),
            PollFailure::TooLarge { size } => write!(
                f,
                "a {size}-byte body, over the {MAX_MODELS_BODY_BYTES}-byte cap"
            ),
            PollFailure::Malformed(why) => write!(f, "not a model list: {why}"),
        }
    }
}

/// How one poll ended: the `outcome` label of `bbr_discovery_polls_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PollOutcome {
    Ok,
    Unreachable,
    HttpError,
    TooLarge,
    Malformed,
}

impl PollOutcome {
    pub const ALL: [PollOutcome; 5] = [
        PollOutcome::Ok,
        PollOutcome::Unreachable,
        PollOutcome::HttpError,
        PollOutcome::TooLarge,
        PollOutcome::Malformed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            PollOutcome::Ok => "ok",
            PollOutcome::Unreachable => "unreachable",
            PollOutcome::HttpError => "http_error",
            PollOutcome::TooLarge => "too_large",
            PollOutcome::Malformed => "malformed",
        }
    }
}

/// The shape read from a pool: OpenAI's list, of which only `data[].id` and `data[].parent`
/// matter. Other fields (vLLM sends `root`, `max_model_len`, `permission`, ...) are ignored:
/// this is another server's answer, not our configuration.
#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelCard>,
}

#[derive(Deserialize)]
struct ModelCard {
    id: String,
    #[serde(default)]
    parent: Option<String>,
}

/// A listed name checked as a configured one is; the failure names the field (`data[0].id`).
fn checked_name(field: &str, name: &str, max_name_bytes: usize) -> Result<(), PollFailure> {
    match model_name_problem(name, max_name_bytes) {
        Some(reason) => Err(PollFailure::Malformed(format!("{field}: {reason}"))),
        None => Ok(()),
    }
}

/// Reads a `/v1/models` body. Names are checked like configured ones (`max_name_bytes` is
/// `maxModelNameBytes`): a name a client could not send, or a header could not carry, makes
/// the whole answer malformed rather than half-applied.
pub fn parse_models(body: &[u8], max_name_bytes: usize) -> Result<Vec<Listed>, PollFailure> {
    if body.len() > MAX_MODELS_BODY_BYTES {
        return Err(PollFailure::TooLarge { size: body.len() });
    }
    let list: ModelList =
        serde_json::from_slice(body).map_err(|e| PollFailure::Malformed(e.to_string()))?;
    let mut out: Vec<Listed> = Vec::with_capacity(list.data.len());
    let mut seen = BTreeSet::new();
    for (i, card) in list.data.into_iter().enumerate() {
        checked_name(&format!("data[{i}].id"), &card.id, max_name_bytes)?;
        let parent = match card.parent {
            Some(p) if p == card.id => None,
            Some(p) => {
                checked_name(&format!("data[{i}].parent"), &p, max_name_bytes)?;
                Some(p)
            }
            None => None,
        };
        // vLLM never lists a name twice; if a server does, the first entry counts.
        if seen.insert(card.id.clone()) {
            out.push(Listed {
                name: card.id,
                parent,
            });
        }
    }
    Ok(out)
}

/// What one pool is known to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Known {
    parent: Option<String>,
    /// Consecutive successful polls that did not list it.
    absent: u32,
}

/// Where a pool's polling stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No poll has answered yet.
    Pending,
    /// The last poll answered a model list.
    Ok,
    /// The last poll failed this way (the map from the last good answer keeps serving).
    Failing(PollOutcome),
}

/// One pool's discovered models, and how its polls are going.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolState {
    models: BTreeMap<String, Known>,
    health: Health,
    answered: bool,
}

impl Default for PoolState {
    fn default() -> Self {
        PoolState::new()
    }
}

/// What applying one poll changed, for the adapter's log line and its view rebuild.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Newly listed names.
    pub added: Vec<String>,
    /// Names gone after `absentPollsBeforeRemoval` absent polls.
    pub removed: Vec<String>,
    /// Names whose parent changed.
    pub reparented: Vec<String>,
    /// The health before, when this poll changed it (log once per change, not per poll).
    pub health_was: Option<Health>,
}

impl Applied {
    /// The routing table must be rebuilt.
    pub fn routes_changed(&self) -> bool {
        !self.added.is_empty() || !self.removed.is_empty() || !self.reparented.is_empty()
    }
}

impl PoolState {
    pub fn new() -> PoolState {
        PoolState {
            models: BTreeMap::new(),
            health: Health::Pending,
            answered: false,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// At least one poll has answered a model list (a failure after it keeps the answer).
    pub fn answered(&self) -> bool {
        self.answered
    }

    /// Number of models known.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// (name, parent) of every model known, by name.
    pub fn models(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.models
            .iter()
            .map(|(name, k)| (name.as_str(), k.parent.as_deref()))
    }

    /// A successful poll listed these models. A model not listed is removed once it has been
    /// missing from `absent_threshold` consecutive successful polls: a poll reaches one
    /// replica, and replicas of a pool may differ for a while.
    pub fn apply_models(&mut self, listed: &[Listed], absent_threshold: u32) -> Applied {
        let mut applied = Applied::default();
        if self.health != Health::Ok {
            applied.health_was = Some(self.health);
        }
        self.health = Health::Ok;
        self.answered = true;
        let listed_names: BTreeSet<&str> = listed.iter().map(|l| l.name.as_str()).collect();
        let mut gone = Vec::new();
        for (name, known) in self.models.iter_mut() {
            if listed_names.contains(name.as_str()) {
                continue;
            }
            known.absent = known.absent.saturating_add(1);
            if known.absent >= absent_threshold {
                gone.push(name.clone());
            }
        }
        for name in gone {
            self.models.remove(&name);
            applied.removed.push(name);
        }
        for l in listed {
            match self.models.get_mut(&l.name) {
                Some(known) => {
                    known.absent = 0;
                    if known.parent != l.parent {
                        known.parent = l.parent.clone();
                        applied.reparented.push(l.name.clone());
                    }
                }
                None => {
                    self.models.insert(
                        l.name.clone(),
                        Known {
                            parent: l.parent.clone(),
                            absent: 0,
                        },
                    );
                    applied.added.push(l.name.clone());
                }
            }
        }
        applied.added.sort();
        applied
    }

    /// A poll failed: what the pool is known to serve stays as it is. Returns the health
    /// before when this failure changed it (a new kind of failure, or the first one).
    pub fn apply_failure(&mut self, failure: &PollFailure) -> Option<Health> {
        let now = Health::Failing(failure.outcome());
        if self.health == now {
            return None;
        }
        let was = self.health;
        self.health = now;
        Some(was)
    }
}

/// A name dropped from the routing table because an earlier source has it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Conflict {
    pub name: String,
    /// `static` (the `models` list) or the pool's cluster that keeps the name.
    pub kept: String,
    /// The pool whose entry was dropped.
    pub dropped: String,
}

/// A routable model: where it runs, and the pool (cluster) for discovered ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub model: ServedModel,
    /// `None` for a static model (the routes match the base model header); the cluster for a
    /// discovered one (the route reads it from the pool header).
    pub pool: Option<String>,
}

/// The table requests are routed by: static models, then each pool's in configuration order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingView {
    routes: Vec<Route>,
    index: HashMap<String, usize>,
    /// Names dropped because an earlier source has them, by name.
    pub conflicts: BTreeSet<Conflict>,
    /// Some pool has not answered yet: the `Retry-After` (seconds) for a model not known yet.
    pub pending_retry_after: Option<u64>,
    unknown_model: UnknownModel,
}

/// What a body decides against the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewVerdict<'v> {
    Route(&'v Route),
    Pass,
    Reject(Rejection),
}

impl RoutingView {
    /// The view of a configuration without pools (or before any pool answered).
    pub fn from_static(router: &Router) -> RoutingView {
        RoutingView::merge(router, &[])
    }

    /// Merges the static models with every pool's. Precedence, fixed so every worker and every
    /// gateway agrees: a static entry wins over a discovered one, and a name discovered in two
    /// pools belongs to the pool configured first. `pools` pairs each configured pool with its
    /// state, in configuration order.
    pub fn merge(router: &Router, pools: &[(&Pool, &PoolState)]) -> RoutingView {
        let mut view = RoutingView {
            unknown_model: router.unknown_model,
            ..RoutingView::default()
        };
        let mut owner: HashMap<String, String> = HashMap::new();
        for served in &router.served {
            view.push(
                Route {
                    model: served.clone(),
                    pool: None,
                },
                &mut owner,
                "static",
            );
        }
        let mut pending_ms: Option<u64> = None;
        for (pool, state) in pools {
            if !state.answered() {
                pending_ms = Some(pending_ms.unwrap_or(0).max(pool.interval_ms));
            }
            // Base models first, then adapters, each by name: the order of `GET /v1/models`
            // does not depend on the order a server happened to list them in.
            for adapters in [false, true] {
                for (name, parent) in state.models() {
                    if parent.is_some() != adapters {
                        continue;
                    }
                    let route = Route {
                        model: ServedModel {
                            name: name.to_string(),
                            base: parent.unwrap_or(name).to_string(),
                            is_adapter: parent.is_some(),
                        },
                        pool: Some(pool.cluster.clone()),
                    };
                    view.push(route, &mut owner, &pool.cluster);
                }
            }
        }
        view.pending_retry_after = pending_ms.map(|ms| ms.div_ceil(1000).max(1));
        view
    }

    fn push(&mut self, route: Route, owner: &mut HashMap<String, String>, source: &str) {
        if let Some(kept) = owner.get(&route.model.name) {
            self.conflicts.insert(Conflict {
                name: route.model.name.clone(),
                kept: kept.clone(),
                dropped: source.to_string(),
            });
            return;
        }
        owner.insert(route.model.name.clone(), source.to_string());
        self.index
            .insert(route.model.name.clone(), self.routes.len());
        self.routes.push(route);
    }

    /// Every routable model, in the order of `GET /v1/models`.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route of this exact name.
    pub fn lookup(&self, model: &str) -> Option<&Route> {
        self.index.get(model).and_then(|&i| self.routes.get(i))
    }

    /// Decides from the scanner's final step. A model nobody lists yet while some pool has
    /// not answered gets 503 with `Retry-After`, not 404: the gateway does not know yet.
    pub fn decide(&self, step: Step) -> Option<ViewVerdict<'_>> {
        match step {
            Step::NeedMore => None,
            Step::Error(err) => Some(ViewVerdict::Reject(err.into())),
            Step::Found(model) => Some(match self.lookup(&model) {
                Some(route) => ViewVerdict::Route(route),
                None => match (self.unknown_model, self.pending_retry_after) {
                    (UnknownModel::Passthrough, _) => ViewVerdict::Pass,
                    (UnknownModel::Reject, Some(retry_after_secs)) => {
                        ViewVerdict::Reject(Rejection::DiscoveryPending {
                            model,
                            retry_after_secs,
                        })
                    }
                    (UnknownModel::Reject, None) => {
                        ViewVerdict::Reject(Rejection::ModelNotFound(model))
                    }
                },
            }),
        }
    }

    /// The `GET /v1/models` body, in OpenAI's list format; `created` is a Unix time. Static
    /// models first (as configured: bases, then adapters), then each pool's in configuration
    /// order (bases, then adapters, by name).
    pub fn model_list_body(&self, created: u64) -> String {
        let data: Vec<_> = self
            .routes
            .iter()
            .map(|r| {
                let m = &r.model;
                json!({
                    "id": m.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "bbr-wasm",
                    "root": m.base,
                    "parent": if m.is_adapter { Some(m.base.as_str()) } else { None },
                })
            })
            .collect();
        json!({"object": "list", "data": data}).to_string()
    }
}

/// The next number of a xorshift64* sequence (for poll jitter; not cryptographic). A zero
/// state is replaced, since xorshift would stay at zero.
pub fn next_random(state: &mut u64) -> u64 {
    let mut x = if *state == 0 {
        0x9E37_79B9_7F4A_7C15
    } else {
        *state
    };
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// The delay before a pool's next poll: `interval_ms` plus up to a tenth of it, drawn from
/// `random`, so workers and gateways started together do not poll in step.
pub fn next_poll_delay_ms(interval_ms: u64, random: u64) -> u64 {
    let spread = interval_ms / 10;
    interval_ms
        + if spread == 0 {
            0
        } else {
            random % (spread + 1)
        }
}

/// FNV-1a, 64 bits: a short stable fingerprint (of the configuration, of a model list) for
/// the keys and values the adapter keeps in the host's shared data. Not cryptographic.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

impl PoolState {
    /// A fingerprint of what the pool is known to serve (names and parents).
    pub fn models_fingerprint(&self) -> u64 {
        let mut text = String::new();
        for (name, parent) in self.models() {
            text.push_str(name);
            text.push('\t');
            text.push_str(parent.unwrap_or(""));
            text.push('\n');
        }
        fingerprint(text.as_bytes())
    }
}
