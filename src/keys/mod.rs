//! The key ledger: `idem_begin`, `idem_finish`, `idem_fail` and
//! `idem_checkpoint` (`idem_get` and `idem_purge` are plain SQL in
//! `sql/functions.sql`).
//!
//! - `begin`: claim a key, or learn why not.
//! - `outcome`: what the holder records: the result, a failure, a
//!   recovery point.
//! - `held`: the keys this transaction holds, kept in step with savepoints
//!   and checked at COMMIT.
pub mod begin;
pub mod held;
pub mod outcome;
