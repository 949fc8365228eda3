//! `idem_get`: a key's committed state (and this transaction's own
//! changes), read-only so that it works on a hot standby. A key that is
//! unknown, expired, or belongs to a role whose privileges the caller lacks
//! is no row: like row-level security, a key of another role is hidden,
//! result, request fingerprint and all.
use crate::keys::owner;
use crate::ledger::key_and_scope;
use crate::ledger::statements;
use crate::pg::fmgr::{finfo_v1, Args, Signature};
use pgrx::pg_sys;
use pgrx::prelude::*;

finfo_v1!(pg_finfo_idem_get);

const SIGNATURE: Signature = Signature {
    name: "idem_get",
    args: &[pg_sys::TEXTOID, pg_sys::TEXTOID],
    // A set of rows, whose shape InitMaterializedSRF takes from the catalog.
    result: None,
};

/// `idem_get(key, scope)`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn idem_get(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: Postgres calls this with the call info of idem_get.
    let args = unsafe { Args::new(fcinfo, &SIGNATURE) };
    let (key, scope) = key_and_scope(&args, 0, 1);
    let caller = owner::current_role();
    // Started before the key is read.
    let rows = args.rows(&statements::READ_KEY_TYPES);
    statements::read_key(&scope, &key, |values, nulls, role| {
        // Judged for the caller: inside read_key the current role is the
        // table's owner.
        if !owner::may_act_on_as(caller, role) {
            return;
        }
        // SAFETY: READ_KEY returns idem_get's twelve columns first, in that
        // order and with those types (`put` checks the count).
        unsafe { rows.put(values, nulls) };
    });
    pg_sys::Datum::from(0usize)
}
