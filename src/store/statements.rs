//! The statements that write `idempotency.keys`, prepared once per backend
//! and kept (`SPI_keepplan`); Postgres' plan cache re-plans them by itself
//! when the table changes. Operators are schema-qualified so that a caller's
//! `search_path` cannot change what they mean inside SECURITY DEFINER code.
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::ffi::CString;

const TEXT: pg_sys::Oid = pg_sys::TEXTOID;
const INT4: pg_sys::Oid = pg_sys::INT4OID;
const INT8: pg_sys::Oid = pg_sys::INT8OID;
const BYTEA: pg_sys::Oid = pg_sys::BYTEAOID;
const TSTZ: pg_sys::Oid = pg_sys::TIMESTAMPTZOID;
const JSONB: pg_sys::Oid = pg_sys::JSONBOID;
const CHAR: pg_sys::Oid = pg_sys::CHAROID;
const INTERVAL: pg_sys::Oid = pg_sys::INTERVALOID;

/// A new claim: the first `idem_begin` of a key.
const INSERT_CLAIM: &str = "INSERT INTO idempotency.keys \
     (scope, key, status, attempt, fingerprint, recovery_point, created_at, locked_until, token, lease) \
     VALUES ($1, $2, 'p', $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING";
const INSERT_CLAIM_TYPES: &[pg_sys::Oid] = &[TEXT, TEXT, INT4, BYTEA, TEXT, TSTZ, TSTZ, INT8, INTERVAL];

/// A claim of a key that has a row: released, expired or taken over.
const UPDATE_CLAIM: &str = "UPDATE idempotency.keys SET status = 'p', attempt = $3, \
     fingerprint = $4, recovery_point = $5, created_at = COALESCE($6, created_at), \
     locked_until = $7, token = $8, lease = $9, result = NULL, finished_at = NULL, expires_at = NULL \
     WHERE scope OPERATOR(pg_catalog.=) $1 AND key OPERATOR(pg_catalog.=) $2";
const UPDATE_CLAIM_TYPES: &[pg_sys::Oid] = &[TEXT, TEXT, INT4, BYTEA, TEXT, TSTZ, TSTZ, INT8, INTERVAL];

/// The outcome: completed, failed, or released for a retry.
const UPDATE_OUTCOME: &str = "UPDATE idempotency.keys SET status = $3, result = $4, \
     finished_at = $5, expires_at = $6, locked_until = NULL \
     WHERE scope OPERATOR(pg_catalog.=) $1 AND key OPERATOR(pg_catalog.=) $2";
const UPDATE_OUTCOME_TYPES: &[pg_sys::Oid] = &[TEXT, TEXT, CHAR, JSONB, TSTZ, TSTZ];

/// A recovery point; a lease is renewed for as long as it was taken.
const UPDATE_CHECKPOINT: &str = "UPDATE idempotency.keys SET recovery_point = $3, \
     locked_until = $4 OPERATOR(pg_catalog.+) lease \
     WHERE scope OPERATOR(pg_catalog.=) $1 AND key OPERATOR(pg_catalog.=) $2";
const UPDATE_CHECKPOINT_TYPES: &[pg_sys::Oid] = &[TEXT, TEXT, TEXT, TSTZ];

/// Fencing tokens come from one sequence, so a key's next holder always
/// gets a larger token than any earlier one, even after the key was purged.
const NEXT_TOKEN: &str = "SELECT pg_catalog.nextval('idempotency.tokens'::pg_catalog.regclass)";

/// The deduplication ledger: a row is the record; ON CONFLICT DO NOTHING
/// waits for another open transaction recording the same key, so exactly
/// one caller ever inserts it.
const INSERT_ONCE: &str = "INSERT INTO idempotency.once (scope, key, recorded_at) \
     VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";
const INSERT_ONCE_TYPES: &[pg_sys::Oid] = &[TEXT, TEXT, TSTZ];

#[derive(Clone, Copy)]
enum Stmt {
    InsertClaim = 0,
    UpdateClaim = 1,
    UpdateOutcome = 2,
    UpdateCheckpoint = 3,
    NextToken = 4,
    InsertOnce = 5,
}

const ALL: &[(Stmt, &str, &[pg_sys::Oid])] = &[
    (Stmt::InsertClaim, INSERT_CLAIM, INSERT_CLAIM_TYPES),
    (Stmt::UpdateClaim, UPDATE_CLAIM, UPDATE_CLAIM_TYPES),
    (Stmt::UpdateOutcome, UPDATE_OUTCOME, UPDATE_OUTCOME_TYPES),
    (Stmt::UpdateCheckpoint, UPDATE_CHECKPOINT, UPDATE_CHECKPOINT_TYPES),
    (Stmt::NextToken, NEXT_TOKEN, &[]),
    (Stmt::InsertOnce, INSERT_ONCE, INSERT_ONCE_TYPES),
];

thread_local! {
    static PLANS: RefCell<Vec<pg_sys::SPIPlanPtr>> = const { RefCell::new(Vec::new()) };
}

