//! Prefix affinity and the endpoint picker: a key from the prompt's first blocks (`prefix`), the
//! picker that chooses a replica by the blocks each has been sent and its load (`picker`), and
//! the tables Envoy's workers share so that they pick alike (`shared_blocks`, `shared_load`).
//! `settings` holds the validated configuration of both. The picker's candidates and their
//! health come from Envoy's own cluster (`hosts`), their load from the servers' own metrics
//! (`load_metrics`).

pub mod hosts;
pub mod load_metrics;
pub mod picker;
pub mod prefix;
pub mod settings;
pub mod shared_blocks;
pub mod shared_load;
