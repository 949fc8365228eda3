//! Thin helpers for the version-1 C functions declared in `sql/functions.sql`:
//! reading arguments as the SQL types they are declared with, and returning a
//! composite row.
//!
//! Nothing here trusts the SQL declaration blindly: the first call of each
//! function (per backend and function OID) compares the declared argument
//! and result types with the ones the Rust code reads, and a row is formed
//! only from a descriptor whose column types were checked. A library and an
//! SQL script of different versions then fail with a clear error instead of
//! reading a datum as the wrong type.
use crate::pg::errors::{error, Code};
use pgrx::{pg_sys, IntoDatum};
use std::cell::RefCell;

/// Declares the `pg_finfo_*` record Postgres looks up for a version-1 function.
macro_rules! finfo_v1 {
    ($finfo:ident) => {
        #[unsafe(no_mangle)]
        #[doc(hidden)]
        pub extern "C" fn $finfo() -> &'static ::pgrx::pg_sys::Pg_finfo_record {
            const V1: ::pgrx::pg_sys::Pg_finfo_record =
                ::pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
    };
}
pub(crate) use finfo_v1;

/// What the Rust side of a C function reads and returns.
pub struct Signature {
    pub name: &'static str,
    pub args: &'static [pg_sys::Oid],
    /// The result type, or None for a composite type whose columns
    /// `return_row` checks.
    pub result: Option<pg_sys::Oid>,
}

/// A function whose declaration was checked, with its result type.
#[derive(Clone, Copy)]
struct Checked {
    fn_oid: pg_sys::Oid,
    result: pg_sys::Oid,
}

/// A composite result type whose descriptor was checked.
#[derive(Clone, Copy)]
struct CheckedRow {
    type_oid: pg_sys::Oid,
    /// The type's type cache entry; PostgreSQL never frees those.
    entry: *mut pg_sys::TypeCacheEntry,
    /// The type cache's identifier of the descriptor that was checked; a
    /// changed type (ALTER TYPE) gets a new one, and an invalidated entry
    /// has none (0) until it is looked up again.
    identifier: u64,
}

thread_local! {
    // A function keeps its OID and argument types for life (CREATE OR
    // REPLACE cannot change them, nor the result type), so a check per OID
    // holds until the backend exits. A dozen functions: a list is enough.
    static CHECKED: RefCell<Vec<Checked>> = const { RefCell::new(Vec::new()) };
    static CHECKED_ROWS: RefCell<Vec<CheckedRow>> = const { RefCell::new(Vec::new()) };
}

fn type_name(oid: pg_sys::Oid) -> String {
    // SAFETY: format_type_be returns a palloc'd NUL-terminated string for
    // any OID (a missing type prints as "???").
    unsafe {
        std::ffi::CStr::from_ptr(pg_sys::format_type_be(oid))
            .to_string_lossy()
            .into_owned()
    }
}

fn names(oids: &[pg_sys::Oid]) -> String {
    oids.iter()
        .map(|o| type_name(*o))
        .collect::<Vec<_>>()
        .join(", ")
}

fn mismatch(what: String) -> ! {
    error(Code::ERRCODE_INVALID_FUNCTION_DEFINITION, what)
        .hint("The extension's SQL objects and its shared library are of different versions: run ALTER EXTENSION idempotency UPDATE, or reinstall the extension.")
        .raise()
}

