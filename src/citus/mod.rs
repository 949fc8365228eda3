//! Citus: the key tables distributed by scope (`idem_distribute()`, in
//! `sql/citus.sql`), co-located with the application's tenant table, so
//! that a tenant's keys live, and move, with its rows.
//!
//! On every node, `idempotency.keys` and `idempotency.once` are then
//! shells: their rows are in shards (`idempotency.keys_<shardid>`), a few
//! of them on each worker. The functions that take a scope are delegated by
//! Citus to the node that holds the scope's shard; there the ledger reads
//! and writes that shard directly, in the caller's transaction, as it does
//! the table on a single server. The shard is found as Citus finds it: the
//! scope's hash under the column's collation, within a shard's hash range.
//!
//! `Shards` is the map of one table's shards, read from Citus's metadata
//! with the newest snapshot when the table's description is read, and
//! forgotten with it: Citus invalidates the distributed table's relcache
//! entry whenever a shard or a placement changes (a move, a split, a new
//! node). Before a shard is used, Citus's own shard metadata lock is taken
//! in share mode, as its executor does for every write: a move waits for
//! the transactions that use the shard and then switches the placement,
//! which a call after it sees.
use crate::pg::errors::{error, Code};
use crate::pg::relation::Spi;
use pgrx::pg_sys;
use pgrx::IntoDatum;
use std::cell::RefCell;
use std::ffi::CStr;

/// One shard of a distributed table: its hash range and, when this node
/// holds an active placement of it, the shard's table here.
#[derive(Debug, Clone)]
struct Range {
    min: i32,
    max: i32,
    shard: i64,
    local: Option<pg_sys::Oid>,
}

/// The shards of a hash-distributed key table.
#[derive(Debug)]
pub struct Shards {
    /// By hash range, ascending.
    ranges: Vec<Range>,
    /// The collation of `scope`, under which Citus hashes it.
    collation: pg_sys::Oid,
}

/// Where a scope's rows are.
pub struct Shard {
    pub id: i64,
    /// The shard's table on this node; None when another node holds it.
    pub local: Option<pg_sys::Oid>,
}

impl Shards {
    /// The shard that holds `scope`'s rows.
    pub fn of(&self, scope: &str, table: &CStr) -> Shard {
        let hash = hash_text(scope, self.collation);
        let at = self.ranges.partition_point(|r| r.max < hash);
        match self.ranges.get(at) {
            Some(r) if r.min <= hash => Shard {
                id: r.shard,
                local: r.local,
            },
            _ => error(
                Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "no shard of idempotency.{} covers the hash of scope \"{scope}\"",
                    table.to_string_lossy()
                ),
            )
            .hint("Check the table's shards in pg_dist_shard.")
            .raise(),
        }
    }

    /// The tables of the shards this node holds.
    pub fn local(&self) -> impl Iterator<Item = pg_sys::Oid> + '_ {
        self.ranges.iter().filter_map(|r| r.local)
    }

    pub fn holds(&self, relid: pg_sys::Oid) -> bool {
        self.ranges.iter().any(|r| r.local == Some(relid))
    }
}

/// The hash Citus gives a text distribution value: `hashtext` under the
/// column's collation (for a deterministic collation, the hash of its
/// bytes).
fn hash_text(value: &str, collation: pg_sys::Oid) -> i32 {
    let datum = value.into_datum().expect("text");
    // SAFETY: hashtext takes one text argument, here a fresh varlena, and
    // returns an int4; the collation is the column's, which exists.
    unsafe {
        pg_sys::OidFunctionCall1Coll(pg_sys::Oid::from(pg_sys::F_HASHTEXT), collation, datum)
            .value() as i32
    }
}

/// Whether Citus is installed in this database: its metadata tables exist.
/// A catalog lookup, so that a server without Citus runs no query.
pub fn installed() -> bool {
    // SAFETY: get_relname_relid reads the syscache and returns InvalidOid
    // when there is no such relation.
    unsafe {
        pg_sys::get_relname_relid(
            c"pg_dist_partition".as_ptr(),
            pg_sys::Oid::from(pg_sys::PG_CATALOG_NAMESPACE),
        ) != pg_sys::InvalidOid
    }
}

/// The partition method Citus has for `relid` ('h' hash, 'n' single shard or
/// reference, ...), read with the newest snapshot; None when it is not a
/// Citus table.
const PARTITION: &str = "SELECT partmethod::pg_catalog.text FROM pg_catalog.pg_dist_partition \
     WHERE logicalrelid OPERATOR(pg_catalog.=) $1";

