//! This process: a background worker's signals, the backend's transaction.

/// Has SIGTERM end this background worker process as it ends a backend (at
/// the next interrupt check, with a FATAL "terminating background worker",
/// rolling back a transaction under way), then lets signals in, as a
/// background worker must before it connects to a database.
pub fn die_on_sigterm() {
    // SAFETY: installs PostgreSQL's handler, which only sets flags and the
    // process latch, before any signal is let in.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        pgrx::pg_sys::pqsignal(pgrx::pg_sys::SIGTERM as i32, Some(terminate));
        // From 18 the backend's own pqsignal is called pqsignal_be.
        #[cfg(feature = "pg18")]
        pgrx::pg_sys::pqsignal_be(pgrx::pg_sys::SIGTERM as i32, Some(terminate));
        pgrx::pg_sys::BackgroundWorkerUnblockSignals();
    }
}

unsafe extern "C-unwind" {
    /// PostgreSQL's own SIGTERM handler for backends (tcop/postgres.c); its
    /// pgrx binding is a wrapper that cannot be installed as a handler.
    #[link_name = "die"]
    fn terminate(postgres_signal_arg: std::ffi::c_int);
}

/// The number of this backend's current top-level transaction (its
/// virtual transaction id's local part), which no later transaction of
/// the backend reuses.
pub fn local_transaction_id() -> u32 {
    // SAFETY: MyProc is this backend's PGPROC, set before any function
    // runs; the field is written by this backend only.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16"))]
        let lxid = (*pgrx::pg_sys::MyProc).lxid;
        // From 17 the local part sits in the PGPROC's vxid.
        #[cfg(any(feature = "pg17", feature = "pg18"))]
        let lxid = (*pgrx::pg_sys::MyProc).vxid.lxid;
        lxid
    }
}
