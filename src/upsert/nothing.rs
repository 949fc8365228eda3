//! Why an upsert wrote nothing. When the update, the look and the insert
//! all did nothing, round after round, either other transactions keep
//! changing the row (a retry can succeed: 40001), or something that no
//! retry changes stops it:
//!
//! - row-level security hides the conflicting row from the caller, so the
//!   update and the look cannot see it while the insert conflicts with it
//!   (`INSERT ... ON CONFLICT DO UPDATE` fails with 42501 there too);
//! - a BEFORE INSERT trigger returned NULL, or a rule replaced the insert,
//!   and no conflicting row exists: the row was skipped on purpose.
//!
//! Which one is told by looking for the conflicting row in the unique
//! index itself, with a dirty snapshot (committed rows and those of open
//! transactions), as the insert's own conflict check does: no SQL, so no
//! row-level security. For a partitioned table, in the unique indexes of
//! its leaf partitions, whose triggers count too.
use super::table::{Column, Target, UniqueKey};
use crate::pg::relation::{begin_index_scan, Rel, Slot};
use pgrx::pg_sys;

pub enum Cause {
    /// Row-level security hides the conflicting row.
    Hidden,
    /// A trigger or rule skipped the insert; no row conflicts.
    Skipped,
    /// Neither: other transactions changed the row meanwhile.
    Concurrent,
}

/// Why nothing was written for a row whose conflict columns have the
/// values `value_of` gives (None where a value cannot be made without
/// SQL, which leaves the question open).
pub fn why(
    target: &Target,
    key: &UniqueKey,
    value_of: impl Fn(&Column) -> Option<pg_sys::Datum>,
) -> Cause {
    let values: Option<Vec<pg_sys::Datum>> = key
        .columns
        .iter()
        .map(|c| target.column(c).and_then(&value_of))
        .collect();
    let Some(values) = values else {
        return Cause::Concurrent;
    };
    // SAFETY: the caller locked the table (RowExclusiveLock, before its
    // description was read) and holds that lock to the end of the
    // transaction.
    let heap = unsafe { Rel::open_locked(target.relid) };
    // A partitioned table's rows, triggers and index entries are its leaf
    // partitions'.
    let leaves = if is_partitioned(&heap) {
        leaf_partitions(&heap)
    } else {
        Vec::new()
    };
    let exists = if leaves.is_empty() {
        conflicting_row(&heap, key.index, &values)
    } else {
        let mut found = Some(false);
        for leaf in &leaves {
            // The leaf's part of the parent's index: its unique index on the
            // same columns, in the same order.
            let index = super::table::unique_keys(leaf)
                .into_iter()
                .find(|k| k.columns == key.columns)
                .map(|k| k.index);
            match index {
                Some(index) => match conflicting_row(leaf, index, &values) {
                    Some(true) => {
                        found = Some(true);
                        break;
                    }
                    Some(false) => {}
                    None => found = None,
                },
                None => found = None,
            }
        }
        found
    };
    let Some(exists) = exists else {
        return Cause::Concurrent;
    };
    if exists {
        // SAFETY: check_enable_rls reads the catalogs and the role's
        // settings; with noError it raises nothing.
        let rls = unsafe { pg_sys::check_enable_rls(target.relid, pg_sys::InvalidOid, true) };
        if rls == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32 {
            return Cause::Hidden;
        }
        return Cause::Concurrent;
    }
    if skips_inserts(&heap) || leaves.iter().any(skips_inserts) {
        Cause::Skipped
    } else {
        Cause::Concurrent
    }
}

fn is_partitioned(rel: &Rel) -> bool {
    // SAFETY: rd_rel of an open relation is its pg_class row.
    unsafe { (*(*rel.as_ptr()).rd_rel).relkind as u8 == pg_sys::RELKIND_PARTITIONED_TABLE }
}

