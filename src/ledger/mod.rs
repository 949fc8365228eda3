//! What the two ledgers, the keys of `idem_begin` and the keys of
//! `idem_once`, share: their key arguments and their tables.
//!
//! - `tables`: where the tables are and what they look like, read with the
//!   tables locked and checked against the columns used here.
//! - `probe`: reads a key's newest row version, committed or not, straight
//!   from the primary-key index, to tell "someone else holds it" apart from
//!   "it is free" without waiting.
//! - `lock`: the short per-key lock that makes probe-then-write atomic.
//! - `statements`: the prepared statements that update and read rows (and insert
//!   them when a DBA's trigger, constraint or index needs the executor).
//! - `insert`: inserts without SQL into the heap and every ready index.
//! - `wait`: bounded waits for a key's holder.
pub mod insert;
pub mod lock;
pub mod probe;
pub mod statements;
pub mod tables;
pub mod wait;

pub use tables::{catalog, COMPLETED, FAILED, IN_PROGRESS, RELEASED};

use pgrx::pg_sys;

/// An HTTP response stored with a key's outcome and replayed byte for byte
/// (`keys.response_*`); every part None when none was stored. Checked on
/// the way in by `keys::response`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Response {
    /// The status code of a final response, 200 to 599.
    pub status: Option<i32>,
    /// A jsonb object: header name to a string, or to an array of strings.
    pub headers: Option<pg_sys::Datum>,
    /// A bytea, any bytes.
    pub body: Option<pg_sys::Datum>,
}

use crate::pg::errors::{error, name_key, Code};
use crate::pg::fmgr::Args;
use crate::pg::settings;

/// Reads and checks the key and scope arguments (22004 for NULL, 22023 for
/// empty or too long).
pub fn key_and_scope(args: &Args, key_arg: usize, scope_arg: usize) -> (String, String) {
    let key = args.text(key_arg);
    let scope = args.text(scope_arg);
    let (key, scope) = match (key, scope) {
        (None, _) => error(
            Code::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "idempotency key must not be NULL",
        )
        .hint("Pass the key that identifies this piece of work, such as 'charge:order-42'.")
        .raise(),
        (Some(k), None) => error(
            Code::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            format!("scope of {} must not be NULL", name_key(&k, "")),
        )
        .hint("Omit scope, or pass '' for keys without a scope.")
        .raise(),
        (Some(k), Some(s)) => (k, s),
    };
    check_key(&key, &scope);
    (key, scope)
}

pub fn check_key(key: &str, scope: &str) {
    if key.is_empty() {
        let whose = if scope.is_empty() {
            String::new()
        } else {
            format!(" in scope \"{scope}\"")
        };
        error(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("idempotency key{whose} must not be empty"),
        )
        .hint("Pass the key that identifies this piece of work, such as 'charge:order-42'.")
        .raise();
    }
    let max = settings::max_key_length().max(1) as usize;
    for (what, value) in [("key", key), ("scope", scope)] {
        // No more bytes than the limit means no more characters either.
        if value.len() <= max {
            continue;
        }
        let chars = value.chars().count();
        if chars > max {
            error(
                Code::ERRCODE_INVALID_PARAMETER_VALUE,
                format!(
                    "{} is too long: its {what} has {chars} characters",
                    name_key(key, scope)
                ),
            )
            .detail(format!("idempotency.max_key_length is {max}."))
            .hint("Use a shorter key, or hash a long natural key with idem_fingerprint().")
            .raise();
        }
    }
}