/// Every shard of $1, with its hash range and whether this node holds an
/// active placement of it.
const SHARDS: &str = "SELECT s.shardid, s.shardminvalue::pg_catalog.int4, \
            s.shardmaxvalue::pg_catalog.int4, \
            EXISTS (SELECT FROM pg_catalog.pg_dist_placement p \
                     WHERE p.shardid OPERATOR(pg_catalog.=) s.shardid \
                       AND p.shardstate OPERATOR(pg_catalog.=) 1 \
                       AND p.groupid OPERATOR(pg_catalog.=) \
                           (SELECT groupid FROM pg_catalog.pg_dist_local_group)) \
       FROM pg_catalog.pg_dist_shard s \
      WHERE s.logicalrelid OPERATOR(pg_catalog.=) $1 \
      ORDER BY s.shardminvalue::pg_catalog.int4";

/// The shards of `table` (an extension table, `rel` its open relation,
/// `nsp` its schema) when Citus distributes it by hash; None when it is a
/// plain table. Read with the newest snapshot, whatever the transaction's
/// isolation: a placement that moved after the transaction began is where
/// it is now. Run as the table's owner.
pub fn shards(
    rel: pg_sys::Oid,
    nsp: pg_sys::Oid,
    name: &CStr,
    scope_collation: pg_sys::Oid,
) -> Option<Shards> {
    let _spi = Spi::connect();
    let method = latest(PARTITION, rel, |row| row.text(1));
    let method = method.into_iter().next()?;
    if method.as_deref() != Some("h") {
        error(
            Code::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!(
                "idempotency.{} is a Citus table that is not distributed by hash",
                name.to_string_lossy()
            ),
        )
        .hint("Undo its distribution (undistribute_table) and call idem_distribute('<tenant table>').")
        .raise();
    }
    let mut ranges = latest(SHARDS, rel, |row| {
        let shard = row.int8(1);
        let local = row.bool(4).then(|| {
            let shard_name = std::ffi::CString::new(format!("{}_{shard}", name.to_string_lossy()))
                .expect("no NUL");
            // SAFETY: get_relname_relid reads the syscache; InvalidOid when
            // the shard's table is not here.
            let oid = unsafe { pg_sys::get_relname_relid(shard_name.as_ptr(), nsp) };
            (oid != pg_sys::InvalidOid).then_some(oid)
        });
        Range {
            min: row.int4(2),
            max: row.int4(3),
            shard,
            local: local.flatten(),
        }
    });
    ranges.sort_by_key(|r| r.min);
    Some(Shards {
        ranges,
        collation: scope_collation,
    })
}

/// One row of a metadata query, read by column (1-based).
struct Row {
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
}

impl Row {
    fn datum(&self, i: i32) -> Option<pg_sys::Datum> {
        let mut isnull = false;
        // SAFETY: the tuple and descriptor are SPI's current result, read
        // before it is freed; i is a column of the query.
        let d = unsafe { pg_sys::SPI_getbinval(self.tuple, self.desc, i, &mut isnull) };
        (!isnull).then_some(d)
    }
    fn int8(&self, i: i32) -> i64 {
        self.datum(i).map(|d| d.value() as i64).unwrap_or_default()
    }
    fn int4(&self, i: i32) -> i32 {
        self.datum(i).map(|d| d.value() as i32).unwrap_or_default()
    }
    fn bool(&self, i: i32) -> bool {
        self.datum(i).is_some_and(|d| d.value() != 0)
    }
    fn text(&self, i: i32) -> Option<String> {
        // SAFETY: column i is text; the value is detoasted and copied.
        self.datum(i).map(|d| unsafe {
            pgrx::varlena::text_to_rust_str(pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr()))
                .unwrap_or_default()
                .to_string()
        })
    }
}

/// Runs a metadata query that takes one OID, with the newest snapshot, and
/// maps its rows. SPI is connected by the caller.
fn latest<T>(sql: &str, relid: pg_sys::Oid, mut each: impl FnMut(&Row) -> T) -> Vec<T> {
    let sql = std::ffi::CString::new(sql).expect("no NUL");
    let mut types = [pg_sys::OIDOID];
    let mut values = [pg_sys::Datum::from(relid)];
    let nulls = [b' ' as std::ffi::c_char];
    // SAFETY: the plan takes one oid parameter, passed with its null flag.
    // The newest snapshot is a static one that SPI registers while the
    // query runs (as the foreign-key checks do). The rows are read before
    // SPI_finish (the caller's guard) frees them.
    unsafe {
        let plan = pg_sys::SPI_prepare(sql.as_ptr(), 1, types.as_mut_ptr());
        if plan.is_null() {
            let code = pg_sys::SPI_result;
            pgrx::error!("could not read Citus metadata: SPI code {code}");
        }
        let rc = pg_sys::SPI_execute_snapshot(
            plan,
            values.as_mut_ptr(),
            nulls.as_ptr(),
            pg_sys::GetLatestSnapshot(),
            std::ptr::null_mut(),
            true,
            false,
            0,
        );
        if rc < 0 {
            pgrx::error!("could not read Citus metadata: SPI code {rc}");
        }
        let table = pg_sys::SPI_tuptable;
        let n = pg_sys::SPI_processed as usize;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let row = Row {
                tuple: *(*table).vals.add(i),
                desc: (*table).tupdesc,
            };
            out.push(each(&row));
        }
        out
    }
}

