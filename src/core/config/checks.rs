//! The field checks of the configuration: each refusal names the field as a JSON path.

use super::raw::MAX_CLUSTER_NAME_BYTES;
use super::{invalid, ConfigError};
use crate::core::routing::table::model_name_problem;

/// An endpoint as Envoy's override_host policy parses it: `IPv4:port` or `[IPv6]:port`
/// (addresses, not names: the policy matches the cluster's resolved hosts). Returned in
/// Envoy's spelling, so it matches what Envoy prints.
pub(super) fn check_endpoint(field: &str, value: &str) -> Result<String, ConfigError> {
    match value.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.port() != 0 => Ok(addr.to_string()),
        _ => Err(invalid(
            field,
            format!("must be IP:port or [IPv6]:port with a non-zero port, got {value:?}"),
        )),
    }
}

/// A cluster name or an authority: it travels in a header value, so printable ASCII without
/// spaces (Envoy cluster names in practice: `qwen-vllm`, `outbound|8000||svc.ns.svc...`).
pub(super) fn check_token(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > MAX_CLUSTER_NAME_BYTES {
        return Err(invalid(
            field,
            format!("is longer than {MAX_CLUSTER_NAME_BYTES} bytes"),
        ));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            field,
            format!("must be printable ASCII without spaces, got {value:?}"),
        ));
    }
    Ok(())
}

pub(super) fn check_range(field: &str, value: u64, max: u64) -> Result<(), ConfigError> {
    if value == 0 || value > max {
        return Err(invalid(
            field,
            format!("must be between 1 and {max}, got {value}"),
        ));
    }
    Ok(())
}

/// A model name must be something a client can send and a header can carry (see
/// [`model_name_problem`]).
pub(super) fn check_model_name(
    field: &str,
    name: &str,
    max_bytes: usize,
) -> Result<(), ConfigError> {
    match model_name_problem(name, max_bytes) {
        Some(reason) => Err(invalid(field, reason)),
        None => Ok(()),
    }
}

pub(super) fn check_path(field: &str, path: &str) -> Result<(), ConfigError> {
    if !path.starts_with('/') {
        return Err(invalid(field, format!("must start with '/', got {path:?}")));
    }
    if path.contains(['?', '#']) || path.chars().any(|c| c.is_control() || c == ' ') {
        return Err(invalid(
            field,
            format!("must be a plain path, got {path:?}"),
        ));
    }
    Ok(())
}

/// A header name (see [`check_header_name`]) that must differ from the headers named before it
/// (`(field, lower-case name)`): the filter sets each of them, so two fields naming one header
/// would overwrite each other.
pub(super) fn distinct_header(
    field: &str,
    name: &str,
    earlier: &[(&str, &str)],
) -> Result<String, ConfigError> {
    let name = check_header_name(field, name)?;
    if earlier.iter().any(|(_, other)| *other == name) {
        let fields: Vec<&str> = earlier.iter().map(|(f, _)| *f).collect();
        let listed = match fields.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
            _ => fields.join(""),
        };
        return Err(invalid(field, format!("must differ from {listed}")));
    }
    Ok(name)
}

/// Header names are RFC 9110 tokens; Envoy stores them lower case.
pub(super) fn check_header_name(field: &str, name: &str) -> Result<String, ConfigError> {
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(is_tchar) {
        return Err(invalid(
            field,
            format!("must be a valid HTTP header name, got {name:?}"),
        ));
    }
    if name.starts_with(':') {
        return Err(invalid(field, "must not be a pseudo-header"));
    }
    Ok(name.to_ascii_lowercase())
}
