//! `idem_once`: the deduplication ledger for side effects and webhooks.
use crate::api::key_and_scope;
use crate::fmgr::{finfo_v1, Args};
use crate::store::statements;
use pgrx::pg_sys;
use pgrx::prelude::*;

finfo_v1!(pg_finfo_idem_once);

/// `idem_once(key, scope) returns boolean`: true the first time the key is
/// recorded (the record commits with the caller's transaction), false when
/// it was recorded already. A caller that meets another open transaction
/// recording the same key waits for it: false if it commits, true if it
/// rolls back.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn idem_once(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let args = unsafe { Args::new(fcinfo) };
    let (key, scope) = key_and_scope(&args, 0, 1);
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    pg_sys::Datum::from(statements::insert_once(&scope, &key, now))
}