/// Checks the declaration of the function being called against `sig`, once
/// per backend and function; returns its result type.
///
/// # Safety
/// `fcinfo` is the call info Postgres passed to a version-1 function.
unsafe fn check(fcinfo: pg_sys::FunctionCallInfo, sig: &Signature) -> pg_sys::Oid {
    // SAFETY: fmgr fills flinfo for every call through the function
    // manager, which is how SQL calls these functions.
    let fn_oid = unsafe {
        let flinfo = (*fcinfo).flinfo;
        if flinfo.is_null() {
            mismatch(format!("{} was called without function info", sig.name));
        }
        (*flinfo).fn_oid
    };
    let known = CHECKED.with(|c| {
        c.borrow()
            .iter()
            .find(|c| c.fn_oid == fn_oid)
            .map(|c| c.result)
    });
    if let Some(result) = known {
        return result;
    }
    let mut argtypes: *mut pg_sys::Oid = std::ptr::null_mut();
    let mut nargs: i32 = 0;
    // SAFETY: get_func_signature raises an ERROR for an unknown OID and
    // otherwise returns a palloc'd array of nargs argument types.
    let (result, declared) = unsafe {
        let result = pg_sys::get_func_signature(fn_oid, &mut argtypes, &mut nargs);
        let declared = if nargs > 0 {
            std::slice::from_raw_parts(argtypes, nargs as usize).to_vec()
        } else {
            Vec::new()
        };
        (result, declared)
    };
    if declared != sig.args {
        mismatch(format!(
            "function {} is declared with arguments ({}) but the library reads ({})",
            sig.name,
            names(&declared),
            names(sig.args)
        ));
    }
    if let Some(expected) = sig.result {
        if result != expected {
            mismatch(format!(
                "function {} is declared to return {} but the library returns {}",
                sig.name,
                type_name(result),
                type_name(expected)
            ));
        }
    }
    CHECKED.with(|c| c.borrow_mut().push(Checked { fn_oid, result }));
    result
}

pub struct Args {
    fcinfo: pg_sys::FunctionCallInfo,
    result: pg_sys::Oid,
    name: &'static str,
}

impl Args {
    /// The arguments of a call of the function `sig` describes, after
    /// checking its declaration (see `check`).
    ///
    /// # Safety
    /// `fcinfo` is the call info Postgres passed to a version-1 function.
    pub unsafe fn new(fcinfo: pg_sys::FunctionCallInfo, sig: &Signature) -> Self {
        // SAFETY: as the caller promises; check() reads flinfo only.
        let result = unsafe { check(fcinfo, sig) };
        // SAFETY: nargs is set by fmgr for every call.
        let nargs = unsafe { (*fcinfo).nargs } as usize;
        if nargs != sig.args.len() {
            mismatch(format!(
                "function {} was called with {nargs} arguments, not {}",
                sig.name,
                sig.args.len()
            ));
        }
        Args {
            fcinfo,
            result,
            name: sig.name,
        }
    }

    fn nullable(&self, i: usize) -> Option<pg_sys::Datum> {
        // SAFETY: i < nargs (the signatures index only declared arguments,
        // and `new` checked their count); args[i] is initialised by fmgr.
        unsafe {
            let n = pgrx::fcinfo::pg_get_nullable_datum(self.fcinfo, i);
            if n.isnull {
                None
            } else {
                Some(n.value)
            }
        }
    }

    pub fn text(&self, i: usize) -> Option<String> {
        // SAFETY: argument i is declared text (checked in `new`).
        self.nullable(i)
            .and_then(|d| unsafe { <String as pgrx::FromDatum>::from_datum(d, false) })
    }

    pub fn datum(&self, i: usize) -> Option<pg_sys::Datum> {
        self.nullable(i)
    }

    pub fn bool(&self, i: usize) -> Option<bool> {
        self.nullable(i).map(|d| d.value() != 0)
    }

    pub fn i32(&self, i: usize) -> Option<i32> {
        self.nullable(i).map(|d| d.value() as i32)
    }

    pub fn i64(&self, i: usize) -> Option<i64> {
        self.nullable(i).map(|d| d.value() as i64)
    }

    pub fn interval(&self, i: usize) -> Option<pg_sys::Interval> {
        // SAFETY: argument i is declared interval (checked in `new`), a
        // by-reference type whose datum points at an Interval.
        self.nullable(i)
            .map(|d| unsafe { *(d.cast_mut_ptr::<pg_sys::Interval>()) })
    }

