//! The endpoint picker's shared table (`core::affinity::shared_blocks`) in the host's shared data, and
//! the raw shared-data calls every part of the filter uses (`root::claim_log` too).
//!
//! Raw ABI calls, not the SDK's `hostcalls::get_shared_data` / `set_shared_data`: those panic
//! (a trap that takes the VM down) on any status but Ok, NotFound (get) and CasMismatch (set).
//! Here every status is an answer: whatever fails, the request is placed by what the table
//! did give (nothing at worst), which is the worker's own picker; nothing waits, nothing
//! retries.

use crate::core::affinity::picker::Picker;
use crate::core::affinity::shared_blocks::{deepest_known, SharedTable};
use crate::core::affinity::shared_load::{SharedLoad, LOAD_ROWS};
use log::debug;
use proxy_wasm::types::Status;
use std::ptr::null_mut;

// The same imports as the SDK's declarations (module "env"), with the status as a u32.
extern "C" {
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
}

/// A slot as read: its bytes (`None`: not found) and the CAS token to write it back with.
pub(super) struct Read {
    pub(super) value: Option<Vec<u8>>,
    pub(super) cas: u32,
}

/// The value and CAS token of `key`; `Ok(None)`-like `Read` when the key does not exist; the
/// host's status otherwise.
pub(super) fn get(key: &str) -> Result<Read, u32> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let mut cas: u32 = 0;
    // SAFETY: the host writes a pointer, a size and a token into the three locals, nothing else.
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    if status == Status::NotFound as u32 {
        return Ok(Read {
            value: None,
            cas: 0,
        });
    }
    if status != Status::Ok as u32 {
        return Err(status);
    }
    let value = if data.is_null() {
        None
    } else {
        // SAFETY: the host allocated the `size` bytes through the SDK's
        // `proxy_on_memory_allocate`, the buffer of a `Vec<u8>` of exactly that capacity;
        // taking it back as that Vec frees it on drop (the SDK's own getter does the same).
        Some(unsafe { Vec::from_raw_parts(data, size, size) })
    };
    Ok(Read { value, cas })
}

/// Writes `key` if its CAS token is still `cas` (0: whatever it is); the host's status
/// otherwise (`Status::CasMismatch`: another worker wrote it since).
pub(super) fn set(key: &str, value: &[u8], cas: u32) -> Result<(), u32> {
    // SAFETY: the host reads the key and value buffers, which outlive the call.
    let status =
        unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) };
    if status == Status::Ok as u32 {
        Ok(())
    } else {
        Err(status)
    }
}

/// What the table knows of a prompt: the deepest block it holds (`core::affinity::shared_blocks::
/// deepest_known`, a handful of reads) and that slot as read, plus every value read (for the
/// garbage count), and whether a read failed (the search then stops where it was).
pub(super) struct Deepest {
    pub(super) block: Option<usize>,
    pub(super) read: Option<Read>,
    pub(super) values: Vec<Option<Vec<u8>>>,
    pub(super) failed: bool,
}

/// Finds the deepest block of `hashes` the shared table holds.
pub(super) fn read_deepest(id: u32, table: &SharedTable, hashes: &[u64]) -> Deepest {
    let mut reads: Vec<(usize, Read)> = Vec::new();
    let mut failed = false;
    let block = deepest_known(hashes.len(), |i| {
        let Some(&hash) = hashes.get(i) else {
            return false;
        };
        if failed {
            return false;
        }
        match get(&table.key(hash)) {
            Ok(read) => {
                let known = table.knows(read.value.as_deref(), hash);
                reads.push((i, read));
                known
            }
            Err(status) => {
                debug!("[{id}] picker: cannot read the shared table: status {status}");
                failed = true;
                false
            }
        }
    });
    let values = reads.iter().map(|(_, r)| r.value.clone()).collect();
    let read = block.and_then(|b| {
        reads
            .into_iter()
            .rev()
            .find_map(|(i, r)| (i == b).then_some(r))
    });
    Deepest {
        block,
        read,
        values,
        failed,
    }
}

