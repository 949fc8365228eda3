//! The `idempotency.*` settings. They can be set per session, per role, per
//! database or in postgresql.conf, like any user setting.
//!
//! During an upgrade a backend may have loaded the library of the previous
//! version, which defined these settings, before it calls into this one.
//! Postgres refuses to define a setting twice, so this library then reads
//! the value the other one keeps instead of failing to load.
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use std::cell::Cell;
use std::ffi::CStr;

/// How long a finished key is kept, in seconds (shown with units: `1d`).
static TTL_SECONDS: GucSetting<i32> = GucSetting::<i32>::new(24 * 60 * 60);

/// The longest key (and scope) accepted, in characters.
static MAX_KEY_LENGTH: GucSetting<i32> = GucSetting::<i32>::new(255);

/// The most statements a backend keeps prepared for `idem_upsert` and
/// `idem_insert_once` (and the most tables it keeps described).
static UPSERT_CACHE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// How often the purge worker purges every database, in seconds; 0 stops it.
static PURGE_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(60);

/// How many expired keys one purge transaction deletes at most.
static PURGE_BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// The pause between two batches of a purge, in milliseconds.
static PURGE_DELAY: GucSetting<i32> = GucSetting::<i32>::new(10);

/// The databases the purge worker visits: a comma-separated list of names,
/// or empty for every database that accepts connections.
static PURGE_DATABASES: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(None);

/// The largest value `idempotency.max_key_length` takes: with four bytes a
/// character, scope and key together still fit a btree index entry.
pub const MAX_KEY_LENGTH_LIMIT: i32 = 320;

const TTL: usize = 0;
const MAX_KEY: usize = 1;
const CACHE: usize = 2;
const INTERVAL: usize = 3;
const BATCH: usize = 4;
const DELAY: usize = 5;
const DATABASES: usize = 6;
const NAMES: [&CStr; 7] = [
    c"idempotency.ttl",
    c"idempotency.max_key_length",
    c"idempotency.upsert_cache_size",
    c"idempotency.purge_interval",
    c"idempotency.purge_batch_size",
    c"idempotency.purge_delay",
    c"idempotency.purge_databases",
];

thread_local! {
    /// Which settings another version's library defined in this backend.
    static BORROWED: [Cell<bool>; 7] = const { [const { Cell::new(false) }; 7] };
}

/// Whether a library loaded earlier defined the setting (a placeholder, made
/// by a SET before any library loaded, is taken over by defining it). Asked
/// by name, not by value: a text setting whose value is unset has none.
fn defined_elsewhere(name: &CStr) -> bool {
    // SAFETY: both functions look the name up and return NULL or 0 when it
    // is missing (missing_ok); the string is not kept.
    unsafe {
        !pg_sys::GetConfigOptionByName(name.as_ptr(), std::ptr::null_mut(), true).is_null()
            && pg_sys::GetConfigOptionFlags(name.as_ptr(), true)
                & pg_sys::GUC_CUSTOM_PLACEHOLDER as i32
                == 0
    }
}

/// The value the other library keeps: its text (an integer's without a
/// unit; "" for an unset text setting), copied here before any other
/// setting call can reuse the buffer.
fn borrowed(which: usize) -> Option<String> {
    if !BORROWED.with(|b| b[which].get()) {
        return None;
    }
    // SAFETY: the setting exists (defined by the other library), so
    // GetConfigOption returns its value: a NUL-terminated string, or NULL
    // for a text setting that is unset.
    Some(unsafe {
        let value = pg_sys::GetConfigOption(NAMES[which].as_ptr(), false, false);
        if value.is_null() {
            String::new()
        } else {
            CStr::from_ptr(value).to_string_lossy().into_owned()
        }
    })
}

fn get(which: usize, own: &GucSetting<i32>) -> i32 {
    match borrowed(which) {
        // An integer setting's value is its decimal text, without a unit.
        Some(text) => text.parse().unwrap_or_else(|_| own.get()),
        None => own.get(),
    }
}

/// How long a finished key is kept, in seconds.
pub fn ttl_seconds() -> i32 {
    get(TTL, &TTL_SECONDS)
}

/// The longest key (and scope) accepted, in characters.
pub fn max_key_length() -> i32 {
    get(MAX_KEY, &MAX_KEY_LENGTH)
}