    /// Builds the call's composite result row from `values`/`nulls`,
    /// checking (once per version of the result type) that its columns have
    /// exactly `types`.
    pub fn return_row(
        &self,
        types: &[pg_sys::Oid],
        values: &mut [pg_sys::Datum],
        nulls: &mut [bool],
    ) -> pg_sys::Datum {
        assert_eq!(values.len(), types.len());
        assert_eq!(nulls.len(), types.len());
        let known = CHECKED_ROWS.with(|c| {
            c.borrow()
                .iter()
                .find(|c| c.type_oid == self.result)
                .copied()
        });
        // SAFETY: a type cache entry lives as long as the backend; its
        // tupDesc is valid while its identifier is the one we checked (an
        // invalidation resets both, and check_row looks the type up again).
        let desc = known.and_then(|k| unsafe {
            let entry = &*k.entry;
            (!entry.tupDesc.is_null() && entry.tupDesc_identifier == k.identifier)
                .then_some(entry.tupDesc)
        });
        let desc = desc.unwrap_or_else(|| self.check_row(types));
        // SAFETY: desc has exactly values.len() columns of the types of
        // `values` (checked against this very descriptor version); it is
        // the type cache's, so heap_form_tuple's header carries the named
        // type's OID; the tuple is a new palloc'd copy of the values.
        unsafe {
            let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            pg_sys::HeapTupleHeaderGetDatum((*tuple).t_data)
        }
    }

    /// Looks the result type up in the type cache and checks that its
    /// columns are `types`; returns its descriptor.
    fn check_row(&self, types: &[pg_sys::Oid]) -> pg_sys::TupleDesc {
        // SAFETY: lookup_type_cache raises an ERROR for an unknown type and
        // returns the type cache entry, whose tupDesc is set (or NULL for a
        // non-composite type) when TYPECACHE_TUPDESC is asked for.
        let (entry, desc, identifier) = unsafe {
            let entry = pg_sys::lookup_type_cache(self.result, pg_sys::TYPECACHE_TUPDESC as i32);
            (entry, (*entry).tupDesc, (*entry).tupDesc_identifier)
        };
        if desc.is_null() {
            mismatch(format!(
                "the result type {} is not a composite type",
                type_name(self.result)
            ));
        }
        // SAFETY: desc is the type cache's valid descriptor.
        let declared = unsafe { column_types(desc) };
        if declared != types {
            mismatch(format!(
                "the result type {} has columns ({}) but the library returns ({})",
                type_name(self.result),
                names(&declared),
                names(types)
            ));
        }
        CHECKED_ROWS.with(|c| {
            let mut c = c.borrow_mut();
            c.retain(|c| c.type_oid != self.result);
            c.push(CheckedRow {
                type_oid: self.result,
                entry,
                identifier,
            });
        });
        desc
    }
}

/// The type of each column of `desc`, InvalidOid for a dropped one.
///
/// # Safety
/// `desc` is a valid tuple descriptor.
unsafe fn column_types(desc: pg_sys::TupleDesc) -> Vec<pg_sys::Oid> {
    // SAFETY: as the caller promises; attrs has natts entries.
    unsafe {
        (0..(*desc).natts as usize)
            .map(|i| {
                let att = crate::pg::relation::attribute(desc, i);
                if (*att).attisdropped {
                    pg_sys::InvalidOid
                } else {
                    (*att).atttypid
                }
            })
            .collect()
    }
}

/// The rows a set-returning function returns, stored in the tuplestore
/// PostgreSQL made for the call (materialize mode).
pub struct Rows {
    rsinfo: *mut pg_sys::ReturnSetInfo,
    columns: usize,
}

impl Args {
    /// Starts the rows of this call, in the query's memory, after checking
    /// that the function is declared to return columns of exactly `types`
    /// (42P13 otherwise, as for `new`): no datum is handed to the executor
    /// as another type.
    pub fn rows(&self, types: &[pg_sys::Oid]) -> Rows {
        // SAFETY: fcinfo is the call's (see `new`); InitMaterializedSRF
        // checks that the caller accepts a materialized set (an error
        // otherwise) and sets resultinfo's tuplestore and descriptor, made
        // from the function's declared result.
        let rsinfo = unsafe {
            pg_sys::InitMaterializedSRF(self.fcinfo, 0);
            (*self.fcinfo).resultinfo.cast::<pg_sys::ReturnSetInfo>()
        };
        // SAFETY: InitMaterializedSRF set setDesc to a valid descriptor.
        unsafe { check_columns(self.name, (*rsinfo).setDesc, types) };
        Rows {
            rsinfo,
            columns: types.len(),
        }
    }
}

