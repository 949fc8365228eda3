//! A thin layer over PostgreSQL: calling conventions of the C functions,
//! errors with SQLSTATE, the `idempotency.*` settings.
pub mod errors;
pub mod fmgr;
pub mod settings;