/// The most statements kept prepared for the upsert helpers.
pub fn upsert_cache_size() -> i32 {
    get(CACHE, &UPSERT_CACHE_SIZE)
}

/// How often the purge worker runs, in seconds (0: it does not).
pub fn purge_interval() -> i32 {
    get(INTERVAL, &PURGE_INTERVAL)
}

/// The most keys one purge transaction deletes.
pub fn purge_batch_size() -> i32 {
    get(BATCH, &PURGE_BATCH_SIZE)
}

/// The pause between two purge batches, in milliseconds.
pub fn purge_delay() -> i32 {
    get(DELAY, &PURGE_DELAY)
}

/// The databases named by `idempotency.purge_databases`, or None for
/// every database.
pub fn purge_databases() -> Option<Vec<String>> {
    let text = borrowed(DATABASES).unwrap_or_else(|| {
        PURGE_DATABASES
            .get()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let names: Vec<String> = text
        .split(',')
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    (!names.is_empty()).then_some(names)
}

pub fn init() {
    // In the order of NAMES.
    let define: [fn(); 7] = [
        define_ttl,
        define_max_key_length,
        define_upsert_cache_size,
        define_purge_interval,
        define_purge_batch_size,
        define_purge_delay,
        define_purge_databases,
    ];
    for (i, name) in NAMES.iter().enumerate() {
        let elsewhere = defined_elsewhere(name);
        BORROWED.with(|b| b[i].set(elsewhere));
        if !elsewhere {
            define[i]();
        }
    }
}

fn define_ttl() {
    GucRegistry::define_int_guc(
        NAMES[TTL],
        c"How long a finished idempotency key is kept.",
        c"idem_finish and idem_fail keep a key until now() + this, unless their ttl argument says otherwise.",
        &TTL_SECONDS,
        1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
}

fn define_max_key_length() {
    GucRegistry::define_int_guc(
        NAMES[MAX_KEY],
        c"The longest idempotency key or scope accepted, in characters.",
        c"Longer keys are refused with SQLSTATE 22023; hash long natural keys with idem_fingerprint().",
        &MAX_KEY_LENGTH,
        1,
        MAX_KEY_LENGTH_LIMIT,
        GucContext::Userset,
        GucFlags::default(),
    );
}

fn define_upsert_cache_size() {
    GucRegistry::define_int_guc(
        NAMES[CACHE],
        c"The most statements a backend keeps prepared for idem_upsert and idem_insert_once.",
        c"Past this many statements, or tables described, the least recently used are freed; a table upserted with many different sets of columns needs a statement for each set.",
        &UPSERT_CACHE_SIZE,
        1,
        1_000_000,
        GucContext::Userset,
        GucFlags::default(),
    );
}

// The purge worker's settings are read by the worker, which rereads
// postgresql.conf on SIGHUP (pg_reload_conf()); they cannot be set per
// session.

fn define_purge_interval() {
    GucRegistry::define_int_guc(
        NAMES[INTERVAL],
        c"How often the idempotency purge worker deletes expired keys in every database.",
        c"0 stops it; idem_purge() still works. The worker runs only when the library is in shared_preload_libraries.",
        &PURGE_INTERVAL,
        0,
        i32::MAX / 1000,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
}

fn define_purge_batch_size() {
    GucRegistry::define_int_guc(
        NAMES[BATCH],
        c"The most expired keys one transaction of the purge worker deletes.",
        c"Each batch commits on its own, so locks and undo stay small.",
        &PURGE_BATCH_SIZE,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

fn define_purge_delay() {
    GucRegistry::define_int_guc(
        NAMES[DELAY],
        c"The pause between two batches of the idempotency purge worker.",
        c"Spreads a large purge out, leaving the disk and CPU to the jobs beside it.",
        &PURGE_DELAY,
        0,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
}

fn define_purge_databases() {
    GucRegistry::define_string_guc(
        NAMES[DATABASES],
        c"The databases the idempotency purge worker visits, separated by commas.",
        c"Empty: every database that accepts connections and is not a template. Databases without the extension are skipped.",
        &PURGE_DATABASES,
        GucContext::Sighup,
        GucFlags::default(),
    );
}
