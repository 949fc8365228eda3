//! The extension's own tables, `idempotency.keys` and `idempotency.once`
//! (created in `sql/schema.sql`): where they are and what they look like.
//!
//! Their description is read from the relcache with the tables locked, once
//! per backend, checked against the columns the Rust code reads and writes
//! (names and types), and forgotten whenever either table is invalidated
//! (ALTER TABLE, DROP/CREATE EXTENSION, an index built or dropped). Callers
//! open a table through `open`, which locks it first and only then takes
//! the description, so that what they read matches the table they hold.
use crate::citus::{self, Shards};
use crate::pg::errors::{error, Code};
use crate::pg::relation::{self, Rel};
use pgrx::pg_sys;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::rc::Rc;

/// Row status codes as stored in `keys.status`.
pub const IN_PROGRESS: u8 = b'p';
pub const COMPLETED: u8 = b'c';
pub const FAILED: u8 = b'f';
pub const RELEASED: u8 = b'r';

/// A column the extension reads or writes.
pub struct Column {
    pub name: &'static CStr,
    pub type_oid: pg_sys::Oid,
    pub not_null: bool,
}

const fn col(name: &'static CStr, type_oid: pg_sys::Oid, not_null: bool) -> Column {
    Column {
        name,
        type_oid,
        not_null,
    }
}

/// The columns of `idempotency.keys`, in the order of `schema.sql`; `K_*`
/// index this list.
pub const KEYS_COLUMNS: [Column; 17] = [
    col(c"created_at", pg_sys::TIMESTAMPTZOID, true),
    col(c"finished_at", pg_sys::TIMESTAMPTZOID, false),
    col(c"expires_at", pg_sys::TIMESTAMPTZOID, false),
    col(c"locked_until", pg_sys::TIMESTAMPTZOID, false),
    col(c"lease", pg_sys::INTERVALOID, false),
    col(c"token", pg_sys::INT8OID, false),
    col(c"attempt", pg_sys::INT4OID, true),
    col(c"status", pg_sys::CHAROID, true),
    col(c"scope", pg_sys::TEXTOID, true),
    col(c"key", pg_sys::TEXTOID, true),
    col(c"fingerprint", pg_sys::BYTEAOID, false),
    col(c"recovery_point", pg_sys::TEXTOID, false),
    col(c"result", pg_sys::JSONBOID, false),
    col(c"owner", pg_sys::TEXTOID, false),
    col(c"response_status", pg_sys::INT4OID, false),
    col(c"response_headers", pg_sys::JSONBOID, false),
    col(c"response_body", pg_sys::BYTEAOID, false),
];
pub const K_CREATED_AT: usize = 0;
pub const K_FINISHED_AT: usize = 1;
pub const K_EXPIRES_AT: usize = 2;
pub const K_LOCKED_UNTIL: usize = 3;
pub const K_LEASE: usize = 4;
pub const K_TOKEN: usize = 5;
pub const K_ATTEMPT: usize = 6;
pub const K_STATUS: usize = 7;
pub const K_SCOPE: usize = 8;
pub const K_KEY: usize = 9;
pub const K_FINGERPRINT: usize = 10;
pub const K_RECOVERY_POINT: usize = 11;
pub const K_RESULT: usize = 12;
pub const K_OWNER: usize = 13;
pub const K_RESPONSE_STATUS: usize = 14;
pub const K_RESPONSE_HEADERS: usize = 15;
pub const K_RESPONSE_BODY: usize = 16;

/// The columns of `idempotency.once`; `O_*` index this list.
pub const ONCE_COLUMNS: [Column; 3] = [
    col(c"recorded_at", pg_sys::TIMESTAMPTZOID, true),
    col(c"scope", pg_sys::TEXTOID, true),
    col(c"key", pg_sys::TEXTOID, true),
];
pub const O_RECORDED_AT: usize = 0;
pub const O_SCOPE: usize = 1;
pub const O_KEY: usize = 2;

/// Which of the two tables.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Which {
    Keys,
    Once,
}

