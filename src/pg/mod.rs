//! A thin layer over PostgreSQL: calling conventions of the C functions,
//! relations and SPI behind guards, cache invalidation, errors with
//! SQLSTATE, the `idempotency.*` settings.
pub mod errors;
pub mod fmgr;
pub mod inval;
pub mod relation;
pub mod settings;
