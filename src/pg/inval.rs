//! Cache invalidation: one relcache callback and one pg_namespace and one
//! pg_authid syscache callback for the whole extension (a backend has room
//! for only ten relcache callbacks), passing each message on to the caches
//! that registered here in `_PG_init`.
use pgrx::pg_sys;
use std::cell::RefCell;

type OnRelation = fn(pg_sys::Oid);
type OnNamespace = fn(u32);
type OnRole = fn();

thread_local! {
    static RELATION: RefCell<Vec<OnRelation>> = const { RefCell::new(Vec::new()) };
    static NAMESPACE: RefCell<Vec<OnNamespace>> = const { RefCell::new(Vec::new()) };
    static ROLE: RefCell<Vec<OnRole>> = const { RefCell::new(Vec::new()) };
}

/// Registers the callbacks with PostgreSQL. Called once, from `_PG_init`.
pub fn init() {
    // SAFETY: both callbacks are plain functions that live as long as the
    // library, and are registered once per backend.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache), pg_sys::Datum::from(0usize));
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
            Some(on_namespace),
            pg_sys::Datum::from(0usize),
        );
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::AUTHOID as i32,
            Some(on_authid),
            pg_sys::Datum::from(0usize),
        );
    }
}

/// `f()` for every change to a role (a rename, a drop).
pub fn on_role_change(f: OnRole) {
    ROLE.with(|r| r.borrow_mut().push(f));
}

/// `f(relid)` for every relcache invalidation; `relid` is InvalidOid when
/// every relation is to be forgotten.
pub fn on_relation(f: OnRelation) {
    RELATION.with(|r| r.borrow_mut().push(f));
}

/// `f(hash)` for every change to a schema; `hash` is the syscache hash of
/// the schema's OID (see `namespace_hash`), or 0 for all schemas.
pub fn on_namespace_change(f: OnNamespace) {
    NAMESPACE.with(|r| r.borrow_mut().push(f));
}

/// The hash value a pg_namespace invalidation carries for `nspoid`.
pub fn namespace_hash(nspoid: pg_sys::Oid) -> u32 {
    // SAFETY: GetSysCacheHashValue only hashes the key; NAMESPACEOID takes
    // one OID key.
    unsafe {
        pg_sys::GetSysCacheHashValue(
            pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
            pg_sys::Datum::from(nspoid),
            pg_sys::Datum::from(0usize),
            pg_sys::Datum::from(0usize),
            pg_sys::Datum::from(0usize),
        )
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_relcache(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    // try_with: at backend exit, thread-locals may already be gone while
    // PostgreSQL still processes invalidations; there is nothing to forget.
    let callbacks = RELATION
        .try_with(|r| r.borrow().clone())
        .unwrap_or_default();
    for f in callbacks {
        f(relid);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_namespace(_arg: pg_sys::Datum, _cacheid: i32, hash: u32) {
    let callbacks = NAMESPACE
        .try_with(|r| r.borrow().clone())
        .unwrap_or_default();
    for f in callbacks {
        f(hash);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_authid(_arg: pg_sys::Datum, _cacheid: i32, _hash: u32) {
    let callbacks = ROLE.try_with(|r| r.borrow().clone()).unwrap_or_default();
    for f in callbacks {
        f();
    }
}
