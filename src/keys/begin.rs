//! `idem_begin`: claim a key, or learn why not.
//!
//! The claim is a row in `idempotency.keys` with status `p`. In transaction
//! mode it is written by the caller's transaction and so commits or rolls
//! back with the caller's own writes; while that transaction is open, other
//! transactions see the uncommitted row through the probe and answer
//! `in_progress`. In lease mode the row carries `locked_until` and a fencing
//! token, and others answer `in_progress` until the lease ends.
use crate::canonical::sql::fingerprint_of_jsonb;
use crate::keys::held::{self, Held};
use crate::keys::owner;
use crate::ledger::insert;
use crate::ledger::lock::{self, KeyLock, Space};
use crate::ledger::probe::{probe, Row, Seen};
use crate::ledger::statements::{self, Claim};
use crate::ledger::wait::{sleep_until, wait_for_transaction};
use crate::ledger::{key_and_scope, Response};
use crate::ledger::{COMPLETED, FAILED, IN_PROGRESS, RELEASED};
use crate::observability::stats::{self, Counter};
use crate::pg::errors::{error, name_key, Code};
use crate::pg::fmgr::{self, finfo_v1, Args, Signature};
use crate::pg::relation::check_writable;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::Cell;

enum Answer {
    Started {
        attempt: i32,
        recovery_point: Option<String>,
        token: Option<i64>,
    },
    Completed {
        result: Option<pg_sys::Datum>,
        response: Response,
        attempt: i32,
        recovery_point: Option<String>,
    },
    Failed {
        result: Option<pg_sys::Datum>,
        response: Response,
        attempt: i32,
        recovery_point: Option<String>,
    },
    InProgress {
        attempt: Option<i32>,
        /// Microseconds until the holder's lease ends; None for a holder in
        /// transaction mode, whose end cannot be foreseen.
        retry_after: Option<i64>,
    },
    Mismatch,
}

finfo_v1!(pg_finfo_idem_begin);

const INTERVAL: pg_sys::Oid = pg_sys::INTERVALOID;

const SIGNATURE: Signature = Signature {
    name: "idem_begin",
    args: &[
        pg_sys::TEXTOID,
        pg_sys::JSONBOID,
        pg_sys::TEXTOID,
        INTERVAL,
        INTERVAL,
    ],
    // idem_begin_result, whose columns `return_row` checks.
    result: None,
};

/// The columns of `idem_begin_result`.
const RESULT_COLUMNS: [pg_sys::Oid; 9] = [
    pg_sys::TEXTOID,
    pg_sys::JSONBOID,
    pg_sys::INT4OID,
    pg_sys::TEXTOID,
    pg_sys::INT8OID,
    pg_sys::INT4OID,
    pg_sys::JSONBOID,
    pg_sys::BYTEAOID,
    INTERVAL,
];

/// `idem_begin(key, request, scope, lease, wait)`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn idem_begin(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: Postgres calls this with the call info of idem_begin.
    let args = unsafe { Args::new(fcinfo, &SIGNATURE) };
    let (key, scope) = key_and_scope(&args, 0, 2);
    let now = clock();
    let lease = args.interval(3);
    if let Some(iv) = &lease {
        if !fmgr::ends_after(now, iv) {
            error(
                Code::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("lease for {} must be positive", name_key(&key, &scope)),
            )
            .hint("Pass an interval such as '2 minutes', or NULL for transaction mode.")
            .raise();
        }
    }
    let deadline = match args.interval(4) {
        None => now,
        Some(iv) => {
            let deadline = fmgr::timestamptz_plus(now, &iv);
            if deadline < now {
                error(
                    Code::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!("wait for {} must not be negative", name_key(&key, &scope)),
                )
                .hint("Pass '0' to answer at once, or how long to wait for the holder.")
                .raise();
            }
            deadline
        }
    };
    let fingerprint = args.datum(1).map(fingerprint_of_jsonb);

    WAITED.set(false);
    let answer = begin(&key, &scope, fingerprint, lease.as_ref(), deadline);
    count(&answer, now);

    let reply = Reply::from(answer);
    let mut values = [pg_sys::Datum::from(0usize); 9];
    let mut nulls = [true; 9];
    (values[0], nulls[0]) = fmgr::text_datum(Some(reply.status));
    (values[3], nulls[3]) = fmgr::text_datum(reply.recovery_point.as_deref());
    let Response {
        status: code,
        headers,
        body,
    } = reply.response;
    let datums = [
        (1, reply.result),
        (2, reply.attempt.map(pg_sys::Datum::from)),
        (4, reply.token.map(pg_sys::Datum::from)),
        (5, code.map(pg_sys::Datum::from)),
        (6, headers),
        (7, body),
        (8, reply.retry_after.map(fmgr::interval_datum)),
    ];
    for (i, datum) in datums {
        if let Some(d) = datum {
            (values[i], nulls[i]) = (d, false);
        }
    }
    args.return_row(&RESULT_COLUMNS, &mut values, &mut nulls)
}