impl Rows {
    /// Adds a row; the tuplestore copies the values.
    ///
    /// # Safety
    /// Each non-null value is a datum of the type `rows` was given for its
    /// column, valid for the call.
    pub unsafe fn put(&self, values: &mut [pg_sys::Datum], nulls: &mut [bool]) {
        assert_eq!(values.len(), self.columns);
        assert_eq!(nulls.len(), self.columns);
        // SAFETY: the tuplestore and descriptor are the call's (`rows`),
        // the descriptor has exactly these columns (checked there), and the
        // values have their types (as the caller promises).
        unsafe {
            pg_sys::tuplestore_putvalues(
                (*self.rsinfo).setResult,
                (*self.rsinfo).setDesc,
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            )
        };
    }
}

/// Checks that a set-returning function's result descriptor (made from its
/// declaration) has columns of exactly `types`.
///
/// # Safety
/// `desc` is a valid tuple descriptor.
unsafe fn check_columns(name: &str, desc: pg_sys::TupleDesc, types: &[pg_sys::Oid]) {
    // SAFETY: as the caller promises.
    let declared = unsafe { column_types(desc) };
    if declared != types {
        mismatch(format!(
            "function {name} is declared to return ({}) but the library returns ({})",
            names(&declared),
            names(types)
        ));
    }
}

/// The range of finite timestamps (`datatype/timestamp.h`).
const MIN_TIMESTAMP: i64 = -211_813_488_000_000_000;
const END_TIMESTAMP: i64 = 9_223_371_331_200_000_000;

/// `ts + interval` with Postgres' own calendar arithmetic.
pub fn timestamptz_plus(ts: pg_sys::TimestampTz, iv: &pg_sys::Interval) -> pg_sys::TimestampTz {
    // Without months or days, calendar arithmetic is plain addition of
    // microseconds (what timestamptz_pl_interval does then), so the common
    // `wait => '0'` costs no call into PostgreSQL.
    if iv.month == 0 && iv.day == 0 {
        if let Some(sum) = ts.checked_add(iv.time) {
            if (MIN_TIMESTAMP..END_TIMESTAMP).contains(&sum) {
                return sum;
            }
        }
    }
    let mut copy = *iv;
    // SAFETY: timestamptz_pl_interval takes a timestamptz by value and an
    // Interval by reference (a pointer to our copy, alive for the call),
    // and returns a timestamptz by value; it raises an ERROR on overflow.
    unsafe {
        let d = pgrx::direct_function_call_as_datum(
            pg_sys::timestamptz_pl_interval,
            &[
                Some(pg_sys::Datum::from(ts)),
                Some(pg_sys::Datum::from(&mut copy as *mut pg_sys::Interval)),
            ],
        )
        .expect("timestamptz + interval is not NULL");
        d.value() as i64
    }
}

/// Whether `ts + iv` is later than `ts`, by calendar arithmetic: what makes
/// a lease or a time to live positive. (`1 month -29 days` is positive from
/// March 1 and not from January 31.)
pub fn ends_after(ts: pg_sys::TimestampTz, iv: &pg_sys::Interval) -> bool {
    timestamptz_plus(ts, iv) > ts
}

/// A text datum, or NULL.
pub fn text_datum(s: Option<&str>) -> (pg_sys::Datum, bool) {
    match s.and_then(|s| s.into_datum()) {
        Some(d) => (d, false),
        None => (pg_sys::Datum::from(0usize), true),
    }
}

/// An interval of `micros` microseconds (no days or months), palloc'd in
/// the current memory context.
pub fn interval_datum(micros: i64) -> pg_sys::Datum {
    // SAFETY: palloc returns memory of the requested size in the current
    // context, or raises an ERROR; it is fully written before it is used.
    unsafe {
        let iv = pg_sys::palloc(std::mem::size_of::<pg_sys::Interval>()) as *mut pg_sys::Interval;
        iv.write(pg_sys::Interval {
            time: micros,
            day: 0,
            month: 0,
        });
        pg_sys::Datum::from(iv)
    }
}
