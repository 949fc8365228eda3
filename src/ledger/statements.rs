//! The statements that update `idempotency.keys` (and insert rows that
//! `insert` cannot write directly), prepared once per backend and kept
//! (`SPI_keepplan`); Postgres' plan cache re-plans them by itself when a
//! table changes, and their parameter types are the column types that
//! `tables` checks. They run as the tables' owner (`execute`) under the
//! caller's `search_path`, so every operator is schema-qualified: the path
//! cannot change what they mean.
//!
//! Updates address the row by its TID (`ctid = $n`), which the probe or the
//! previous write returned: a TID scan has no plan to get wrong, whatever the
//! table's statistics say, and costs no index descent. The scope and key are
//! checked again on the row, and a row changed since (only a purge can) is
//! simply not found, which the callers treat as "look again".
use super::tables::{self, Which};
use crate::pg::relation::{self, Spi};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;

const TEXT: pg_sys::Oid = pg_sys::TEXTOID;
const INT4: pg_sys::Oid = pg_sys::INT4OID;
const INT8: pg_sys::Oid = pg_sys::INT8OID;
const BYTEA: pg_sys::Oid = pg_sys::BYTEAOID;
const TSTZ: pg_sys::Oid = pg_sys::TIMESTAMPTZOID;
const JSONB: pg_sys::Oid = pg_sys::JSONBOID;
const CHAR: pg_sys::Oid = pg_sys::CHAROID;
const INTERVAL: pg_sys::Oid = pg_sys::INTERVALOID;
const TID: pg_sys::Oid = pg_sys::TIDOID;

/// The row a statement updates: its TID, then scope and key to be sure.
const THIS_ROW: &str = "WHERE ctid OPERATOR(pg_catalog.=) $1 \
     AND scope OPERATOR(pg_catalog.=) $2 AND key OPERATOR(pg_catalog.=) $3 RETURNING ctid";

/// A claim of a key that has a row: released, expired or taken over.
const UPDATE_CLAIM: &str = "UPDATE {table} SET status = 'p', attempt = $4, \
     fingerprint = $5, recovery_point = $6, created_at = COALESCE($7, created_at), \
     locked_until = $8, token = $9, lease = $10, owner = $11, result = NULL, finished_at = NULL, \
     expires_at = NULL, response_status = NULL, response_headers = NULL, response_body = NULL";
const CLAIM_TYPES: &[pg_sys::Oid] = &[
    TID, TEXT, TEXT, INT4, BYTEA, TEXT, TSTZ, TSTZ, INT8, INTERVAL, TEXT,
];

/// The outcome: completed, failed, or released for a retry.
const UPDATE_OUTCOME: &str = "UPDATE {table} SET status = $4, result = $5, \
     finished_at = $6, expires_at = $7, locked_until = NULL, response_status = $8, \
     response_headers = $9, response_body = $10";
const UPDATE_OUTCOME_TYPES: &[pg_sys::Oid] =
    &[TID, TEXT, TEXT, CHAR, JSONB, TSTZ, TSTZ, INT4, JSONB, BYTEA];

/// A recovery point; a lease is renewed for as long as it was taken.
const UPDATE_CHECKPOINT: &str = "UPDATE {table} SET recovery_point = $4, \
     locked_until = $5 OPERATOR(pg_catalog.+) lease";
const UPDATE_CHECKPOINT_TYPES: &[pg_sys::Oid] = &[TID, TEXT, TEXT, TEXT, TSTZ];

/// Fencing tokens come from one sequence, so a key's next holder always
/// gets a larger token than any earlier one, even after the key was purged.
const NEXT_TOKEN: &str = "SELECT pg_catalog.nextval('idempotency.tokens'::pg_catalog.regclass)";

/// A key's committed state for `idem_get`, in its result's columns, then
/// the owner. Every operator, type and collation is qualified, and the
/// collation is the index's, so that the primary key is used (on a Citus
/// shard, whose scope has the tenant column's collation, the column's own).
const READ_KEY: &str = "SELECT CASE \
     WHEN status OPERATOR(pg_catalog.=) 'p'::pg_catalog.\"char\" THEN 'in_progress' \
     WHEN status OPERATOR(pg_catalog.=) 'c'::pg_catalog.\"char\" THEN 'completed' \
     WHEN status OPERATOR(pg_catalog.=) 'f'::pg_catalog.\"char\" THEN 'failed' \
     WHEN status OPERATOR(pg_catalog.=) 'r'::pg_catalog.\"char\" THEN 'released' END, \
     result, attempt, recovery_point, pg_catalog.encode(fingerprint, 'hex'), \
     created_at, finished_at, expires_at, locked_until, \
     response_status, response_headers, response_body, owner \
     FROM {table} \
     WHERE scope OPERATOR(pg_catalog.=) ($1 {collate}) \
     AND key OPERATOR(pg_catalog.=) ($2 COLLATE pg_catalog.\"C\") \
     AND (expires_at IS NULL OR expires_at OPERATOR(pg_catalog.>) pg_catalog.clock_timestamp())";

