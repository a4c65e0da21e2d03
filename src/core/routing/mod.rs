//! Routing one request: what a request is (`request`), which model it names and where that model
//! is served (`table`, `discovery`), the headers that carry the decision (`headers`), the
//! OpenAI-style errors a client gets instead (`errors`), and the names of the counters that
//! count each outcome (`metrics`).

pub mod discovery;
pub mod errors;
pub mod headers;
pub mod metrics;
pub mod request;
pub mod table;