/// The leaf partitions of a partitioned table, locked (AccessShareLock, as
/// a read of them would take) and opened, at any depth.
fn leaf_partitions(parent: &Rel) -> Vec<Rel> {
    let mut leaves = Vec::new();
    let mut todo: Vec<pg_sys::Oid> = partitions(parent);
    while let Some(oid) = todo.pop() {
        crate::pg::relation::lock(oid, pg_sys::AccessShareLock);
        // A partition detached and dropped meanwhile is simply gone.
        let Some(rel) = Rel::try_open_locked(oid) else {
            continue;
        };
        if is_partitioned(&rel) {
            todo.extend(partitions(&rel));
        } else {
            leaves.push(rel);
        }
    }
    leaves
}

/// The direct partitions of a partitioned table (detached ones omitted).
fn partitions(rel: &Rel) -> Vec<pg_sys::Oid> {
    // SAFETY: rel is an open, locked partitioned table; the partition
    // descriptor lives in its relcache entry while it is open, and holds
    // nparts OIDs.
    unsafe {
        let desc = pg_sys::RelationGetPartitionDesc(rel.as_ptr(), true);
        if desc.is_null() {
            return Vec::new();
        }
        (0..(*desc).nparts as usize)
            .map(|i| *(*desc).oids.add(i))
            .collect()
    }
}

/// Whether a BEFORE INSERT row trigger or a rule on INSERT may keep a row
/// from being inserted.
fn skips_inserts(heap: &Rel) -> bool {
    // SAFETY: trigdesc and rd_rules of an open relation are NULL or its
    // triggers and rules.
    unsafe {
        let rel = heap.as_ptr();
        let trig = (*rel).trigdesc;
        (!trig.is_null() && (*trig).trig_insert_before_row) || !(*rel).rd_rules.is_null()
    }
}

/// Whether the unique btree index `index` of `heap` holds a row with these
/// key values that a dirty snapshot sees; None when that cannot be asked
/// (a partitioned table's index has no entries of its own; not a btree).
fn conflicting_row(heap: &Rel, index: pg_sys::Oid, values: &[pg_sys::Datum]) -> Option<bool> {
    let index = Rel::index(index, pg_sys::AccessShareLock);
    // SAFETY: rd_rel of an open relation is its pg_class row.
    let (relkind, relam) = unsafe {
        let form = (*index.as_ptr()).rd_rel;
        ((*form).relkind as u8, (*form).relam)
    };
    if relkind != pg_sys::RELKIND_INDEX || relam != pg_sys::BTREE_AM_OID {
        return None;
    }
    let n = values.len();
    if index.index_form().indnkeyatts as usize != n {
        return None;
    }
    let mut snapshot = pg_sys::SnapshotData {
        snapshot_type: pg_sys::SnapshotType::SNAPSHOT_DIRTY,
        ..Default::default()
    };
    // SAFETY: heap and index are open and locked; the scan and the slot are
    // dropped before them (guards drop in reverse order). Each scan key is
    // the btree equality of the index column's operator family for its
    // input type, under the column's collation, and each value is of the
    // column's type, which the unique index's operator class accepts.
    unsafe {
        let rel = index.as_ptr();
        let mut keys: Vec<pg_sys::ScanKeyData> = vec![Default::default(); n];
        for (i, key) in keys.iter_mut().enumerate() {
            let opfamily = *(*rel).rd_opfamily.add(i);
            let opcintype = *(*rel).rd_opcintype.add(i);
            let op = pg_sys::get_opfamily_member(
                opfamily,
                opcintype,
                opcintype,
                pg_sys::BTEqualStrategyNumber as i16,
            );
            if op == pg_sys::InvalidOid {
                return None;
            }
            pg_sys::ScanKeyEntryInitialize(
                key,
                0,
                (i + 1) as pg_sys::AttrNumber,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::InvalidOid,
                *(*rel).rd_indcollation.add(i),
                pg_sys::get_opcode(op),
                values[i],
            );
        }
        let scan = begin_index_scan(heap.as_ptr(), rel, &mut snapshot, n as i32);
        pg_sys::index_rescan(scan.0, keys.as_mut_ptr(), n as i32, std::ptr::null_mut(), 0);
        let slot = Slot::for_table(heap);
        Some(pg_sys::index_getnext_slot(
            scan.0,
            pg_sys::ScanDirection::ForwardScanDirection,
            slot.0,
        ))
    }
}