/// A parameter value: a datum, or NULL.
pub type Param = Option<pg_sys::Datum>;

fn plan(stmt: Stmt) -> pg_sys::SPIPlanPtr {
    PLANS.with(|p| {
        let mut plans = p.borrow_mut();
        if plans.is_empty() {
            for (_, sql, types) in ALL {
                let sql = CString::new(*sql).expect("no NUL in SQL");
                unsafe {
                    let plan = pg_sys::SPI_prepare(sql.as_ptr(), types.len() as i32, types.as_ptr() as *mut _);
                    if plan.is_null() {
                        let code = pg_sys::SPI_result;
                        pgrx::error!("could not prepare an idempotency statement: SPI code {code}");
                    }
                    pg_sys::SPI_keepplan(plan);
                    plans.push(plan);
                }
            }
        }
        plans[stmt as usize]
    })
}

/// Runs one statement inside its own SPI connection; returns the rows it
/// changed, and the first column of its first row when it returns rows.
fn execute(stmt: Stmt, params: &[Param]) -> u64 {
    execute_returning(stmt, params).0
}

fn execute_returning(stmt: Stmt, params: &[Param]) -> (u64, Option<pg_sys::Datum>) {
    unsafe {
        pg_sys::SPI_connect();
        let plan = plan(stmt);
        let mut values: Vec<pg_sys::Datum> =
            params.iter().map(|p| p.unwrap_or(pg_sys::Datum::from(0usize))).collect();
        let nulls: Vec<std::ffi::c_char> =
            params.iter().map(|p| if p.is_some() { b' ' } else { b'n' } as std::ffi::c_char).collect();
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, 0);
        if rc < 0 {
            pgrx::error!("idempotency statement failed: SPI code {rc}");
        }
        let n = pg_sys::SPI_processed;
        let mut first = None;
        let table = pg_sys::SPI_tuptable;
        if n > 0 && !table.is_null() {
            let mut isnull = false;
            let d = pg_sys::SPI_getbinval(*(*table).vals, (*table).tupdesc, 1, &mut isnull);
            // Only by-value results (bigint) are read this way.
            first = (!isnull).then_some(d);
        }
        pg_sys::SPI_finish();
        (n, first)
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

pub struct Claim<'a> {
    pub attempt: i32,
    pub fingerprint: Option<&'a [u8; 32]>,
    pub recovery_point: Option<&'a str>,
    /// None keeps the row's creation time (a retry of the same key).
    pub created_at: Option<pg_sys::TimestampTz>,
    pub locked_until: Option<pg_sys::TimestampTz>,
    pub token: Option<i64>,
    pub lease: Option<&'a pg_sys::Interval>,
}

impl Claim<'_> {
    fn params(&self, scope: &str, key: &str) -> Vec<Param> {
        vec![
            text(scope),
            text(key),
            Some(pg_sys::Datum::from(self.attempt)),
            bytes(self.fingerprint),
            opt_text(self.recovery_point),
            int8(self.created_at),
            int8(self.locked_until),
            int8(self.token),
            self.lease.map(|iv| pg_sys::Datum::from(iv as *const pg_sys::Interval)),
        ]
    }
}

/// Inserts a claim row; false when a row for the key exists after all.
pub fn insert_claim(scope: &str, key: &str, claim: &Claim) -> bool {
    execute(Stmt::InsertClaim, &claim.params(scope, key)) == 1
}

/// Turns an existing row into a claim; false when the row is gone or not
/// visible to this transaction's snapshot.
pub fn update_claim(scope: &str, key: &str, claim: &Claim) -> bool {
    execute(Stmt::UpdateClaim, &claim.params(scope, key)) == 1
}

/// Stores the outcome of a claim held by this transaction.
pub fn update_outcome(
    scope: &str,
    key: &str,
    status: u8,
    result: Option<pg_sys::Datum>,
    finished_at: pg_sys::TimestampTz,
    expires_at: pg_sys::TimestampTz,
) -> bool {
    let params = [
        text(scope),
        text(key),
        Some(pg_sys::Datum::from(status as i8)),
        result,
        int8(Some(finished_at)),
        int8(Some(expires_at)),
    ];
    execute(Stmt::UpdateOutcome, &params) == 1
}

/// Records a recovery point and renews a lease.
pub fn update_checkpoint(scope: &str, key: &str, recovery_point: Option<&str>, now: pg_sys::TimestampTz) -> bool {
    execute(Stmt::UpdateCheckpoint, &[text(scope), text(key), opt_text(recovery_point), int8(Some(now))]) == 1
}

/// The next fencing token.
pub fn next_token() -> i64 {
    match execute_returning(Stmt::NextToken, &[]) {
        (1, Some(d)) => d.value() as i64,
        _ => pgrx::error!("idempotency.tokens returned no value"),
    }
}

/// Records a key in the ledger; false when it was recorded before.
pub fn insert_once(scope: &str, key: &str, now: pg_sys::TimestampTz) -> bool {
    execute(Stmt::InsertOnce, &[text(scope), text(key), int8(Some(now))]) == 1
}
