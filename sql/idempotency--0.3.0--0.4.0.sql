-- idempotency 0.3.0 to 0.4.0: idem_purge in C (counted, and run on a
-- schedule by the purge worker when the library is preloaded);
-- idem_stats() and idem_stats_reset(); the idem_held view.
-- Run by ALTER EXTENSION idempotency UPDATE, with search_path set to the
-- extension's schema; every name outside it is qualified.

-- Storage for churn (schema.sql says why): pages filled whole, autovacuum
-- after 2 % of the rows are dead. Takes effect for pages written from now
-- on; the table is not rewritten.
ALTER TABLE idempotency.keys SET (fillfactor = 100, autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000, autovacuum_analyze_scale_factor = 0.05);

-- idem_purge keeps its signature, owner and privileges: replaced in place
-- (from PL/pgSQL to C, same statement).
CREATE OR REPLACE FUNCTION idem_purge(batch_size integer DEFAULT 10000)
RETURNS bigint
LANGUAGE c VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS '$libdir/idempotency-0.4.0', 'idem_purge';
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
AS '$libdir/idempotency-0.4.0', 'idem_stats';
COMMENT ON FUNCTION idem_stats IS 'What the idem_* functions answered since the last reset, cluster-wide';

CREATE FUNCTION idem_stats_reset()
RETURNS void
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS '$libdir/idempotency-0.4.0', 'idem_stats_reset';
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
AS '$libdir/idempotency-0.4.0', 'idem_held_keys';
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

-- Every other C function now calls the library of 0.4.0: each is defined
-- again from its own definition, with only the library's file name changed.
DO $$
DECLARE
    f pg_catalog.oid;
BEGIN
    FOR f IN
        SELECT p.oid
          FROM pg_catalog.pg_proc AS p
          JOIN pg_catalog.pg_depend AS d
            ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
           AND d.objid OPERATOR(pg_catalog.=) p.oid
           AND d.deptype OPERATOR(pg_catalog.=) 'e'
          JOIN pg_catalog.pg_extension AS e
            ON e.oid OPERATOR(pg_catalog.=) d.refobjid
         WHERE e.extname OPERATOR(pg_catalog.=) 'idempotency'
           AND p.probin OPERATOR(pg_catalog.=) '$libdir/idempotency-0.3.0'
    LOOP
        EXECUTE pg_catalog.replace(pg_catalog.pg_get_functiondef(f),
                                   '$libdir/idempotency-0.3.0',
                                   '$libdir/idempotency-0.4.0');
    END LOOP;
END
$$;