/// The types of `idem_get`'s result columns, which `READ_KEY` returns first.
pub const READ_KEY_TYPES: [pg_sys::Oid; 12] = [
    TEXT, JSONB, INT4, TEXT, TEXT, TSTZ, TSTZ, TSTZ, TSTZ, INT4, JSONB, BYTEA,
];

/// How many they are.
pub const READ_KEY_COLUMNS: usize = READ_KEY_TYPES.len();

/// On Citus, Citus's shard metadata lock in share mode (5) on one shard
/// (`citus::lock_shard`).
const LOCK_SHARD_METADATA: &str = "SELECT pg_catalog.lock_shard_metadata(5, ARRAY[$1])";

#[derive(Clone, Copy)]
enum Stmt {
    UpdateClaim = 0,
    UpdateOutcome = 1,
    UpdateCheckpoint = 2,
    NextToken = 3,
    InsertKeys = 4,
    InsertOnce = 5,
    ReadKey = 6,
    LockShardMetadata = 7,
}

/// `INSERT INTO {table} (every column of which) VALUES ($1, ...)`, for
/// rows that `insert` cannot write directly.
fn insert_sql(which: Which) -> (String, Vec<pg_sys::Oid>) {
    let columns = which.columns();
    let names = columns
        .iter()
        .map(|c| c.name.to_str().expect("ASCII column names"))
        .collect::<Vec<_>>()
        .join(", ");
    let params = (1..=columns.len())
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ");
    (
        format!("INSERT INTO {{table}} ({names}) VALUES ({params}) RETURNING ctid"),
        columns.iter().map(|c| c.type_oid).collect(),
    )
}

/// The table a statement works on: the table itself (`idempotency.keys`
/// or `idempotency.once`), or on Citus one of its shards on this node.
#[derive(Clone, Copy)]
enum On {
    Table,
    Shard(pg_sys::Oid),
}

fn sql_of(stmt: Stmt, on: On) -> (String, Vec<pg_sys::Oid>) {
    let (template, types) = match stmt {
        Stmt::UpdateClaim => (format!("{UPDATE_CLAIM} {THIS_ROW}"), CLAIM_TYPES.to_vec()),
        Stmt::UpdateOutcome => (
            format!("{UPDATE_OUTCOME} {THIS_ROW}"),
            UPDATE_OUTCOME_TYPES.to_vec(),
        ),
        Stmt::UpdateCheckpoint => (
            format!("{UPDATE_CHECKPOINT} {THIS_ROW}"),
            UPDATE_CHECKPOINT_TYPES.to_vec(),
        ),
        Stmt::NextToken => (NEXT_TOKEN.to_string(), Vec::new()),
        Stmt::InsertKeys => insert_sql(Which::Keys),
        Stmt::InsertOnce => insert_sql(Which::Once),
        Stmt::ReadKey => (READ_KEY.to_string(), vec![TEXT, TEXT]),
        Stmt::LockShardMetadata => (LOCK_SHARD_METADATA.to_string(), vec![INT8]),
    };
    let (table, collate) = match on {
        On::Table => (
            format!(
                "idempotency.{}",
                stmt.which().name().to_str().expect("ASCII table names")
            ),
            "COLLATE pg_catalog.\"C\"".to_string(),
        ),
        On::Shard(oid) => (crate::citus::qualified_name(oid), String::new()),
    };
    (
        template
            .replace("{table}", &table)
            .replace("{collate}", &collate),
        types,
    )
}

impl Stmt {
    /// The table the statement works on.
    fn which(self) -> Which {
        match self {
            Stmt::InsertOnce => Which::Once,
            _ => Which::Keys,
        }
    }
}

const COUNT: usize = 8;

