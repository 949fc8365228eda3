//! `idem_finish`, `idem_fail` and `idem_checkpoint`: what the holder of a key
//! records. In transaction mode the holder is the transaction that began the
//! key; in lease mode it is whoever presents the current fencing token.
use crate::keys::held::{self, Held};
use crate::keys::owner;
use crate::keys::response;
use crate::ledger::insert::{self as direct, KeyRow};
use crate::ledger::key_and_scope;
use crate::ledger::lock::{KeyLock, Space};
use crate::ledger::probe::{probe, Seen};
use crate::ledger::statements::{self, Outcome, Tid};
use crate::ledger::{COMPLETED, FAILED, IN_PROGRESS, RELEASED};
use crate::observability::stats::{self, Counter};
use crate::pg::errors::{error, name_key, Code};
use crate::pg::fmgr::{self, finfo_v1, Args, Signature};
use crate::pg::relation::check_writable;
use crate::pg::settings;
use pgrx::pg_sys;
use pgrx::prelude::*;

fn not_held(key: &str, scope: &str) -> ! {
    error(
        Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("{} is not held by this transaction", name_key(key, scope)),
    )
    .hint("Call idem_begin() for it in this transaction first and act only on 'started'; for a key begun with a lease, pass its token.")
    .raise()
}

fn fenced(key: &str, scope: &str, token: i64) -> ! {
    stats::count(Counter::StaleTokens);
    error(
        Code::ERRCODE_T_R_SERIALIZATION_FAILURE,
        format!(
            "token {token} is no longer current for {}",
            name_key(key, scope)
        ),
    )
    .detail("The lease ended and another worker took the key over, or the key was finished.")
    .hint("Stop this attempt: its work belongs to the key's current holder.")
    .raise()
}

/// Who is writing: this transaction (the held entry) or a lease holder.
enum Holder {
    Transaction(Held),
    Lease,
}

/// Checks that the caller holds the key; returns where the claim row is,
/// and the key lock when the holder is a lease (so that no takeover can slip
/// in before the write).
fn holder(key: &str, scope: &str, token: Option<i64>) -> (Holder, Option<Tid>, Option<KeyLock>) {
    match token {
        None => match held::get(scope, key) {
            Some(h) if !h.finished => {
                // The transaction holds it, under the role that claimed it
                // (or one with its privileges, after a SET ROLE).
                owner::check_holder(h.owner, key, scope);
                let tid = h.tid;
                (Holder::Transaction(h), tid, None)
            }
            _ => not_held(key, scope),
        },
        Some(token) => {
            let lock = KeyLock::acquire(Space::Keys, scope, key);
            match probe(scope, key) {
                Seen::Found(row) if row.status == IN_PROGRESS && row.token == Some(token) => {
                    if let Some(role) = owner::denied(row.owner.as_deref()) {
                        lock.release();
                        owner::refuse(key, scope, role);
                    }
                    (Holder::Lease, Some(row.tid), Some(lock))
                }
                Seen::Absent | Seen::Deleting { .. } => {
                    lock.release();
                    not_held(key, scope)
                }
                _ => {
                    lock.release();
                    fenced(key, scope, token)
                }
            }
        }
    }
}

fn ttl_expiry(
    key: &str,
    scope: &str,
    ttl: Option<pg_sys::Interval>,
) -> (pg_sys::TimestampTz, pg_sys::TimestampTz) {
    // SAFETY: reads a backend global.
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let expires = match ttl {
        Some(iv) => {
            if !fmgr::ends_after(now, &iv) {
                error(
                    Code::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!("ttl for {} must be positive", name_key(key, scope)),
                )
                .hint("Pass an interval such as '7 days', or omit ttl to use idempotency.ttl.")
                .raise();
            }
            fmgr::timestamptz_plus(now, &iv)
        }
        None => now.saturating_add(settings::ttl_seconds() as i64 * 1_000_000),
    };
    (now, expires)
}

fn record_outcome(
    function: &std::ffi::CStr,
    key: &str,
    scope: &str,
    token: Option<i64>,
    outcome: Outcome,
    ttl: Option<pg_sys::Interval>,
) {
    check_writable(function);
    let (now, expires) = ttl_expiry(key, scope, ttl);
    let (who, at, lock) = holder(key, scope, token);
    let claimed_by = match &who {
        Holder::Transaction(h) if at.is_none() => Some(owner::role_name(h.owner)),
        _ => None,
    };
    let tid = match (&who, at) {
        // A new key claimed by its lock: its one row is written now.
        (Holder::Transaction(h), None) => direct::insert_key_row(&KeyRow {
            scope,
            key,
            status: outcome.status,
            attempt: h.attempt,
            token: None,
            owner: claimed_by.as_deref(),
            fingerprint: h.fingerprint.as_ref(),
            result: outcome.result,
            response: outcome.response,
            recovery_point: h.recovery_point.as_deref(),
            created_at: now,
            finished_at: Some(now),
            expires_at: Some(expires),
            locked_until: None,
            lease: None,
        }),
        (_, Some(at)) => {
            match statements::update_outcome(&at, scope, key, &outcome, now, expires) {
                Some(tid) => tid,
                None => not_held(key, scope),
            }
        }
        (Holder::Lease, None) => unreachable!("a lease holder's row was found"),
    };
    if let Some(lock) = lock {
        lock.release();
    }
    if let Holder::Transaction(h) = who {
        held::set(
            scope,
            key,
            Held {
                finished: true,
                tid: Some(tid),
                ..h
            },
        );
    }
}

