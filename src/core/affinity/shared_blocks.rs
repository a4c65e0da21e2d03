//! What the endpoint picker's workers learn together: a bounded, direct-mapped table of the
//! prompt blocks sent to each endpoint, kept in the host's shared data (process-wide, one per
//! wasm `vm_id`), so that a prefix one Envoy worker sent to a replica is found by the others.
//!
//! Each Envoy worker runs its own wasm VM, and so its own [`Picker`](super::picker::Picker):
//! without this table a prefix whose connections land on two workers is placed twice, once by
//! each worker's own history (bench/results/routing/workers/main-w1, main-w2: with 2 workers
//! the picker's hit rate on tenants fell from 0.870 to 0.716).
//!
//! The table, per picker pool: `slots` keys, `bbr-wasm.picker.<cluster>.<slot>`; a block's
//! chained hash `h` lives in slot `h mod slots`. A slot's value ([`SlotEntry`]) holds the full
//! 64-bit hash it stands for (a slot shared by two hashes holds the last one written: a
//! collision forgets, never misleads), the endpoints the block was last sent to (up to
//! [`ENDPOINTS_PER_SLOT`], most recent first), and a tag of the pool's endpoint list, so an
//! entry written under another list of endpoints (a configuration change, another listener's
//! filter with other endpoints under the same cluster name) is not read as this one's. The
//! number of keys is fixed by the cluster names and `sharedSlots`, whatever the traffic, and
//! the same across configuration changes.
//!
//! Scoring: a chained hash stands for its whole prefix, so an endpoint that was sent block `i`
//! of this prompt was sent its first `i + 1` blocks: [`SharedTable::attributed`] gives each
//! endpoint the deepest block the table names it for. (Not "leading blocks from the first" as
//! the local LRU counts: a slot names only the last endpoints sent that block, so a preamble
//! every prompt shares names whoever was sent any of them last, while the deeper blocks still
//! say whose the rest is.)
//!
//! Plain data and functions: the host calls (read, compare-and-swap) are the filter's.

use xxhash_rust::xxh64::xxh64;

/// Default for `prefixAffinity.picker.sharedSlots`: as many as the default `lruBlocks`.
pub const DEFAULT_SHARED_SLOTS: usize = 8192;
/// Largest accepted `prefixAffinity.picker.sharedSlots` (keys per pool in Envoy's shared data,
/// an estimated 100-150 bytes each there).
pub const MAX_SHARED_SLOTS: usize = 1 << 18;
/// Endpoints one slot remembers for its block, most recent first: a prefix the bounded load
/// spread over two replicas is cached on both.
pub const ENDPOINTS_PER_SLOT: usize = 2;
/// The encoded size of a [`SlotEntry`].
pub const ENTRY_BYTES: usize = 2 + 8 + 8 + 2 * ENDPOINTS_PER_SLOT;

/// First byte of an entry, then the layout's version: anything else is not an entry.
const MAGIC: u8 = 0xB5;
const VERSION: u8 = 1;
/// The little-endian u64 at `at` in `bytes`, if it is all there (shared-data values are
/// read as the host returns them, never trusted to be whole).
pub(crate) fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b: [u8; 8] = bytes.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(b))
}

/// An unused endpoint position.
const NO_ENDPOINT: u16 = u16::MAX;

/// One slot's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotEntry {
    /// [`SharedTable::pool_tag`] of the writer's pool.
    pub pool_tag: u64,
    /// The chained block hash the slot stands for.
    pub hash: u64,
    /// Endpoint indexes, most recent first; `None` after the used ones.
    pub endpoints: [Option<u16>; ENDPOINTS_PER_SLOT],
}

impl SlotEntry {
    /// `MAGIC`, `VERSION`, pool tag and hash (little-endian u64), then each endpoint as a
    /// little-endian u16 (`0xFFFF`: none).
    pub fn encode(&self) -> [u8; ENTRY_BYTES] {
        let mut out = [0u8; ENTRY_BYTES];
        let bytes = [MAGIC, VERSION]
            .into_iter()
            .chain(self.pool_tag.to_le_bytes())
            .chain(self.hash.to_le_bytes())
            .chain(
                self.endpoints
                    .iter()
                    .flat_map(|e| e.unwrap_or(NO_ENDPOINT).to_le_bytes()),
            );
        for (o, b) in out.iter_mut().zip(bytes) {
            *o = b;
        }
        out
    }