thread_local! {
    static PLANS: RefCell<[Option<pg_sys::SPIPlanPtr>; COUNT]> = const { RefCell::new([None; COUNT]) };
    /// On Citus, the statements on this node's shards, by shard table.
    static SHARD_PLANS: RefCell<HashMap<(usize, pg_sys::Oid), pg_sys::SPIPlanPtr>> =
        RefCell::new(HashMap::new());
}

/// A parameter value: a datum, or NULL.
pub type Param = Option<pg_sys::Datum>;

/// A row's address in `idempotency.keys`.
pub type Tid = pg_sys::ItemPointerData;

fn plan(stmt: Stmt, on: On) -> pg_sys::SPIPlanPtr {
    match on {
        On::Table => PLANS.with(|p| {
            let mut plans = p.borrow_mut();
            if let Some(plan) = plans[stmt as usize] {
                return plan;
            }
            let (sql, types) = sql_of(stmt, on);
            let plan = prepare_kept(&sql, &types);
            plans[stmt as usize] = Some(plan);
            plan
        }),
        // A shard's table is named by its OID, which is never reused while
        // the plan lives: a plan of a shard that moved away is never run
        // again.
        On::Shard(oid) => SHARD_PLANS.with(|p| {
            *p.borrow_mut()
                .entry((stmt as usize, oid))
                .or_insert_with(|| {
                    let (sql, types) = sql_of(stmt, on);
                    prepare_kept(&sql, &types)
                })
        }),
    }
}

/// Prepares `sql` with parameters of `types` and keeps the plan for the
/// backend's life (until `SPI_freeplan`). Call inside an SPI connection.
/// (A statement that does not parse raises its own error from SPI_prepare.)
pub fn prepare_kept(sql: &str, types: &[pg_sys::Oid]) -> pg_sys::SPIPlanPtr {
    let sql = CString::new(sql).expect("no NUL in SQL");
    // SAFETY: sql is a NUL-terminated string and types has the length
    // passed; SPI_prepare copies both. SPI_keepplan moves the plan under
    // CacheMemoryContext, so it outlives this SPI connection.
    unsafe {
        let plan = pg_sys::SPI_prepare(sql.as_ptr(), types.len() as i32, types.as_ptr() as *mut _);
        if plan.is_null() {
            let code = pg_sys::SPI_result;
            pgrx::error!("could not prepare an idempotency statement: SPI code {code}");
        }
        pg_sys::SPI_keepplan(plan);
        plan
    }
}

/// What a statement returned: rows changed, and the first column of the
/// first row (a TID or a bigint), copied out of SPI's memory.
enum First {
    None,
    Tid(Tid),
    Int8(i64),
}

/// Runs `stmt` as the key table's owner, like the body of a SECURITY
/// DEFINER function: the caller needs no rights on the `idempotency` schema.
/// `scope` is the scope of the row it writes, which on Citus picks the
/// shard (None: a statement on no table).
fn execute(stmt: Stmt, scope: Option<&str>, params: &[Param]) -> (u64, First) {
    let cat = super::catalog();
    let on = target(&cat, stmt.which(), scope, pg_sys::RowExclusiveLock);
    relation::as_role(cat.owner, || execute_as_owner(stmt, on, params))
}

/// Where a statement on `scope`'s rows of `which` runs: on Citus, the
/// scope's shard on this node, locked in `mode` (the row's probe locked it
/// already, unless the statement reads).
fn target(cat: &tables::Catalog, which: Which, scope: Option<&str>, mode: u32) -> On {
    match scope {
        Some(scope) if cat.distributed() => On::Shard(tables::locate(which, scope, mode).0),
        _ => On::Table,
    }
}

