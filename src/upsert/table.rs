//! What a target table looks like, read from the catalogs once per backend
//! (and again after the table changes), with the plans built from that
//! description: they live and die together, so a plan never outlives the
//! shape of the table it was prepared for.
use super::cache::{self, Kind};
use crate::pg::errors::{error, Code};
use crate::pg::relation::{self, Rel};
use pgrx::pg_sys;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::CStr;
use std::rc::Rc;

pub struct Column {
    pub name: String,
    pub type_oid: pg_sys::Oid,
    /// `GENERATED ALWAYS AS IDENTITY`: a given value needs OVERRIDING SYSTEM VALUE.
    pub identity_always: bool,
    /// The type's default equality operator, or InvalidOid (values then
    /// compare as text).
    pub equality: pg_sys::Oid,
    pub typmod: i32,
    /// How a JSON value becomes this column's value without
    /// `jsonb_populate_record`; None for arrays, composites, domains and
    /// json, which only `jsonb_populate_record` converts.
    pub conversion: Option<Conversion>,
}

/// A JSON value to a column value, as `jsonb_populate_record` does it for
/// scalar types: JSON null is NULL; a jsonb column takes the value itself;
/// any other type gets the string (unquoted), the number or boolean as
/// text, or the nested object's text, through its input function with the
/// column's type modifier.
pub enum Conversion {
    Jsonb,
    Input {
        function: Box<pg_sys::FmgrInfo>,
        ioparam: pg_sys::Oid,
    },
}

fn conversion(typid: pg_sys::Oid, context: pg_sys::MemoryContext) -> Option<Conversion> {
    // SAFETY: the type cache and lsyscache lookups raise an ERROR for an
    // unknown type; fmgr_info_cxt fills the boxed FmgrInfo, which lives in
    // the Target with `context`, where the function may cache what it needs
    // (fn_extra): both go when the Target goes.
    unsafe {
        if typid == pg_sys::JSONBOID {
            return Some(Conversion::Jsonb);
        }
        let typtype = pg_sys::get_typtype(typid) as u8;
        let scalar = (typtype == pg_sys::TYPTYPE_BASE
            || typtype == pg_sys::TYPTYPE_ENUM
            || typtype == pg_sys::TYPTYPE_RANGE
            || typtype == pg_sys::TYPTYPE_MULTIRANGE)
            && pg_sys::get_element_type(typid) == pg_sys::InvalidOid
            && typid != pg_sys::JSONOID;
        if !scalar {
            return None;
        }
        let (mut func, mut ioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
        pg_sys::getTypeInputInfo(typid, &mut func, &mut ioparam);
        let mut function = Box::new(pg_sys::FmgrInfo::default());
        pg_sys::fmgr_info_cxt(func, &mut *function, context);
        Some(Conversion::Input { function, ioparam })
    }
}

pub struct UniqueKey {
    pub primary: bool,
    /// The key columns, in the index's order.
    pub columns: Vec<String>,
    pub index: pg_sys::Oid,
}

/// A prepared statement for one (columns, conflict columns, kind). The
/// parameter types it was prepared with are the plan's own
/// (`SPI_getargtypeid`), which the caller checks before running it.
pub struct Plan {
    pub ptr: pg_sys::SPIPlanPtr,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // Freed at the start of the next outermost call: this one may be
        // running it.
        cache::retire_plan(self.ptr);
    }
}

type PlanKey = (Vec<String>, Vec<String>, Kind);

/// A plan as the cache keeps it (None: nothing to do), with when it was
/// last used.
struct Kept {
    plan: Option<Rc<Plan>>,
    used: Cell<u64>,
}

impl Drop for Kept {
    fn drop(&mut self) {
        cache::dropped_plan();
    }
}

