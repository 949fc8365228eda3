-- The public SQL surface. Each C function is implemented in src/ (see
-- CONTRIBUTING.md). The library's file name carries the version
-- ($libdir/idempotency-<version>, a unit test keeps it equal to Cargo.toml's
-- version): SQL of one release never calls into the library of another, and
-- during an upgrade old and new libraries can be installed side by side.
-- Callers need no rights on the idempotency schema: the C functions read and
-- insert rows without SQL and run their prepared statements as the key
-- table's owner (src/ledger/statements.rs); idem_purge is SECURITY
-- DEFINER. Every statement qualifies its operators, so a caller's
-- search_path cannot change their meaning.
--
-- Privileges: a key belongs to the role that claimed it (src/keys/owner.rs);
-- every function but idem_purge is executable by PUBLIC, as functions are by
-- default, and acts only on the caller's own keys. idem_purge deletes every
-- role's expired keys, so only the installer may run it until it grants it.

-- idem_begin's row is a named type rather than OUT parameters: the executor
-- then takes its shape from the type cache instead of rebuilding it from
-- the function's catalog entry on every call. The response_* columns replay
-- a stored HTTP response; retry_after tells an in_progress caller when a
-- lease ends. Columns added by a release come last (ALTER TYPE ... ADD
-- ATTRIBUTE in its update script).
CREATE TYPE idem_begin_result AS (
    status text,
    result jsonb,
    attempt integer,
    recovery_point text,
    token bigint,
    response_status integer,
    response_headers jsonb,
    response_body bytea,
    retry_after interval);

CREATE FUNCTION idem_begin(
    key text,
    request jsonb DEFAULT NULL,
    scope text DEFAULT '',
    lease interval DEFAULT NULL,
    wait interval DEFAULT '0')
RETURNS idem_begin_result
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS '$libdir/idempotency-0.5.0', 'idem_begin';
COMMENT ON FUNCTION idem_begin IS 'Claim an idempotency key: started, completed, failed, in_progress or mismatch';

CREATE FUNCTION idem_finish(
    key text,
    result jsonb DEFAULT NULL,
    scope text DEFAULT '',
    token bigint DEFAULT NULL,
    ttl interval DEFAULT NULL,
    response_status integer DEFAULT NULL,
    response_headers jsonb DEFAULT NULL,
    response_body bytea DEFAULT NULL)
RETURNS void
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS '$libdir/idempotency-0.5.0', 'idem_finish';
COMMENT ON FUNCTION idem_finish IS 'Store the result of a key this transaction (or this token) holds';

CREATE FUNCTION idem_fail(
    key text,
    error jsonb DEFAULT NULL,
    scope text DEFAULT '',
    retryable boolean DEFAULT true,
    token bigint DEFAULT NULL,
    ttl interval DEFAULT NULL,
    response_status integer DEFAULT NULL,
    response_headers jsonb DEFAULT NULL,
    response_body bytea DEFAULT NULL)
RETURNS void
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS '$libdir/idempotency-0.5.0', 'idem_fail';
COMMENT ON FUNCTION idem_fail IS 'Release a held key for a retry, or store a permanent failure';

CREATE FUNCTION idem_checkpoint(
    key text,
    recovery_point text,
    scope text DEFAULT '',
    token bigint DEFAULT NULL)
RETURNS void
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS '$libdir/idempotency-0.5.0', 'idem_checkpoint';
COMMENT ON FUNCTION idem_checkpoint IS 'Record a recovery point for a held key and renew its lease';

CREATE FUNCTION idem_once(key text, scope text DEFAULT '')
RETURNS boolean
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS '$libdir/idempotency-0.5.0', 'idem_once';
COMMENT ON FUNCTION idem_once IS 'Record a key in the deduplication ledger: true the first time, false after';

-- The upsert helpers run with the caller's privileges (SECURITY INVOKER):
-- GRANTs and row-level security on the target apply as to any statement.
CREATE FUNCTION idem_upsert(target regclass, data jsonb, conflict_columns text[] DEFAULT NULL)
RETURNS text
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS '$libdir/idempotency-0.5.0', 'idem_upsert';
COMMENT ON FUNCTION idem_upsert IS 'Insert a row, or update the row it conflicts with: inserted, updated or unchanged';

CREATE FUNCTION idem_insert_once(target regclass, data jsonb, conflict_columns text[] DEFAULT NULL)
RETURNS boolean
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS '$libdir/idempotency-0.5.0', 'idem_insert_once';
COMMENT ON FUNCTION idem_insert_once IS 'Insert a row unless a conflicting row exists; true if it inserted';

CREATE FUNCTION idem_canonical(value jsonb)
RETURNS text
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE
AS '$libdir/idempotency-0.5.0', 'idem_canonical';
COMMENT ON FUNCTION idem_canonical IS 'The RFC 8785 canonical JSON text of a value';

CREATE FUNCTION idem_fingerprint(value jsonb)
RETURNS text
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE
AS '$libdir/idempotency-0.5.0', 'idem_fingerprint';
COMMENT ON FUNCTION idem_fingerprint IS 'Lowercase hex SHA-256 of idem_canonical(value)';

