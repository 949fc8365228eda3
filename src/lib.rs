//! `idempotency`: safe retries for PostgreSQL.
//!
//! The public surface is the `idem_*` functions declared in `sql/functions.sql`;
//! this crate implements them, one folder for each section of the README:
//!
//! - `keys/`: the key ledger (`idem_begin`, `idem_finish`, `idem_fail`,
//!   `idem_checkpoint`) and the keys a transaction holds.
//! - `once/`: the deduplication ledger (`idem_once`).
//! - `ledger/`: what both ledgers share: key arguments, their tables, the
//!   dirty-snapshot lookup, the per-key lock, inserts and bounded waits.
//! - `upsert/`: `idem_upsert` and `idem_insert_once` on the caller's tables.
//! - `retention/`: expired keys deleted, by `idem_purge` and the purge
//!   background worker.
//! - `observability/`: `idem_stats()` counters in shared memory and the
//!   keys held now.
//! - `citus/`: on a Citus cluster, the shard of the key tables that holds
//!   a scope's rows (`idem_distribute()` in `sql/citus.sql`).
//! - `canonical/`: RFC 8785 canonical JSON and SHA-256 fingerprints.
//! - `pg/`: glue to PostgreSQL: function calls, errors, settings.
use pgrx::prelude::*;

mod canonical;
mod citus;
mod keys;
mod ledger;
mod observability;
mod once;
mod pg;
mod retention;
mod upsert;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/citus.sql", name = "citus");
extension_sql_file!("../sql/functions.sql", name = "functions", finalize);

#[allow(non_snake_case)]
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    pg::errors::no_backtraces();
    pg::settings::init();
    pg::inval::init();
    keys::held::init();
    keys::owner::init();
    ledger::tables::init();
    upsert::init();
    // Only while shared_preload_libraries is processed: shared memory for
    // the counters, and the purge worker.
    observability::stats::init();
    retention::worker::init();
}

