//! A reference reading of a `multipart/form-data` body, written the plain way (the whole body
//! in memory, substring search for the delimiters), to compare with bbr-wasm's streaming
//! [`MultipartScanner`](bbr_wasm::core::MultipartScanner).
//!
//! It follows the scanner's documented choices (RFC 7578/2046 with the same leniencies: a
//! preamble and an epilogue are ignored, transport padding after a delimiter, a part with no
//! headers, part headers up to [`MAX_PART_HEADER_BYTES`]), so the two must agree on every body:
//! the same model, or the same error at the same offset. Part headers are read with the scanner's
//! own `part_name`; the framing, which is where streaming goes wrong, is independent.

use bbr_wasm::core::multipart::{part_name, MAX_PART_HEADER_BYTES};
use bbr_wasm::core::{MultipartScanner, ScanError, Step};

const TRUNCATED: &str = "the body ends before the closing boundary (truncated part)";
const AFTER_BOUNDARY: &str = "unexpected bytes after a boundary";

fn invalid(offset: usize, reason: &'static str) -> Step {
    Step::Error(ScanError::InvalidMultipart {
        offset: offset as u64,
        reason,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What the scanner must say about `body` (boundary already checked, as by `boundary_of`), and
/// what `early_model` must say once the first `model` part has ended (`None` when the body
/// fails before that).
pub fn reference_early(
    body: &[u8],
    boundary: &str,
    max_model_bytes: usize,
) -> (Step, Option<Step>) {
    let mut early = None;
    let step = read_body(body, boundary, max_model_bytes, &mut early);
    (step, early)
}

fn read_body(
    body: &[u8],
    boundary: &str,
    max_model_bytes: usize,
    early: &mut Option<Step>,
) -> Step {
    let delimiter: Vec<u8> = [b"\r\n--".as_slice(), boundary.as_bytes()].concat();
    let truncated = invalid(body.len(), TRUNCATED);
    // The first delimiter: at the very start without its CRLF, or anywhere after a preamble.
    let mut pos = if body.starts_with(&delimiter[2..]) {
        delimiter.len() - 2
    } else {
        match find(body, &delimiter) {
            Some(i) => i + delimiter.len(),
            None => return invalid(body.len(), "no multipart boundary found in the body"),
        }
    };
    let mut model: Option<Vec<u8>> = None;
    loop {
        // Just after a delimiter: `--` closes the body, else optional padding and CRLF.
        match body.get(pos) {
            None => return truncated,
            Some(b'-') => match body.get(pos + 1) {
                None => return truncated,
                Some(b'-') => break,
                Some(_) => return invalid(pos + 1, AFTER_BOUNDARY),
            },
            Some(b' ' | b'\t') => {
                while matches!(body.get(pos), Some(b' ' | b'\t')) {
                    pos += 1;
                }
                match body.get(pos) {
                    None => return truncated,
                    Some(b'\r') => {}
                    Some(_) => return invalid(pos, AFTER_BOUNDARY),
                }
            }
            Some(b'\r') => {}
            Some(_) => return invalid(pos, AFTER_BOUNDARY),
        }
        pos += 1; // the CR
        match body.get(pos) {
            None => return truncated,
            Some(b'\n') => pos += 1,
            Some(_) => return invalid(pos, "a boundary line must end with CRLF"),
        }

        // The header block: an empty line alone, or header lines up to a blank line.
        let rest = &body[pos..];
        let header_len = if rest.starts_with(b"\r\n") {
            Some(2)
        } else {
            find(rest, b"\r\n\r\n").map(|i| i + 4)
        };
        let header_len = match header_len {
            Some(n) if n <= MAX_PART_HEADER_BYTES => n,
            _ if rest.len() > MAX_PART_HEADER_BYTES => {
                return invalid(pos + MAX_PART_HEADER_BYTES, "part headers too long")
            }
            _ => return truncated,
        };
        let name = match part_name(&rest[..header_len]) {
            Ok(name) => name,
            // The scanner decides at the last byte of the header block.
            Err(why) => return invalid(pos + header_len - 1, why),
        };
        let is_model = name.as_deref() == Some("model");
        if is_model && model.is_some() {
            return Step::Error(ScanError::DuplicateModel);
        }
        pos += header_len;

        // The content, up to the next delimiter.
        let rest = &body[pos..];
        let Some(len) = find(rest, &delimiter) else {
            // What the scanner keeps of a truncated part: all but a trailing partial delimiter.
            let partial = rest
                .iter()
                .rposition(|&b| b == b'\r')
                .filter(|&i| delimiter.starts_with(&rest[i..]))
                .map_or(0, |i| rest.len() - i);
            if is_model && rest.len() - partial > max_model_bytes {
                return Step::Error(ScanError::ModelTooLong {
                    limit: max_model_bytes,
                });
            }
            return truncated;
        };
        if is_model {
            if len > max_model_bytes {
                return Step::Error(ScanError::ModelTooLong {
                    limit: max_model_bytes,
                });
            }
            model = Some(rest[..len].to_vec());
            *early = Some(verdict(&rest[..len]));
        }
        pos += len + delimiter.len();
    }
    match model {
        Some(model) => verdict(&model),
        None => Step::Error(ScanError::MissingModel),
    }
}

/// The verdict on a complete `model` field.
fn verdict(model: &[u8]) -> Step {
    let Ok(model) = String::from_utf8(model.to_vec()) else {
        return Step::Error(ScanError::ModelInvalidUnicode);
    };
    if model.is_empty() {
        return Step::Error(ScanError::ModelEmpty);
    }
    if model.chars().any(char::is_control) {
        return Step::Error(ScanError::ModelControlCharacter);
    }
    Step::Found(model)
}

/// Two final steps agree: equal, with the reasons of `InvalidMultipart` not compared (only
/// their offsets).
pub fn same(a: &Step, b: &Step) -> bool {
    match (a, b) {
        (
            Step::Error(ScanError::InvalidMultipart { offset: x, .. }),
            Step::Error(ScanError::InvalidMultipart { offset: y, .. }),
        ) => x == y,
        _ => a == b,
    }
}

/// Feeds `body` cut at `cuts` (sorted or not; out-of-range ones ignored), then finishes.
pub fn scan(body: &[u8], boundary: &str, max_model_bytes: usize, cuts: &[usize]) -> Step {
    let mut cuts: Vec<usize> = cuts.iter().copied().filter(|&c| c <= body.len()).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut scanner = MultipartScanner::new(boundary, max_model_bytes);
    let mut start = 0;
    for end in cuts.into_iter().chain(std::iter::once(body.len())) {
        if let Some(chunk) = body.get(start..end) {
            if let step @ Step::Error(_) = scanner.feed(chunk) {
                return step;
            }
        }
        start = end;
    }
    scanner.finish()
}

/// Feeds `body` one byte at a time, watching `early_model`: once it has a verdict, that
/// verdict stays until an error ends the body. Returns the final step and the first verdict.
pub fn scan_bytewise_early(
    body: &[u8],
    boundary: &str,
    max_model_bytes: usize,
) -> Result<(Step, Option<Step>), String> {
    let mut scanner = MultipartScanner::new(boundary, max_model_bytes);
    let mut early: Option<Step> = None;
    for (i, b) in body.chunks(1).enumerate() {
        let step = scanner.feed(b);
        if let Step::Error(_) = step {
            return Ok((step, early));
        }
        match (&early, scanner.early_model()) {
            (None, now) => early = now,
            (Some(was), Some(now)) if *was == now => {}
            (Some(was), now) => {
                return Err(format!(
                    "early_model went from {was:?} to {now:?} at byte {i}"
                ))
            }
        }
    }
    Ok((scanner.finish(), early))
}
