//! The purge worker: expired keys deleted on a schedule, with no scheduler
//! on the application's side. Started when the library is in
//! `shared_preload_libraries`.
//!
//! A launcher, connected to no database (it reads only the shared catalog
//! `pg_database`), wakes every `idempotency.purge_interval` and visits the
//! databases one at a time: for each it starts a short-lived worker
//! connected to that database and waits for it to end. That worker purges
//! only where this very version of the extension is installed (another
//! version's tables may differ), in batches of
//! `idempotency.purge_batch_size`, each its own transaction, pausing
//! `idempotency.purge_delay` between them, for 2 s at most (a longer
//! backlog is taken up again after a short pause rather than at the next
//! interval). No worker stays in a database long enough to make DROP
//! DATABASE fail, and templates are never visited (CREATE DATABASE copies
//! them only while no one is connected).
use crate::observability::stats::{self, Counter};
use crate::pg::settings;
use crate::retention::purge;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use std::time::{Duration, Instant};

/// The library file of this version (see `sql/functions.sql`).
const LIBRARY: &str = concat!("idempotency-", env!("CARGO_PKG_VERSION"));

/// The longest a worker stays in a database: it then leaves after the
/// batch under way. DROP DATABASE (and CREATE DATABASE from it as a
/// template) waits 5 s for other sessions to leave, and signals only
/// autovacuum's workers; a visit shorter than that, with a pause after it,
/// never makes it fail.
const VISIT: Duration = Duration::from_secs(2);

/// After a visit cut short by `VISIT`, the pause before the next round
/// (which then comes at once, so that a backlog is purged at full speed):
/// longer than DROP DATABASE's 100 ms between looks.
const BACKLOG_PAUSE: Duration = Duration::from_millis(500);

/// The launcher's name and type in `pg_stat_activity`.
pub const LAUNCHER: &str = "idempotency purge launcher";
/// A database worker's type in `pg_stat_activity`.
pub const PURGE: &str = "idempotency purge";

/// From `_PG_init`: registers the launcher when the library is being
/// preloaded (a background worker can only be registered then); does
/// nothing otherwise.
pub fn init() {
    // SAFETY: reads a global that is set while shared_preload_libraries is
    // being processed.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    BackgroundWorkerBuilder::new(LAUNCHER)
        .set_type(LAUNCHER)
        .set_library(LIBRARY)
        .set_function("idem_purge_launcher")
        .enable_spi_access()
        // Not on a standby (nothing can be deleted there): it starts when
        // the server accepts writes, as after a promotion.
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        // Back 10 s after it ends with an error or is terminated.
        .set_restart_time(Some(Duration::from_secs(10)))
        .load();
}

/// The launcher's main function.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn idem_purge_launcher(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // No database: pg_database is a shared catalog.
    BackgroundWorker::connect_worker_to_spi(None, None);
    let mut last_round: Option<Instant> = None;
    // What starting a worker allocates (its handle) is freed after each
    // visit: the launcher runs for the server's life.
    let mut memory = PgMemoryContexts::new("idempotency purge visit");
    loop {
        let interval = settings::purge_interval();
        let every = Duration::from_secs(interval.max(0) as u64);
        let due = interval > 0 && last_round.is_none_or(|t| t.elapsed() >= every);
        let mut backlog = false;
        if due {
            last_round = Some(Instant::now());
            backlog = round(&mut memory);
        }
        // Sleep until the next round; with the worker off, until a reload
        // turns it on.
        let sleep = match last_round {
            _ if backlog && interval > 0 => {
                last_round = None;
                BACKLOG_PAUSE
            }
            Some(t) if interval > 0 => every.saturating_sub(t.elapsed()),
            _ if interval > 0 => Duration::ZERO,
            _ => Duration::from_secs(3600),
        };
        if !BackgroundWorker::wait_latch(Some(sleep.max(Duration::from_millis(1)))) {
            // Terminated (pg_terminate_backend, or the server is stopping:
            // then it is not started again), or the postmaster died. A
            // non-zero exit has the postmaster start it again after its
            // restart time while the server runs.
            // SAFETY: ends this process as PostgreSQL expects.
            unsafe { pg_sys::proc_exit(1) };
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: rereads postgresql.conf outside any transaction, as a
            // background worker does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
}

/// A database the launcher may visit.
struct Database {
    oid: pg_sys::Oid,
    name: String,
}

/// Every database that accepts connections and is not a template (nor
/// half-dropped).
fn databases() -> Vec<Database> {
    BackgroundWorker::transaction(|| {
        let mut found = Vec::new();
        // SAFETY: in a transaction, pg_database is locked (AccessShare) and
        // opened, scanned with a catalog snapshot, and closed; each tuple is
        // a pg_database row (GETSTRUCT gives its fixed part), read before
        // the next one is fetched. The scan and relation are released in
        // the order they were taken; an error aborts the transaction, which
        // releases both.
        unsafe {
            let rel =
                pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as i32);
            let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
            loop {
                let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
                if tuple.is_null() {
                    break;
                }
                let form = &*(pg_sys::GETSTRUCT(tuple) as *const pg_sys::FormData_pg_database);
                // datconnlimit -2: a database whose DROP was interrupted.
                if !form.datallowconn || form.datistemplate || form.datconnlimit == -2 {
                    continue;
                }
                found.push(Database {
                    oid: form.oid,
                    name: std::ffi::CStr::from_ptr(form.datname.data.as_ptr())
                        .to_string_lossy()
                        .into_owned(),
                });
            }
            pg_sys::heap_endscan(scan);
            pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
        }
        found
    })
}