/// Unit tests inside Postgres (`cargo pgrx test`). Each runs in its own
/// transaction, rolled back at the end; what needs COMMIT, savepoints seen
/// from a client or a second session is tested by pg_regress and the
/// isolation specs in `tests/`.
#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn one<T: pgrx::FromDatum + pgrx::IntoDatum>(sql: &str) -> T {
        Spi::get_one::<T>(sql)
            .expect("query runs")
            .expect("not NULL")
    }

    #[pg_test]
    fn begin_claims_then_replays_the_stored_result() {
        assert_eq!(
            one::<String>("SELECT status FROM idem_begin('t:1', '{\"a\": 1}')"),
            "started"
        );
        assert_eq!(
            one::<i32>("SELECT attempt FROM idem_begin('t:1', '{\"a\": 1}')"),
            1
        );
        Spi::run("SELECT idem_finish('t:1', '{\"id\": 7}')").unwrap();
        assert_eq!(
            one::<String>("SELECT status FROM idem_begin('t:1')"),
            "completed"
        );
        assert_eq!(
            one::<String>("SELECT result::text FROM idem_begin('t:1')"),
            "{\"id\": 7}"
        );
        assert_eq!(
            one::<String>("SELECT status FROM idem_begin('t:1', '{\"a\": 2}')"),
            "mismatch"
        );
        assert_eq!(
            one::<String>("SELECT status FROM idem_get('t:1')"),
            "completed"
        );
    }

    #[pg_test]
    fn a_table_of_begin_answers() {
        // (statement before, key, request, expected status)
        let cases: &[(&str, &str, &str, &str)] = &[
            ("", "fresh", "NULL", "started"),
            ("SELECT idem_fail('r', '\"e\"')", "r", "NULL", "started"),
            (
                "SELECT idem_fail('p', '\"e\"', retryable => false)",
                "p",
                "NULL",
                "failed",
            ),
            ("SELECT idem_finish('c', '1')", "c", "'{}'", "completed"),
            ("SELECT idem_finish('m', '1')", "m", "'[1]'", "mismatch"),
        ];
        for (before, key, request, want) in cases {
            Spi::run(&format!("SELECT idem_begin('{key}', request => '{{}}')")).unwrap();
            if !before.is_empty() {
                Spi::run(before).unwrap();
            }
            let got = one::<String>(&format!(
                "SELECT status FROM idem_begin('{key}', request => {request}::jsonb)"
            ));
            assert_eq!(&got, want, "key {key}");
        }
    }

    #[pg_test]
    fn retry_after_release_counts_attempts() {
        Spi::run("SELECT idem_begin('t:2')").unwrap();
        Spi::run("SELECT idem_fail('t:2')").unwrap();
        assert_eq!(one::<i32>("SELECT attempt FROM idem_begin('t:2')"), 2);
        Spi::run("SELECT idem_fail('t:2')").unwrap();
        assert_eq!(one::<i32>("SELECT attempt FROM idem_begin('t:2')"), 3);
    }

    #[pg_test(error = "idempotency key \"nope\" is not held by this transaction")]
    fn finish_without_begin_is_refused() {
        Spi::run("SELECT idem_finish('nope')").unwrap();
    }

    #[pg_test(error = "idempotency key must not be NULL")]
    fn null_key_is_refused() {
        Spi::run("SELECT idem_begin(NULL)").unwrap();
    }

    /// Microseconds since 2000-01-01 UTC, PostgreSQL's timestamptz.
    fn timestamptz(text: &str) -> i64 {
        one::<i64>(&format!(
            "SELECT ((extract(epoch FROM '{text}'::timestamptz) - 946684800) * 1000000)::bigint"
        ))
    }

    #[pg_test]
    fn positive_means_later_by_the_calendar() {
        Spi::run("SET LOCAL TimeZone = 'UTC'").unwrap();
        let month_less_29_days = pgrx::pg_sys::Interval {
            time: 0,
            day: -29,
            month: 1,
        };
        // January 31 + 1 month is February 28; 29 days back is January 30.
        let jan31 = timestamptz("2026-01-31 12:00");
        assert!(!crate::pg::fmgr::ends_after(jan31, &month_less_29_days));
        // March 1 + 1 month is April 1; 29 days back is March 3.
        let mar1 = timestamptz("2026-03-01 12:00");
        assert!(crate::pg::fmgr::ends_after(mar1, &month_less_29_days));
        assert_eq!(
            crate::pg::fmgr::timestamptz_plus(jan31, &month_less_29_days),
            timestamptz("2026-01-30 12:00")
        );
    }

    /// Numbers read from jsonb's stored numerics give the same canonical
    /// text as numbers read from their printed text.
    #[pg_test]
    fn numerics_read_from_storage_match_their_text() {
        let rows = Spi::connect(|client| {
            client
                .select(
                    "SELECT n::text, idem_canonical(to_jsonb(n)) FROM (
                       SELECT round((random() - 0.5)::numeric * 10::numeric ^ (g % 40 - 20), g % 25) AS n
                         FROM generate_series(1, 20000) g
                       UNION ALL SELECT unnest(ARRAY[0, -0.0, 1, -1, 10000, 9999.9999, 0.0001, 100000000,
                              1e-30, 1e30, 123456789012345678901234567890.123456789, -0.000000001,
                              9007199254740993, 9007199254740992, 1e400, 1e-400]::numeric[])) t",
                    None,
                    &[],
                )
                .unwrap()
                .map(|r| {
                    (
                        r.get::<String>(1).unwrap().unwrap(),
                        r.get::<String>(2).unwrap().unwrap(),
                    )
                })
                .collect::<Vec<_>>()
        });
        assert!(rows.len() > 20000);
        for (text, canonical) in rows {
            let mut want = String::new();
            crate::canonical::number::canonical(&text, &mut want);
            assert_eq!(canonical, want, "{text}");
        }
    }

    #[pg_test]
    fn key_lock_hash_is_hashtextextended() {
        for (scope, key) in [
            ("", "a"),
            ("", ""),
            ("shop", "order-42"),
            ("Ä", "ключ-€"),
            ("tenant:9", &"x".repeat(300)),
        ] {
            let sql = format!("SELECT hashtextextended('{key}', hashtextextended('{scope}', 0))");
            assert_eq!(
                crate::ledger::lock::key_hash(scope, key) as i64,
                one::<i64>(&sql),
                "scope {scope:?} key {key:?}"
            );
        }
    }

    #[pg_test]
    fn fingerprint_is_sha256_of_canonical_text() {
        let cases: &[(&str, &str)] = &[
            ("{}", "{}"),
            (
                "{\"b\": 1, \"a\": [1.50, null]}",
                "{\"a\":[1.5,null],\"b\":1}",
            ),
            ("1e30", "1e+30"),
            ("\"\\u001f\"", "\"\\u001f\""),
        ];
        for (input, canonical) in cases {
            assert_eq!(
                &one::<String>(&format!("SELECT idem_canonical('{input}')")),
                canonical
            );
            let same = one::<bool>(&format!(
                "SELECT idem_fingerprint('{input}') = encode(sha256(convert_to('{}', 'UTF8')), 'hex')",
                canonical.replace('\'', "''")
            ));
            assert!(same, "fingerprint of {input}");
        }
    }
}

/// Checks that need no server.
#[cfg(test)]
mod unit {
    /// Every C function of `sql/functions.sql` names the library file of
    /// this very version, which `cargo pgrx install` builds as
    /// `idempotency-<version>.so` (the control file has no
    /// module_pathname).
    #[test]
    fn sql_calls_the_library_of_its_own_version() {
        let sql = include_str!("../sql/functions.sql");
        let want = format!("AS '$libdir/idempotency-{}',", env!("CARGO_PKG_VERSION"));
        let declared = sql
            .lines()
            .filter(|l| l.contains("$libdir"))
            .collect::<Vec<_>>();
        let c_functions = sql.matches("LANGUAGE c").count();
        assert!(c_functions > 0);
        let as_lines = declared.iter().filter(|l| l.starts_with("AS ")).count();
        assert_eq!(as_lines, c_functions, "one AS line per C function");
        for line in declared.iter().filter(|l| l.starts_with("AS ")) {
            assert!(line.starts_with(&want), "{line} does not name {want}");
        }
        let control = include_str!("../idempotency.control");
        assert!(!control.contains("module_pathname"));
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
