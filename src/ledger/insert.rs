//! Inserting a row into one of the extension's own tables without SQL: the
//! heap tuple, then its one index entry, as Postgres inserts catalog rows.
//! This skips the executor's start-up for each row, which measured as most
//! of the cost of a claim. It is correct only because these tables have no
//! triggers, no constraints that the caller does not already guarantee, and
//! exactly one index, the primary key on (scope, key), which every insert
//! checks first; `heap_insert` itself takes care of WAL, TOAST, statistics and
//! serializable conflict checks, and the unique index insert still refuses
//! a duplicate key.
use pgrx::pg_sys;

pub type Tid = pg_sys::ItemPointerData;

/// Inserts `values`/`nulls` (one per column) into `heap`, and `key` (the
/// index's column values) into its primary key `index`.
pub fn insert(
    heap: pg_sys::Oid,
    index: pg_sys::Oid,
    values: &mut [pg_sys::Datum],
    nulls: &mut [bool],
    key: &mut [pg_sys::Datum; 2],
) -> Tid {
    unsafe {
        let rel = pg_sys::table_open(heap, pg_sys::RowExclusiveLock as i32);
        check_still_plain(rel);
        let idx = pg_sys::index_open(index, pg_sys::RowExclusiveLock as i32);
        let tuple = pg_sys::heap_form_tuple((*rel).rd_att, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::heap_insert(
            rel,
            tuple,
            pg_sys::GetCurrentCommandId(true),
            0,
            std::ptr::null_mut(),
        );
        let info = pg_sys::BuildIndexInfo(idx);
        let mut key_nulls = [false, false];
        pg_sys::index_insert(
            idx,
            key.as_mut_ptr(),
            key_nulls.as_mut_ptr(),
            &mut (*tuple).t_self,
            rel,
            pg_sys::IndexUniqueCheck::UNIQUE_CHECK_YES,
            false,
            info,
        );
        let tid = (*tuple).t_self;
        pg_sys::heap_freetuple(tuple);
        pg_sys::index_close(idx, pg_sys::NoLock as i32);
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
        // As after any statement: later reads of this transaction see it.
        pg_sys::CommandCounterIncrement();
        tid
    }
}

/// Checked on every insert, with the table locked (cheap: the relcache has
/// both): a trigger or a second index added since the backend started (by
/// pg_repack, say) would miss this insert, so refuse rather than lose it.
unsafe fn check_still_plain(rel: pg_sys::Relation) {
    unsafe {
        let indexes = pg_sys::RelationGetIndexList(rel);
        let count = if indexes.is_null() {
            0
        } else {
            (*indexes).length
        };
        if (*(*rel).rd_rel).relhastriggers || count != 1 {
            let name =
                std::ffi::CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr()).to_string_lossy();
            crate::pg::errors::error(
                pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("idempotency.{name} has triggers or indexes besides its primary key"),
            )
            .detail("The extension inserts into this table without the executor and maintains only its primary key.")
            .hint("Drop triggers and indexes added to the extension's tables (a table rewrite by pg_repack adds them for its run).")
            .raise();
        }
    }
}

/// A whole row of `idempotency.keys`.
pub struct KeyRow<'a> {
    pub scope: &'a str,
    pub key: &'a str,
    pub status: u8,
    pub attempt: i32,
    pub token: Option<i64>,
    pub fingerprint: Option<&'a [u8; 32]>,
    pub result: Option<pg_sys::Datum>,
    pub recovery_point: Option<&'a str>,
    pub created_at: pg_sys::TimestampTz,
    pub finished_at: Option<pg_sys::TimestampTz>,
    pub expires_at: Option<pg_sys::TimestampTz>,
    pub locked_until: Option<pg_sys::TimestampTz>,
    pub lease: Option<&'a pg_sys::Interval>,
}

pub fn insert_key_row(row: &KeyRow) -> Tid {
    use pgrx::IntoDatum;
    let cat = super::catalog();
    let a = &cat.att;
    let mut values = vec![pg_sys::Datum::from(0usize); cat.natts];
    let mut nulls = vec![true; cat.natts];
    let mut set = |attnum: i16, v: Option<pg_sys::Datum>| {
        if let Some(d) = v {
            values[(attnum - 1) as usize] = d;
            nulls[(attnum - 1) as usize] = false;
        }
    };
    let scope = row.scope.into_datum().expect("text datum");
    let key = row.key.into_datum().expect("text datum");
    set(a.scope, Some(scope));
    set(a.key, Some(key));
    set(a.status, Some(pg_sys::Datum::from(row.status as i8)));
    set(a.attempt, Some(pg_sys::Datum::from(row.attempt)));
    set(a.token, row.token.map(pg_sys::Datum::from));
    set(
        a.fingerprint,
        row.fingerprint.and_then(|f| (&f[..]).into_datum()),
    );
    set(a.result, row.result);
    set(
        a.recovery_point,
        row.recovery_point.and_then(|r| r.into_datum()),
    );
    set(a.created_at, Some(pg_sys::Datum::from(row.created_at)));
    set(a.finished_at, row.finished_at.map(pg_sys::Datum::from));
    set(a.expires_at, row.expires_at.map(pg_sys::Datum::from));
    set(a.locked_until, row.locked_until.map(pg_sys::Datum::from));
    set(
        a.lease,
        row.lease
            .map(|iv| pg_sys::Datum::from(iv as *const pg_sys::Interval)),
    );
    insert(
        cat.keys,
        cat.pkey,
        &mut values,
        &mut nulls,
        &mut [scope, key],
    )
}

/// Records a key in the `idem_once` ledger.
pub fn insert_once_row(scope: &str, key: &str, recorded_at: pg_sys::TimestampTz) -> Tid {
    use pgrx::IntoDatum;
    let cat = super::catalog();
    let scope = scope.into_datum().expect("text datum");
    let key = key.into_datum().expect("text datum");
    let mut values = vec![pg_sys::Datum::from(0usize); cat.once_natts];
    let mut nulls = vec![true; cat.once_natts];
    for (i, d) in cat
        .once_att
        .into_iter()
        .zip([scope, key, pg_sys::Datum::from(recorded_at)])
    {
        values[i] = d;
        nulls[i] = false;
    }
    insert(
        cat.once,
        cat.once_pkey,
        &mut values,
        &mut nulls,
        &mut [scope, key],
    )
}