    /// The entry these bytes encode; `None` for anything else (another length, magic or
    /// version, no endpoint, an endpoint after a gap, an endpoint twice): what another
    /// writer put there is never trusted.
    pub fn decode(bytes: &[u8]) -> Option<SlotEntry> {
        if bytes.len() != ENTRY_BYTES {
            return None;
        }
        let (&magic, rest) = bytes.split_first()?;
        let (&version, rest) = rest.split_first()?;
        if magic != MAGIC || version != VERSION {
            return None;
        }
        let pool_tag = le_u64(rest, 0)?;
        let hash = le_u64(rest, 8)?;
        let mut endpoints = [None; ENDPOINTS_PER_SLOT];
        let mut gap = false;
        for (k, slot) in endpoints.iter_mut().enumerate() {
            let at = 16 + 2 * k;
            let b: [u8; 2] = rest.get(at..at + 2)?.try_into().ok()?;
            let e = u16::from_le_bytes(b);
            if e == NO_ENDPOINT {
                gap = true;
                continue;
            }
            if gap {
                return None;
            }
            *slot = Some(e);
        }
        let used: Vec<u16> = endpoints.iter().flatten().copied().collect();
        if used.is_empty()
            || used
                .iter()
                .enumerate()
                .any(|(i, e)| used.iter().take(i).any(|x| x == e))
        {
            return None;
        }
        Some(SlotEntry {
            pool_tag,
            hash,
            endpoints,
        })
    }

    /// Whether the entry names endpoint `index`.
    pub fn names(&self, index: usize) -> bool {
        self.endpoints
            .iter()
            .flatten()
            .any(|&e| usize::from(e) == index)
    }
}

/// One picker pool's shared table: where its slots are and how to read and update them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedTable {
    slots: usize,
    endpoints: usize,
    pool_tag: u64,
    key_prefix: String,
}

