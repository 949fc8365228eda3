//! Waiting, for at most a given time, for the transaction that holds a key
//! (or for the key's lock, which a transaction-mode holder keeps).
//!
//! The wait is a real lock wait, as a row lock wait is: it shows in `pg_locks`, the deadlock detector sees it, and it ends
//! the moment the holder commits or rolls back. Postgres offers no lock wait
//! that returns when a timeout passes, only `lock_timeout`, which raises. So
//! the wait runs with `lock_timeout` set to what is left of `wait`, inside an
//! internal subtransaction that catches exactly that error. The subtransaction
//! writes nothing, so it costs no transaction id. A `lock_timeout` of the
//! caller's own that is shorter than what is left still ends the wait with
//! its error (55P03), as it would any lock wait.
//!
//! On a hot standby the holder is a transaction on the primary, which holds
//! no lock here: the wait polls until the standby sees it end, with the
//! same bounds (`wait`, then the caller's `lock_timeout` as 55P03).
use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::pg_sys::PgTryBuilder;
use pgrx::PgSqlErrorCode;

/// Runs `wait` (a lock wait) with `lock_timeout` set to what is left until
/// `deadline`; true when it returned, false when the time ran out.
pub fn bounded(
    deadline: pg_sys::TimestampTz,
    wait: impl FnOnce() + std::panic::UnwindSafe,
) -> bool {
    // SAFETY: reads the system clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    if now >= deadline {
        return false;
    }
    let left_ms = ((deadline - now + 999) / 1000).clamp(1, i32::MAX as i64) as i32;
    // SAFETY: the internal subtransaction is ended on every path: released
    // when `wait` returns, rolled back when it raises (lock_timeout or any
    // other error, which is then raised again); `finally` puts back the
    // memory context, resource owner and lock_timeout the subtransaction
    // changed. `wait` only waits for a lock.
    unsafe {
        let old_context = pg_sys::CurrentMemoryContext;
        let old_owner = pg_sys::CurrentResourceOwner;
        let old_timeout = pg_sys::LockTimeout;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(old_context);
        // A shorter lock_timeout of the caller's own still applies: then
        // its error is the caller's, not the end of `wait`.
        let callers = old_timeout > 0 && old_timeout <= left_ms;
        pg_sys::LockTimeout = if callers { old_timeout } else { left_ms };
        PgTryBuilder::new(|| {
            wait();
            // Committing the subtransaction hands a lock it took to the
            // caller's (sub)transaction.
            pg_sys::ReleaseCurrentSubTransaction();
            true
        })
        .catch_when(
            PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
            |e: CaughtError| {
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
                if callers {
                    e.rethrow()
                }
                false
            },
        )
        // Any other error (a cancel, statement_timeout, a deadlock) must not
        // leave the internal subtransaction open: roll it back, then let the
        // error abort the caller's (sub)transaction as usual.
        .catch_others(|e: CaughtError| {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            e.rethrow()
        })
        .finally(|| {
            pg_sys::LockTimeout = old_timeout;
            pg_sys::MemoryContextSwitchTo(old_context);
            pg_sys::CurrentResourceOwner = old_owner;
        })
        .execute()
    }
}

/// Waits until transaction `xid` ends or `deadline` passes (None: as long
/// as it takes, bounded only by the caller's `lock_timeout`).
pub fn wait_for_transaction(xid: pg_sys::TransactionId, deadline: Option<pg_sys::TimestampTz>) {
    if in_recovery() {
        return poll_on_standby(xid, deadline);
    }
    // SAFETY: waits for transaction xid to end (a lock wait taking part in
    // deadlock detection), or raises an ERROR.
    let wait = || unsafe {
        pg_sys::XactLockTableWait(
            xid,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            pg_sys::XLTW_Oper::XLTW_None,
        );
    };
    match deadline {
        Some(deadline) => {
            bounded(deadline, wait);
        }
        None => wait(),
    }
}

fn in_recovery() -> bool {
    // SAFETY: reads shared state under its own spinlock.
    unsafe { pg_sys::RecoveryInProgress() }
}

/// On a standby: sleeps in short steps until the standby sees `xid` end,
/// `deadline` passes, or the caller's `lock_timeout` runs out (55P03).
fn poll_on_standby(xid: pg_sys::TransactionId, deadline: Option<pg_sys::TimestampTz>) {
    // SAFETY: reads the system clock and a backend global.
    let (start, lock_timeout_ms) = unsafe { (pg_sys::GetCurrentTimestamp(), pg_sys::LockTimeout) };
    let timeout_at = (lock_timeout_ms > 0).then(|| start + lock_timeout_ms as i64 * 1000);
    loop {
        // SAFETY: on a standby the known-assigned transaction ids say
        // whether a primary's transaction is still running.
        if !unsafe { pg_sys::TransactionIdIsInProgress(xid) } {
            return;
        }
        // SAFETY: reads the system clock.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        if deadline.is_some_and(|d| now >= d) {
            return;
        }
        if timeout_at.is_some_and(|t| now >= t) {
            crate::pg::errors::error(
                PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
                "canceling statement due to lock timeout",
            )
            .raise();
        }
        let step = [deadline, timeout_at]
            .into_iter()
            .flatten()
            .fold(now + 10_000, i64::min);
        sleep_until(step);
    }
}

/// Sleeps until `until`, waking every 10 ms at most so that cancellation
/// stays prompt.
pub fn sleep_until(until: pg_sys::TimestampTz) {
    loop {
        // SAFETY: reads the system clock.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        if now >= until {
            return;
        }
        let ms = ((until - now + 999) / 1000).clamp(1, 10);
        // SAFETY: waits on this backend's own latch for at most ms
        // milliseconds (exiting if the postmaster dies), then resets it.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                ms as _,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
    }
}
