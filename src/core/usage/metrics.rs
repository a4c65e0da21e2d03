//! The accounting's metric names, in the tag convention of `routing::metrics` (labels carried
//! in the name, `name=.=value;.;`, which the shipped Envoy configs' `stats_tags` turn into
//! labels). OpenTelemetry's GenAI names, for the README's table:
//!
//! | here | OpenTelemetry |
//! | --- | --- |
//! | `bbr_tokens_total{model,type}` | `gen_ai.client.token.usage` by `gen_ai.token.type` |
//! | `bbr_time_to_first_token_ms{model}` | `gen_ai.server.time_to_first_token` (seconds there) |
//! | `bbr_time_per_output_token_ms{model}` | `gen_ai.server.time_per_output_token` (seconds there) |

/// The `type` labels of [`tokens`]: prompt tokens, completion tokens, and the prompt tokens
/// the server found in its cache (part of `input`, not in addition to it).
pub const INPUT: &str = "input";
pub const OUTPUT: &str = "output";
pub const CACHED_INPUT: &str = "cached_input";

/// Counter: tokens of one base model, by type.
pub fn tokens(base_model: &str, kind: &str) -> String {
    format!("model=.={base_model};.;type=.={kind};.;bbr_tokens_total")
}

/// Counter: tokens of one adapter (requested by its name), by type; also counted under its base
/// model in [`tokens`], so summing `bbr_tokens_total` never counts them twice.
pub fn adapter_tokens(adapter: &str, kind: &str) -> String {
    format!("model=.={adapter};.;type=.={kind};.;bbr_adapter_tokens_total")
}

/// Histogram: time to first token as the gateway sees it, per base model, in milliseconds.
pub fn time_to_first_token(base_model: &str) -> String {
    format!("model=.={base_model};.;bbr_time_to_first_token_ms")
}

/// Histogram: time per output token after the first, per base model, in milliseconds.
pub fn time_per_output_token(base_model: &str) -> String {
    format!("model=.={base_model};.;bbr_time_per_output_token_ms")
}

/// Counter: responses read, by outcome (`counted`, `absent`, and the unreadable ones:
/// `malformed`, `truncated`, `encoded`, `too_large`).
pub fn responses(outcome: &str) -> String {
    format!("outcome=.={outcome};.;bbr_usage_responses_total")
}

/// Counter: routed streams the filter asked for their usage (`usage.addIncludeUsage`).
pub const INCLUDE_USAGE_ADDED: &str = "bbr_usage_include_added_total";
/// Counter: such streams whose body the host would not let the filter edit (they went on as
/// they came, without usage).
pub const INCLUDE_USAGE_FAILED: &str = "bbr_usage_include_failed_total";

/// The filter-state key of the access log's fields. Envoy stores it as `wasm.bbr_usage` (a
/// `CelState`: source/extensions/common/wasm/context.cc, `Context::setProperty`), which the
/// access log reads whole with `%FILTER_STATE(wasm.bbr_usage:PLAIN)%`. One key, not one per
/// field: each `setProperty` is a host call (about a microsecond of the gateway's CPU per
/// request), and Envoy's `%FILTER_STATE(KEY:FIELD:NAME)%` cannot pick fields out of it
/// (`CelState` has no `getField`: source/extensions/filters/common/expr/cel_state.h).
pub const ACCESS_LOG_PROPERTY: &str = "bbr_usage";

/// The access log's value: `prompt_tokens=N completion_tokens=N ttft_ms=N`, each field only
/// when it is known, in that order; `None` when none is (nothing is set, and Envoy logs `-`).
pub fn access_log_value(
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    ttft_ms: Option<u64>,
) -> Option<String> {
    use core::fmt::Write;
    let fields = [
        ("prompt_tokens", prompt_tokens),
        ("completion_tokens", completion_tokens),
        ("ttft_ms", ttft_ms),
    ];
    let mut out: Option<String> = None;
    for (name, value) in fields {
        let Some(value) = value else { continue };
        let s = out.get_or_insert_with(|| String::with_capacity(64));
        if !s.is_empty() {
            s.push(' ');
        }
        // Writing to a String cannot fail.
        let _ = write!(s, "{name}={value}");
    }
    out
}
