//! Reads a key's newest row version from the primary-key index with a dirty
//! snapshot: it sees rows that other transactions have inserted or are
//! changing but not committed yet, and tells us which transaction that is.
//! That is how `idem_begin` answers `in_progress` at once, and how it answers
//! from the committed state in REPEATABLE READ when its snapshot is older.
//!
//! A completed key's replay is answered from this probe alone, with no SQL.
use super::tables::*;
use super::Response;
use crate::pg::relation::{begin_index_scan, HeapScan, Rel, Slot};
use pgrx::pg_sys;
use pgrx::{IntoDatum, PgMemoryContexts};

/// A key's row as the probe saw it.
#[derive(Debug)]
pub struct Row {
    pub status: u8,
    pub attempt: i32,
    pub token: Option<i64>,
    /// The role that claimed the key (NULL for keys claimed in transaction
    /// mode before 0.2.0, which belong to no role).
    pub owner: Option<String>,
    pub fingerprint: Option<[u8; 32]>,
    /// The stored result, copied out of the buffer (a jsonb datum).
    pub result: Option<pg_sys::Datum>,
    /// The stored response, copied out of the buffer like the result.
    pub response: Response,
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

/// Visits every version of (scope, key) in `which` that a dirty snapshot
/// sees, through the table's primary key.
fn scan(
    which: Which,
    scope: &str,
    key: &str,
    mut visit: impl FnMut(*mut pg_sys::TupleTableSlot, &Table, Version),
) {
    let (heap, table) = open(which, scope, pg_sys::AccessShareLock);
    let table = &*table;
    let index = Rel::index(heap.primary_key(), pg_sys::AccessShareLock);
    // The scan keys below are the index's first two columns: they must be
    // scope and key, in that order.
    let form = index.index_form();
    if form.indnkeyatts != 2
        || index.index_key(0) != table.att[which.scope_column()]
        || index.index_key(1) != table.att[which.key_column()]
    {
        crate::pg::errors::error(
            crate::pg::errors::Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "the primary key of idempotency.{} is not (scope, key)",
                heap.name()
            ),
        )
        .hint("Reinstall the extension.")
        .raise();
    }
    let mut snapshot = pg_sys::SnapshotData {
        snapshot_type: pg_sys::SnapshotType::SNAPSHOT_DIRTY,
        ..Default::default()
    };
    let scope_d = scope.into_datum().expect("text datum");
    let key_d = key.into_datum().expect("text datum");
    // SAFETY: heap and index are open and locked; the scan, the slot and
    // the snapshot live until the end of this block (the guards drop in
    // reverse order: slot, then scan, then the relations). The scan keys
    // compare text with texteq under the index's own collations, on the
    // index's two key columns (checked above).
    unsafe {
        let scan = begin_index_scan(heap.as_ptr(), index.as_ptr(), &mut snapshot, 2);
        let mut keys: [pg_sys::ScanKeyData; 2] = [Default::default(), Default::default()];
        for (i, arg) in [scope_d, key_d].into_iter().enumerate() {
            pg_sys::ScanKeyEntryInitialize(
                &mut keys[i],
                0,
                (i + 1) as pg_sys::AttrNumber,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::InvalidOid,
                *(*index.as_ptr()).rd_indcollation.add(i),
                pg_sys::Oid::from(pg_sys::F_TEXTEQ),
                arg,
            );
        }
        pg_sys::index_rescan(scan.0, keys.as_mut_ptr(), 2, std::ptr::null_mut(), 0);
        let slot = Slot::for_table(&heap);
        while pg_sys::index_getnext_slot(
            scan.0,
            pg_sys::ScanDirection::ForwardScanDirection,
            slot.0,
        ) {
            let mut should_free = false;
            let tuple = pg_sys::ExecFetchSlotHeapTuple(slot.0, false, &mut should_free);
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
            visit(slot.0, table, version);
        }
    }
}

