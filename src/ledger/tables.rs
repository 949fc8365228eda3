//! The extension's own tables, `idempotency.keys` and `idempotency.once`
//! (created in `sql/schema.sql`): where they are and what they look like.
//!
//! Their description is read from the relcache with the tables locked, once
//! per backend, checked against the columns the Rust code reads and writes
//! (names and types), and forgotten whenever either table is invalidated
//! (ALTER TABLE, DROP/CREATE EXTENSION, an index built or dropped). Callers
//! open a table through `open`, which locks it first and only then takes
//! the description, so that what they read matches the table they hold.
use crate::pg::errors::{error, Code};
use crate::pg::relation::{self, Rel};
use pgrx::pg_sys;
use std::cell::RefCell;
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
    pub keys: Table,
    pub once: Table,
    /// The role that owns the key table (the extension's owner): the
    /// prepared statements run as it, as SECURITY DEFINER functions would.
    pub owner: pg_sys::Oid,
}

impl Catalog {
    pub fn table(&self, which: Which) -> &Table {
        match which {
            Which::Keys => &self.keys,
            Which::Once => &self.once,
        }
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
            relid == pg_sys::InvalidOid || relid == cat.keys.oid || relid == cat.once.oid
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

/// Locks `which` in `mode` and opens it, with the description of the table
/// now locked: an invalidation processed while taking the lock (the table
/// was altered, or dropped and created again) makes it look again.
pub fn open(which: Which, mode: u32) -> (Rel, Rc<Catalog>) {
    loop {
        let before = catalog();
        let oid = before.table(which).oid;
        relation::lock(oid, mode);
        if let Some(now) = cached() {
            if now.table(which).oid == oid {
                // SAFETY: `oid` is locked, and the description that names
                // it survived the invalidations the lock processed, so the
                // table exists and cannot be dropped while we hold it.
                let rel = unsafe { Rel::open_locked(oid) };
                if rel.natts() != now.table(which).natts {
                    // The description is forgotten on every change of the
                    // descriptor; this would be a bug, so refuse to go on.
                    shape_error(which, "its descriptor changed while it was locked".into());
                }
                return (rel, now);
            }
        }
        // Invalidated while we waited for the lock: describe it again. The
        // lock stays held, as a statement's would.
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
    Catalog {
        keys: table(&keys, Which::Keys),
        once: table(&once, Which::Once),
        owner,
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
