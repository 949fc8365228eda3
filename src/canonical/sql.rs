//! `idem_canonical` and `idem_fingerprint`, and the fingerprint of a
//! `request` argument: the canonical text of a jsonb datum, written from its
//! binary form into a text buffer or straight into SHA-256.
use super::jsonb::JsonbTree;
use crate::pg::fmgr::{finfo_v1, Args, Signature};
use pgrx::pg_sys;
use pgrx::prelude::*;

/// Writes the canonical text of jsonb datum `d` into `sink`.
fn canonicalize<S: super::Sink>(d: pg_sys::Datum, sink: &mut S) {
    // SAFETY: d is a jsonb datum (a declared jsonb argument);
    // pg_detoast_datum returns it, or a palloc'd detoasted copy with a
    // 4-byte header, which lives until the end of the call.
    unsafe {
        let jsonb = pg_sys::pg_detoast_datum(d.cast_mut_ptr()) as *const pg_sys::Jsonb;
        super::write(&JsonbTree::new(jsonb), sink);
    }
}

/// The SHA-256 of the canonical text of a jsonb datum.
pub fn fingerprint_of_jsonb(d: pg_sys::Datum) -> [u8; 32] {
    let mut hasher = super::Hasher::new();
    canonicalize(d, &mut hasher);
    hasher.finish()
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

/// A text datum of `bytes` (valid UTF-8: canonical text is).
fn text_datum(bytes: &[u8]) -> pg_sys::Datum {
    // SAFETY: cstring_to_text_with_len copies len bytes into a new palloc'd
    // text value.
    unsafe {
        pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
            bytes.as_ptr().cast(),
            bytes.len() as i32,
        ))
    }
}

/// `idem_canonical(value jsonb) returns text`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn idem_canonical(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: Postgres calls this with the call info of idem_canonical.
    let args = unsafe { Args::new(fcinfo, &CANONICAL) };
    let d = args.datum(0).expect("declared STRICT");
    let mut out = Vec::with_capacity(256);
    canonicalize(d, &mut out);
    text_datum(&out)
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
    text_datum(super::hex(&fingerprint_of_jsonb(d)).as_bytes())
}
