//! The caller's table, for `idem_upsert` and `idem_insert_once`: what it
//! looks like (columns, unique keys), the statements built for it, and their
//! prepared plans, kept per backend and per (table, columns, conflict
//! columns) and thrown away when the table changes.
//!
//! Statements are built from identifiers Postgres quotes (`quote_identifier`)
//! and take the row's values as bound parameters of the columns' own types,
//! each made by the type's input function as `jsonb_populate_record` makes
//! it; a row with an array, composite, domain or json column is bound as one
//! jsonb parameter turned into the table's row type by
//! `jsonb_populate_record` itself. No value is ever spliced into SQL.
use pgrx::pg_sys;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

pub use super::table::Target;
use super::{statements, table};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Kind {
    /// Update the conflicting row where a value differs.
    Update,
    /// Find the conflicting row holding these values.
    Same,
    /// Insert unless a row conflicts.
    Insert,
}

type PlanKey = (pg_sys::Oid, Vec<String>, Vec<String>, Kind);

#[derive(Default)]
struct Cache {
    targets: HashMap<pg_sys::Oid, Rc<Target>>,
    plans: HashMap<PlanKey, Option<pg_sys::SPIPlanPtr>>,
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
            if let Some(Some(plan)) = c.plans.remove(&k) {
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
    let t = Rc::new(table::load(relid));
    CACHE.with(|c| c.borrow_mut().targets.insert(relid, t.clone()));
    t
}

/// The prepared plan for these columns, built on first use; None when the
/// statement has nothing to do (see `statements::build`).
pub fn plan(
    target: &Target,
    columns: &[String],
    conflict: &[String],
    kind: Kind,
) -> Option<pg_sys::SPIPlanPtr> {
    let key = (target.relid, columns.to_vec(), conflict.to_vec(), kind);
    if let Some(p) = CACHE.with(|c| c.borrow().plans.get(&key).copied()) {
        return p;
    }
    let plan = statements::build(target, columns, conflict, kind).map(|sql| {
        crate::ledger::statements::prepare_kept(&sql, &statements::parameter_types(target, columns))
    });
    CACHE.with(|c| c.borrow_mut().plans.insert(key, plan));
    plan
}
