//! Inserting a row into one of the extension's own tables.
//!
//! The common case needs no SQL: the heap tuple, then an entry in every
//! index that is ready for inserts, as PostgreSQL inserts catalog rows
//! (`CatalogIndexInsert`). This skips the executor's start-up for each row,
//! which measured as most of the cost of a claim. `heap_insert` takes care
//! of WAL, TOAST, statistics and serializable conflict checks, and the
//! unique indexes still refuse a duplicate key.
//!
//! That is what an INSERT would do only while the table is as the extension
//! created it, or changed in ways that need nothing more: a second index on
//! plain columns, or an index being built or rebuilt concurrently (CREATE
//! INDEX CONCURRENTLY, REINDEX CONCURRENTLY), which gets its entries from
//! the moment it is ready for inserts, exactly as from the executor. When a
//! trigger, an index on expressions or with a WHERE clause, an exclusion
//! or deferred constraint, a CHECK or NOT NULL constraint or a column was
//! added (by a DBA, or by pg_repack for the length of its run), the row is
//! inserted with a prepared INSERT instead, so that all of them apply.
use super::statements;
use super::tables::{self, Table, Which};
use super::tables::{
    K_ATTEMPT, K_CREATED_AT, K_EXPIRES_AT, K_FINGERPRINT, K_FINISHED_AT, K_KEY, K_LEASE,
    K_LOCKED_UNTIL, K_OWNER, K_RECOVERY_POINT, K_RESPONSE_BODY, K_RESPONSE_HEADERS,
    K_RESPONSE_STATUS, K_RESULT, K_SCOPE, K_STATUS, K_TOKEN, O_KEY, O_RECORDED_AT, O_SCOPE,
};
use super::Response;
use crate::pg::relation::Rel;
use pgrx::pg_sys;
use pgrx::IntoDatum;

pub type Tid = pg_sys::ItemPointerData;

/// Inserts a row of `which`, given as one value per column of
/// `which.columns()` (None is NULL); returns where it went.
/// `scope` is the row's scope, which on Citus picks the shard.
fn insert(which: Which, scope: &str, row: &[Option<pg_sys::Datum>]) -> Tid {
    assert_eq!(row.len(), which.columns().len());
    let (heap, table) = tables::open(which, scope, pg_sys::RowExclusiveLock);
    let table = &*table;
    if table.plain && !heap.has_triggers() {
        if let Some(indexes) = plain_indexes(&heap) {
            return direct(&heap, table, row, &indexes);
        }
    }
    statements::insert_row(which, scope, row)
}

struct Index {
    rel: Rel,
    info: *mut pg_sys::IndexInfo,
}

/// The table's indexes that are ready for inserts, opened; None when one of
/// them needs the executor (expressions, a predicate, an exclusion or
/// deferred constraint).
fn plain_indexes(heap: &Rel) -> Option<Vec<Index>> {
    let mut indexes = Vec::new();
    for oid in heap.index_oids() {
        let rel = Rel::index(oid, pg_sys::RowExclusiveLock);
        // SAFETY: rel is an open index; BuildIndexInfo reads its relcache
        // entry into a new palloc'd IndexInfo.
        let info = unsafe { pg_sys::BuildIndexInfo(rel.as_ptr()) };
        // SAFETY: info was just built and is not shared.
        let (ready, plain) = unsafe {
            (
                (*info).ii_ReadyForInserts,
                (*info).ii_Expressions.is_null()
                    && (*info).ii_Predicate.is_null()
                    && (*info).ii_ExclusionOps.is_null(),
            )
        };
        if !ready {
            // Being built by CREATE INDEX CONCURRENTLY and not yet ready:
            // the build itself will find this row.
            continue;
        }
        let form = rel.index_form();
        if !plain || (form.indisunique && !form.indimmediate) {
            return None;
        }
        indexes.push(Index { rel, info });
    }
    Some(indexes)
}

