//! What an operator can see: counters of what the functions answered
//! (`idem_stats()`, in shared memory when the library is preloaded) and the
//! keys held now (`idem_held`).
pub mod held;
pub mod stats;
