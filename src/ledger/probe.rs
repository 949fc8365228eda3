//! Reads a key's newest row version from the primary-key index with a dirty
//! snapshot: it sees rows that other transactions have inserted or are
//! changing but not committed yet, and tells us which transaction that is.
//! That is how `idem_begin` answers `in_progress` at once, and how it answers
//! from the committed state in REPEATABLE READ when its snapshot is older.
//!
//! A completed key's replay is answered from this probe alone, with no SQL.
use super::tables::{catalog, Attnums};
use pgrx::pg_sys;
use pgrx::IntoDatum;

/// A key's row as the probe saw it.
#[derive(Debug)]
pub struct Row {
    pub status: u8,
    pub attempt: i32,
    pub token: Option<i64>,
    pub fingerprint: Option<[u8; 32]>,
    /// The stored result, copied out of the buffer (a jsonb datum).
    pub result: Option<pg_sys::Datum>,
    pub recovery_point: Option<String>,
    pub expires_at: Option<pg_sys::TimestampTz>,
    pub locked_until: Option<pg_sys::TimestampTz>,
    /// Written by this transaction (or one of its subtransactions).
    pub own: bool,
    /// Where the row version is, for an update that follows.
    pub tid: pg_sys::ItemPointerData,
}

impl Row {
    /// Past its expiry a key is unknown, even before it is purged.
    pub fn expired(&self, now: pg_sys::TimestampTz) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }
}

#[derive(Debug)]
pub enum Seen {
    /// No row: the key was never begun, or its row was purged.
    Absent,
    /// Another open transaction inserted or is updating the row.
    Busy {
        xid: pg_sys::TransactionId,
        row: Row,
    },
    /// Another open transaction is deleting the row (a purge).
    Deleting { xid: pg_sys::TransactionId },
    /// The row as committed, or as this transaction left it.
    Found(Row),
}

/// What one visible row version looked like to the dirty snapshot.
struct Version {
    /// Another open transaction inserted it.
    inserting: pg_sys::TransactionId,
    /// Another open transaction is updating or deleting it.
    changing: pg_sys::TransactionId,
    /// The change is a delete (the version has no newer version).
    deleting: bool,
    /// This transaction wrote it.
    own: bool,
}

/// Visits every version of (scope, key) in `heap` that a dirty snapshot
/// sees, through the primary key `index`.
fn scan(
    heap: pg_sys::Oid,
    index: pg_sys::Oid,
    scope: &str,
    key: &str,
    mut visit: impl FnMut(*mut pg_sys::TupleTableSlot, Version),
) {
    unsafe {
        let heap = pg_sys::table_open(heap, pg_sys::AccessShareLock as i32);
        let index = pg_sys::index_open(index, pg_sys::AccessShareLock as i32);
        let mut snapshot = pg_sys::SnapshotData {
            snapshot_type: pg_sys::SnapshotType::SNAPSHOT_DIRTY,
            ..Default::default()
        };
        let scan = pg_sys::index_beginscan(heap, index, &mut snapshot, 2, 0);
        let scope_d = scope.into_datum().expect("text datum");
        let key_d = key.into_datum().expect("text datum");
        let mut keys: [pg_sys::ScanKeyData; 2] = [Default::default(), Default::default()];
        for (i, arg) in [scope_d, key_d].into_iter().enumerate() {
            pg_sys::ScanKeyEntryInitialize(
                &mut keys[i],
                0,
                (i + 1) as pg_sys::AttrNumber,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::InvalidOid,
                *(*index).rd_indcollation.add(i),
                pg_sys::Oid::from(pg_sys::F_TEXTEQ),
                arg,
            );
        }
        pg_sys::index_rescan(scan, keys.as_mut_ptr(), 2, std::ptr::null_mut(), 0);
        let slot = pg_sys::table_slot_create(heap, std::ptr::null_mut());
        while pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot) {
            let mut should_free = false;
            let tuple = pg_sys::ExecFetchSlotHeapTuple(slot, false, &mut should_free);
            let t_self = (*tuple).t_self;
            let t_ctid = (*(*tuple).t_data).t_ctid;
            let xmin = (*(*tuple).t_data).t_choice.t_heap.t_xmin;
            let version = Version {
                inserting: snapshot.xmin,
                changing: snapshot.xmax,
                deleting: pg_sys::ItemPointerEquals(
                    &t_self as *const _ as *mut _,
                    &t_ctid as *const _ as *mut _,
                ),
                own: pg_sys::TransactionIdIsCurrentTransactionId(xmin),
            };
            visit(slot, version);
        }
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_endscan(scan);
        pg_sys::index_close(index, pg_sys::NoLock as i32);
        pg_sys::table_close(heap, pg_sys::NoLock as i32);
    }
}

