//! `idem_stats()` and `idem_stats_reset()`: cluster-wide counters of what
//! the functions answered, kept in shared memory.
//!
//! The counters exist only when the library is in `shared_preload_libraries`
//! (shared memory is sized when the server starts). Otherwise counting does
//! nothing and `idem_stats()` says what to add to `postgresql.conf`.
//!
//! Each counter is a 64-bit atomic added to with a relaxed fetch-add: a
//! call counts when it returns, whether or not its transaction commits (as
//! `pg_stat_*` counters do), and a reading may mix counts from just before
//! and just after a concurrent call, never a torn value.
use crate::pg::errors::{error, Code};
use crate::pg::fmgr::{finfo_v1, Args, Signature};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;
use std::sync::atomic::{AtomicI64, AtomicPtr, AtomicU64, Ordering};

/// What is counted, in the order of `idem_stats()`'s columns.
#[derive(Clone, Copy)]
#[repr(usize)]
pub enum Counter {
    BeginStarted,
    BeginCompleted,
    BeginFailed,
    BeginInProgress,
    BeginMismatch,
    /// `idem_begin` calls that waited (for a holder's transaction or lease).
    Waits,
    /// Microseconds those calls waited, in all.
    WaitMicros,
    LeaseTakeovers,
    /// Writes with a token that was no longer current (40001).
    StaleTokens,
    Finishes,
    FailsRetryable,
    FailsFinal,
    OnceTrue,
    OnceFalse,
    UpsertInserted,
    UpsertUpdated,
    UpsertUnchanged,
    UpsertSkipped,
    InsertOnceTrue,
    InsertOnceFalse,
    KeysPurged,
}

const COUNTERS: usize = Counter::KeysPurged as usize + 1;

/// The shared memory block.
#[repr(C)]
struct Counters {
    values: [AtomicU64; COUNTERS],
    /// When the counters were last zeroed (server start or
    /// `idem_stats_reset()`), as a timestamptz.
    reset_at: AtomicI64,
}

/// The block's name in the shared memory index. The version is part of it:
/// two versions' libraries preloaded together never share a layout.
const NAME: &CStr = match CStr::from_bytes_with_nul(
    concat!("idempotency-", env!("CARGO_PKG_VERSION"), " counters\0").as_bytes(),
) {
    Ok(name) => name,
    Err(_) => panic!("the block's name has one NUL, at its end"),
};

/// The block, once the postmaster made it (inherited by every backend it
/// forks); null without preloading.
static SHARED: AtomicPtr<Counters> = AtomicPtr::new(std::ptr::null_mut());

static mut PREV_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP: pg_sys::shmem_startup_hook_type = None;

