//! The background worker's own process: signals.

/// Has SIGTERM end this background worker process as it ends a backend (at
/// the next interrupt check, with a FATAL "terminating background worker",
/// rolling back a transaction under way), then lets signals in, as a
/// background worker must before it connects to a database.
pub fn die_on_sigterm() {
    // SAFETY: installs a handler that only sets flags and a latch (below),
    // before any signal is let in.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        pgrx::pg_sys::pqsignal(pgrx::pg_sys::SIGTERM as i32, Some(terminate));
        // From 18 the backend's own pqsignal is called pqsignal_be.
        #[cfg(feature = "pg18")]
        pgrx::pg_sys::pqsignal_be(pgrx::pg_sys::SIGTERM as i32, Some(terminate));
        pgrx::pg_sys::BackgroundWorkerUnblockSignals();
    }
}

/// What PostgreSQL's `die` does in a backend.
unsafe extern "C-unwind" fn terminate(_signal: std::ffi::c_int) {
    // SAFETY: only flags that PostgreSQL's interrupt checks read, written
    // as sig_atomic_t, and the process latch, which SetLatch may set from a
    // signal handler.
    unsafe {
        (&raw mut pgrx::pg_sys::ProcDiePending).write_volatile(1);
        (&raw mut pgrx::pg_sys::InterruptPending).write_volatile(1);
        pgrx::pg_sys::SetLatch(pgrx::pg_sys::MyLatch);
    }
}
