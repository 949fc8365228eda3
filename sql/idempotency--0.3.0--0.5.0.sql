-- idempotency 0.3.0 to 0.5.0 in one step: what idempotency--0.3.0--0.4.0.sql
-- does, with every C function on the library of 0.5.0, then
-- idem_distribute() of 0.4.0 to 0.5.0. ALTER EXTENSION UPDATE takes this
-- shortest path, so an update from 0.3.0 needs no library of a release in
-- between installed. Run with search_path set to the extension's schema;
-- every name outside it is qualified.

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

-- Every other C function now calls the library of 0.5.0: each is defined
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
                                   '$libdir/idempotency-0.5.0');
    END LOOP;
END
$$;

-- idem_distribute() for Citus (citus.sql says what it does); nothing
-- changes on a server without Citus.
CREATE FUNCTION idem_distribute(colocate_with regclass)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $distribute$
DECLARE
    method "char";
    tenant_group integer;
    tenant_column text;
    tenant_type oid;
    tenant_collation oid;
    collation_name text;
    keys_group integer;
    t regclass;
    f regprocedure;
    command text;
    failed text;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
        RAISE EXCEPTION 'idem_distribute() needs Citus, which is not installed in database %',
                        current_database()
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'On a single server there is nothing to distribute: the keys are in idempotency.keys.';
    END IF;
    IF NOT citus_is_coordinator() THEN
        RAISE EXCEPTION 'idem_distribute() runs on the coordinator'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Call it once on the coordinator: it prepares every node.';
    END IF;

    SELECT p.partmethod, p.colocationid, column_to_column_name(p.logicalrelid, p.partkey)
      INTO method, tenant_group, tenant_column
      FROM pg_dist_partition AS p
     WHERE p.logicalrelid = colocate_with;
    IF method IS DISTINCT FROM 'h' THEN
        RAISE EXCEPTION 'table % is not distributed by hash', colocate_with
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('Distribute it by its tenant column first: SELECT create_distributed_table(%L, ''tenant_id'');',
                                colocate_with::text);
    END IF;
    SELECT a.atttypid, a.attcollation INTO tenant_type, tenant_collation
      FROM pg_attribute AS a
     WHERE a.attrelid = colocate_with AND a.attname = tenant_column;
    IF tenant_type <> 'pg_catalog.text'::regtype THEN
        RAISE EXCEPTION 'the keys cannot be co-located with table %: its distribution column % is %, and a scope is text',
                        colocate_with, quote_ident(tenant_column), format_type(tenant_type, NULL)
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Citus co-locates tables whose distribution columns have one type: distribute the tenant table by a text column (its values are the scopes), or keep the keys on the coordinator (docs/citus.md).';
    END IF;
    SELECT format('%I.%I', n.nspname, c.collname) INTO collation_name
      FROM pg_collation AS c JOIN pg_namespace AS n ON n.oid = c.collnamespace
     WHERE c.oid = tenant_collation AND c.collisdeterministic;
    IF collation_name IS NULL THEN
        RAISE EXCEPTION 'the keys cannot be co-located with table %: its distribution column % has a nondeterministic collation',
                        colocate_with, quote_ident(tenant_column)
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Keys and scopes are compared byte for byte: use a deterministic collation for the tenant column.';
    END IF;

    SELECT p.colocationid INTO keys_group
      FROM pg_dist_partition AS p
     WHERE p.logicalrelid = 'idempotency.keys'::regclass;
    IF keys_group IS NOT NULL AND keys_group <> tenant_group THEN
        RAISE EXCEPTION 'the keys are already distributed, co-located with other tables than %', colocate_with
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'A cluster keeps one tenant layout for its keys: co-locate them with a table of that layout.';
    END IF;
    IF keys_group IS NULL THEN
        FOREACH t IN ARRAY ARRAY['idempotency.keys'::regclass, 'idempotency.once'::regclass] LOOP
            -- The scope takes the tenant column's collation (under a
            -- deterministic one, the same keys are equal), on every node,
            -- where the extension created the table too; then the table is
            -- distributed: its rows move to the shards, and its own heap,
            -- now a shell, is emptied.
            IF (SELECT a.attcollation FROM pg_attribute AS a
                 WHERE a.attrelid = t AND a.attname = 'scope') <> tenant_collation THEN
                command := format('ALTER TABLE %s ALTER COLUMN scope TYPE pg_catalog.text COLLATE %s',
                                  t, collation_name);
                EXECUTE command;
                SELECT string_agg(format('%s:%s: %s', r.nodename, r.nodeport, r.result), '; ')
                  INTO failed
                  FROM run_command_on_workers(command) AS r
                 WHERE NOT r.success;
                IF failed IS NOT NULL THEN
                    RAISE EXCEPTION 'could not change the collation of %.scope on every node: %', t, failed
                        USING ERRCODE = 'object_not_in_prerequisite_state',
                              HINT = 'Create the extension on every node (CREATE EXTENSION idempotency on the coordinator propagates it), then call idem_distribute() again.';
                END IF;
            END IF;
            PERFORM create_distributed_table(t, 'scope', colocate_with => colocate_with::text);
            PERFORM truncate_local_data_after_distributing_table(t);
        END LOOP;
        -- A node added later gets the extension as installed, with scope
        -- in "C": Citus then refuses to place the keys there.
        IF tenant_collation <> 'pg_catalog."C"'::regcollation THEN
            RAISE NOTICE 'the scope columns now have the collation %, on every node', collation_name
                USING HINT = format('Before adding a node to the cluster, run on it: CREATE EXTENSION idempotency; '
                                    'ALTER TABLE idempotency.keys ALTER COLUMN scope TYPE text COLLATE %1$s; '
                                    'ALTER TABLE idempotency.once ALTER COLUMN scope TYPE text COLLATE %1$s;',
                                    collation_name);
        END IF;
    END IF;

    -- Every function that takes a scope runs on the node of its shard.
    FOR f IN
        SELECT p.oid::regprocedure
          FROM pg_proc AS p
          JOIN pg_depend AS d
            ON d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
          JOIN pg_extension AS e ON e.oid = d.refobjid
         WHERE e.extname = 'idempotency'
           AND p.proname IN ('idem_begin', 'idem_finish', 'idem_fail', 'idem_checkpoint',
                             'idem_once', 'idem_get')
         ORDER BY p.proname
    LOOP
        PERFORM create_distributed_function(f, 'scope', colocate_with => 'idempotency.keys',
                                            force_delegation => true);
    END LOOP;
END
$distribute$;
COMMENT ON FUNCTION idem_distribute IS 'On Citus: distribute the keys by scope, co-located with a tenant table, and delegate the functions to the scope''s node';
REVOKE EXECUTE ON FUNCTION idem_distribute FROM PUBLIC;