pub fn probe(scope: &str, key: &str) -> Seen {
    let mut seen = Seen::Absent;
    scan(Which::Keys, scope, key, |slot, table, v| {
        // SAFETY: `scan` hands over its slot holding a row of `table`.
        let this = unsafe {
            if v.inserting != pg_sys::InvalidTransactionId {
                Seen::Busy {
                    xid: v.inserting,
                    row: read_row(slot, table, false, false),
                }
            } else if v.changing != pg_sys::InvalidTransactionId {
                if v.deleting {
                    Seen::Deleting { xid: v.changing }
                } else {
                    Seen::Busy {
                        xid: v.changing,
                        row: read_row(slot, table, false, false),
                    }
                }
            } else {
                Seen::Found(read_row(slot, table, v.own, true))
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
    let mut seen = Recorded::No;
    scan(Which::Once, scope, key, |_, _, v| {
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
///
/// # Safety
/// `slot` holds a row of the table `table` describes (the scan's slot, made
/// from the locked relation whose descriptor `open` checked against it).
unsafe fn read_row(
    slot: *mut pg_sys::TupleTableSlot,
    table: &Table,
    own: bool,
    with_result: bool,
) -> Row {
    // SAFETY: slot_getallattrs fills tts_values/tts_isnull for every
    // attribute of the slot's descriptor, which has table.natts attributes;
    // every position read is one of table.att, all below natts. The
    // datums' types are the ones `tables` checked for these columns.
    unsafe {
        pg_sys::slot_getallattrs(slot);
        debug_assert_eq!((*(*slot).tts_tupleDescriptor).natts as usize, table.natts);
        let values = (*slot).tts_values;
        let nulls = (*slot).tts_isnull;
        let get = |column: usize| -> Option<pg_sys::Datum> {
            let i = table.pos(column);
            if *nulls.add(i) {
                None
            } else {
                Some(*values.add(i))
            }
        };
        let fingerprint = get(K_FINGERPRINT).and_then(|d| {
            let v = pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr());
            let bytes = pgrx::varlena::varlena_to_byte_slice(v);
            <[u8; 32]>::try_from(bytes).ok()
        });
        let recovery_point = get(K_RECOVERY_POINT).map(|d| {
            pgrx::varlena::text_to_rust_str(pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr()))
                .unwrap_or_default()
                .to_string()
        });
        Row {
            status: get(K_STATUS).map(|d| d.value() as u8).unwrap_or(0),
            attempt: get(K_ATTEMPT).map(|d| d.value() as i32).unwrap_or(0),
            token: get(K_TOKEN).map(|d| d.value() as i64),
            owner: get(K_OWNER).map(|d| text_of(d)),
            fingerprint,
            result: get(K_RESULT).filter(|_| with_result).map(|d| copy(d)),
            response: if with_result {
                Response {
                    status: get(K_RESPONSE_STATUS).map(|d| d.value() as i32),
                    headers: get(K_RESPONSE_HEADERS).map(|d| copy(d)),
                    body: get(K_RESPONSE_BODY).map(|d| copy(d)),
                }
            } else {
                Response::default()
            },
            recovery_point,
            expires_at: get(K_EXPIRES_AT).map(|d| d.value() as i64),
            locked_until: get(K_LOCKED_UNTIL).map(|d| d.value() as i64),
            own,
            tid: (*slot).tts_tid,
        }
    }
}

/// A varlena column's value, detoasted into a copy of its own that outlives
/// the scan's buffer pin.
///
/// # Safety
/// `d` is a varlena datum of a row the caller's slot holds.
unsafe fn copy(d: pg_sys::Datum) -> pg_sys::Datum {
    // SAFETY: as the caller promises; the copy is palloc'd in the current
    // memory context.
    pg_sys::Datum::from(unsafe { pg_sys::pg_detoast_datum_copy(d.cast_mut_ptr()) })
}

/// A short text column's value (a role's name), read in place when it is
/// stored inline and uncompressed, as a short value always is; detoasted
/// otherwise.
///
/// # Safety
/// `d` is a text datum of a row the caller's slot holds.
unsafe fn text_of(d: pg_sys::Datum) -> String {
    let p = d.cast_mut_ptr::<pg_sys::varlena>();
    // SAFETY: a 1-byte-header or 4-byte uncompressed varlena holds its bytes
    // right after the header (VARDATA_ANY, VARSIZE_ANY_EXHDR); anything
    // else (compressed, external) goes through pg_detoast_datum_packed.
    unsafe {
        let inline = (pgrx::varlena::varatt_is_1b(p) && !pgrx::varlena::varatt_is_1b_e(p))
            || pgrx::varlena::varatt_is_4b_u(p);
        let p = if inline {
            p
        } else {
            pg_sys::pg_detoast_datum_packed(p)
        };
        let bytes = std::slice::from_raw_parts(
            pgrx::varlena::vardata_any(p).cast::<u8>(),
            pgrx::varlena::varsize_any_exhdr(p),
        );
        String::from_utf8_lossy(bytes).into_owned()
    }
}

/// A key row in progress, as `in_progress` saw it.
pub struct InProgress {
    pub scope: String,
    pub key: String,
    pub row: Row,
    pub created_at: pg_sys::TimestampTz,
    /// The open transaction writing the claim (None for a committed one,
    /// a lease's).
    pub writer: Option<pg_sys::TransactionId>,
}

/// Every key row with status "in progress" that a dirty snapshot sees, in
/// one pass over the whole table: committed claims (leases), and claims
/// other open transactions (or this one) have written but not committed.
/// A version another transaction is replacing or deleting is left out:
/// its successor, if any, is seen on its own. On Citus, every shard of the
/// key table that this node holds.
pub fn in_progress(mut visit: impl FnMut(InProgress)) {
    for (heap, table) in open_all(Which::Keys, pg_sys::AccessShareLock) {
        in_progress_in(&heap, &table, &mut visit);
    }
}

fn in_progress_in(heap: &Rel, table: &Table, visit: &mut impl FnMut(InProgress)) {
    let mut snapshot = pg_sys::SnapshotData {
        snapshot_type: pg_sys::SnapshotType::SNAPSHOT_DIRTY,
        ..Default::default()
    };
    // What one row needs (a detoasted fingerprint, the visitor's datums) is
    // freed before the next: a table of many claims is read in constant
    // memory.
    let mut row_memory = PgMemoryContexts::new("idempotency in-progress row");
    // SAFETY: the table is open and locked, and is a heap (the extension
    // creates it); the scan and the slot live until the end of this block
    // (the guard ends the scan before the relation is closed). A dirty
    // snapshot is set, for the tuple just returned, by the visibility test
    // heap_getnextslot runs (page-at-a-time mode is off for a snapshot that
    // is not MVCC). The tuple is the slot's, valid until the next fetch.
    unsafe {
        let flags = pg_sys::ScanOptions::SO_TYPE_SEQSCAN | pg_sys::ScanOptions::SO_ALLOW_STRAT;
        let scan = HeapScan(pg_sys::heap_beginscan(
            heap.as_ptr(),
            &mut snapshot,
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            flags,
        ));
        let slot = Slot::for_table(heap);
        while pg_sys::heap_getnextslot(scan.0, pg_sys::ScanDirection::ForwardScanDirection, slot.0)
        {
            pgrx::check_for_interrupts!();
            if snapshot.xmax != pg_sys::InvalidTransactionId {
                continue;
            }
            let mut should_free = false;
            let tuple = pg_sys::ExecFetchSlotHeapTuple(slot.0, false, &mut should_free);
            // A dirty snapshot shows every version another open transaction
            // inserted, even those it went on to replace (it does not look
            // at their xmax): only the newest is the claim.
            let inserting = snapshot.xmin;
            if inserting != pg_sys::InvalidTransactionId && replaced((*tuple).t_data) {
                continue;
            }
            row_memory.switch_to(|_| read_in_progress(slot.0, tuple, table, inserting, visit));
            row_memory.reset();
        }
    }
}

/// Whether a row version inserted by an open transaction was then updated
/// or deleted by it (not merely locked, nor changed in a subtransaction
/// that rolled back: the version is then still its newest).
///
/// # Safety
/// `header` is the header of a tuple held in a pinned buffer, inserted by
/// a transaction still in progress.
unsafe fn replaced(header: pg_sys::HeapTupleHeader) -> bool {
    // SAFETY: as the caller promises; the mask and xmax are plain fields
    // of the header; HeapTupleGetUpdateXid reads a multixact's members,
    // which exist while its transactions are in progress.
    unsafe {
        let mask = (*header).t_infomask as u32;
        if mask & pg_sys::HEAP_XMAX_INVALID != 0 {
            return false;
        }
        let lock_only = mask & pg_sys::HEAP_XMAX_LOCK_ONLY != 0
            || mask & (pg_sys::HEAP_XMAX_IS_MULTI | pg_sys::HEAP_LOCK_MASK)
                == pg_sys::HEAP_XMAX_EXCL_LOCK;
        if lock_only {
            return false;
        }
        let xmax = if mask & pg_sys::HEAP_XMAX_IS_MULTI != 0 {
            pg_sys::HeapTupleGetUpdateXid(header)
        } else {
            (*header).t_choice.t_heap.t_xmax
        };
        xmax != pg_sys::InvalidTransactionId && !pg_sys::TransactionIdDidAbort(xmax)
    }
}

/// Hands one row of the scan to `visit` if it is in progress.
///
/// # Safety
/// `slot` holds `tuple`, a row of the key table `table` describes (the
/// scan's slot, made from the locked relation whose descriptor `open`
/// checked); `inserting` is the open transaction the dirty snapshot said
/// inserted it, if any.
unsafe fn read_in_progress(
    slot: *mut pg_sys::TupleTableSlot,
    tuple: pg_sys::HeapTuple,
    table: &Table,
    inserting: pg_sys::TransactionId,
    visit: &mut impl FnMut(InProgress),
) {
    // SAFETY: as the caller promises; slot_getallattrs fills every
    // attribute, and every position read is one of table.att.
    unsafe {
        pg_sys::slot_getallattrs(slot);
        let values = (*slot).tts_values;
        let nulls = (*slot).tts_isnull;
        let status = table.pos(K_STATUS);
        if *nulls.add(status) || (*values.add(status)).value() as u8 != IN_PROGRESS {
            return;
        }
        let text = |column: usize| -> String {
            let i = table.pos(column);
            if *nulls.add(i) {
                String::new()
            } else {
                text_of(*values.add(i))
            }
        };
        let own = inserting == pg_sys::InvalidTransactionId
            && pg_sys::TransactionIdIsCurrentTransactionId(
                (*(*tuple).t_data).t_choice.t_heap.t_xmin,
            );
        let created_at = (*values.add(table.pos(K_CREATED_AT))).value() as i64;
        visit(InProgress {
            scope: text(K_SCOPE),
            key: text(K_KEY),
            row: read_row(slot, table, own, false),
            created_at,
            writer: (inserting != pg_sys::InvalidTransactionId).then_some(inserting),
        });
    }
}