/// One round: a worker for each database chosen, one after the other.
/// True when a visit lasted `VISIT` or more: expired keys are probably
/// left behind.
fn round(memory: &mut PgMemoryContexts) -> bool {
    let chosen = settings::purge_databases();
    let databases = databases();
    let mut backlog = false;
    for db in databases {
        if chosen
            .as_ref()
            .is_some_and(|names| !names.contains(&db.name))
        {
            continue;
        }
        // SAFETY: switch_to makes the visit's context current and the
        // launcher's again after; nothing allocated in it is used after the
        // reset.
        let visited = unsafe { memory.switch_to(|_| visit(&db)) };
        // SAFETY: the visit's context is no longer current (above), and the
        // handle it held was used up by the wait.
        unsafe { memory.reset() };
        match visited {
            Some(long) => backlog |= long,
            // No free slot (max_worker_processes): try again next round.
            None => break,
        }
    }
    backlog
}

/// Starts the worker of one database and waits for it to end. Some(true)
/// when it stayed `VISIT` or more, None when it could not start.
fn visit(db: &Database) -> Option<bool> {
    // SAFETY: reads a backend global.
    let me = unsafe { pg_sys::MyProcPid };
    let started = BackgroundWorkerBuilder::new(&format!("{PURGE} of database {}", db.name))
        .set_type(PURGE)
        .set_library(LIBRARY)
        .set_function("idem_purge_database")
        .set_argument(Some(pg_sys::Datum::from(db.oid.to_u32())))
        .enable_spi_access()
        .set_restart_time(None)
        .set_notify_pid(me)
        .load_dynamic();
    match started {
        // Its errors are in the server log, under its own name.
        Ok(worker) => {
            let visit = Instant::now();
            let _ = worker.wait_for_shutdown();
            Some(visit.elapsed() >= VISIT)
        }
        Err(_) => {
            warning!(
                "idempotency purge launcher could not start a worker for database \"{}\"",
                db.name
            );
            None
        }
    }
}

/// A database worker's main function: purges the database whose OID is
/// its argument, then exits.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn idem_purge_database(arg: pg_sys::Datum) {
    // SIGTERM (a fast shutdown, pg_terminate_backend) ends it at the next
    // interrupt check, even in the middle of a batch, which then rolls back.
    crate::pg::process::die_on_sigterm();
    let oid = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(oid), None);
    // The extension's version here, and whether this database's sessions
    // are read-only (ALTER DATABASE ... SET default_transaction_read_only):
    // a purge there would fail every round, so it is left alone.
    let (version, read_only) = BackgroundWorker::transaction(|| {
        // Whatever the database sets for its sessions: batches run in READ
        // COMMITTED (at a higher level, meeting a key being claimed again
        // would fail the batch with 40001 instead of skipping it), and no
        // lock is waited for long (see `purge::batch`).
        let _ = Spi::run(
            "SELECT pg_catalog.set_config('default_transaction_isolation', 'read committed', false), \
                    pg_catalog.set_config('lock_timeout', '5s', false)",
        );
        let version = Spi::get_one::<String>(
            "SELECT extversion FROM pg_catalog.pg_extension \
             WHERE extname OPERATOR(pg_catalog.=) 'idempotency'",
        );
        let read_only = Spi::get_one::<bool>(
            "SELECT pg_catalog.current_setting('default_transaction_read_only')::pg_catalog.bool",
        );
        (version, read_only)
    });
    match version {
        Ok(Some(v)) if v == env!("CARGO_PKG_VERSION") => {}
        Ok(Some(v)) => {
            debug1!(
                "idempotency purge: skipped, version {v} is installed here, not {}",
                env!("CARGO_PKG_VERSION")
            );
            return;
        }
        _ => return,
    }
    if read_only != Ok(Some(false)) {
        debug1!("idempotency purge: skipped, default_transaction_read_only is on here");
        return;
    }
    let batch = i64::from(settings::purge_batch_size());
    let delay = settings::purge_delay();
    let started = Instant::now();
    let mut purged = 0;
    loop {
        let Some(n) = BackgroundWorker::transaction(|| {
            purge::lock_without_waiting().then(|| purge::batch(Some(batch)))
        }) else {
            // The table is locked (VACUUM FULL, LOCK TABLE, an ALTER waiting
            // for its lock): come back next round rather than wait, which
            // would hold up every other database.
            debug1!("idempotency purge: skipped, idempotency.keys is locked");
            break;
        };
        // Counted once committed: a batch cut short by SIGTERM deleted nothing.
        stats::add(Counter::KeysPurged, n as u64);
        purged += n;
        if n < batch || started.elapsed() >= VISIT {
            break;
        }
        if delay > 0 {
            // SAFETY: waits on this process's latch, which is reset before
            // it is used again; interrupts (SIGTERM) are handled after.
            unsafe {
                pg_sys::WaitLatch(
                    pg_sys::MyLatch,
                    (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH)
                        as i32,
                    delay as _,
                    pg_sys::PG_WAIT_EXTENSION,
                );
                pg_sys::ResetLatch(pg_sys::MyLatch);
            }
        }
        pgrx::check_for_interrupts!();
    }
    debug1!("idempotency purge: {purged} expired keys deleted");
}
