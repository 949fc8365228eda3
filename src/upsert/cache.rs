//! The caller's tables as this backend knows them: one description per
//! table (`table::Target`), which carries the plans prepared for it, thrown
//! away when the table or its schema changes.
//!
//! Statements are built from identifiers Postgres quotes (`quote_identifier`)
//! and take the row's values as bound parameters of the columns' own types,
//! each made by the type's input function as `jsonb_populate_record` makes
//! it; a row with an array, composite, domain or json column is bound as one
//! jsonb parameter turned into the table's row type by
//! `jsonb_populate_record` itself. No value is ever spliced into SQL.
//!
//! A description is read only with the table locked (the caller locks it
//! before asking), so it matches the table the statements will run on, and
//! no ALTER TABLE can change the table until the transaction ends. Plans and
//! memory of a forgotten description are freed at the start of the next
//! outermost call, since an invalidation can arrive while one of its plans
//! is running.
//!
//! The cache is bounded by `idempotency.upsert_cache_size`: past that many
//! statements (or described tables), the least recently used go first.
use super::table::{self, Target};
use crate::pg::inval;
use pgrx::pg_sys;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Kind {
    /// Update the conflicting row where a value differs.
    Update,
    /// Find the conflicting row holding these values.
    Same,
    /// Insert unless a row conflicts.
    Insert,
}

/// What a forgotten description leaves to free.
enum Stale {
    Plan(pg_sys::SPIPlanPtr),
    Context(pg_sys::MemoryContext),
}

thread_local! {
    static TARGETS: RefCell<HashMap<pg_sys::Oid, Rc<Target>>> = RefCell::new(HashMap::new());
    static STALE: RefCell<Vec<Stale>> = const { RefCell::new(Vec::new()) };
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// Counts invalidations, so that a description read while one arrived
    /// is used once and not kept.
    static INVALIDATIONS: Cell<u64> = const { Cell::new(0) };
    /// A clock for least-recently-used order: one tick per use.
    static TICK: Cell<u64> = const { Cell::new(0) };
    /// Statements kept by all descriptions.
    static PLANS: Cell<usize> = const { Cell::new(0) };
}

/// The next tick of the use clock.
pub fn tick() -> u64 {
    let t = TICK.get() + 1;
    TICK.set(t);
    t
}

fn limit() -> usize {
    crate::pg::settings::upsert_cache_size().max(1) as usize
}

/// A description kept one more statement: forget the least recently used
/// ones beyond the limit.
pub fn added_plan() {
    PLANS.set(PLANS.get() + 1);
    while PLANS.get() > limit() {
        let oldest = TARGETS.with(|t| {
            t.borrow()
                .values()
                .filter_map(|v| v.oldest_plan().map(|used| (used, v.clone())))
                .min_by_key(|(used, _)| *used)
                .map(|(_, v)| v)
        });
        // A description being read (not yet in the map) may hold the rest.
        match oldest {
            Some(target) if target.forget_oldest_plan() => {}
            _ => break,
        }
    }
}

/// A description let go of a statement (at backend exit, maybe after the
/// counter itself).
pub fn dropped_plan() {
    let _ = PLANS.try_with(|p| p.set(p.get().saturating_sub(1)));
}

/// Forgets the least recently used descriptions beyond the limit.
fn trim_targets() {
    let gone: Vec<Rc<Target>> = TARGETS.with(|t| {
        let mut t = t.borrow_mut();
        let mut gone = Vec::new();
        while t.len() > limit() {
            let Some(oldest) = t.iter().min_by_key(|(_, v)| v.used.get()).map(|(k, _)| *k) else {
                break;
            };
            gone.extend(t.remove(&oldest));
        }
        gone
    });
    drop(gone);
}

pub fn init() {
    inval::on_relation(forget_table);
    inval::on_namespace_change(forget_namespace);
}

/// Forgets one table's description (or all, for InvalidOid). The targets
/// leave the map before they are dropped, so that their Drop (which records
/// what to free) never runs inside the map's borrow.
fn forget_table(relid: pg_sys::Oid) {
    INVALIDATIONS.set(INVALIDATIONS.get() + 1);
    let gone: Vec<Rc<Target>> = TARGETS
        .try_with(|t| {
            let mut t = t.borrow_mut();
            if relid == pg_sys::InvalidOid {
                t.drain().map(|(_, v)| v).collect()
            } else {
                t.remove(&relid).into_iter().collect()
            }
        })
        .unwrap_or_default();
    drop(gone);
}

/// A renamed schema changes the qualified names in the statements without
/// touching the tables' relcache entries: forget the targets in it (hash 0:
/// in every schema).
fn forget_namespace(hash: u32) {
    INVALIDATIONS.set(INVALIDATIONS.get() + 1);
    let gone: Vec<Rc<Target>> = TARGETS
        .try_with(|t| {
            let mut t = t.borrow_mut();
            let hit: Vec<pg_sys::Oid> = t
                .iter()
                .filter(|(_, v)| hash == 0 || v.namespace_hash == hash)
                .map(|(k, _)| *k)
                .collect();
            hit.iter().filter_map(|k| t.remove(k)).collect()
        })
        .unwrap_or_default();
    drop(gone);
}

// When the backend exits, Rust destroys its thread-locals in no set order:
// a description dropped with TARGETS may find STALE gone. The process is
// ending and takes the memory with it, so that is not an error.
pub fn retire_plan(plan: pg_sys::SPIPlanPtr) {
    let _ = STALE.try_with(|s| s.borrow_mut().push(Stale::Plan(plan)));
}

pub fn retire_context(context: pg_sys::MemoryContext) {
    let _ = STALE.try_with(|s| s.borrow_mut().push(Stale::Context(context)));
}

/// Marks a call in progress; frees what forgotten descriptions left when no
/// call is running.
pub struct Entered;

pub fn enter() -> Entered {
    if DEPTH.get() == 0 {
        let stale = STALE.with(|s| std::mem::take(&mut *s.borrow_mut()));
        for s in stale {
            // SAFETY: no call is running (depth 0), so no plan of a
            // forgotten target is executing and no input function of one
            // is using its context; each was retired exactly once.
            unsafe {
                match s {
                    Stale::Plan(p) => {
                        pg_sys::SPI_freeplan(p);
                    }
                    Stale::Context(c) => pg_sys::MemoryContextDelete(c),
                }
            }
        }
    }
    DEPTH.set(DEPTH.get() + 1);
    Entered
}

impl Drop for Entered {
    fn drop(&mut self) {
        // Runs on success and while an error unwinds; depth only counts.
        DEPTH.set(DEPTH.get() - 1);
    }
}

/// The description of `relid`, which the caller has locked.
pub fn target(relid: pg_sys::Oid) -> Rc<Target> {
    if let Some(t) = TARGETS.with(|c| c.borrow().get(&relid).cloned()) {
        t.used.set(tick());
        return t;
    }
    let before = INVALIDATIONS.get();
    let t = Rc::new(table::load(relid));
    if INVALIDATIONS.get() == before {
        TARGETS.with(|c| c.borrow_mut().insert(relid, t.clone()));
        trim_targets();
    }
    t
}
