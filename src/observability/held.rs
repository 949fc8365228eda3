//! `idem_held_keys()`: the keys in progress that have a row, for an
//! operator chasing a stuck job (the `idem_held` view joins it with
//! `pg_stat_activity` and adds the keys claimed by lock alone).
//!
//! A claim row written by an open transaction is found with a dirty
//! snapshot, and its writer's process with `BackendXidGetPid`; a committed
//! claim row is a lease's (or a transaction's that committed without
//! finishing the key), and no process holds it.
use crate::keys::owner;
use crate::ledger::probe::{self, InProgress};
use crate::pg::fmgr::{self, finfo_v1, Args, Signature};
use pgrx::pg_sys;
use pgrx::prelude::*;

finfo_v1!(pg_finfo_idem_held_keys);

const SIGNATURE: Signature = Signature {
    name: "idem_held_keys",
    args: &[],
    result: None,
};

/// scope, key, owner, pid, token, locked_until, attempt, created_at.
const TYPES: [pg_sys::Oid; 8] = [
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::INT4OID,
    pg_sys::INT8OID,
    pg_sys::TIMESTAMPTZOID,
    pg_sys::INT4OID,
    pg_sys::TIMESTAMPTZOID,
];

/// The process of the open transaction `xid` (a subtransaction's counts
/// as its top transaction's); None for a prepared transaction, which has
/// no process, or one that just ended.
fn pid_of(xid: pg_sys::TransactionId) -> Option<i32> {
    // SAFETY: xid belongs to a transaction the dirty snapshot saw in
    // progress, so it is at least TransactionXmin and pg_subtrans holds
    // its parent; BackendXidGetPid reads the proc array under its lock.
    let pid = unsafe { pg_sys::BackendXidGetPid(pg_sys::SubTransGetTopmostTransaction(xid)) };
    (pid != 0).then_some(pid)
}

/// `idem_held_keys()`: one row per key in progress that has a row and
/// belongs to a role whose privileges the caller has (every key for
/// members of pg_read_all_stats).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn idem_held_keys(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: Postgres calls this with the call info of idem_held_keys.
    let args = unsafe { Args::new(fcinfo, &SIGNATURE) };
    let caller = owner::current_role();
    let sees_all =
        owner::has_privileges_of(caller, pg_sys::Oid::from(pg_sys::ROLE_PG_READ_ALL_STATS));
    let rows = args.rows(&TYPES);
    // SAFETY: reads a backend global.
    let my_pid = unsafe { pg_sys::MyProcPid };
    probe::in_progress(|held: InProgress| {
        if !sees_all && !owner::may_act_on_as(caller, held.row.owner.as_deref()) {
            return;
        }
        let pid = match held.writer {
            Some(xid) => pid_of(xid),
            None if held.row.own => Some(my_pid),
            None => None,
        };
        let mut values = [pg_sys::Datum::from(0usize); 8];
        let mut nulls = [true; 8];
        (values[0], nulls[0]) = fmgr::text_datum(Some(&held.scope));
        (values[1], nulls[1]) = fmgr::text_datum(Some(&held.key));
        (values[2], nulls[2]) = fmgr::text_datum(held.row.owner.as_deref());
        let datums = [
            (3, pid.map(pg_sys::Datum::from)),
            (4, held.row.token.map(pg_sys::Datum::from)),
            (5, held.row.locked_until.map(pg_sys::Datum::from)),
            (6, Some(pg_sys::Datum::from(held.row.attempt))),
            (7, Some(pg_sys::Datum::from(held.created_at))),
        ];
        for (i, datum) in datums {
            if let Some(d) = datum {
                (values[i], nulls[i]) = (d, false);
            }
        }
        // SAFETY: texts, an int4 pid, an int8 token, timestamptz values
        // and an int4 attempt, as TYPES says; every text is a fresh datum.
        unsafe { rows.put(&mut values, &mut nulls) };
    });
    pg_sys::Datum::from(0usize)
}