thread_local! {
    /// Whether the current `idem_begin` call has waited.
    static WAITED: Cell<bool> = const { Cell::new(false) };
}

/// Runs a wait of `idem_begin`'s, noting in `WAITED` that the call waited.
fn timed<T>(wait: impl FnOnce() -> T) -> T {
    WAITED.set(true);
    wait()
}

/// Counts the answer (and the wait) in `idem_stats()`. A call that waited
/// counts as waiting from its start (`started`, the clock its `wait` is
/// measured from) until its answer: the time the caller was held up, the
/// re-reads between waits included. A call that waited out its whole
/// `wait` so counts at least that long (it answers only once the clock has
/// passed its deadline).
fn count(answer: &Answer, started: pg_sys::TimestampTz) {
    stats::count(match answer {
        Answer::Started { .. } => Counter::BeginStarted,
        Answer::Completed { .. } => Counter::BeginCompleted,
        Answer::Failed { .. } => Counter::BeginFailed,
        Answer::InProgress { .. } => Counter::BeginInProgress,
        Answer::Mismatch => Counter::BeginMismatch,
    });
    if WAITED.get() {
        stats::count(Counter::Waits);
        stats::add(
            Counter::WaitMicros,
            clock().saturating_sub(started).max(0) as u64,
        );
    }
}

/// One row of `idem_begin_result`: NULL wherever the answer has nothing.
#[derive(Default)]
struct Reply {
    status: &'static str,
    result: Option<pg_sys::Datum>,
    attempt: Option<i32>,
    recovery_point: Option<String>,
    token: Option<i64>,
    response: Response,
    retry_after: Option<i64>,
}

impl From<Answer> for Reply {
    fn from(answer: Answer) -> Reply {
        match answer {
            Answer::Started {
                attempt,
                recovery_point,
                token,
            } => Reply {
                status: "started",
                attempt: Some(attempt),
                recovery_point,
                token,
                ..Reply::default()
            },
            Answer::Completed {
                result,
                response,
                attempt,
                recovery_point,
            } => Reply {
                status: "completed",
                result,
                attempt: Some(attempt),
                recovery_point,
                response,
                ..Reply::default()
            },
            Answer::Failed {
                result,
                response,
                attempt,
                recovery_point,
            } => Reply {
                status: "failed",
                result,
                attempt: Some(attempt),
                recovery_point,
                response,
                ..Reply::default()
            },
            Answer::InProgress {
                attempt,
                retry_after,
            } => Reply {
                status: "in_progress",
                attempt,
                retry_after,
                ..Reply::default()
            },
            Answer::Mismatch => Reply {
                status: "mismatch",
                ..Reply::default()
            },
        }
    }
}

fn differs(stored: Option<&[u8; 32]>, new: Option<&[u8; 32]>) -> bool {
    matches!((stored, new), (Some(a), Some(b)) if a != b)
}

