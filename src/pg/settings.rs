//! The `idempotency.*` settings. They can be set per session, per role, per
//! database or in postgresql.conf, like any user setting.
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};

/// How long a finished key is kept, in seconds (shown with units: `1d`).
pub static TTL_SECONDS: GucSetting<i32> = GucSetting::<i32>::new(24 * 60 * 60);

/// The longest key (and scope) accepted, in characters.
pub static MAX_KEY_LENGTH: GucSetting<i32> = GucSetting::<i32>::new(255);

/// The most statements a backend keeps prepared for `idem_upsert` and
/// `idem_insert_once` (and the most tables it keeps described).
pub static UPSERT_CACHE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// The largest value `idempotency.max_key_length` takes: with four bytes a
/// character, scope and key together still fit a btree index entry.
pub const MAX_KEY_LENGTH_LIMIT: i32 = 320;

pub fn init() {
    GucRegistry::define_int_guc(
        c"idempotency.ttl",
        c"How long a finished idempotency key is kept.",
        c"idem_finish and idem_fail keep a key until now() + this, unless their ttl argument says otherwise.",
        &TTL_SECONDS,
        1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"idempotency.max_key_length",
        c"The longest idempotency key or scope accepted, in characters.",
        c"Longer keys are refused with SQLSTATE 22023; hash long natural keys with idem_fingerprint().",
        &MAX_KEY_LENGTH,
        1,
        MAX_KEY_LENGTH_LIMIT,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"idempotency.upsert_cache_size",
        c"The most statements a backend keeps prepared for idem_upsert and idem_insert_once.",
        c"Past this many statements, or tables described, the least recently used are freed; a table upserted with many different sets of columns needs a statement for each set.",
        &UPSERT_CACHE_SIZE,
        1,
        1_000_000,
        GucContext::Userset,
        GucFlags::default(),
    );
}