impl Which {
    pub fn name(self) -> &'static CStr {
        match self {
            Which::Keys => c"keys",
            Which::Once => c"once",
        }
    }

    pub fn columns(self) -> &'static [Column] {
        match self {
            Which::Keys => &KEYS_COLUMNS,
            Which::Once => &ONCE_COLUMNS,
        }
    }

    /// The position of `scope` among `columns()`.
    pub fn scope_column(self) -> usize {
        match self {
            Which::Keys => K_SCOPE,
            Which::Once => O_SCOPE,
        }
    }

    /// The position of `key` among `columns()`.
    pub fn key_column(self) -> usize {
        match self {
            Which::Keys => K_KEY,
            Which::Once => O_KEY,
        }
    }

    /// CHECK constraints the table is created with.
    fn checks(self) -> usize {
        match self {
            Which::Keys => 1,
            Which::Once => 0,
        }
    }
}

/// One table as it was when described.
pub struct Table {
    pub oid: pg_sys::Oid,
    /// Columns in the descriptor, dropped ones included.
    pub natts: usize,
    /// Attribute numbers (1-based) of `Which::columns()`, in that order.
    pub att: Vec<i16>,
    /// No column besides the extension's own, and no NOT NULL or CHECK
    /// constraint besides those it creates: a row formed from the known
    /// columns is what an INSERT would store. (Triggers and indexes can
    /// come and go without an invalidation of this description, so
    /// `insert` checks them on every call.)
    pub plain: bool,
}

impl Table {
    /// The 0-based position in the descriptor of known column `i`.
    pub fn pos(&self, i: usize) -> usize {
        (self.att[i] - 1) as usize
    }
}

pub struct Catalog {
    pub keys: Rc<Table>,
    pub once: Rc<Table>,
    /// The role that owns the key table (the extension's owner): the
    /// prepared statements run as it, as SECURITY DEFINER functions would.
    pub owner: pg_sys::Oid,
    /// On Citus, once `idem_distribute()` ran, the shards of each table:
    /// the rows are there, and the tables themselves are empty shells.
    keys_shards: Option<Shards>,
    once_shards: Option<Shards>,
    /// Descriptions of this node's shards, made when first opened.
    shard_tables: RefCell<HashMap<pg_sys::Oid, Rc<Table>>>,
}

impl Catalog {
    pub fn table(&self, which: Which) -> &Table {
        self.main(which)
    }

    fn main(&self, which: Which) -> &Rc<Table> {
        match which {
            Which::Keys => &self.keys,
            Which::Once => &self.once,
        }
    }

    fn shards(&self, which: Which) -> Option<&Shards> {
        match which {
            Which::Keys => self.keys_shards.as_ref(),
            Which::Once => self.once_shards.as_ref(),
        }
    }

    /// Whether the tables are distributed by Citus.
    pub fn distributed(&self) -> bool {
        self.keys_shards.is_some()
    }

    /// The description of `rel`, a table of `which` that `locate` locked:
    /// the table itself or one of its shards on this node.
    fn described(&self, which: Which, rel: &Rel) -> Rc<Table> {
        let main = self.main(which);
        if rel.oid() == main.oid {
            return main.clone();
        }
        self.shard_tables
            .borrow_mut()
            .entry(rel.oid())
            .or_insert_with(|| Rc::new(table(rel, which)))
            .clone()
    }
}

thread_local! {
    static CATALOG: RefCell<Option<Rc<Catalog>>> = const { RefCell::new(None) };
}

pub fn init() {
    crate::pg::inval::on_relation(forget);
}

/// Forgets the description when either table (or every relation) is
/// invalidated.
fn forget(relid: pg_sys::Oid) {
    let _ = CATALOG.try_with(|c| {
        let mut c = c.borrow_mut();
        let hit = c.as_ref().is_some_and(|cat| {
            relid == pg_sys::InvalidOid
                || relid == cat.keys.oid
                || relid == cat.once.oid
                || cat.keys_shards.as_ref().is_some_and(|s| s.holds(relid))
                || cat.once_shards.as_ref().is_some_and(|s| s.holds(relid))
        });
        if hit {
            *c = None;
        }
    });
}

fn cached() -> Option<Rc<Catalog>> {
    CATALOG.with(|c| c.borrow().clone())
}

