//! The endpoint picker's in-flight counts, shared by Envoy's workers: each worker publishes its
//! own counts in a row of the host's shared data, and reads the others' rows before a pick,
//! so the load score and the bound see every worker's requests, as with a single worker.
//!
//! Rows, per picker pool: keys `bbr-wasm.picker.<cluster>.load.<row>`, `row` below
//! [`LOAD_ROWS`]. A worker claims the lowest row that is free (not found, no row of this pool,
//! or not refreshed for [`LOAD_LEASE_MS`]) at its first pick, then writes only that row: after
//! each pick, after each request ends, and on its timer (which keeps the row fresh while the
//! worker is idle). A row names its owner (a random number per worker) and when it was
//! written; a row not refreshed within the lease (its worker's VM is gone) is not counted and
//! may be claimed again. So a count is never added to or subtracted from by two workers: no
//! count can drift, and a row's worth of error disappears with its lease.
//!
//! Plain data and functions: the host calls are the filter's.

use super::shared_blocks::le_u64;

/// Most rows per pool: workers that can share their counts (later ones keep theirs alone).
pub const LOAD_ROWS: usize = 64;
/// A row not written for this long is not counted, and may be claimed by another worker.
pub const LOAD_LEASE_MS: u64 = 5_000;

const MAGIC: u8 = 0xB6;
const VERSION: u8 = 1;
/// magic, version, pool tag, owner, stamp; then a u16 per endpoint.
const HEAD_BYTES: usize = 2 + 8 + 8 + 8;

/// One worker's published counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadRow {
    pub pool_tag: u64,
    /// The publishing worker's random id.
    pub owner: u64,
    /// When it was written (ms).
    pub stamp_ms: u64,
    /// In flight per endpoint, by index.
    pub counts: Vec<u16>,
}

impl LoadRow {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD_BYTES + 2 * self.counts.len());
        out.push(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.pool_tag.to_le_bytes());
        out.extend_from_slice(&self.owner.to_le_bytes());
        out.extend_from_slice(&self.stamp_ms.to_le_bytes());
        for c in &self.counts {
            out.extend_from_slice(&c.to_le_bytes());
        }
        out
    }

    /// The row these bytes encode; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<LoadRow> {
        if bytes.len() < HEAD_BYTES || (bytes.len() - HEAD_BYTES) % 2 != 0 {
            return None;
        }
        if bytes.first() != Some(&MAGIC) || bytes.get(1) != Some(&VERSION) {
            return None;
        }
        let counts = bytes
            .get(HEAD_BYTES..)?
            .chunks_exact(2)
            .map(|c| {
                u16::from_le_bytes([
                    c.first().copied().unwrap_or(0),
                    c.get(1).copied().unwrap_or(0),
                ])
            })
            .collect();
        Some(LoadRow {
            pool_tag: le_u64(bytes, 2)?,
            owner: le_u64(bytes, 10)?,
            stamp_ms: le_u64(bytes, 18)?,
            counts,
        })
    }
}

/// One picker pool's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedLoad {
    pool_tag: u64,
    endpoints: usize,
    key_prefix: String,
}

impl SharedLoad {
    /// The rows of the pool `cluster` whose endpoint list has tag `pool_tag`
    /// (`core::affinity::shared_blocks::pool_tag`).
    pub fn new(cluster: &str, pool_tag: u64, endpoints: usize) -> SharedLoad {
        SharedLoad {
            pool_tag,
            endpoints,
            key_prefix: format!("bbr-wasm.picker.{cluster}.load."),
        }
    }

    pub fn key(&self, row: usize) -> String {
        format!("{}{}", self.key_prefix, row)
    }

    /// The row `value` holds if it is a live row of this pool (written within the lease).
    fn live(&self, value: Option<&[u8]>, now_ms: u64) -> Option<LoadRow> {
        LoadRow::decode(value?).filter(|r| {
            r.pool_tag == self.pool_tag
                && r.counts.len() == self.endpoints
                && now_ms.saturating_sub(r.stamp_ms) <= LOAD_LEASE_MS
        })
    }

    /// Whether worker `owner` may take a row holding `value`: nothing there, no live row of
    /// this pool, or its own.
    pub fn claimable(&self, value: Option<&[u8]>, owner: u64, now_ms: u64) -> bool {
        self.live(value, now_ms).is_none_or(|r| r.owner == owner)
    }

    /// The other workers' in flight per endpoint: the sum of the live rows of this pool in
    /// `values` not owned by `owner`.
    pub fn others(&self, values: &[Option<Vec<u8>>], owner: u64, now_ms: u64) -> Vec<u32> {
        let mut out = vec![0u32; self.endpoints];
        for row in values
            .iter()
            .filter_map(|v| self.live(v.as_deref(), now_ms))
            .filter(|r| r.owner != owner)
        {
            for (o, &c) in out.iter_mut().zip(&row.counts) {
                *o = o.saturating_add(u32::from(c));
            }
        }
        out
    }

    /// The row worker `owner` publishes with its counts at `now_ms`.
    pub fn row(&self, owner: u64, now_ms: u64, counts: &[u32]) -> Vec<u8> {
        LoadRow {
            pool_tag: self.pool_tag,
            owner,
            stamp_ms: now_ms,
            counts: (0..self.endpoints)
                .map(|i| {
                    counts
                        .get(i)
                        .map_or(0, |&c| u16::try_from(c).unwrap_or(u16::MAX))
                })
                .collect(),
        }
        .encode()
    }
}