impl SharedTable {
    /// The table of the pool `cluster` with these endpoints; `None` when `slots` is 0
    /// (sharing off) or the pool has more endpoints than an entry can name.
    pub fn new(cluster: &str, endpoints: &[String], slots: usize) -> Option<SharedTable> {
        if slots == 0 || endpoints.len() >= usize::from(NO_ENDPOINT) {
            return None;
        }
        Some(SharedTable {
            slots,
            endpoints: endpoints.len(),
            pool_tag: pool_tag(cluster, endpoints),
            key_prefix: format!("bbr-wasm.picker.{cluster}."),
        })
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The tag of this pool's endpoint list that its entries carry.
    pub fn pool_tag(&self) -> u64 {
        self.pool_tag
    }

    /// The slot of a block hash.
    pub fn slot_of(&self, hash: u64) -> usize {
        // slots >= 1 (see `new`); the remainder is below it, so it fits a usize.
        (hash % self.slots.max(1) as u64) as usize
    }

    /// The shared-data key of the slot of a block hash.
    pub fn key(&self, hash: u64) -> String {
        format!("{}{}", self.key_prefix, self.slot_of(hash))
    }

    /// The entry a slot's bytes hold for `hash` in this pool, if they hold one.
    /// Whether `value` (a slot as read) is this pool's entry for `hash`.
    pub fn knows(&self, value: Option<&[u8]>, hash: u64) -> bool {
        self.entry_for(value, hash).is_some()
    }

    fn entry_for(&self, value: Option<&[u8]>, hash: u64) -> Option<SlotEntry> {
        SlotEntry::decode(value?).filter(|e| {
            e.pool_tag == self.pool_tag
                && e.hash == hash
                && e.endpoints
                    .iter()
                    .flatten()
                    .all(|&x| usize::from(x) < self.endpoints)
        })
    }

    /// Per endpoint, the prompt's blocks the table says it was sent: the deepest block `i` whose
    /// slot (`values[i]`, the bytes read for `hashes[i]`'s key, `None` if not found or not
    /// read) names it counts `i + 1`. One number per endpoint.
    pub fn attributed(&self, hashes: &[u64], values: &[Option<Vec<u8>>]) -> Vec<usize> {
        let mut out = vec![0usize; self.endpoints];
        for (i, (&hash, value)) in hashes.iter().zip(values).enumerate() {
            let Some(entry) = self.entry_for(value.as_deref(), hash) else {
                continue;
            };
            for &e in entry.endpoints.iter().flatten() {
                if let Some(n) = out.get_mut(usize::from(e)) {
                    *n = i + 1;
                }
            }
        }
        out
    }

    /// The value to write in `hash`'s slot, which held `old`, once the block was sent to
    /// `chosen`; `None` when the slot already names it there (nothing to write). A slot
    /// holding another hash, another pool's entry or bytes that are no entry is taken over.
    pub fn update(
        &self,
        old: Option<&[u8]>,
        hash: u64,
        chosen: usize,
    ) -> Option<[u8; ENTRY_BYTES]> {
        let chosen = u16::try_from(chosen)
            .ok()
            .filter(|&c| usize::from(c) < self.endpoints)?;
        let mut endpoints = [None; ENDPOINTS_PER_SLOT];
        match self.entry_for(old, hash) {
            Some(entry) if entry.names(usize::from(chosen)) => return None,
            Some(entry) => {
                // Most recent first; the oldest falls off.
                let mut kept =
                    std::iter::once(chosen).chain(entry.endpoints.iter().flatten().copied());
                for slot in endpoints.iter_mut() {
                    *slot = kept.next();
                }
            }
            None => {
                if let Some(first) = endpoints.first_mut() {
                    *first = Some(chosen);
                }
            }
        }
        Some(
            SlotEntry {
                pool_tag: self.pool_tag,
                hash,
                endpoints,
            }
            .encode(),
        )
    }
}

/// The deepest of a prompt's `blocks` blocks that `known` says the table holds, probing as
/// few slots as it can: the last block first (a prompt sent before is known to its end: one
/// probe), then a binary search. A chained hash stands for its whole prefix, so when block `i`
/// was written, so were the blocks before it: known blocks come first. A slot overwritten
/// since (a collision, or two endpoints after it) can hide deeper known blocks; that costs
/// affinity on one request, never a wrong answer. About 6 probes for 32 blocks, where reading
/// every slot took 32 host calls (`make bench`, 23:28: 92 against 46 us of gateway CPU per
/// 16 KiB request).
pub fn deepest_known(blocks: usize, mut known: impl FnMut(usize) -> bool) -> Option<usize> {
    let last = blocks.checked_sub(1)?;
    if known(last) {
        return Some(last);
    }
    // Blocks below `low` are known (or not looked at), blocks from `high` on are not.
    let (mut low, mut high, mut deepest) = (0, last, None);
    while low < high {
        let mid = low + (high - low) / 2;
        if known(mid) {
            deepest = Some(mid);
            low = mid + 1;
        } else {
            high = mid;
        }
    }
    deepest
}

/// How many of the slots read held bytes that are no [`SlotEntry`] at all (not counting another
/// hash's or another pool's entries, which are what a shared table normally holds).
pub fn not_entries(values: &[Option<Vec<u8>>]) -> usize {
    values
        .iter()
        .flatten()
        .filter(|v| SlotEntry::decode(v).is_none())
        .count()
}

/// A tag of a pool's cluster and endpoint list, in order (the entries name endpoints by index).
pub fn pool_tag(cluster: &str, endpoints: &[String]) -> u64 {
    let mut bytes =
        Vec::with_capacity(cluster.len() + endpoints.iter().map(|e| e.len() + 1).sum::<usize>());
    bytes.extend_from_slice(cluster.as_bytes());
    for e in endpoints {
        bytes.push(0);
        bytes.extend_from_slice(e.as_bytes());
    }
    xxh64(&bytes, 0x6262_722d_7069_636b)
}