-- Read-only, so it works on a hot standby. Shows the committed state (and
-- this transaction's own changes); a key that is unknown, expired, or
-- belongs to a role whose privileges the caller lacks is no row. VOLATILE:
-- it reads the clock, as the other functions do, to tell a key expired.
CREATE FUNCTION idem_get(key text, scope text DEFAULT '')
RETURNS TABLE (
    status text,
    result jsonb,
    attempt integer,
    recovery_point text,
    fingerprint text,
    created_at timestamptz,
    finished_at timestamptz,
    expires_at timestamptz,
    locked_until timestamptz,
    response_status integer,
    response_headers jsonb,
    response_body bytea)
LANGUAGE c VOLATILE PARALLEL SAFE ROWS 1
AS '$libdir/idempotency-0.5.0', 'idem_get';
COMMENT ON FUNCTION idem_get IS 'The committed state of a key, or no row when it is unknown, expired or another role''s';

-- Deletes up to batch_size expired keys (NULL: all of them) and returns how
-- many. Rows another transaction has locked are skipped, never waited for,
-- so a purge does not block idem_begin or idem_finish. The purge worker
-- (when the library is preloaded) runs the same batches; without it, run
-- this from cron or pg_cron. An expired key is unknown to every function
-- even before it is purged.
CREATE FUNCTION idem_purge(batch_size integer DEFAULT 10000)
RETURNS bigint
LANGUAGE c VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS '$libdir/idempotency-0.5.0', 'idem_purge';
COMMENT ON FUNCTION idem_purge IS 'Delete up to batch_size expired keys; returns how many';
REVOKE EXECUTE ON FUNCTION idem_purge FROM PUBLIC;

-- Cluster-wide counters, kept in shared memory when the library is in
-- shared_preload_libraries (an error otherwise, with what to add). A call
-- counts when it returns, whether or not its transaction commits.
-- wait_time is in milliseconds.
CREATE FUNCTION idem_stats(
    OUT begin_started bigint,
    OUT begin_completed bigint,
    OUT begin_failed bigint,
    OUT begin_in_progress bigint,
    OUT begin_mismatch bigint,
    OUT waits bigint,
    OUT wait_time double precision,
    OUT lease_takeovers bigint,
    OUT stale_tokens bigint,
    OUT finishes bigint,
    OUT fails_retryable bigint,
    OUT fails_final bigint,
    OUT once_true bigint,
    OUT once_false bigint,
    OUT upsert_inserted bigint,
    OUT upsert_updated bigint,
    OUT upsert_unchanged bigint,
    OUT upsert_skipped bigint,
    OUT insert_once_true bigint,
    OUT insert_once_false bigint,
    OUT keys_purged bigint,
    OUT stats_reset timestamptz)
RETURNS SETOF record
LANGUAGE c VOLATILE PARALLEL SAFE ROWS 1
AS '$libdir/idempotency-0.5.0', 'idem_stats';
COMMENT ON FUNCTION idem_stats IS 'What the idem_* functions answered since the last reset, cluster-wide';

CREATE FUNCTION idem_stats_reset()
RETURNS void
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS '$libdir/idempotency-0.5.0', 'idem_stats_reset';
COMMENT ON FUNCTION idem_stats_reset IS 'Zero the counters of idem_stats()';
REVOKE EXECUTE ON FUNCTION idem_stats_reset FROM PUBLIC;

-- The keys in progress that have a row, with the process of the open
-- transaction writing the claim (NULL for a lease, held by no process).
-- One pass over the whole key table. Rows of roles whose privileges the
-- caller lacks are left out, unless it is a member of pg_read_all_stats.
CREATE FUNCTION idem_held_keys(
    OUT scope text,
    OUT key text,
    OUT owner text,
    OUT pid integer,
    OUT token bigint,
    OUT locked_until timestamptz,
    OUT attempt integer,
    OUT created_at timestamptz)
RETURNS SETOF record
LANGUAGE c VOLATILE PARALLEL RESTRICTED
AS '$libdir/idempotency-0.5.0', 'idem_held_keys';
COMMENT ON FUNCTION idem_held_keys IS 'Keys in progress that have a row, for the idem_held view';

-- What is held now, for an operator chasing a stuck job. mode:
--   transaction  a claim row written by an open transaction (pid), or left
--                in progress by one that committed without finishing
--                (pid NULL: the next idem_begin takes it over);
--   lease        a claim that outlives transactions (token, locked_until);
--   lock         keys claimed in transaction mode by the key lock alone:
--                they have no row until they are finished, so each backend
--                shows one line with how many it holds (keys), key NULL.
-- since: the holder's transaction start, or for a lease when the key was
-- first claimed.
CREATE VIEW idem_held AS
SELECT h.scope, h.key, h.owner,
       CASE WHEN h.token IS NULL THEN 'transaction' ELSE 'lease' END AS mode,
       h.pid, h.token, h.attempt, 1::bigint AS keys,
       CASE WHEN h.token IS NULL AND h.pid IS NOT NULL THEN a.xact_start ELSE h.created_at END AS since,
       h.locked_until, a.state, a.application_name, a.query
  FROM @extschema@.idem_held_keys() h
  LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) h.pid
UNION ALL
SELECT NULL, NULL, a.usename::text, 'lock', l.pid, NULL, NULL, pg_catalog.count(*),
       a.xact_start, NULL, a.state, a.application_name, a.query
  FROM pg_catalog.pg_locks l
  JOIN pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) l.pid
 WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory'
   AND l.objsubid OPERATOR(pg_catalog.=) 7648
   AND l.granted
   AND l.database OPERATOR(pg_catalog.=) (SELECT oid FROM pg_catalog.pg_database
                                           WHERE datname OPERATOR(pg_catalog.=) pg_catalog.current_database())
 GROUP BY l.pid, a.usename, a.xact_start, a.state, a.application_name, a.query;
COMMENT ON VIEW idem_held IS 'Keys in progress now: claim rows and leases by key, keys held by lock alone counted per backend';
GRANT SELECT ON idem_held TO PUBLIC;