pub struct Target {
    pub relid: pg_sys::Oid,
    /// The schema-qualified, quoted name.
    pub name: String,
    /// The syscache hash of the table's schema, to forget the target when
    /// that schema is renamed.
    pub namespace_hash: u32,
    pub columns: Vec<Column>,
    pub unique_keys: Vec<UniqueKey>,
    /// Citus distributes the table: its statements go through Citus's
    /// planner, which cannot ship idem_upsert's comparison of whole rows.
    pub distributed: bool,
    /// Where the input functions keep what they cache.
    _context: Context,
    /// The statements prepared for this table, by columns and kind.
    plans: RefCell<HashMap<PlanKey, Kept>>,
    /// When this description was last used (see `cache::tick`).
    pub used: Cell<u64>,
}

/// A memory context of a Target's own, deleted (at the start of the next
/// outermost call) when the Target goes, or when describing it fails.
/// It is named "idempotency upsert target" with the table's name as its
/// identifier, so `pg_backend_memory_contexts` shows which tables a backend
/// has described.
struct Context(pg_sys::MemoryContext);

impl Context {
    fn new(table: &str) -> Context {
        let ident = std::ffi::CString::new(table).expect("quoted names hold no NUL");
        // SAFETY: creates an empty memory context under CacheMemoryContext,
        // which lives as long as the backend; the identifier is copied into
        // the context itself, so it lives exactly as long.
        Context(unsafe {
            let context = pg_sys::AllocSetContextCreateInternal(
                pg_sys::CacheMemoryContext,
                c"idempotency upsert target".as_ptr(),
                pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
                pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
                pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
            );
            pg_sys::MemoryContextSetIdentifier(
                context,
                pg_sys::MemoryContextStrdup(context, ident.as_ptr()),
            );
            context
        })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        cache::retire_context(self.0);
    }
}

impl Target {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Whether every one of `columns` converts without
    /// `jsonb_populate_record`, so statements can take typed parameters.
    pub fn typed(&self, columns: &[String]) -> bool {
        columns
            .iter()
            .all(|c| self.column(c).is_some_and(|c| c.conversion.is_some()))
    }

    pub fn primary_key(&self) -> Option<&UniqueKey> {
        self.unique_keys.iter().find(|k| k.primary)
    }

    /// The prepared plan for these columns, built on first use; None when
    /// the statement has nothing to do (see `statements::build`).
    pub fn plan(&self, columns: &[String], conflict: &[String], kind: Kind) -> Option<Rc<Plan>> {
        let key = (columns.to_vec(), conflict.to_vec(), kind);
        if let Some(k) = self.plans.borrow().get(&key) {
            k.used.set(cache::tick());
            return k.plan.clone();
        }
        let plan = super::statements::build(self, columns, conflict, kind).map(|sql| {
            let types = super::statements::parameter_types(self, columns);
            Rc::new(Plan {
                ptr: crate::ledger::statements::prepare_kept(&sql, &types),
            })
        });
        self.plans.borrow_mut().insert(
            key,
            Kept {
                plan: plan.clone(),
                used: Cell::new(cache::tick()),
            },
        );
        cache::added_plan();
        plan
    }

    /// When the least recently used statement was last used.
    pub fn oldest_plan(&self) -> Option<u64> {
        self.plans.borrow().values().map(|k| k.used.get()).min()
    }

    /// Forgets the least recently used statement (freed once no call runs
    /// it); false when there is none.
    pub fn forget_oldest_plan(&self) -> bool {
        let mut plans = self.plans.borrow_mut();
        let Some(key) = plans
            .iter()
            .min_by_key(|(_, k)| k.used.get())
            .map(|(key, _)| key.clone())
        else {
            return false;
        };
        let gone = plans.remove(&key);
        drop(plans);
        drop(gone);
        true
    }
}