finfo_v1!(pg_finfo_idem_finish);

const TEXT: pg_sys::Oid = pg_sys::TEXTOID;
const JSONB: pg_sys::Oid = pg_sys::JSONBOID;
const INT8: pg_sys::Oid = pg_sys::INT8OID;
const VOID: Option<pg_sys::Oid> = Some(pg_sys::VOIDOID);

const INTERVAL: pg_sys::Oid = pg_sys::INTERVALOID;
const INT4: pg_sys::Oid = pg_sys::INT4OID;
const BYTEA: pg_sys::Oid = pg_sys::BYTEAOID;

const FINISH: Signature = Signature {
    name: "idem_finish",
    args: &[TEXT, JSONB, TEXT, INT8, INTERVAL, INT4, JSONB, BYTEA],
    result: VOID,
};

const FAIL: Signature = Signature {
    name: "idem_fail",
    args: &[
        TEXT,
        JSONB,
        TEXT,
        pg_sys::BOOLOID,
        INT8,
        INTERVAL,
        INT4,
        JSONB,
        BYTEA,
    ],
    result: VOID,
};

const CHECKPOINT: Signature = Signature {
    name: "idem_checkpoint",
    args: &[TEXT, TEXT, TEXT, INT8],
    result: VOID,
};

/// `idem_finish(key, result, scope, token, ttl, response_status,
/// response_headers, response_body)`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn idem_finish(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: Postgres calls this with the call info of idem_finish.
    let args = unsafe { Args::new(fcinfo, &FINISH) };
    let (key, scope) = key_and_scope(&args, 0, 2);
    let response = response::from_args(&args, 5, &key, &scope);
    record_outcome(
        c"idem_finish",
        &key,
        &scope,
        args.i64(3),
        Outcome {
            status: COMPLETED,
            result: args.datum(1),
            response,
        },
        args.interval(4),
    );
    stats::count(Counter::Finishes);
    pg_sys::Datum::from(0usize)
}

finfo_v1!(pg_finfo_idem_fail);

/// `idem_fail(key, error, scope, retryable, token, ttl, response_status,
/// response_headers, response_body)`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn idem_fail(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: Postgres calls this with the call info of idem_fail.
    let args = unsafe { Args::new(fcinfo, &FAIL) };
    let (key, scope) = key_and_scope(&args, 0, 2);
    let status = if args.bool(3).unwrap_or(true) {
        RELEASED
    } else {
        FAILED
    };
    let response = response::from_args(&args, 6, &key, &scope);
    record_outcome(
        c"idem_fail",
        &key,
        &scope,
        args.i64(4),
        Outcome {
            status,
            result: args.datum(1),
            response,
        },
        args.interval(5),
    );
    stats::count(if status == RELEASED {
        Counter::FailsRetryable
    } else {
        Counter::FailsFinal
    });
    pg_sys::Datum::from(0usize)
}

finfo_v1!(pg_finfo_idem_checkpoint);

/// `idem_checkpoint(key, recovery_point, scope, token)`: records progress
/// and, in lease mode, renews the lease for as long as it was first taken.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn idem_checkpoint(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: Postgres calls this with the call info of idem_checkpoint.
    let args = unsafe { Args::new(fcinfo, &CHECKPOINT) };
    let (key, scope) = key_and_scope(&args, 0, 2);
    let recovery_point = args.text(1);
    let token = args.i64(3);
    check_writable(c"idem_checkpoint");
    let (who, at, lock) = holder(&key, &scope, token);
    // SAFETY: reads the system clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    // A claim by key lock has no row yet: the recovery point is written
    // with the outcome.
    let tid = match at {
        Some(at) => {
            match statements::update_checkpoint(&at, &scope, &key, recovery_point.as_deref(), now) {
                Some(tid) => Some(tid),
                None => not_held(&key, &scope),
            }
        }
        None => None,
    };
    if let Some(lock) = lock {
        lock.release();
    }
    if let Holder::Transaction(h) = who {
        held::set(
            &scope,
            &key,
            Held {
                recovery_point,
                tid,
                ..h
            },
        );
    }
    pg_sys::Datum::from(0usize)
}