fn clock() -> pg_sys::TimestampTz {
    // SAFETY: reads the system clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

fn transaction_start() -> pg_sys::TimestampTz {
    // SAFETY: reads a backend global.
    unsafe { pg_sys::GetCurrentTransactionStartTimestamp() }
}

fn snapshot_is_transaction_wide() -> bool {
    // SAFETY: reads a backend global.
    unsafe { pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 }
}

fn serialization_failure(key: &str, scope: &str) -> ! {
    error(
        Code::ERRCODE_T_R_SERIALIZATION_FAILURE,
        format!(
            "could not serialize access to {}: it changed after this transaction's snapshot",
            name_key(key, scope)
        ),
    )
    .hint("Retry the transaction.")
    .raise()
}

fn begin(
    key: &str,
    scope: &str,
    fingerprint: Option<[u8; 32]>,
    lease: Option<&pg_sys::Interval>,
    deadline: pg_sys::TimestampTz,
) -> Answer {
    // A key this transaction already holds: the same attempt again.
    if let Some(h) = held::get(scope, key).filter(|h| !h.finished) {
        // Under the role that claimed it (see outcome.rs: after SET ROLE).
        owner::check_holder(h.owner, key, scope);
        if differs(h.fingerprint.as_ref(), fingerprint.as_ref()) {
            return Answer::Mismatch;
        }
        if lease.is_some() {
            error(
                Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "{} is held by this transaction in transaction mode",
                    name_key(key, scope)
                ),
            )
            .hint("Finish or fail it first, or begin it without a lease.")
            .raise();
        }
        return Answer::Started {
            attempt: h.attempt,
            recovery_point: h.recovery_point,
            token: None,
        };
    }
    // A lease holder's finish is a commit we cannot wait on as a lock (it is
    // another transaction than the claim's), so a wait on a lease re-reads
    // the key, every 1 ms at first and every 50 ms at most.
    let mut lease_poll: i64 = 1_000;
    // The first look may be taken without the key lock (see
    // `lock::look_first`), so that a finished key (a duplicate delivery)
    // costs one index lookup and no lock. Otherwise each round tries the key
    // lock and then looks at the key (again). With the lock, the look
    // decides and a claim may follow. Without it (someone is claiming the
    // key, or holds it by its lock), the look still answers a finished key,
    // and otherwise the key is in progress.
    let mut first = lock::look_first(Space::Keys);
    loop {
        let now = clock();
        let lock = if first {
            None
        } else {
            KeyLock::try_acquire(Space::Keys, scope, key)
        };
        let seen = probe(scope, key);
        if let Seen::Found(row) = &seen {
            let expired = row.expired(now);
            if !expired && (row.status == COMPLETED || row.status == FAILED) {
                if let Some(lock) = lock {
                    lock.release();
                }
                let Seen::Found(row) = seen else {
                    unreachable!()
                };
                refuse_unless_owner(&row, now, key, scope);
                if differs(row.fingerprint.as_ref(), fingerprint.as_ref()) {
                    return Answer::Mismatch;
                }
                lock::learn(Space::Keys, true);
                return replay(row);
            }
        }
        if std::mem::take(&mut first) && !matches!(seen, Seen::Busy { .. }) {
            continue;
        }
        let lock = match (lock, seen) {
            (Some(lock), seen) => (lock, seen),
            (None, busy @ Seen::Busy { .. }) => {
                match answer_busy(busy, key, scope, fingerprint.as_ref(), now, deadline) {
                    Some(answer) => return answer,
                    None => continue,
                }
            }
            (None, seen) => {
                if let Seen::Found(row) = &seen {
                    refuse_unless_owner(row, now, key, scope);
                    if differs(row.fingerprint.as_ref(), fingerprint.as_ref()) && !row.expired(now)
                    {
                        return Answer::Mismatch;
                    }
                }
                if now >= deadline {
                    return Answer::InProgress {
                        attempt: attempt_of(&seen),
                        retry_after: retry_after_of(&seen, now),
                    };
                }
                // Wait for the lock's holder, then look again holding it.
                match timed(|| KeyLock::acquire_until(Space::Keys, scope, key, deadline)) {
                    Some(lock) => (lock, probe(scope, key)),
                    None => continue,
                }
            }
        };
        let (lock, seen) = lock;
        match seen {
            Seen::Absent => {
                // A claim: refused where nothing may be written (25006).
                check_writable(c"idem_begin");
                lock::learn(Space::Keys, false);
                if lease.is_none() && held::take_lock_claim() {
                    // The lock is the claim: nothing is written until
                    // idem_finish or idem_fail, and a rollback leaves nothing.
                    lock.keep();
                    held::set(
                        scope,
                        key,
                        Held {
                            attempt: 1,
                            fingerprint,
                            recovery_point: None,
                            finished: false,
                            owner: owner::current_role(),
                            tid: None,
                        },
                    );
                    return Answer::Started {
                        attempt: 1,
                        recovery_point: None,
                        token: None,
                    };
                }
                let claim = new_claim(
                    1,
                    fingerprint.as_ref(),
                    None,
                    Some(transaction_start()),
                    lease,
                    now,
                    owner::current_role_name(),
                    None,
                );
                let tid = insert::insert_key_row(&claim.row(scope, key));
                lock.release();
                return started(scope, key, claim, fingerprint, tid);
            }
            Seen::Deleting { xid } => {
                // A purge is removing the expired row; it commits quickly,
                // but the wait is bounded like any other.
                lock.release();
                if now >= deadline {
                    return Answer::InProgress {
                        attempt: None,
                        retry_after: None,
                    };
                }
                timed(|| wait_for_transaction(xid, Some(deadline)));
            }
            busy @ Seen::Busy { .. } => {
                lock.release();
                if let Some(answer) =
                    answer_busy(busy, key, scope, fingerprint.as_ref(), now, deadline)
                {
                    return answer;
                }
            }
            Seen::Found(row) => {
                let expired = row.expired(now);
                let leased = row.status == IN_PROGRESS
                    && !row.own
                    && row.locked_until.is_some_and(|l| l > now);
                if let Some(role) = foreign_owner(&row, now) {
                    lock.release();
                    owner::refuse(key, scope, role);
                }
                if !expired && differs(row.fingerprint.as_ref(), fingerprint.as_ref()) {
                    lock.release();
                    return Answer::Mismatch;
                }
                let claim = match row.status {
                    _ if expired => {
                        // Past its expiry a key is unknown: start afresh.
                        new_claim(
                            1,
                            fingerprint.as_ref(),
                            None,
                            Some(transaction_start()),
                            lease,
                            now,
                            owner::current_role_name(),
                            row.token,
                        )
                    }
                    IN_PROGRESS if row.own => {
                        lock.release();
                        return Answer::Started {
                            attempt: row.attempt,
                            recovery_point: row.recovery_point,
                            token: row.token,
                        };
                    }
                    IN_PROGRESS if leased => {
                        lock.release();
                        if now >= deadline {
                            return Answer::InProgress {
                                attempt: Some(row.attempt),
                                retry_after: lease_left(&row, now),
                            };
                        }
                        let until = row.locked_until.unwrap_or(now).min(deadline);
                        timed(|| sleep_until(until.min(now.saturating_add(lease_poll))));
                        lease_poll = (lease_poll * 2).min(50_000);
                        continue;
                    }
                    // Released for a retry, or a lease that has ended: the
                    // next attempt, resuming from the last recovery point.
                    // The key stays its owner's (a key from before owners
                    // were recorded becomes the claimer's).
                    IN_PROGRESS | RELEASED => new_claim(
                        row.attempt + 1,
                        row.fingerprint.as_ref().or(fingerprint.as_ref()),
                        row.recovery_point.as_deref(),
                        None,
                        lease,
                        now,
                        row.owner.clone().unwrap_or_else(owner::current_role_name),
                        row.token,
                    ),
                    // Finished while this caller waited for the lock.
                    COMPLETED | FAILED => {
                        lock.release();
                        return replay(row);
                    }
                    other => pgrx::error!(
                        "idempotency.keys holds an unknown status {:?}",
                        other as char
                    ),
                };
                // Everything that can be answered without writing was;
                // this is a claim.
                check_writable(c"idem_begin");
                let written = statements::update_claim(&row.tid, scope, key, &claim);
                lock.release();
                if let Some(tid) = written {
                    // A claim of a row left in progress by another holder
                    // (whose lease ended) takes the key over.
                    if row.status == IN_PROGRESS && !expired {
                        stats::count(Counter::LeaseTakeovers);
                    }
                    return started(scope, key, claim, fingerprint, tid);
                }
                // The row changed or went away since the look (READ
                // COMMITTED: look again), or this transaction's snapshot
                // cannot see it (claiming it could double a claim).
                if snapshot_is_transaction_wide() {
                    serialization_failure(key, scope);
                }
            }
        }
    }
}

