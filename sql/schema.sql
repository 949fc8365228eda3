-- Keys are text compared byte by byte, and hashed as UTF-8 for their locks:
-- a database of another encoding is refused before anything is created.
DO $$
BEGIN
    IF pg_catalog.getdatabaseencoding() OPERATOR(pg_catalog.<>) 'UTF8' THEN
        RAISE EXCEPTION 'idempotency requires a database with UTF8 encoding, not %',
            pg_catalog.getdatabaseencoding()
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Create the database with ENCODING ''UTF8''.';
    END IF;
END
$$;

-- The stored keys. Applications never write here directly: the idem_*
-- functions do, without SQL or through statements run as the extension's
-- owner. PUBLIC gets no access at all, since results may hold what a request
-- returned.
CREATE SCHEMA idempotency;
COMMENT ON SCHEMA idempotency IS 'Stored idempotency keys; written only through the idem_* functions';
REVOKE ALL ON SCHEMA idempotency FROM PUBLIC;

-- One row a key. Fixed-width columns first to keep rows compact. status:
-- p = in progress, c = completed, f = failed, r = released for a retry.
-- scope and key use the "C" collation: byte order is all the index needs, and
-- it is much cheaper than a linguistic collation. Storage is set for churn:
-- keys are written, expire and are purged in batches, and autovacuum takes
-- back what a purge frees after 2 % of the rows (not 20 %) are dead, so that
-- new keys fill the freed space rather than new pages; pages are filled
-- whole (fillfactor 100), since most keys are inserted once and never
-- updated (bench/churn.py: 14 % smaller than with fillfactor 80; where
-- each purge deletes a tenth of the keys, the table grew 1.22 x over nine
-- cycles with the default thresholds and 1.02 x with these; BENCHMARKS.md). expires_at is
-- deliberately not indexed: the purge's scan is cheaper than an index
-- entry for every key. owner is the
-- name of the role that claimed the key, which alone (with the roles that
-- have its privileges) may act on it or see it: a name, so that a dump
-- restored into another cluster, where roles have other OIDs, keeps keys
-- their roles' (a regrole would refuse a row whose role is missing). The
-- response_* columns hold an HTTP response to replay byte for byte (status,
-- chosen headers, body), beside result. Columns added by a release come
-- last, in the order its update script adds them, so that a fresh install
-- and an updated one store rows alike.
CREATE TABLE idempotency.keys (
    created_at     timestamptz NOT NULL,
    finished_at    timestamptz,
    expires_at     timestamptz,
    locked_until   timestamptz,
    lease          interval,
    token          bigint,
    attempt        integer NOT NULL,
    status         "char" NOT NULL CHECK (status IN ('p', 'c', 'f', 'r')),
    scope          text COLLATE "C" NOT NULL,
    key            text COLLATE "C" NOT NULL,
    fingerprint    bytea,
    recovery_point text,
    result         jsonb,
    owner          text,
    response_status  integer,
    response_headers jsonb,
    response_body    bytea,
    PRIMARY KEY (scope, key)
) WITH (fillfactor = 100, autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 1000,
        autovacuum_analyze_scale_factor = 0.05);
COMMENT ON TABLE idempotency.keys IS 'One row per idempotency key; see idem_get() for a readable view of a key';
REVOKE ALL ON idempotency.keys FROM PUBLIC;

-- The deduplication ledger of idem_once: one row a recorded key, kept for
-- good (a key is recorded once in committed history).
CREATE TABLE idempotency.once (
    recorded_at timestamptz NOT NULL,
    scope       text COLLATE "C" NOT NULL,
    key         text COLLATE "C" NOT NULL,
    PRIMARY KEY (scope, key)
);
COMMENT ON TABLE idempotency.once IS 'Keys recorded by idem_once()';
REVOKE ALL ON idempotency.once FROM PUBLIC;

-- Fencing tokens for lease mode: one sequence, so tokens only ever grow.
CREATE SEQUENCE idempotency.tokens;
REVOKE ALL ON SEQUENCE idempotency.tokens FROM PUBLIC;

-- Keep the data (and the token sequence's position) in pg_dump output.
SELECT pg_catalog.pg_extension_config_dump('idempotency.keys', '');
SELECT pg_catalog.pg_extension_config_dump('idempotency.tokens', '');
SELECT pg_catalog.pg_extension_config_dump('idempotency.once', '');
