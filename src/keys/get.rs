//! `idem_get`: a key's committed state (and this transaction's own
//! changes), read-only so that it works on a hot standby. A key that is
//! unknown, expired, or belongs to a role whose privileges the caller lacks
//! is no row: like row-level security, a key of another role is hidden,
//! result, request fingerprint and all.
use crate::keys::owner;
use crate::ledger::key_and_scope;
use crate::ledger::statements::{self, READ_KEY_COLUMNS};
use crate::pg::fmgr::{self, finfo_v1, Args, Signature};
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
    // SAFETY: InitMaterializedSRF checks that the caller accepts a
    // materialized set (an error otherwise) and builds the tuplestore and
    // its descriptor from the function's declared result, in the query's
    // memory, before the key is read.
    let rsinfo = unsafe {
        pg_sys::InitMaterializedSRF(fcinfo, 0);
        (*fcinfo).resultinfo.cast::<pg_sys::ReturnSetInfo>()
    };
    // SAFETY: InitMaterializedSRF set setDesc to a valid descriptor.
    unsafe { fmgr::check_columns("idem_get", (*rsinfo).setDesc, &statements::READ_KEY_TYPES) };
    statements::read_key(&scope, &key, |values, nulls, role| {
        // Judged for the caller: inside read_key the current role is the
        // table's owner.
        if !owner::may_act_on_as(caller, role) {
            return;
        }
        assert_eq!(values.len(), READ_KEY_COLUMNS);
        // SAFETY: the tuplestore and descriptor were made above for the
        // twelve columns of idem_get's result, which READ_KEY returns in that
        // order and with those types; putvalues copies them.
        unsafe {
            pg_sys::tuplestore_putvalues(
                (*rsinfo).setResult,
                (*rsinfo).setDesc,
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            )
        };
    });
    pg_sys::Datum::from(0usize)
}