/// From `_PG_init`: asks for the shared memory when the library is being
/// preloaded; does nothing otherwise.
pub fn init() {
    // SAFETY: _PG_init runs in the postmaster (or a single-user backend)
    // while shared_preload_libraries is processed, before any hook is
    // called; the hooks are chained, each calling the one it replaced.
    unsafe {
        if !pg_sys::process_shared_preload_libraries_in_progress {
            return;
        }
        PREV_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request);
        PREV_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(startup);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn request() {
    // SAFETY: called by the postmaster in shmem_request_hook, where
    // RequestAddinShmemSpace is allowed; the previous hook is another
    // library's, called as it expects.
    unsafe {
        if let Some(prev) = PREV_REQUEST {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Counters>());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn startup() {
    // SAFETY: called in shmem_startup_hook, after shared memory was made
    // with the space requested above; AddinShmemInitLock serialises the
    // look-up-or-create of the block (found on a restart after a crash
    // of a backend, when the postmaster makes shared memory anew: not found
    // then either). The block is written whole before it is published.
    unsafe {
        if let Some(prev) = PREV_STARTUP {
            prev();
        }
        let lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let block =
            pg_sys::ShmemInitStruct(NAME.as_ptr(), std::mem::size_of::<Counters>(), &mut found)
                .cast::<Counters>();
        if !found {
            block.write(Counters {
                values: [const { AtomicU64::new(0) }; COUNTERS],
                reset_at: AtomicI64::new(pg_sys::GetCurrentTimestamp()),
            });
        }
        SHARED.store(block, Ordering::Relaxed);
        pg_sys::LWLockRelease(lock);
    }
}

fn shared() -> Option<&'static Counters> {
    let block = SHARED.load(Ordering::Relaxed);
    // SAFETY: a non-null pointer is the block made in `startup`, which
    // lives as long as the server's shared memory, so as this process.
    (!block.is_null()).then(|| unsafe { &*block })
}

/// Adds `n` to a counter (nothing without preloading).
#[inline]
pub fn add(counter: Counter, n: u64) {
    if let Some(c) = shared() {
        c.values[counter as usize].fetch_add(n, Ordering::Relaxed);
    }
}

#[inline]
pub fn count(counter: Counter) {
    add(counter, 1);
}

fn require() -> &'static Counters {
    shared().unwrap_or_else(|| {
        error(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "idempotency statistics are not collected: the library is not preloaded",
        )
        .hint(format!(
            "Add 'idempotency-{0}' to shared_preload_libraries in postgresql.conf \
             (ALTER SYSTEM SET shared_preload_libraries = 'idempotency-{0}', keeping any \
             libraries already listed) and restart the server.",
            env!("CARGO_PKG_VERSION")
        ))
        .raise()
    })
}

finfo_v1!(pg_finfo_idem_stats);

const STATS: Signature = Signature {
    name: "idem_stats",
    args: &[],
    result: None,
};

/// The column types of `idem_stats()`: the counters, with the wait time in
/// milliseconds as double precision, then the time of the last reset.
const STATS_TYPES: [pg_sys::Oid; COUNTERS + 1] = {
    let mut types = [pg_sys::INT8OID; COUNTERS + 1];
    types[Counter::WaitMicros as usize] = pg_sys::FLOAT8OID;
    types[COUNTERS] = pg_sys::TIMESTAMPTZOID;
    types
};

/// `idem_stats()`: one row.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn idem_stats(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: Postgres calls this with the call info of idem_stats.
    let args = unsafe { Args::new(fcinfo, &STATS) };
    let counters = require();
    let rows = args.rows(&STATS_TYPES);
    let mut values = [pg_sys::Datum::from(0usize); COUNTERS + 1];
    let mut nulls = [false; COUNTERS + 1];
    for (i, value) in counters.values.iter().enumerate() {
        let n = value.load(Ordering::Relaxed);
        values[i] = if i == Counter::WaitMicros as usize {
            (n as f64 / 1000.0).into_datum().expect("float8 datum")
        } else {
            pg_sys::Datum::from(n as i64)
        };
    }
    values[COUNTERS] = pg_sys::Datum::from(counters.reset_at.load(Ordering::Relaxed));
    // SAFETY: bigint counters, the wait time as a float8 datum and the
    // reset time as a timestamptz, as STATS_TYPES says.
    unsafe { rows.put(&mut values, &mut nulls) };
    pg_sys::Datum::from(0usize)
}

finfo_v1!(pg_finfo_idem_stats_reset);

const RESET: Signature = Signature {
    name: "idem_stats_reset",
    args: &[],
    result: Some(pg_sys::VOIDOID),
};

/// `idem_stats_reset()`: zeroes every counter and records when.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn idem_stats_reset(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: Postgres calls this with the call info of idem_stats_reset.
    let _args = unsafe { Args::new(fcinfo, &RESET) };
    let counters = require();
    for value in &counters.values {
        value.store(0, Ordering::Relaxed);
    }
    // SAFETY: reads the system clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    counters.reset_at.store(now, Ordering::Relaxed);
    pg_sys::Datum::from(0usize)
}