/// Names `chosen` in the slots past the deepest block the table held (`deepest`, from
/// [`read_deepest`]), and in that block's slot if it does not name `chosen` yet. The blocks
/// past it were not in the table when read, so they are written without reading them first
/// (CAS 0: a concurrent writer's entry for the same block, or a colliding block's, is
/// replaced, which forgets, never misleads); the blocks before it are left as they are. One
/// write per new block and no reads, where naming every block took a read and a write each.
/// Returns whether a call failed.
pub(super) fn write_past(
    id: u32,
    table: &SharedTable,
    hashes: &[u64],
    deepest: &Deepest,
    chosen: usize,
) -> bool {
    let first_new = deepest.block.map_or(0, |b| b + 1);
    if let (Some(b), Some(read)) = (deepest.block, deepest.read.as_ref()) {
        if let Some(&hash) = hashes.get(b) {
            if let Some(value) = table.update(read.value.as_deref(), hash, chosen) {
                match set(&table.key(hash), &value, read.cas) {
                    Ok(()) => {}
                    Err(status) if status == Status::CasMismatch as u32 => {}
                    Err(status) => {
                        debug!("[{id}] picker: cannot write the shared table: status {status}");
                        return true;
                    }
                }
            }
        }
    }
    for &hash in hashes.iter().skip(first_new) {
        let Some(value) = table.update(None, hash, chosen) else {
            continue;
        };
        if let Err(status) = set(&table.key(hash), &value, 0) {
            debug!("[{id}] picker: cannot write the shared table: status {status}");
            return true;
        }
    }
    false
}

/// Names `chosen` in the slots of `hashes` (read before as `reads`, in the same order; read now
/// when `reads` is shorter). A write that lost a race (CasMismatch: another worker wrote that
/// slot since, as recently as this) is skipped; a failed call ends the writing. Returns whether
/// one failed.
pub(super) fn write_slots(
    id: u32,
    table: &SharedTable,
    hashes: &[u64],
    reads: &[Read],
    chosen: usize,
) -> bool {
    for (i, &hash) in hashes.iter().enumerate() {
        let key = table.key(hash);
        let fresh;
        let read = match reads.get(i) {
            Some(read) => read,
            None => match get(&key) {
                Ok(read) => {
                    fresh = read;
                    &fresh
                }
                Err(status) => {
                    debug!("[{id}] picker: cannot read the shared table: status {status}");
                    return true;
                }
            },
        };
        let Some(value) = table.update(read.value.as_deref(), hash, chosen) else {
            continue;
        };
        match set(&key, &value, read.cas) {
            Ok(()) => {}
            Err(status) if status == Status::CasMismatch as u32 => {}
            Err(status) => {
                debug!("[{id}] picker: cannot write the shared table: status {status}");
                return true;
            }
        }
    }
    false
}

/// The rows of in-flight counts as read.
pub(super) struct LoadRead {
    /// Row by row from 0 (`None`: not found).
    pub(super) values: Vec<Option<Vec<u8>>>,
    /// The first row the reader may claim, with its CAS token.
    pub(super) claim: Option<(usize, u32)>,
    /// A read failed (the rows after it were not read).
    pub(super) failed: bool,
}

/// Reads the pool's rows of in-flight counts from row 0 on, until one is not found (rows are
/// claimed lowest first and never deleted, so none lies past it) or a read fails.
pub(super) fn read_load(id: u32, load: &SharedLoad, owner: u64, now_ms: u64) -> LoadRead {
    let mut values = Vec::new();
    let mut claim = None;
    for row in 0..LOAD_ROWS {
        match get(&load.key(row)) {
            Ok(read) => {
                let end = read.value.is_none();
                if claim.is_none() && load.claimable(read.value.as_deref(), owner, now_ms) {
                    claim = Some((row, read.cas));
                }
                values.push(read.value);
                if end {
                    break;
                }
            }
            Err(status) => {
                debug!("[{id}] picker: cannot read the shared load: status {status}");
                return LoadRead {
                    values,
                    claim,
                    failed: true,
                };
            }
        }
    }
    LoadRead {
        values,
        claim,
        failed: false,
    }
}

/// Writes this worker's counts into its row, if it has one; claims `claim` (a row and its CAS
/// token from [`read_load`]) if it has none. A claim that lost a race is tried again at the
/// next pick. Returns whether a call failed.
pub(super) fn publish_load(
    id: u32,
    load: &SharedLoad,
    picker: &mut Picker,
    claim: Option<(usize, u32)>,
    now_ms: u64,
) -> bool {
    let value = load.row(picker.share_owner(), now_ms, &picker.in_flight());
    let (row, cas) = match (picker.load_row(), claim) {
        (Some(row), _) => (row, 0),
        (None, Some(claim)) => claim,
        (None, None) => return false,
    };
    match set(&load.key(row), &value, cas) {
        Ok(()) => {
            picker.set_load_row(Some(row));
            false
        }
        Err(status) if status == Status::CasMismatch as u32 => false,
        Err(status) => {
            debug!("[{id}] picker: cannot write the shared load: status {status}");
            true
        }
    }
}
