//! What must hold of every configuration `Router::from_json` accepts.

use bbr_wasm::core::config::{MAX_MAX_BODY_BYTES, MAX_MAX_MODEL_NAME_BYTES};
use bbr_wasm::core::{
    BodyScanner, HeadAction, ModelScanner, MultipartScanner, RequestHead, Router, Step, Verdict,
};
use serde_json::Value;

/// Parses `bytes` as a configuration; when it is accepted, checks the router against
/// serde_json's reading of the same text and against the scanners. `Err` names the broken
/// invariant.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    let router = match Router::from_json(bytes) {
        Ok(router) => router,
        Err(e) => {
            // The message is what Envoy logs: it must render.
            let _ = e.to_string();
            return Ok(());
        }
    };
    let fail = |why: String| {
        Err(format!(
            "{why}\n  config: {:?}",
            String::from_utf8_lossy(bytes)
        ))
    };

    // serde_json reads the same models, bases first, then adapters, in order.
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return fail(format!("accepted, but serde_json refuses it: {e}")),
    };
    let models = value.get("models").and_then(Value::as_array);
    let mut want: Vec<(String, String, bool)> = Vec::new();
    let mut adapters = Vec::new();
    for m in models.into_iter().flatten() {
        let name = m.get("name").and_then(Value::as_str).unwrap_or_default();
        want.push((name.to_string(), name.to_string(), false));
        for a in m
            .get("adapters")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let a = a.as_str().unwrap_or_default();
            adapters.push((a.to_string(), name.to_string(), true));
        }
    }
    want.extend(adapters);
    let got: Vec<(String, String, bool)> = router
        .served
        .iter()
        .map(|s| (s.name.clone(), s.base.clone(), s.is_adapter))
        .collect();
    if got != want {
        return fail(format!("served {got:?}, serde_json reads {want:?}"));
    }

    // Limits in range, names a client can send.
    if !(1..=MAX_MAX_BODY_BYTES).contains(&router.max_body_bytes) {
        return fail(format!("maxBodyBytes {} accepted", router.max_body_bytes));
    }
    let max = router.max_model_name_bytes;
    if !(1..=MAX_MAX_MODEL_NAME_BYTES).contains(&max) {
        return fail(format!("maxModelNameBytes {max} accepted"));
    }
    for s in &router.served {
        let name = &s.name;
        if name.is_empty()
            || name.len() > max
            || name.trim() != name
            || name.chars().any(char::is_control)
        {
            return fail(format!("model name {name:?} accepted"));
        }
        // Every name looks up to itself, and its base to a base model.
        match router.lookup(name) {
            Some(found) if found == s => {}
            other => return fail(format!("lookup({name:?}) = {other:?}, want {s:?}")),
        }
        match router.lookup(&s.base) {
            Some(base) if !base.is_adapter && base.name == s.base => {}
            other => return fail(format!("base of {name:?} looks up to {other:?}")),
        }
        if router.lookup(&format!("{name}\u{0}")).is_some() {
            return fail(format!("{name:?} + NUL looks up"));
        }
        // A request naming it, plainly or fully escaped, routes to it.
        for body in [json_body(name), escaped_body(name)] {
            let step = scan_json(&body, max);
            let routed = matches!(router.decide(step.clone()), Some(Verdict::Route(m)) if m == s);
            if !routed {
                return fail(format!(
                    "body {:?} gives {step:?}",
                    String::from_utf8_lossy(&body)
                ));
            }
        }
        let form = format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{name}\r\n--XyZ--\r\n"
        );
        let mut scanner = MultipartScanner::new("XyZ", max);
        let step = match scanner.feed(form.as_bytes()) {
            Step::NeedMore => scanner.finish(),
            err => err,
        };
        if step != Step::Found(name.clone()) {
            return fail(format!("form field {name:?} gives {step:?}"));
        }
    }
    if router.lookup("").is_some() {
        return fail("the empty name looks up".into());
    }

    // Header names: valid tokens, lower case, distinct.
    for h in [&router.base_model_header, &router.model_header] {
        let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if h.is_empty() || !h.chars().all(tchar) || *h != h.to_ascii_lowercase() {
            return fail(format!("header name {h:?} accepted"));
        }
    }
    if router.base_model_header == router.model_header {
        return fail("the two header names are equal".into());
    }

    // Paths: inspected requests are inspected with the right scanner.
    if router.path_prefixes.is_empty() {
        return fail("no path prefix".into());
    }
    let head = |method, path, content_type| RequestHead {
        method,
        path,
        content_type: Some(content_type),
        ..RequestHead::default()
    };
    for prefix in &router.path_prefixes {
        let json = BodyScanner::Json(ModelScanner::new(max));
        let action = router.classify(&head("POST", prefix, "application/json"));
        if action != HeadAction::Inspect(Box::new(json)) {
            return fail(format!("POST {prefix:?} (JSON): {action:?}"));
        }
    }
    for path in &router.multipart_paths {
        if !router
            .path_prefixes
            .iter()
            .any(|p| path.starts_with(p.as_str()))
        {
            return fail(format!("multipart path {path:?} under no prefix"));
        }
        let form = BodyScanner::Multipart(MultipartScanner::new("XyZ", max));
        let action = router.classify(&head("POST", path, "multipart/form-data; boundary=XyZ"));
        if action != HeadAction::Inspect(Box::new(form)) {
            return fail(format!("POST {path:?} (multipart): {action:?}"));
        }
    }
    if let Some(path) = &router.model_list_path {
        let action = router.classify(&head("GET", path, "application/json"));
        if action != HeadAction::ServeModelList {
            return fail(format!("GET {path:?}: {action:?}"));
        }
        let list: Value = match serde_json::from_str(&router.model_list_body(0)) {
            Ok(v) => v,
            Err(e) => return fail(format!("the model list is no JSON: {e}")),
        };
        let ids: Vec<&str> = list["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str())
            .collect();
        let names: Vec<&str> = router.served.iter().map(|s| s.name.as_str()).collect();
        if ids != names {
            return fail(format!("model list ids {ids:?}, served {names:?}"));
        }
    }
    Ok(())
}

/// `{"model": name}` as serde_json writes it.
fn json_body(name: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "model": name })).unwrap_or_default()
}

/// `{"model": name}` with the key's `m` and every character of the value but ASCII letters
/// and digits written as a `\u` escape (UTF-16 surrogate pairs past the BMP).
fn escaped_body(name: &str) -> Vec<u8> {
    let mut out = String::from("{\"");
    let escape = |out: &mut String, s: &str| {
        for c in s.chars() {
            if c.is_ascii_alphanumeric() {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    };
    out.push_str("\\u006dodel");
    out.push_str("\": \"");
    escape(&mut out, name);
    out.push_str("\"}");
    out.into_bytes()
}

fn scan_json(body: &[u8], max: usize) -> Step {
    let mut scanner = ModelScanner::new(max);
    match scanner.feed(body) {
        Step::NeedMore => scanner.finish(),
        err => err,
    }
}
