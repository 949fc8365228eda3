//! `idem_once`: the deduplication ledger for side effects and webhooks.
use crate::ledger::insert;
use crate::ledger::key_and_scope;
use crate::ledger::lock::{self, KeyLock, Space};
use crate::ledger::probe::{probe_once, Recorded};
use crate::ledger::wait::wait_for_transaction;
use crate::observability::stats::{self, Counter};
use crate::pg::fmgr::{finfo_v1, Args, Signature};
use crate::pg::relation::check_writable;
use pgrx::pg_sys;
use pgrx::prelude::*;

finfo_v1!(pg_finfo_idem_once);

const SIGNATURE: Signature = Signature {
    name: "idem_once",
    args: &[pg_sys::TEXTOID, pg_sys::TEXTOID],
    result: Some(pg_sys::BOOLOID),
};

/// `idem_once(key, scope) returns boolean`: true the first time the key is
/// recorded (the record commits with the caller's transaction), false when
/// it was recorded already. A caller that meets another open transaction
/// recording the same key waits for it: false if it commits, true if it
/// rolls back.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn idem_once(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: Postgres calls this with the call info of idem_once.
    let args = unsafe { Args::new(fcinfo, &SIGNATURE) };
    let (key, scope) = key_and_scope(&args, 0, 1);
    // SAFETY: reads a backend global.
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let new = record(&scope, &key, now);
    stats::count(if new {
        Counter::OnceTrue
    } else {
        Counter::OnceFalse
    });
    pg_sys::Datum::from(new)
}

/// As INSERT ... ON CONFLICT DO NOTHING would, without running SQL: the key
/// lock makes look-then-insert atomic among callers, and a key another open
/// transaction is recording is waited for, then looked at again.
fn record(scope: &str, key: &str, now: pg_sys::TimestampTz) -> bool {
    // Look first, or lock first: see `lock::look_first`.
    let mut locked =
        (!lock::look_first(Space::Once)).then(|| KeyLock::acquire(Space::Once, scope, key));
    loop {
        match probe_once(scope, key) {
            Recorded::Yes => {
                if let Some(lock) = locked {
                    lock.release();
                }
                lock::learn(Space::Once, true);
                return false;
            }
            Recorded::Busy(xid) => {
                if let Some(lock) = locked.take() {
                    lock.release();
                }
                wait_for_transaction(xid, None);
            }
            Recorded::No => match locked.take() {
                None => locked = Some(KeyLock::acquire(Space::Once, scope, key)),
                Some(lock) => {
                    // A new record: refused where nothing may be written
                    // (25006); a key already recorded was answered above.
                    check_writable(c"idem_once");
                    lock::learn(Space::Once, false);
                    insert::insert_once_row(scope, key, now);
                    lock.release();
                    return true;
                }
            },
        }
    }
}
