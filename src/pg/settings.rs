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

/// The largest value `idempotency.max_key_length` takes: with four bytes a
/// character, scope and key together still fit a btree index entry.
pub const MAX_KEY_LENGTH_LIMIT: i32 = 320;

const TTL: usize = 0;
const MAX_KEY: usize = 1;
const CACHE: usize = 2;
const NAMES: [&CStr; 3] = [
    c"idempotency.ttl",
    c"idempotency.max_key_length",
    c"idempotency.upsert_cache_size",
];

thread_local! {
    /// Which settings another version's library defined in this backend.
    static BORROWED: [Cell<bool>; 3] = const { [const { Cell::new(false) }; 3] };
}

/// Whether a library loaded earlier defined the setting (a placeholder, made
/// by a SET before any library loaded, is taken over by defining it).
fn defined_elsewhere(name: &CStr) -> bool {
    // SAFETY: both functions look the name up and return NULL or 0 when it
    // is missing (missing_ok); the string is not kept.
    unsafe {
        !pg_sys::GetConfigOption(name.as_ptr(), true, false).is_null()
            && pg_sys::GetConfigOptionFlags(name.as_ptr(), true)
                & pg_sys::GUC_CUSTOM_PLACEHOLDER as i32
                == 0
    }
}

fn get(which: usize, own: &GucSetting<i32>) -> i32 {
    if !BORROWED.with(|b| b[which].get()) {
        return own.get();
    }
    // SAFETY: the setting exists (defined by the other library); an integer
    // setting's value is its decimal text, copied here before any other
    // setting call can reuse the buffer.
    let text = unsafe {
        CStr::from_ptr(pg_sys::GetConfigOption(NAMES[which].as_ptr(), false, false))
            .to_string_lossy()
            .into_owned()
    };
    text.parse().unwrap_or_else(|_| own.get())
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

pub fn init() {
    // In the order of NAMES.
    let define: [fn(); 3] = [define_ttl, define_max_key_length, define_upsert_cache_size];
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