fn direct(heap: &Rel, table: &Table, row: &[Option<pg_sys::Datum>], indexes: &[Index]) -> Tid {
    let natts = heap.natts();
    let mut values = vec![pg_sys::Datum::from(0usize); natts];
    let mut nulls = vec![true; natts];
    for (i, v) in row.iter().enumerate() {
        if let Some(d) = v {
            values[table.pos(i)] = *d;
            nulls[table.pos(i)] = false;
        }
    }
    // SAFETY: heap is open with RowExclusiveLock; values/nulls have one
    // entry per attribute of its descriptor (natts, which `tables::open`
    // checked against the description `table` comes from), each of the
    // column's checked type or NULL, and NULL for dropped columns. The
    // indexes are open, ready, and on plain columns, whose attribute
    // numbers (1..=natts) index values/nulls; the tuple is freed last.
    unsafe {
        let tuple = pg_sys::heap_form_tuple(heap.desc(), values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::heap_insert(
            heap.as_ptr(),
            tuple,
            pg_sys::GetCurrentCommandId(true),
            0,
            std::ptr::null_mut(),
        );
        for index in indexes {
            // Every index here is on plain columns (checked in
            // plain_indexes), so its values are the row's own: what
            // FormIndexDatum would read back from the tuple.
            let mut ivalues = [pg_sys::Datum::from(0usize); pg_sys::INDEX_MAX_KEYS as usize];
            let mut inulls = [false; pg_sys::INDEX_MAX_KEYS as usize];
            let info = &*index.info;
            for k in 0..info.ii_NumIndexAttrs as usize {
                let attnum = info.ii_IndexAttrNumbers[k];
                let at = (attnum - 1) as usize;
                ivalues[k] = values[at];
                inulls[k] = nulls[at];
            }
            let check = if index.rel.index_form().indisunique {
                pg_sys::IndexUniqueCheck::UNIQUE_CHECK_YES
            } else {
                pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO
            };
            pg_sys::index_insert(
                index.rel.as_ptr(),
                ivalues.as_mut_ptr(),
                inulls.as_mut_ptr(),
                &mut (*tuple).t_self,
                heap.as_ptr(),
                check,
                false,
                index.info,
            );
        }
        let tid = (*tuple).t_self;
        pg_sys::heap_freetuple(tuple);
        // As after any statement: later reads of this transaction see it.
        pg_sys::CommandCounterIncrement();
        tid
    }
}

/// A whole row of `idempotency.keys`.
pub struct KeyRow<'a> {
    pub scope: &'a str,
    pub key: &'a str,
    pub status: u8,
    pub attempt: i32,
    pub token: Option<i64>,
    /// The name of the role the key belongs to.
    pub owner: Option<&'a str>,
    pub fingerprint: Option<&'a [u8; 32]>,
    pub result: Option<pg_sys::Datum>,
    pub response: Response,
    pub recovery_point: Option<&'a str>,
    pub created_at: pg_sys::TimestampTz,
    pub finished_at: Option<pg_sys::TimestampTz>,
    pub expires_at: Option<pg_sys::TimestampTz>,
    pub locked_until: Option<pg_sys::TimestampTz>,
    pub lease: Option<&'a pg_sys::Interval>,
}

pub fn insert_key_row(row: &KeyRow) -> Tid {
    let mut values = [None; tables::KEYS_COLUMNS.len()];
    values[K_SCOPE] = row.scope.into_datum();
    values[K_KEY] = row.key.into_datum();
    values[K_STATUS] = Some(pg_sys::Datum::from(row.status as i8));
    values[K_ATTEMPT] = Some(pg_sys::Datum::from(row.attempt));
    values[K_TOKEN] = row.token.map(pg_sys::Datum::from);
    values[K_OWNER] = row.owner.and_then(|o| o.into_datum());
    values[K_FINGERPRINT] = row.fingerprint.and_then(|f| (&f[..]).into_datum());
    values[K_RESULT] = row.result;
    values[K_RESPONSE_STATUS] = row.response.status.map(pg_sys::Datum::from);
    values[K_RESPONSE_HEADERS] = row.response.headers;
    values[K_RESPONSE_BODY] = row.response.body;
    values[K_RECOVERY_POINT] = row.recovery_point.and_then(|r| r.into_datum());
    values[K_CREATED_AT] = Some(pg_sys::Datum::from(row.created_at));
    values[K_FINISHED_AT] = row.finished_at.map(pg_sys::Datum::from);
    values[K_EXPIRES_AT] = row.expires_at.map(pg_sys::Datum::from);
    values[K_LOCKED_UNTIL] = row.locked_until.map(pg_sys::Datum::from);
    values[K_LEASE] = row
        .lease
        .map(|iv| pg_sys::Datum::from(iv as *const pg_sys::Interval));
    insert(Which::Keys, row.scope, &values)
}

/// Records a key in the `idem_once` ledger.
pub fn insert_once_row(scope: &str, key: &str, recorded_at: pg_sys::TimestampTz) -> Tid {
    let mut values = [None; tables::ONCE_COLUMNS.len()];
    values[O_SCOPE] = scope.into_datum();
    values[O_KEY] = key.into_datum();
    values[O_RECORDED_AT] = Some(pg_sys::Datum::from(recorded_at));
    insert(Which::Once, scope, &values)
}
