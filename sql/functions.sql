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
AS '$libdir/idempotency-0.3.0', 'idem_begin';
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
AS '$libdir/idempotency-0.3.0', 'idem_finish';
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
AS '$libdir/idempotency-0.3.0', 'idem_fail';
COMMENT ON FUNCTION idem_fail IS 'Release a held key for a retry, or store a permanent failure';

CREATE FUNCTION idem_checkpoint(
    key text,
    recovery_point text,
    scope text DEFAULT '',
    token bigint DEFAULT NULL)
RETURNS void
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS '$libdir/idempotency-0.3.0', 'idem_checkpoint';
COMMENT ON FUNCTION idem_checkpoint IS 'Record a recovery point for a held key and renew its lease';

CREATE FUNCTION idem_once(key text, scope text DEFAULT '')
RETURNS boolean
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS '$libdir/idempotency-0.3.0', 'idem_once';
COMMENT ON FUNCTION idem_once IS 'Record a key in the deduplication ledger: true the first time, false after';

-- The upsert helpers run with the caller's privileges (SECURITY INVOKER):
-- GRANTs and row-level security on the target apply as to any statement.
CREATE FUNCTION idem_upsert(target regclass, data jsonb, conflict_columns text[] DEFAULT NULL)
RETURNS text
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS '$libdir/idempotency-0.3.0', 'idem_upsert';
COMMENT ON FUNCTION idem_upsert IS 'Insert a row, or update the row it conflicts with: inserted, updated or unchanged';

CREATE FUNCTION idem_insert_once(target regclass, data jsonb, conflict_columns text[] DEFAULT NULL)
RETURNS boolean
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS '$libdir/idempotency-0.3.0', 'idem_insert_once';
COMMENT ON FUNCTION idem_insert_once IS 'Insert a row unless a conflicting row exists; true if it inserted';

CREATE FUNCTION idem_canonical(value jsonb)
RETURNS text
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE
AS '$libdir/idempotency-0.3.0', 'idem_canonical';
COMMENT ON FUNCTION idem_canonical IS 'The RFC 8785 canonical JSON text of a value';

CREATE FUNCTION idem_fingerprint(value jsonb)
RETURNS text
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE
AS '$libdir/idempotency-0.3.0', 'idem_fingerprint';
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
AS '$libdir/idempotency-0.3.0', 'idem_get';
COMMENT ON FUNCTION idem_get IS 'The committed state of a key, or no row when it is unknown, expired or another role''s';

-- Deletes up to batch_size expired keys (NULL: all of them) and returns how
-- many. Rows another transaction has locked are skipped, never waited for,
-- so a purge does not block idem_begin or idem_finish. Run it from cron or
-- pg_cron; an expired key is unknown to every function even before.
CREATE FUNCTION idem_purge(batch_size integer DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    IF batch_size < 0 THEN
        RAISE EXCEPTION 'batch_size must not be negative'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass how many expired keys to delete at most, or NULL for all of them.';
    END IF;
    WITH gone AS (
        DELETE FROM idempotency.keys
         WHERE ctid = ANY (ARRAY(
                   SELECT ctid FROM idempotency.keys
                    WHERE expires_at < clock_timestamp()
                    LIMIT batch_size
                      FOR UPDATE SKIP LOCKED))
        RETURNING 1)
    SELECT count(*) INTO n FROM gone;
    RETURN n;
END
$$;
COMMENT ON FUNCTION idem_purge IS 'Delete up to batch_size expired keys; returns how many';
REVOKE EXECUTE ON FUNCTION idem_purge FROM PUBLIC;
