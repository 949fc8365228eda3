//! The key ledger: `idem_begin`, `idem_finish`, `idem_fail`,
//! `idem_checkpoint` and `idem_get` (`idem_purge` is plain SQL in
//! `sql/functions.sql`).
//!
//! - `begin`: claim a key, or learn why not.
//! - `outcome`: what the holder records: the result, a failure, a
//!   recovery point.
//! - `response`: an HTTP response stored with the outcome, checked on the
//!   way in.
//! - `get`: a key's committed state, for the roles that may see it.
//! - `owner`: keys belong to the role that claimed them; who may act on one.
//! - `held`: the keys this transaction holds, kept in step with savepoints
//!   and checked at COMMIT.
pub mod begin;
pub mod get;
pub mod held;
pub mod outcome;
pub mod owner;
pub mod response;