/// The attempt a caller that finds the key locked reports.
fn attempt_of(seen: &Seen) -> Option<i32> {
    match seen {
        Seen::Found(row) => Some(row.attempt),
        Seen::Busy { row, .. } => Some(row.attempt),
        // A new key's first attempt.
        _ => Some(1),
    }
}

/// How long until the lease of an in-progress row ends; None for a claim in
/// transaction mode, and for a lease that has ended (the row version seen
/// is then one a transaction is taking over, with no lease of its own).
fn lease_left(row: &Row, now: pg_sys::TimestampTz) -> Option<i64> {
    row.locked_until
        .filter(|&until| row.status == IN_PROGRESS && until > now)
        .map(|until| until - now)
}

/// `lease_left` of the row a caller that finds the key locked saw, if any.
fn retry_after_of(seen: &Seen, now: pg_sys::TimestampTz) -> Option<i64> {
    match seen {
        Seen::Found(row) | Seen::Busy { row, .. } => lease_left(row, now),
        _ => None,
    }
}

/// Another open transaction holds the key: answer, or wait for it and
/// return None to look again.
fn answer_busy(
    seen: Seen,
    key: &str,
    scope: &str,
    fingerprint: Option<&[u8; 32]>,
    now: pg_sys::TimestampTz,
    deadline: pg_sys::TimestampTz,
) -> Option<Answer> {
    let Seen::Busy { xid, row } = seen else {
        unreachable!("called for Busy only")
    };
    // An expired row being claimed again has forgotten its old request.
    let expired = row.expired(now);
    refuse_unless_owner(&row, now, key, scope);
    if !expired && differs(row.fingerprint.as_ref(), fingerprint) {
        return Some(Answer::Mismatch);
    }
    if now >= deadline {
        return Some(Answer::InProgress {
            attempt: Some(row.attempt),
            retry_after: lease_left(&row, now),
        });
    }
    timed(|| wait_for_transaction(xid, Some(deadline)));
    None
}

