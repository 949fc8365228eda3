//! The keys this transaction holds in transaction mode.
//!
//! A key's claim is a row this transaction inserted or updated; this map is
//! the backend's own record of which of those claims are still open, so that
//! a repeated `idem_begin` answers without a lookup, `idem_finish` can check
//! it is called by the holder, and COMMIT can refuse a claim left open.
//!
//! The map follows the transaction: it is emptied when the transaction ends,
//! and what a rolled-back savepoint did to it is undone. Changes made inside a
//! subtransaction are logged with the subtransaction's id; since ids grow
//! within a transaction, the entries at the tail of the log with an id at or
//! above an aborted subtransaction's are exactly what it (and its committed
//! children) did. Nothing is logged at the top level, so a batch of 100 000
//! keys costs one map entry each and no log.
use crate::pg::errors::{error, name_key, Code};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;

/// `TopSubTransactionId` in xact.h: the id of the top-level transaction.
const TOP_SUBTRANSACTION: pg_sys::SubTransactionId = 1;

#[derive(Clone, Debug)]
pub struct Held {
    pub attempt: i32,
    pub fingerprint: Option<[u8; 32]>,
    pub recovery_point: Option<String>,
    pub finished: bool,
    /// The role that claimed the key in this transaction (which must
    /// still have its privileges to act on it after a SET ROLE).
    pub owner: pg_sys::Oid,
    /// The claim row's current version, which this transaction wrote; None
    /// while the claim is the key lock alone (a new key: nothing written).
    pub tid: Option<pg_sys::ItemPointerData>,
}

/// How many new keys a transaction claims by their key lock alone (the
/// fastest claim: nothing is written until idem_finish). Later claims write
/// a row, so a batch of any size needs no more lock-table entries than this.
pub const LOCK_CLAIMS: u32 = 8;

#[derive(Default)]
struct State {
    keys: HashMap<String, Held>,
    open: usize,
    /// Keys claimed by their lock in this transaction (savepoint rollbacks
    /// included, which only makes this err on the side of fewer).
    lock_claims: u32,
    undo: Vec<(pg_sys::SubTransactionId, String, Option<Held>)>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Scope and key joined by a NUL byte, which text values cannot contain.
fn map_key(scope: &str, key: &str) -> String {
    let mut s = String::with_capacity(scope.len() + key.len() + 1);
    s.push_str(scope);
    s.push('\0');
    s.push_str(key);
    s
}

fn split_map_key(k: &str) -> (&str, &str) {
    k.split_once('\0').unwrap_or(("", k))
}

pub fn get(scope: &str, key: &str) -> Option<Held> {
    STATE.with(|s| {
        let s = s.borrow();
        if s.keys.is_empty() {
            return None;
        }
        s.keys.get(&map_key(scope, key)).cloned()
    })
}

/// Records the new state of a key this transaction holds.
pub fn set(scope: &str, key: &str, held: Held) {
    let mk = map_key(scope, key);
    // SAFETY: reads a backend global.
    let subid = unsafe { pg_sys::GetCurrentSubTransactionId() };
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let now_open = !held.finished;
        let prev = s.keys.insert(mk.clone(), held);
        let was_open = prev.as_ref().is_some_and(|p| !p.finished);
        match (was_open, now_open) {
            (false, true) => s.open += 1,
            (true, false) => s.open -= 1,
            _ => {}
        }
        if subid != TOP_SUBTRANSACTION {
            s.undo.push((subid, mk, prev));
        }
    });
}

/// Counts a claim by key lock; false when the transaction has used up its
/// share and the claim must write a row instead.
pub fn take_lock_claim() -> bool {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        if s.lock_claims >= LOCK_CLAIMS {
            return false;
        }
        s.lock_claims += 1;
        true
    })
}

pub fn init() {
    // SAFETY: both callbacks are plain functions that live as long as the
    // library, registered once per backend from _PG_init.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}

fn clear() {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        if !s.keys.is_empty() || !s.undo.is_empty() || s.lock_claims > 0 {
            *s = State::default();
        }
    });
}

/// At COMMIT (and PREPARE TRANSACTION): a key begun and neither finished nor
/// failed makes the whole transaction fail, so none of its work commits.
fn check_none_open() {
    let open = STATE.with(|s| {
        let s = s.borrow();
        if s.open == 0 {
            return None;
        }
        // The smallest, so the message does not depend on hash order.
        let first = s
            .keys
            .iter()
            .filter(|(_, h)| !h.finished)
            .map(|(k, _)| k)
            .min()
            .cloned();
        Some((s.open, first))
    });
    if let Some((count, Some(first))) = open {
        let (scope, key) = split_map_key(&first);
        let others = if count > 1 {
            format!(" (and {} more)", count - 1)
        } else {
            String::new()
        };
        // SAFETY: reads the backend's transaction state.
        if !unsafe { pg_sys::IsTransactionBlock() } {
            // No BEGIN: the statement was a transaction of its own
            // (autocommit, the default of most drivers), so nothing after it
            // could have finished the key.
            error(
                Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("{}{others} was begun outside a transaction block, so its statement's own transaction ended before the key was finished or failed", name_key(key, scope)),
            )
            .detail("In autocommit every statement commits by itself. The key and the work done under it are as if never begun.")
            .hint("Open a transaction (BEGIN, or your driver's transaction block) around idem_begin(), the work and idem_finish(); or pass lease => to idem_begin() to claim the key across transactions.")
            .raise();
        }
        error(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("{}{others} was begun in this transaction but neither finished nor failed", name_key(key, scope)),
        )
        .detail("The transaction was rolled back, so the key and the work done under it are as if never begun.")
        .hint("Call idem_finish() or idem_fail() for every key idem_begin() returned 'started' for, before COMMIT.")
        .raise();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PRE_PREPARE => check_none_open(),
        XACT_EVENT_COMMIT
        | XACT_EVENT_ABORT
        | XACT_EVENT_PREPARE
        | XACT_EVENT_PARALLEL_COMMIT
        | XACT_EVENT_PARALLEL_ABORT => clear(),
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event != pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        return;
    }
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        while s
            .undo
            .last()
            .is_some_and(|(subid, _, _)| *subid >= my_subid)
        {
            let (_, mk, prev) = s.undo.pop().expect("checked above");
            let was_open = s.keys.get(&mk).is_some_and(|h| !h.finished);
            let now_open = prev.as_ref().is_some_and(|h| !h.finished);
            match prev {
                Some(h) => {
                    s.keys.insert(mk, h);
                }
                None => {
                    s.keys.remove(&mk);
                }
            }
            match (was_open, now_open) {
                (false, true) => s.open += 1,
                (true, false) => s.open -= 1,
                _ => {}
            }
        }
    });
}