/// The description, read afresh if it was forgotten. Prefer `open`, which
/// ties the description to a lock on the table.
pub fn catalog() -> Rc<Catalog> {
    if let Some(c) = cached() {
        return c;
    }
    let c = Rc::new(describe());
    CATALOG.with(|cell| *cell.borrow_mut() = Some(c.clone()));
    c
}

/// Where `scope`'s rows of `which` are in `cat`: the Citus shard (None
/// for a plain table) and the table on this node (None: another node holds
/// the shard).
fn place(cat: &Catalog, which: Which, scope: &str) -> (Option<i64>, Option<pg_sys::Oid>) {
    match cat.shards(which) {
        None => (None, Some(cat.table(which).oid)),
        Some(shards) => {
            let shard = shards.of(scope, which.name());
            (Some(shard.id), shard.local)
        }
    }
}

/// Locks, in `mode`, the table that holds `scope`'s rows of `which`: the
/// table itself, or on Citus the scope's shard on this node (with Citus's
/// shard metadata lock first, so that the shard cannot move away before
/// the transaction ends). Returns it with the description of the tables
/// as they are now locked: an invalidation processed while taking a lock
/// (the table was altered, dropped and created again, or the shard moved)
/// makes it look again.
pub fn locate(which: Which, scope: &str, mode: u32) -> (pg_sys::Oid, Rc<Catalog>) {
    loop {
        let before = catalog();
        let at = place(&before, which, scope);
        if let Some(shard) = at.0 {
            citus::lock_shard(shard, before.owner);
            if cached().is_none_or(|now| place(&now, which, scope) != at) {
                continue;
            }
        }
        let Some(oid) = at.1 else {
            citus::elsewhere(scope);
        };
        relation::lock(oid, mode);
        if let Some(now) = cached() {
            if place(&now, which, scope) == at {
                return (oid, now);
            }
        }
        // Invalidated while we waited for the lock: describe it again. The
        // lock stays held, as a statement's would.
    }
}

/// Locks and opens the table that holds `scope`'s rows of `which` (see
/// `locate`), with the description of what was opened.
pub fn open(which: Which, scope: &str, mode: u32) -> (Rel, Rc<Table>) {
    let (oid, cat) = locate(which, scope, mode);
    // SAFETY: `oid` is locked, and the description that names it survived
    // the invalidations the lock processed, so the table exists and cannot
    // be dropped while we hold it.
    let rel = unsafe { Rel::open_locked(oid) };
    let table = cat.described(which, &rel);
    if rel.natts() != table.natts {
        // The description is forgotten on every change of the descriptor;
        // this would be a bug, so refuse to go on.
        shape_error(which, "its descriptor changed while it was locked".into());
    }
    (rel, table)
}

/// Locks (in `mode`) and opens every table of `which` that holds rows on
/// this node: the table itself, or on Citus this node's shards of it.
pub fn open_all(which: Which, mode: u32) -> Vec<(Rel, Rc<Table>)> {
    loop {
        let before = catalog();
        let oids: Vec<pg_sys::Oid> = match before.shards(which) {
            None => vec![before.table(which).oid],
            Some(shards) => shards.local().collect(),
        };
        for oid in &oids {
            relation::lock(*oid, mode);
        }
        if cached().is_some_and(|now| Rc::ptr_eq(&now, &before)) {
            return oids
                .into_iter()
                .map(|oid| {
                    // SAFETY: locked, and still named by the description
                    // after the invalidations the locks processed.
                    let rel = unsafe { Rel::open_locked(oid) };
                    let table = before.described(which, &rel);
                    (rel, table)
                })
                .collect();
        }
    }
}

fn missing(what: &str) -> ! {
    error(Code::ERRCODE_UNDEFINED_TABLE, format!("{what} is missing"))
        .hint("Reinstall the extension: DROP EXTENSION idempotency; CREATE EXTENSION idempotency;")
        .raise()
}

fn shape_error(which: Which, why: String) -> ! {
    error(
        Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!(
            "idempotency.{} is not as the extension created it: {why}",
            which.name().to_string_lossy()
        ),
    )
    .hint("Undo the change to the table, or reinstall the extension.")
    .raise()
}