pub fn probe(scope: &str, key: &str) -> Seen {
    let cat = catalog();
    let mut seen = Seen::Absent;
    scan(cat.keys, cat.pkey, scope, key, |slot, v| {
        let this = unsafe {
            if v.inserting != pg_sys::InvalidTransactionId {
                Seen::Busy {
                    xid: v.inserting,
                    row: read_row(slot, &cat.att, false, false),
                }
            } else if v.changing != pg_sys::InvalidTransactionId {
                if v.deleting {
                    Seen::Deleting { xid: v.changing }
                } else {
                    Seen::Busy {
                        xid: v.changing,
                        row: read_row(slot, &cat.att, false, false),
                    }
                }
            } else {
                Seen::Found(read_row(slot, &cat.att, v.own, true))
            }
        };
        // Another transaction's claim outranks what is committed; a row
        // being deleted outranks nothing.
        seen = match (std::mem::replace(&mut seen, Seen::Absent), this) {
            (s @ Seen::Busy { .. }, _) => s,
            (_, b @ Seen::Busy { .. }) => b,
            (s @ Seen::Found(_), _) => s,
            (_, f @ Seen::Found(_)) => f,
            (_, other) => other,
        };
    });
    seen
}

/// A key in the `idem_once` ledger.
pub enum Recorded {
    No,
    /// Another open transaction is recording (or deleting) it.
    Busy(pg_sys::TransactionId),
    Yes,
}

pub fn probe_once(scope: &str, key: &str) -> Recorded {
    let cat = catalog();
    let mut seen = Recorded::No;
    scan(cat.once, cat.once_pkey, scope, key, |_, v| {
        let other = if v.inserting != pg_sys::InvalidTransactionId {
            v.inserting
        } else {
            v.changing
        };
        seen = match seen {
            Recorded::Busy(x) => Recorded::Busy(x),
            _ if other != pg_sys::InvalidTransactionId => Recorded::Busy(other),
            _ => Recorded::Yes,
        };
    });
    seen
}

/// `with_result` is false for rows of open transactions: their result is not
/// ours to read (and its TOAST chunks may not be visible).
unsafe fn read_row(
    slot: *mut pg_sys::TupleTableSlot,
    att: &Attnums,
    own: bool,
    with_result: bool,
) -> Row {
    unsafe {
        pg_sys::slot_getallattrs(slot);
        let values = (*slot).tts_values;
        let nulls = (*slot).tts_isnull;
        let get = |n: i16| -> Option<pg_sys::Datum> {
            let i = (n - 1) as usize;
            if *nulls.add(i) {
                None
            } else {
                Some(*values.add(i))
            }
        };
        let fingerprint = get(att.fingerprint).and_then(|d| {
            let v = pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr());
            let bytes = pgrx::varlena::varlena_to_byte_slice(v);
            <[u8; 32]>::try_from(bytes).ok()
        });
        let recovery_point = get(att.recovery_point).map(|d| {
            pgrx::varlena::text_to_rust_str(pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr()))
                .unwrap_or_default()
                .to_string()
        });
        Row {
            status: get(att.status).map(|d| d.value() as u8).unwrap_or(0),
            attempt: get(att.attempt).map(|d| d.value() as i32).unwrap_or(0),
            token: get(att.token).map(|d| d.value() as i64),
            fingerprint,
            result: get(att.result)
                .filter(|_| with_result)
                .map(|d| pg_sys::Datum::from(pg_sys::pg_detoast_datum_copy(d.cast_mut_ptr()))),
            recovery_point,
            expires_at: get(att.expires_at).map(|d| d.value() as i64),
            locked_until: get(att.locked_until).map(|d| d.value() as i64),
            own,
            tid: (*slot).tts_tid,
        }
    }
}
