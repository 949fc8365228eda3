//! `idem_canonical` and `idem_fingerprint`, and the fingerprint of a
//! `request` argument.
use crate::canonical::{self, CanonError};
use crate::pg::errors::{error, name_key, Code};
use crate::pg::fmgr::{finfo_v1, Args, Signature};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::IntoDatum;
use std::ffi::CStr;

fn jsonb_text(d: pg_sys::Datum) -> String {
    // SAFETY: d is a jsonb datum (a declared jsonb argument); jsonb_out
    // returns a palloc'd NUL-terminated string.
    unsafe {
        let out = pgrx::direct_function_call_as_datum(pg_sys::jsonb_out, &[Some(d)])
            .expect("jsonb_out returns text");
        CStr::from_ptr(out.cast_mut_ptr::<std::ffi::c_char>())
            .to_string_lossy()
            .into_owned()
    }
}

fn canonical_or_raise(d: pg_sys::Datum, whose: impl FnOnce() -> String) -> String {
    match canonical::canonical_from_json_text(&jsonb_text(d)) {
        Ok(text) => text,
        Err(CanonError::NumberOutOfRange(n)) => error(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("{} holds a number too large for canonical JSON", whose()),
        )
        .detail(format!("RFC 8785 numbers are IEEE 754 doubles: {n}"))
        .hint("Pass such numbers as strings.")
        .raise(),
    }
}

/// The SHA-256 of the canonical text of a `request` argument.
pub fn fingerprint_of_jsonb(d: pg_sys::Datum, key: &str, scope: &str) -> [u8; 32] {
    canonical::sha256(&canonical_or_raise(d, || {
        format!("the request for {}", name_key(key, scope))
    }))
}

finfo_v1!(pg_finfo_idem_canonical);

const CANONICAL: Signature = Signature {
    name: "idem_canonical",
    args: &[pg_sys::JSONBOID],
    result: Some(pg_sys::TEXTOID),
};

const FINGERPRINT: Signature = Signature {
    name: "idem_fingerprint",
    args: &[pg_sys::JSONBOID],
    result: Some(pg_sys::TEXTOID),
};

/// `idem_canonical(value jsonb) returns text`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn idem_canonical(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: Postgres calls this with the call info of idem_canonical.
    let args = unsafe { Args::new(fcinfo, &CANONICAL) };
    let d = args.datum(0).expect("declared STRICT");
    canonical_or_raise(d, || "the value".to_string())
        .into_datum()
        .expect("text datum")
}

finfo_v1!(pg_finfo_idem_fingerprint);

/// `idem_fingerprint(value jsonb) returns text`: 64 lowercase hex digits.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn idem_fingerprint(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: Postgres calls this with the call info of idem_fingerprint.
    let args = unsafe { Args::new(fcinfo, &FINGERPRINT) };
    let d = args.datum(0).expect("declared STRICT");
    let text = canonical_or_raise(d, || "the value".to_string());
    canonical::hex(&canonical::sha256(&text))
        .into_datum()
        .expect("text datum")
}