/// Citus's shard metadata lock, taken in share mode to the end of the
/// transaction through Citus's own `lock_shard_metadata` (which knows the
/// lock's tag: for co-located shards, one per shard group), as Citus's
/// executor takes it before it writes to a shard: a shard move or split
/// takes it in exclusive mode, on every node, to stop writes before it
/// switches the placement. Run as the key table's owner, whom Citus
/// requires. Taken once per shard and (sub)transaction: a lock taken in a
/// subtransaction that rolls back is gone, so a subtransaction takes its
/// own.
pub fn lock_shard(shard: i64, owner: pg_sys::Oid) {
    // SAFETY: reads the backend's current subtransaction id.
    let now = (crate::pg::process::local_transaction_id(), unsafe {
        pg_sys::GetCurrentSubTransactionId()
    });
    let held = LOCKED.with(|l| {
        let l = l.borrow();
        l.0 == now && l.1.contains(&shard)
    });
    if held {
        return;
    }
    crate::ledger::statements::lock_shard_metadata(owner, shard);
    // The invalidations sent by whatever held the lock in exclusive mode
    // (a move switching the placement) are processed now, so that the
    // caller's look at its cached map afterwards sees them.
    // SAFETY: processes pending invalidation messages, as taking any lock
    // on a relation does.
    unsafe { pg_sys::AcceptInvalidationMessages() };
    LOCKED.with(|l| {
        let mut l = l.borrow_mut();
        if l.0 != now {
            *l = (now, Vec::new());
        }
        l.1.push(shard);
    });
}

thread_local! {
    /// The shards whose metadata lock this (sub)transaction took.
    static LOCKED: RefCell<((u32, pg_sys::SubTransactionId), Vec<i64>)> =
        const { RefCell::new(((0, 0), Vec::new())) };
}

/// Raises the error for a scope whose shard is on another node. When the
/// call came from another node (Citus delegated it here, or routed it
/// through a connection of its own), the shard moved after the call was
/// routed: the transaction can be retried, and goes to the new node. A
/// call made on this node directly was not delegated at all.
pub fn elsewhere(scope: &str) -> ! {
    if citus_connection() {
        error(
            Code::ERRCODE_T_R_SERIALIZATION_FAILURE,
            format!(
                "the shard of scope \"{scope}\" moved to another node while the call was routed"
            ),
        )
        .hint("Retry the transaction: it is routed to the node that holds the shard now.")
        .raise()
    }
    error(
        Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!(
            "the keys of scope \"{scope}\" are on another node: the call was not delegated to it"
        ),
    )
    .hint(
        "Call it as a statement of its own with the scope as a constant or a parameter, \
         SELECT ... FROM idem_begin(...), so that Citus delegates it (see docs/citus.md).",
    )
    .raise()
}

/// Whether this backend serves a connection that Citus opened from
/// another node (its application_name starts with "citus_internal").
fn citus_connection() -> bool {
    // SAFETY: GetConfigOption returns the setting's current value, a string
    // owned by the GUC machinery, valid until the next change; read at once.
    unsafe {
        let v = pg_sys::GetConfigOption(c"application_name".as_ptr(), true, false);
        !v.is_null() && CStr::from_ptr(v).to_bytes().starts_with(b"citus_internal")
    }
}

/// The SQL name of a table, schema-qualified and quoted as needed.
pub fn qualified_name(relid: pg_sys::Oid) -> String {
    // SAFETY: the relation is locked by the caller; get_rel_name and
    // get_namespace_name return palloc'd copies or NULL for a missing one,
    // and quote_qualified_identifier a palloc'd string.
    unsafe {
        let name = pg_sys::get_rel_name(relid);
        let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
        if name.is_null() || nsp.is_null() {
            pgrx::error!("relation {relid:?} does not exist");
        }
        CStr::from_ptr(pg_sys::quote_qualified_identifier(nsp, name))
            .to_string_lossy()
            .into_owned()
    }
}

/// Whether Citus distributes `relid` (any method: hash, single shard,
/// reference). Call only where Citus is `installed`.
pub fn distributed(relid: pg_sys::Oid) -> bool {
    let _spi = Spi::connect();
    !latest(PARTITION, relid, |_| ()).is_empty()
}
