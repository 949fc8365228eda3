//! Thin helpers for the version-1 C functions declared in `sql/functions.sql`:
//! reading arguments as the SQL types they are declared with, and returning a
//! composite row with the function's OUT parameters as its columns.
use pgrx::{pg_sys, FromDatum, IntoDatum};
use std::ptr::null_mut;

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

pub struct Args {
    fcinfo: pg_sys::FunctionCallInfo,
}

impl Args {
    /// # Safety
    /// `fcinfo` is the call info Postgres passed to a version-1 function.
    pub unsafe fn new(fcinfo: pg_sys::FunctionCallInfo) -> Self {
        Args { fcinfo }
    }

    fn nullable(&self, i: usize) -> Option<pg_sys::Datum> {
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
        self.nullable(i)
            .and_then(|d| unsafe { String::from_datum(d, false) })
    }

    pub fn datum(&self, i: usize) -> Option<pg_sys::Datum> {
        self.nullable(i)
    }

    pub fn bool(&self, i: usize) -> Option<bool> {
        self.nullable(i).map(|d| d.value() != 0)
    }

    pub fn i64(&self, i: usize) -> Option<i64> {
        self.nullable(i).map(|d| d.value() as i64)
    }

    pub fn interval(&self, i: usize) -> Option<pg_sys::Interval> {
        self.nullable(i)
            .map(|d| unsafe { *(d.cast_mut_ptr::<pg_sys::Interval>()) })
    }

    /// The interval argument as microseconds, months counted as 30 days and
    /// days as 24 hours, as Postgres itself compares intervals.
    pub fn interval_micros(&self, i: usize) -> Option<i128> {
        self.interval(i).map(|iv| interval_micros(&iv))
    }
}

pub fn interval_micros(iv: &pg_sys::Interval) -> i128 {
    const DAY: i128 = 86_400_000_000;
    iv.time as i128 + iv.day as i128 * DAY + iv.month as i128 * 30 * DAY
}

/// `ts + interval` with Postgres' own calendar arithmetic.
pub fn timestamptz_plus(ts: pg_sys::TimestampTz, iv: &pg_sys::Interval) -> pg_sys::TimestampTz {
    unsafe {
        let mut copy = *iv;
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

thread_local! {
    /// Blessed result descriptors by function OID, kept for the backend's
    /// life (a re-created function has a new OID). A prepared statement
    /// builds a fresh FmgrInfo on every execution, so `fn_extra` alone would
    /// not save the work.
    static RESULT_DESCS: std::cell::RefCell<std::collections::HashMap<pg_sys::Oid, usize>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// Builds the result row of a function declared with OUT parameters.
pub unsafe fn return_row(
    fcinfo: pg_sys::FunctionCallInfo,
    values: &mut [pg_sys::Datum],
    nulls: &mut [bool],
) -> pg_sys::Datum {
    unsafe {
        let fn_oid = (*(*fcinfo).flinfo).fn_oid;
        let cached = RESULT_DESCS.with(|d| d.borrow().get(&fn_oid).copied());
        let desc = match cached {
            Some(ptr) => ptr as pg_sys::TupleDesc,
            None => {
                let mut td: pg_sys::TupleDesc = null_mut();
                let kind = pg_sys::get_call_result_type(fcinfo, null_mut(), &mut td);
                if kind != pg_sys::TypeFuncClass::TYPEFUNC_COMPOSITE {
                    pgrx::error!("function returning record called in context that cannot accept type record");
                }
                let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
                let desc = pg_sys::BlessTupleDesc(pg_sys::CreateTupleDescCopy(td));
                pg_sys::MemoryContextSwitchTo(old);
                RESULT_DESCS.with(|d| d.borrow_mut().insert(fn_oid, desc as usize));
                desc
            }
        };
        let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::HeapTupleHeaderGetDatum((*tuple).t_data)
    }
}

/// A text datum, or NULL.
pub fn text_datum(s: Option<&str>) -> (pg_sys::Datum, bool) {
    match s.and_then(|s| s.into_datum()) {
        Some(d) => (d, false),
        None => (pg_sys::Datum::from(0usize), true),
    }
}
