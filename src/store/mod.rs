//! The key table `idempotency.keys` (created in `sql/schema.sql`).
//!
//! - `probe`: reads a key's newest row version, committed or not, straight
//!   from the primary-key index, to tell "someone else holds it" apart from
//!   "it is free" without waiting.
//! - `lock`: the short per-key lock that makes probe-then-write atomic.
//! - `statements`: the prepared statements that write rows.
//! - `wait`: bounded waits for a key's holder.
pub mod lock;
pub mod probe;
pub mod statements;
pub mod wait;

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
    pub pkey: pg_sys::Oid,
    pub att: Attnums,
}

/// Column positions of `idempotency.keys`, looked up by name.
#[derive(Clone, Copy)]
pub struct Attnums {
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
            if relid == pg_sys::InvalidOid || relid == cat.keys || relid == cat.pkey {
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

unsafe fn lookup() -> Catalog {
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"idempotency".as_ptr(), false);
        let keys = pg_sys::get_relname_relid(c"keys".as_ptr(), nsp);
        let pkey = pg_sys::get_relname_relid(c"keys_pkey".as_ptr(), nsp);
        if keys == pg_sys::InvalidOid || pkey == pg_sys::InvalidOid {
            crate::errors::error(
                pgrx::PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                "the table idempotency.keys or its primary key is missing",
            )
            .hint("Reinstall the extension: DROP EXTENSION idempotency; CREATE EXTENSION idempotency;")
            .raise();
        }
        let att = |name: &std::ffi::CStr| pg_sys::get_attnum(keys, name.as_ptr());
        Catalog {
            keys,
            pkey,
            att: Attnums {
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
