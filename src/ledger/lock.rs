//! An exclusive lock per key. Every claim takes it, so that two callers
//! never claim one key at once: a claim row is written under it, and a
//! second caller's look at the key then sees that row and answers
//! `in_progress` at once instead of queueing behind it in the unique index.
//!
//! For a new key in transaction mode the lock is the claim: it is kept to the
//! end of the transaction and nothing is written until `idem_finish`. Each
//! transaction claims at most `held::LOCK_CLAIMS` keys that way; after that,
//! and for every other claim, the lock is released right after the claim row
//! is written, so a transaction holding 100 000 keys holds only a few locks.
//!
//! It is an advisory lock tag of our own (field4, distinct from
//! `pg_advisory_lock`'s 1 and 2) in the current database, keyed by a 64-bit
//! hash of scope and key (see `key_hash`); a hash collision only makes two
//! keys' claims take turns. The hash has a fixed definition, PostgreSQL's
//! own `hash_bytes_extended`, so every backend computes the same tag for a
//! key whichever version of this library it runs, and a DBA can compute it
//! in SQL to find a key's lock in `pg_locks`.
use pgrx::pg_sys;

unsafe extern "C-unwind" {
    /// `common/hashfn.c`: the function behind `hash_any_extended` and
    /// `hashtextextended`. Not in pgrx's bindings.
    fn hash_bytes_extended(k: *const u8, keylen: i32, seed: u64) -> u64;
}

fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    // SAFETY: hash_bytes_extended reads exactly keylen bytes from k and has
    // no other effect; keys are at most a few kilobytes, well within i32.
    unsafe { hash_bytes_extended(bytes.as_ptr(), bytes.len() as i32, seed) }
}

/// The 64-bit hash of a key: in SQL,
/// `hashtextextended(key, hashtextextended(scope, 0))` (for the "C"
/// collation of the key columns, whose text hash is the bytes' hash).
pub fn key_hash(scope: &str, key: &str) -> u64 {
    hash_bytes(key.as_bytes(), hash_bytes(scope.as_bytes(), 0))
}

/// A key lock held by this backend. Dropping it releases it, unless it was
/// kept (`keep`); while an error unwinds, the (sub)transaction's abort
/// releases it instead.
pub struct KeyLock {
    tag: pg_sys::LOCKTAG,
    /// The resource owner the lock belongs to, which must release it.
    owner: pg_sys::ResourceOwner,
}

/// Which table's keys a lock is for.
#[derive(Clone, Copy)]
pub enum Space {
    Keys = 0x1de0,
    Once = 0x1de1,
}

fn tag_for(space: Space, scope: &str, key: &str) -> pg_sys::LOCKTAG {
    let hash = key_hash(scope, key);
    pg_sys::LOCKTAG {
        // SAFETY: reads a backend global set at connection start.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: (hash >> 32) as u32,
        locktag_field3: hash as u32,
        locktag_field4: space as u16,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    }
}

fn transaction_owner() -> pg_sys::ResourceOwner {
    // SAFETY: reads a backend global, set while a transaction is open
    // (these functions run inside SQL calls).
    unsafe { pg_sys::CurTransactionResourceOwner }
}

impl KeyLock {
    /// Waits for the lock as long as it takes (its holders hold it briefly,
    /// or are the key's holder, whose end is what the caller waits for).
    pub fn acquire(space: Space, scope: &str, key: &str) -> KeyLock {
        let tag = tag_for(space, scope, key);
        let owner = transaction_owner();
        // SAFETY: tag is a valid advisory tag; LockAcquire waits (taking
        // part in deadlock detection) or raises an ERROR.
        as_owner(owner, || unsafe {
            pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as i32, false, false);
        });
        KeyLock { tag, owner }
    }

    /// Takes the lock if it is free.
    pub fn try_acquire(space: Space, scope: &str, key: &str) -> Option<KeyLock> {
        let tag = tag_for(space, scope, key);
        let owner = transaction_owner();
        // SAFETY: as in `acquire`; with dontWait it returns NOT_AVAIL
        // instead of waiting.
        let got = as_owner(owner, || unsafe {
            pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as i32, false, true)
        });
        (got != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL).then(|| KeyLock { tag, owner })
    }

    /// Waits at most until `deadline` for the lock.
    pub fn acquire_until(
        space: Space,
        scope: &str,
        key: &str,
        deadline: pg_sys::TimestampTz,
    ) -> Option<KeyLock> {
        let tag = tag_for(space, scope, key);
        // Taken inside a subtransaction whose commit hands the lock to the
        // transaction's own resource owner, so that is the one to release it.
        // SAFETY: as in `acquire`.
        super::wait::bounded(deadline, || unsafe {
            pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as i32, false, false);
        })
        .then(|| KeyLock {
            tag,
            owner: transaction_owner(),
        })
    }

    /// Keeps the lock to the end of the (sub)transaction: in transaction
    /// mode the lock on a new key is the claim itself.
    pub fn keep(self) {
        std::mem::forget(self);
    }

    /// Releases the lock now.
    pub fn release(self) {
        drop(self);
    }
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        // SAFETY: this guard holds the lock, taken for `owner`, which is
        // still the (sub)transaction's owner (a guard never outlives the
        // SQL call that took it).
        as_owner(self.owner, || unsafe {
            pg_sys::LockRelease(&self.tag, pg_sys::ExclusiveLock as i32, false);
        });
    }
}

/// Runs `f` with `owner` as the current resource owner. Locks are taken for
/// the (sub)transaction's own resource owner, not the statement's portal:
/// a claim kept to the transaction's end must live exactly as long as the
/// (sub)transaction that `held` records it under, even when it was taken
/// while fetching from a cursor.
fn as_owner<T>(owner: pg_sys::ResourceOwner, f: impl FnOnce() -> T) -> T {
    struct Restore(pg_sys::ResourceOwner);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: puts back the owner read below; a plain assignment.
            unsafe { pg_sys::CurrentResourceOwner = self.0 };
        }
    }
    // SAFETY: reads and sets a backend global; Restore puts it back when f
    // returns or unwinds.
    let _restore = unsafe {
        let restore = Restore(pg_sys::CurrentResourceOwner);
        pg_sys::CurrentResourceOwner = owner;
        restore
    };
    f()
}

/// Whether a call should look at its key before taking the key lock.
///
/// Looking first answers a finished key (a duplicate delivery) with one
/// index lookup and no lock, but a new key then needs a second look under
/// the lock, since its row may have been committed between the look and the
/// lock. Locking first costs a finished key a lock it did not need and a new
/// key nothing extra. Both orders are correct; each backend takes the one
/// its recent calls in `space` would have preferred (a two-bit saturating
/// counter, starting on the side of looking first).
pub fn look_first(space: Space) -> bool {
    HABIT.with(|h| h[space.index()].get() >= 2)
}

/// Tells `look_first` what a call found: a finished key (`true`) or a new
/// one.
pub fn learn(space: Space, finished: bool) {
    HABIT.with(|h| {
        let c = &h[space.index()];
        c.set(if finished {
            (c.get() + 1).min(3)
        } else {
            c.get().saturating_sub(1)
        });
    });
}

impl Space {
    fn index(self) -> usize {
        match self {
            Space::Keys => 0,
            Space::Once => 1,
        }
    }
}

thread_local! {
    static HABIT: [std::cell::Cell<u8>; 2] = const { [std::cell::Cell::new(2), std::cell::Cell::new(2)] };
}