/// Describes table `relid`, which the caller has locked, from its relcache
/// entry: taking the lock processed every invalidation committed before
/// it, and the relcache reads the catalogs with a fresh catalog snapshot,
/// so this is the table as it is now, whatever snapshot the statement or
/// the transaction holds (a description read with SQL under an older
/// snapshot would show the table as it was before an ALTER the lock waited
/// for).
pub fn load(relid: pg_sys::Oid) -> Target {
    let Some(rel) = Rel::try_open_locked(relid) else {
        error(
            Code::ERRCODE_UNDEFINED_TABLE,
            format!("relation with OID {} does not exist", relid.to_u32()),
        )
        .raise();
    };
    // SAFETY: rd_rel of an open relation is its pg_class row; relname is
    // a NUL-terminated NameData; get_namespace_name returns a palloc'd
    // string (or NULL for a schema dropped meanwhile, which the lock on the
    // table prevents); quote_qualified_identifier returns a palloc'd string.
    let (relkind, namespace, name) = unsafe {
        let form = (*rel.as_ptr()).rd_rel;
        let nsp = pg_sys::get_namespace_name((*form).relnamespace);
        let name = if nsp.is_null() {
            rel.name()
        } else {
            CStr::from_ptr(pg_sys::quote_qualified_identifier(
                nsp,
                (*form).relname.data.as_ptr(),
            ))
            .to_string_lossy()
            .into_owned()
        };
        ((*form).relkind as u8, (*form).relnamespace, name)
    };
    if relkind != pg_sys::RELKIND_RELATION && relkind != pg_sys::RELKIND_PARTITIONED_TABLE {
        error(
            Code::ERRCODE_WRONG_OBJECT_TYPE,
            format!("\"{name}\" is not a table"),
        )
        .detail("idem_upsert and idem_insert_once write to tables and partitioned tables only.")
        .hint("Pass the table behind the view or foreign table.")
        .raise();
    }
    let context = Context::new(&name);
    let attrs = rel.attributes();
    let attname =
        |a: &pg_sys::FormData_pg_attribute| relation::attname(a).to_string_lossy().into_owned();
    let columns = attrs
        .iter()
        .filter(|a| !a.attisdropped)
        .map(|a| Column {
            name: attname(a),
            type_oid: a.atttypid,
            identity_always: a.attidentity as u8 == pg_sys::ATTRIBUTE_IDENTITY_ALWAYS,
            equality: equality(a.atttypid),
            typmod: a.atttypmod,
            conversion: conversion(a.atttypid, context.0),
        })
        .collect();
    let unique_keys = unique_keys(&rel);
    let distributed = crate::citus::installed() && crate::citus::distributed(relid);
    Target {
        relid,
        name,
        namespace_hash: crate::pg::inval::namespace_hash(namespace),
        columns,
        unique_keys,
        distributed,
        _context: context,
        plans: RefCell::new(HashMap::new()),
        used: Cell::new(cache::tick()),
    }
}

/// The valid unique indexes of `rel` on plain columns without a predicate,
/// with their key columns by name (INCLUDE columns follow the key columns
/// and are not part of what is unique).
pub fn unique_keys(rel: &Rel) -> Vec<UniqueKey> {
    let attrs = rel.attributes();
    let mut keys = Vec::new();
    for oid in rel.index_oids() {
        let index = Rel::index(oid, pg_sys::AccessShareLock);
        let form = index.index_form();
        if !form.indisunique || !form.indisvalid {
            continue;
        }
        // SAFETY: both return a copy of the index's expression or predicate
        // list from its relcache entry, or NIL.
        let plain = unsafe {
            pg_sys::RelationGetIndexExpressions(index.as_ptr()).is_null()
                && pg_sys::RelationGetIndexPredicate(index.as_ptr()).is_null()
        };
        if !plain {
            continue;
        }
        let columns = (0..form.indnkeyatts as usize)
            .map(|k| {
                let attnum = index.index_key(k);
                attrs
                    .iter()
                    .find(|a| a.attnum == attnum)
                    .map(|a| relation::attname(a).to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        keys.push(UniqueKey {
            primary: form.indisprimary,
            columns,
            index: oid,
        });
    }
    keys
}

fn equality(typid: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: lookup_type_cache raises an ERROR for an unknown type and
    // returns a valid entry otherwise.
    unsafe {
        let entry = pg_sys::lookup_type_cache(typid, pg_sys::TYPECACHE_EQ_OPR as i32);
        if entry.is_null() {
            pg_sys::InvalidOid
        } else {
            (*entry).eq_opr
        }
    }
}