fn execute_as_owner(stmt: Stmt, on: On, params: &[Param]) -> (u64, First) {
    let _spi = Spi::connect();
    let plan = plan(stmt, on);
    let mut values: Vec<pg_sys::Datum> = params
        .iter()
        .map(|p| p.unwrap_or(pg_sys::Datum::from(0usize)))
        .collect();
    let nulls: Vec<std::ffi::c_char> = params
        .iter()
        .map(|p| if p.is_some() { b' ' } else { b'n' } as std::ffi::c_char)
        .collect();
    // SAFETY: the plan was prepared with sql_of(stmt)'s parameter types, and
    // every caller passes one datum of that type (or NULL) per parameter;
    // the values and nulls arrays have that length. SPI_tuptable and its
    // first row are read before SPI_finish frees them, and a TID is copied
    // out by value.
    unsafe {
        if pg_sys::SPI_getargcount(plan) as usize != params.len() {
            pgrx::error!("idempotency statement expects other parameters");
        }
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, 0);
        if rc < 0 {
            pgrx::error!("idempotency statement failed: SPI code {rc}");
        }
        let n = pg_sys::SPI_processed;
        let table = pg_sys::SPI_tuptable;
        let mut first = First::None;
        if n > 0 && !table.is_null() {
            let mut isnull = false;
            let d = pg_sys::SPI_getbinval(*(*table).vals, (*table).tupdesc, 1, &mut isnull);
            if !isnull {
                first = match pg_sys::SPI_gettypeid((*table).tupdesc, 1) {
                    pg_sys::TIDOID => First::Tid(*d.cast_mut_ptr::<Tid>()),
                    _ => First::Int8(d.value() as i64),
                };
            }
        }
        (n, first)
    }
}

/// Takes Citus's shard metadata lock on `shard` in share mode, as `owner`
/// (whom Citus requires): a statement on no table.
pub fn lock_shard_metadata(owner: pg_sys::Oid, shard: i64) {
    relation::as_role(owner, || {
        execute_as_owner(
            Stmt::LockShardMetadata,
            On::Table,
            &[Some(pg_sys::Datum::from(shard))],
        )
    });
}

/// Inserts a row with SQL, for when the table needs more than a direct
/// insert (see `insert`): one value per column of `which.columns()`.
pub fn insert_row(which: Which, scope: &str, row: &[Param]) -> Tid {
    let stmt = match which {
        Which::Keys => Stmt::InsertKeys,
        Which::Once => Stmt::InsertOnce,
    };
    match execute(stmt, Some(scope), row) {
        (1, First::Tid(t)) => t,
        _ => pgrx::error!(
            "the insert into idempotency.{} returned no row",
            which.name().to_string_lossy()
        ),
    }
}

fn text(s: &str) -> Param {
    s.into_datum()
}

fn opt_text(s: Option<&str>) -> Param {
    s.and_then(|s| s.into_datum())
}

fn bytes(b: Option<&[u8; 32]>) -> Param {
    b.and_then(|b| (&b[..]).into_datum())
}

fn int8(v: Option<i64>) -> Param {
    v.map(pg_sys::Datum::from)
}

fn tid(t: &Tid) -> Param {
    Some(pg_sys::Datum::from(t as *const Tid))
}

/// The new row version's TID when the statement wrote one.
fn written(result: (u64, First)) -> Option<Tid> {
    match result {
        (1, First::Tid(t)) => Some(t),
        _ => None,
    }
}

pub struct Claim<'a> {
    pub attempt: i32,
    pub fingerprint: Option<&'a [u8; 32]>,
    pub recovery_point: Option<&'a str>,
    /// None keeps the row's creation time (a retry of the same key).
    pub created_at: Option<pg_sys::TimestampTz>,
    pub locked_until: Option<pg_sys::TimestampTz>,
    pub token: Option<i64>,
    pub lease: Option<&'a pg_sys::Interval>,
    /// The name of the role the key belongs to.
    pub owner: String,
}

impl Claim<'_> {
    /// The claim as a new row of `idempotency.keys`.
    pub fn row<'a>(&'a self, scope: &'a str, key: &'a str) -> super::insert::KeyRow<'a> {
        super::insert::KeyRow {
            scope,
            key,
            status: super::IN_PROGRESS,
            attempt: self.attempt,
            token: self.token,
            owner: Some(&self.owner),
            fingerprint: self.fingerprint,
            result: None,
            response: super::Response::default(),
            recovery_point: self.recovery_point,
            created_at: self
                .created_at
                // SAFETY: reads a backend global.
                .unwrap_or_else(|| unsafe { pg_sys::GetCurrentTransactionStartTimestamp() }),
            finished_at: None,
            expires_at: None,
            locked_until: self.locked_until,
            lease: self.lease,
        }
    }

    fn params(&self, row: Param, scope: &str, key: &str) -> Vec<Param> {
        vec![
            row,
            text(scope),
            text(key),
            Some(pg_sys::Datum::from(self.attempt)),
            bytes(self.fingerprint),
            opt_text(self.recovery_point),
            int8(self.created_at),
            int8(self.locked_until),
            int8(self.token),
            self.lease
                .map(|iv| pg_sys::Datum::from(iv as *const pg_sys::Interval)),
            text(&self.owner),
        ]
    }
}