/// `previous_token` is the last token the key's row holds: a new one is
/// larger still. On one server the sequence alone sees to that; on Citus
/// each node has its own sequence, and a key that moved with its shard
/// must not go back to a smaller token.
#[allow(clippy::too_many_arguments)]
fn new_claim<'a>(
    attempt: i32,
    fingerprint: Option<&'a [u8; 32]>,
    recovery_point: Option<&'a str>,
    created_at: Option<pg_sys::TimestampTz>,
    lease: Option<&'a pg_sys::Interval>,
    now: pg_sys::TimestampTz,
    owner: String,
    previous_token: Option<i64>,
) -> Claim<'a> {
    let (locked_until, token) = match lease {
        Some(iv) => (
            Some(fmgr::timestamptz_plus(now, iv)),
            Some(
                statements::next_token()
                    .max(previous_token.map_or(i64::MIN, |t| t.saturating_add(1))),
            ),
        ),
        None => (None, None),
    };
    Claim {
        attempt,
        fingerprint,
        recovery_point,
        created_at,
        locked_until,
        token,
        lease,
        owner,
    }
}

fn started(
    scope: &str,
    key: &str,
    claim: Claim,
    fingerprint: Option<[u8; 32]>,
    tid: statements::Tid,
) -> Answer {
    let tid = Some(tid);
    let recovery_point = claim.recovery_point.map(str::to_string);
    if claim.token.is_none() {
        held::set(
            scope,
            key,
            Held {
                attempt: claim.attempt,
                fingerprint: claim.fingerprint.copied().or(fingerprint),
                recovery_point: recovery_point.clone(),
                finished: false,
                owner: owner::current_role(),
                tid,
            },
        );
    }
    Answer::Started {
        attempt: claim.attempt,
        recovery_point,
        token: claim.token,
    }
}

/// A key of another role is not answered at all, whatever its state: its
/// result, its request and its progress are that role's (42501). An expired
/// key is unknown, so anyone may claim it afresh; this transaction's own
/// rows are its own.
fn refuse_unless_owner(row: &Row, now: pg_sys::TimestampTz, key: &str, scope: &str) {
    if let Some(role) = foreign_owner(row, now) {
        owner::refuse(key, scope, role);
    }
}

/// The owner of a row the caller may not act on (see `refuse_unless_owner`).
fn foreign_owner(row: &Row, now: pg_sys::TimestampTz) -> Option<&str> {
    if row.own || row.expired(now) {
        return None;
    }
    owner::denied(row.owner.as_deref())
}

fn replay(row: Row) -> Answer {
    let Row {
        status,
        result,
        response,
        attempt,
        recovery_point,
        ..
    } = row;
    if status == COMPLETED {
        Answer::Completed {
            result,
            response,
            attempt,
            recovery_point,
        }
    } else {
        Answer::Failed {
            result,
            response,
            attempt,
            recovery_point,
        }
    }
}
