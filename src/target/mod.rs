//! The caller's table, for `idem_upsert` and `idem_insert_once`: what it
//! looks like (columns, unique keys), the statements built for it, and their
//! prepared plans, kept per backend and per (table, columns, conflict
//! columns) and thrown away when the table changes.
//!
//! Statements are built from identifiers Postgres quotes (`quote_identifier`)
//! and take the row as one bound jsonb parameter, turned into the table's
//! row type by `jsonb_populate_record`, so every value goes through its
//! column type's own input function and no value is ever spliced into SQL.
pub mod catalog;
pub mod statements;

use pgrx::pg_sys;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

pub use catalog::Target;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Kind {
    Upsert,
    InsertOnce,
}

type PlanKey = (pg_sys::Oid, Vec<String>, Vec<String>, Kind);

#[derive(Default)]
struct Cache {
    targets: HashMap<pg_sys::Oid, Rc<Target>>,
    plans: HashMap<PlanKey, pg_sys::SPIPlanPtr>,
    /// Plans of changed tables, freed at the next outermost call: an
    /// invalidation can arrive while one of them is running.
    stale: Vec<pg_sys::SPIPlanPtr>,
    depth: u32,
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

pub fn init() {
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache_inval), pg_sys::Datum::from(0usize));
        // A renamed schema changes the qualified names in the statements
        // without touching the tables' relcache entries.
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
            Some(on_namespace_inval),
            pg_sys::Datum::from(0usize),
        );
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_namespace_inval(_arg: pg_sys::Datum, _cacheid: i32, _hash: u32) {
    unsafe { on_relcache_inval(pg_sys::Datum::from(0usize), pg_sys::InvalidOid) };
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_relcache_inval(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let all = relid == pg_sys::InvalidOid;
        if all {
            c.targets.clear();
        } else {
            c.targets.remove(&relid);
        }
        let gone: Vec<PlanKey> = c
            .plans
            .keys()
            .filter(|k| all || k.0 == relid)
            .cloned()
            .collect();
        for k in gone {
            if let Some(plan) = c.plans.remove(&k) {
                c.stale.push(plan);
            }
        }
    });
}

/// Marks a call in progress; frees stale plans when no call is running.
pub struct Entered;

pub fn enter() -> Entered {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.depth == 0 {
            for plan in std::mem::take(&mut c.stale) {
                unsafe { pg_sys::SPI_freeplan(plan) };
            }
        }
        c.depth += 1;
    });
    Entered
}

impl Drop for Entered {
    fn drop(&mut self) {
        // Runs on success and while an error unwinds; depth only counts.
        CACHE.with(|c| c.borrow_mut().depth -= 1);
    }
}

pub fn target(relid: pg_sys::Oid) -> Rc<Target> {
    if let Some(t) = CACHE.with(|c| c.borrow().targets.get(&relid).cloned()) {
        return t;
    }
    let t = Rc::new(catalog::load(relid));
    CACHE.with(|c| c.borrow_mut().targets.insert(relid, t.clone()));
    t
}

/// The prepared plan for these columns, built on first use.
pub fn plan(
    target: &Target,
    columns: &[String],
    conflict: &[String],
    kind: Kind,
) -> pg_sys::SPIPlanPtr {
    let key = (target.relid, columns.to_vec(), conflict.to_vec(), kind);
    if let Some(p) = CACHE.with(|c| c.borrow().plans.get(&key).copied()) {
        return p;
    }
    let sql = statements::build(target, columns, conflict, kind);
    let plan = crate::store::statements::prepare_kept(&sql, &[pg_sys::JSONBOID]);
    CACHE.with(|c| c.borrow_mut().plans.insert(key, plan));
    plan
}