/// Turns the row at `at` into a claim; None when the row is gone, changed,
/// or not visible to this transaction's snapshot.
pub fn update_claim(at: &Tid, scope: &str, key: &str, claim: &Claim) -> Option<Tid> {
    written(execute(
        Stmt::UpdateClaim,
        Some(scope),
        &claim.params(tid(at), scope, key),
    ))
}

/// What the holder of a key records: its status (completed, failed or
/// released), the result or error, and the response.
pub struct Outcome {
    pub status: u8,
    pub result: Option<pg_sys::Datum>,
    pub response: super::Response,
}

/// Stores the outcome of a claim held by the caller.
pub fn update_outcome(
    at: &Tid,
    scope: &str,
    key: &str,
    outcome: &Outcome,
    finished_at: pg_sys::TimestampTz,
    expires_at: pg_sys::TimestampTz,
) -> Option<Tid> {
    let params = [
        tid(at),
        text(scope),
        text(key),
        Some(pg_sys::Datum::from(outcome.status as i8)),
        outcome.result,
        int8(Some(finished_at)),
        int8(Some(expires_at)),
        outcome.response.status.map(pg_sys::Datum::from),
        outcome.response.headers,
        outcome.response.body,
    ];
    written(execute(Stmt::UpdateOutcome, Some(scope), &params))
}

/// Records a recovery point and renews a lease.
pub fn update_checkpoint(
    at: &Tid,
    scope: &str,
    key: &str,
    recovery_point: Option<&str>,
    now: pg_sys::TimestampTz,
) -> Option<Tid> {
    let params = [
        tid(at),
        text(scope),
        text(key),
        opt_text(recovery_point),
        int8(Some(now)),
    ];
    written(execute(Stmt::UpdateCheckpoint, Some(scope), &params))
}

/// The next fencing token.
pub fn next_token() -> i64 {
    match execute(Stmt::NextToken, None, &[]) {
        (1, First::Int8(t)) => t,
        _ => pgrx::error!("idempotency.tokens returned no value"),
    }
}

/// Reads a key's committed state (and this transaction's own changes) as
/// the table's owner, and hands `emit` its `READ_KEY_COLUMNS` values and
/// nulls, with the key's owner, while they are valid. Nothing is emitted for
/// a key that is unknown or expired.
pub fn read_key(
    scope: &str,
    key: &str,
    emit: impl FnOnce(&mut [pg_sys::Datum], &mut [bool], Option<&str>),
) {
    let cat = super::catalog();
    let on = target(&cat, Which::Keys, Some(scope), pg_sys::AccessShareLock);
    relation::as_role(cat.owner, || {
        let _spi = Spi::connect();
        let plan = plan(Stmt::ReadKey, on);
        let mut params = [text(scope).expect("text"), text(key).expect("text")];
        let nulls = [b' ' as std::ffi::c_char; 2];
        // SAFETY: the plan takes two text parameters, passed with their
        // nulls. The row is read before SPI_finish (when _spi drops) frees
        // it, and emit gets values that live that long.
        unsafe {
            let rc = pg_sys::SPI_execute_plan(plan, params.as_mut_ptr(), nulls.as_ptr(), false, 1);
            if rc < 0 {
                pgrx::error!("idempotency statement failed: SPI code {rc}");
            }
            let table = pg_sys::SPI_tuptable;
            if pg_sys::SPI_processed == 0 || table.is_null() {
                return;
            }
            let mut values = [pg_sys::Datum::from(0usize); READ_KEY_COLUMNS + 1];
            let mut nulls = [true; READ_KEY_COLUMNS + 1];
            for (i, (v, n)) in values.iter_mut().zip(nulls.iter_mut()).enumerate() {
                *v = pg_sys::SPI_getbinval(*(*table).vals, (*table).tupdesc, i as i32 + 1, n);
            }
            let role = (!nulls[READ_KEY_COLUMNS]).then(|| {
                pgrx::varlena::text_to_rust_str(pg_sys::pg_detoast_datum_packed(
                    values[READ_KEY_COLUMNS].cast_mut_ptr(),
                ))
                .unwrap_or_default()
            });
            emit(
                &mut values[..READ_KEY_COLUMNS],
                &mut nulls[..READ_KEY_COLUMNS],
                role,
            );
        }
    })
}