fn relid(nsp: pg_sys::Oid, which: Which) -> pg_sys::Oid {
    // SAFETY: get_relname_relid reads the syscache; it returns InvalidOid
    // when there is no such relation.
    let oid = unsafe { pg_sys::get_relname_relid(which.name().as_ptr(), nsp) };
    if oid == pg_sys::InvalidOid {
        missing(&format!("idempotency.{}", which.name().to_string_lossy()));
    }
    oid
}

/// Finds both tables, locks them (AccessShareLock, as any reader would),
/// and describes them from their locked relcache entries.
fn describe() -> Catalog {
    // SAFETY: reads a backend global.
    if unsafe { pg_sys::GetDatabaseEncoding() } != pg_sys::pg_enc::PG_UTF8 as i32 {
        error(
            Code::ERRCODE_FEATURE_NOT_SUPPORTED,
            "idempotency requires a database with UTF8 encoding",
        )
        .hint("Create the database with ENCODING 'UTF8'.")
        .raise();
    }
    // SAFETY: get_namespace_oid reads the syscache; with missing_ok it
    // returns InvalidOid for a missing schema.
    let nsp = unsafe { pg_sys::get_namespace_oid(c"idempotency".as_ptr(), true) };
    if nsp == pg_sys::InvalidOid {
        missing("the schema idempotency");
    }
    // Look, lock, and look again until the names lead to the OIDs locked
    // (a concurrent DROP/CREATE EXTENSION can change them in between).
    let (keys_oid, once_oid) = loop {
        let (k, o) = (relid(nsp, Which::Keys), relid(nsp, Which::Once));
        relation::lock(k, pg_sys::AccessShareLock);
        relation::lock(o, pg_sys::AccessShareLock);
        if relid(nsp, Which::Keys) == k && relid(nsp, Which::Once) == o {
            break (k, o);
        }
    };
    // SAFETY: both OIDs are locked and were found by name after locking.
    let (keys, once) = unsafe { (Rel::open_locked(keys_oid), Rel::open_locked(once_oid)) };
    // SAFETY: rd_rel of an open relation is its pg_class row.
    let owner = unsafe { (*(*keys.as_ptr()).rd_rel).relowner };
    let keys_table = table(&keys, Which::Keys);
    let once_table = table(&once, Which::Once);
    // On Citus, the shards: read as the owner, who may read the metadata.
    let (keys_shards, once_shards) = if citus::installed() {
        let collation = |rel: &Rel, t: &Table, which: Which| {
            rel.attributes()[t.pos(which.scope_column())].attcollation
        };
        relation::as_role(owner, || {
            (
                citus::shards(
                    keys_oid,
                    nsp,
                    Which::Keys.name(),
                    collation(&keys, &keys_table, Which::Keys),
                ),
                citus::shards(
                    once_oid,
                    nsp,
                    Which::Once.name(),
                    collation(&once, &once_table, Which::Once),
                ),
            )
        })
    } else {
        (None, None)
    };
    Catalog {
        keys: Rc::new(keys_table),
        once: Rc::new(once_table),
        owner,
        keys_shards,
        once_shards,
        shard_tables: RefCell::new(HashMap::new()),
    }
}

/// Checks one locked table's descriptor against the columns the extension
/// uses, and finds their positions.
fn table(rel: &Rel, which: Which) -> Table {
    let natts = rel.natts();
    let attrs = rel.attributes();
    let mut att = Vec::with_capacity(which.columns().len());
    let mut plain = rel.check_constraints() == which.checks();
    for column in which.columns() {
        let Some(a) = attrs
            .iter()
            .find(|a| !a.attisdropped && relation::attname(a) == column.name)
        else {
            shape_error(
                which,
                format!("column \"{}\" is missing", column.name.to_string_lossy()),
            );
        };
        if a.atttypid != column.type_oid {
            shape_error(
                which,
                format!(
                    "column \"{}\" has another type",
                    column.name.to_string_lossy()
                ),
            );
        }
        if a.attnotnull != column.not_null {
            plain = false;
        }
        att.push(a.attnum);
    }
    let live = attrs.iter().filter(|a| !a.attisdropped).count();
    if live != which.columns().len() {
        plain = false;
    }
    Table {
        oid: rel.oid(),
        natts,
        att,
        plain,
    }
}
