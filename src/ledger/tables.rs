//! The extension's own tables, `idempotency.keys` and `idempotency.once`
//! (created in `sql/schema.sql`): where they are and what they look like.

use pgrx::pg_sys;
use std::cell::Cell;

/// Row status codes as stored in `keys.status`.
pub const IN_PROGRESS: u8 = b'p';
pub const COMPLETED: u8 = b'c';
pub const FAILED: u8 = b'f';
pub const RELEASED: u8 = b'r';

/// Where the key table lives, found once per backend and forgotten whenever
/// the table or its index is invalidated (DROP/CREATE EXTENSION, ALTER).
#[derive(Clone, Copy)]
pub struct Catalog {
    pub keys: pg_sys::Oid,
    /// The role that owns the key table (the extension's owner): the
    /// prepared statements run as it, as SECURITY DEFINER functions would.
    pub owner: pg_sys::Oid,
    pub pkey: pg_sys::Oid,
    pub att: Attnums,
    /// Columns of `idempotency.keys`, dropped ones included.
    pub natts: usize,
    pub once: pg_sys::Oid,
    pub once_pkey: pg_sys::Oid,
    pub once_natts: usize,
    /// Column positions (0-based) of scope, key and recorded_at in
    /// `idempotency.once`.
    pub once_att: [usize; 3],
}

/// Column positions of `idempotency.keys` (1-based), looked up by name.
#[derive(Clone, Copy)]
pub struct Attnums {
    pub created_at: i16,
    pub finished_at: i16,
    pub lease: i16,
    pub scope: i16,
    pub key: i16,
    pub status: i16,
    pub attempt: i16,
    pub token: i16,
    pub fingerprint: i16,
    pub result: i16,
    pub recovery_point: i16,
    pub expires_at: i16,
    pub locked_until: i16,
}

thread_local! {
    static CATALOG: Cell<Option<Catalog>> = const { Cell::new(None) };
}

pub fn init() {
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache_inval), pg_sys::Datum::from(0usize));
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_relcache_inval(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    CATALOG.with(|c| {
        if let Some(cat) = c.get() {
            if relid == pg_sys::InvalidOid
                || [cat.keys, cat.pkey, cat.once, cat.once_pkey].contains(&relid)
            {
                c.set(None);
            }
        }
    });
}

pub fn catalog() -> Catalog {
    if let Some(c) = CATALOG.with(|c| c.get()) {
        return c;
    }
    let c = unsafe { lookup() };
    CATALOG.with(|cell| cell.set(Some(c)));
    c
}

fn missing(what: &str) -> ! {
    crate::pg::errors::error(
        pgrx::PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
        format!("{what} is missing"),
    )
    .hint("Reinstall the extension: DROP EXTENSION idempotency; CREATE EXTENSION idempotency;")
    .raise()
}

/// The table's column count (dropped columns included) and owner. (That
/// the table has no trigger and only its primary key, which `direct` relies
/// on, is checked on every insert, with the table locked.)
unsafe fn shape(table: pg_sys::Oid) -> (usize, pg_sys::Oid) {
    unsafe {
        let rel = pg_sys::table_open(table, pg_sys::AccessShareLock as i32);
        let natts = (*(*rel).rd_att).natts as usize;
        let owner = (*(*rel).rd_rel).relowner;
        pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
        (natts, owner)
    }
}

unsafe fn lookup() -> Catalog {
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"idempotency".as_ptr(), false);
        let rel = |name: &std::ffi::CStr| {
            let oid = pg_sys::get_relname_relid(name.as_ptr(), nsp);
            if oid == pg_sys::InvalidOid {
                missing(&format!("idempotency.{}", name.to_string_lossy()));
            }
            oid
        };
        let keys = rel(c"keys");
        let pkey = rel(c"keys_pkey");
        let once = rel(c"once");
        let once_pkey = rel(c"once_pkey");
        let att = |name: &std::ffi::CStr| pg_sys::get_attnum(keys, name.as_ptr());
        let (natts, owner) = shape(keys);
        Catalog {
            keys,
            owner,
            pkey,
            natts,
            once,
            once_pkey,
            once_natts: shape(once).0,
            once_att: [c"scope", c"key", c"recorded_at"]
                .map(|name| pg_sys::get_attnum(once, name.as_ptr()) as usize - 1),
            att: Attnums {
                created_at: att(c"created_at"),
                finished_at: att(c"finished_at"),
                lease: att(c"lease"),
                scope: att(c"scope"),
                key: att(c"key"),
                status: att(c"status"),
                attempt: att(c"attempt"),
                token: att(c"token"),
                fingerprint: att(c"fingerprint"),
                result: att(c"result"),
                recovery_point: att(c"recovery_point"),
                expires_at: att(c"expires_at"),
                locked_until: att(c"locked_until"),
            },
        }
    }
}
