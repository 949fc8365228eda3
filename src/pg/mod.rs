//! A thin layer over PostgreSQL: calling conventions of the C functions,
//! relations and SPI behind guards, cache invalidation, errors with
//! SQLSTATE, the `idempotency.*` settings, a background worker's signals.
pub mod errors;
pub mod fmgr;
pub mod inval;
pub mod process;
pub mod relation;
pub mod settings;
