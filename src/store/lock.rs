//! A short exclusive lock per key, held only from the probe to the end of the
//! statement that claims the key (microseconds), never for the transaction.
//! Every claim takes it, so a second caller's probe always sees the first
//! caller's claim row and answers `in_progress` at once instead of queueing
//! behind it in the unique index.
//!
//! It is an advisory lock tag of our own (field4 below) in the current
//! database, keyed by a 64-bit hash of scope and key; a hash collision only
//! makes two keys' claims take turns. Because it is released right after the
//! write, a transaction holding 100 000 keys holds none of these locks.
use pgrx::pg_sys;
use std::hash::{Hash, Hasher};

/// Distinguishes our tags from `pg_advisory_lock`'s (which use 1 and 2).
const TAG_SPACE: u16 = 0x1de0;

pub struct KeyLock {
    tag: pg_sys::LOCKTAG,
}

fn tag_for(scope: &str, key: &str) -> pg_sys::LOCKTAG {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    scope.hash(&mut h);
    key.hash(&mut h);
    let hash = h.finish();
    pg_sys::LOCKTAG {
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: (hash >> 32) as u32,
        locktag_field3: hash as u32,
        locktag_field4: TAG_SPACE,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    }
}

impl KeyLock {
    pub fn acquire(scope: &str, key: &str) -> KeyLock {
        let tag = tag_for(scope, key);
        unsafe {
            pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as i32, false, false);
        }
        KeyLock { tag }
    }

    /// Releases the lock. On an error the lock is released by the
    /// (sub)transaction abort instead, so there is no `Drop`.
    pub fn release(self) {
        unsafe {
            pg_sys::LockRelease(&self.tag, pg_sys::ExclusiveLock as i32, false);
        }
    }
}
