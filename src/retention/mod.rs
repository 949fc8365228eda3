//! Expired keys deleted: by `idem_purge`, and on a schedule by the purge
//! worker when the library is preloaded.
pub mod purge;
pub mod worker;
