-- idempotency 0.1.0 to 0.5.0 in one step: what idempotency--0.1.0--0.4.0.sql
-- does, with every C function on the library of 0.5.0, then
-- idem_distribute() of 0.4.0 to 0.5.0. ALTER EXTENSION UPDATE takes this
-- shortest path, so an update from 0.1.0 needs no library of a release in
-- between installed. Run with search_path set to the extension's schema;
-- every name outside it is qualified.

-- Keys belong to the role that claimed them (0.2.0): the role of a lease
-- becomes the owner of its key, by name; keys claimed in transaction mode
-- under 0.1.0 have no owner and stay open to every role until they expire.
ALTER TABLE idempotency.keys ADD COLUMN owner pg_catalog.text;
UPDATE idempotency.keys SET owner = pg_catalog.pg_get_userbyid(holder) WHERE holder IS NOT NULL;
ALTER TABLE idempotency.keys DROP COLUMN holder;

-- The response columns, last as in schema.sql; NULL in every existing row,
-- so the table is not rewritten.
ALTER TABLE idempotency.keys
    ADD COLUMN response_status pg_catalog.int4,
    ADD COLUMN response_headers pg_catalog.jsonb,
    ADD COLUMN response_body pg_catalog.bytea;

ALTER TYPE @extschema@.idem_begin_result
    ADD ATTRIBUTE response_status pg_catalog.int4,
    ADD ATTRIBUTE response_headers pg_catalog.jsonb,
    ADD ATTRIBUTE response_body pg_catalog.bytea,
    ADD ATTRIBUTE retry_after pg_catalog.interval;

-- Functions whose parameters or result columns change are dropped and
-- created again (CREATE OR REPLACE cannot add or rename parameters), keeping
-- their owner and privileges: an application keeps, and gets no more than,
-- the rights it had, whatever default privileges the role running the
-- update has. Privileges set again here would be recorded as the
-- function's initial ones (as any GRANT in an extension script is), which
-- pg_dump leaves out; they are recorded as a DBA's instead, as before, so
-- that a dump carries them.
DO $update$
DECLARE
    f record;
    g record;
    owner pg_catalog.oid;
    old_acl pg_catalog.aclitem[];
    new_acl pg_catalog.aclitem[];
    new_oid pg_catalog.oid;
BEGIN
    FOR f IN
        SELECT *
          FROM (VALUES
            ('@extschema@.idem_finish(text, jsonb, text, bigint, interval)',
             '@extschema@.idem_finish(text, jsonb, text, bigint, interval, integer, jsonb, bytea)',
             $def$
CREATE FUNCTION @extschema@.idem_finish(
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
AS '$libdir/idempotency-0.5.0', 'idem_finish'
$def$,
             'Store the result of a key this transaction (or this token) holds'),
            ('@extschema@.idem_fail(text, jsonb, text, boolean, bigint)',
             '@extschema@.idem_fail(text, jsonb, text, boolean, bigint, interval, integer, jsonb, bytea)',
             $def$
CREATE FUNCTION @extschema@.idem_fail(
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
AS '$libdir/idempotency-0.5.0', 'idem_fail'
$def$,
             'Release a held key for a retry, or store a permanent failure'),
            ('@extschema@.idem_upsert(regclass, jsonb, text[])',
             '@extschema@.idem_upsert(regclass, jsonb, text[])',
             $def$
CREATE FUNCTION @extschema@.idem_upsert(target regclass, data jsonb, conflict_columns text[] DEFAULT NULL)
RETURNS text
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS '$libdir/idempotency-0.5.0', 'idem_upsert'
$def$,
             'Insert a row, or update the row it conflicts with: inserted, updated or unchanged'),
            ('@extschema@.idem_insert_once(regclass, jsonb, text[])',
             '@extschema@.idem_insert_once(regclass, jsonb, text[])',
             $def$
CREATE FUNCTION @extschema@.idem_insert_once(target regclass, data jsonb, conflict_columns text[] DEFAULT NULL)
RETURNS boolean
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS '$libdir/idempotency-0.5.0', 'idem_insert_once'
$def$,
             'Insert a row unless a conflicting row exists; true if it inserted'),
            ('@extschema@.idem_get(text, text)',
             '@extschema@.idem_get(text, text)',
             $def$
CREATE FUNCTION @extschema@.idem_get(key text, scope text DEFAULT '')
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
AS '$libdir/idempotency-0.5.0', 'idem_get'
$def$,
             'The committed state of a key, or no row when it is unknown, expired or another role''s'))
          AS t(old, new, definition, comment)
    LOOP
        SELECT p.proowner, COALESCE(p.proacl, pg_catalog.acldefault('f', p.proowner))
          INTO owner, old_acl
          FROM pg_catalog.pg_proc AS p
         WHERE p.oid OPERATOR(pg_catalog.=) f.old::pg_catalog.regprocedure;
        EXECUTE 'DROP FUNCTION ' OPERATOR(pg_catalog.||) f.old;
        EXECUTE f.definition;
        EXECUTE pg_catalog.format('COMMENT ON FUNCTION %s IS %L', f.new, f.comment);
        EXECUTE pg_catalog.format('ALTER FUNCTION %s OWNER TO %I', f.new, pg_catalog.pg_get_userbyid(owner));
        new_oid := f.new::pg_catalog.regprocedure;
        SELECT COALESCE(p.proacl, pg_catalog.acldefault('f', p.proowner))
          INTO new_acl
          FROM pg_catalog.pg_proc AS p
         WHERE p.oid OPERATOR(pg_catalog.=) new_oid;
        CONTINUE WHEN new_acl OPERATOR(pg_catalog.=) old_acl;
        FOR g IN SELECT DISTINCT e.grantee FROM pg_catalog.aclexplode(new_acl) AS e LOOP
            EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM %s CASCADE', f.new,
                CASE WHEN g.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC'
                     ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(g.grantee)) END);
        END LOOP;
        FOR g IN SELECT * FROM pg_catalog.aclexplode(old_acl) LOOP
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %s%s', f.new,
                CASE WHEN g.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC'
                     ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(g.grantee)) END,
                CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
        END LOOP;
        DELETE FROM pg_catalog.pg_init_privs AS i
         WHERE i.classoid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
           AND i.objoid OPERATOR(pg_catalog.=) new_oid;
        -- (PostgreSQL 17 and later also record the roles of initial
        -- privileges as shared dependencies of kind 'i'.)
        DELETE FROM pg_catalog.pg_shdepend AS d
         WHERE d.dbid OPERATOR(pg_catalog.=) (SELECT db.oid FROM pg_catalog.pg_database AS db
                                               WHERE db.datname OPERATOR(pg_catalog.=) pg_catalog.current_database())
           AND d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
           AND d.objid OPERATOR(pg_catalog.=) new_oid
           AND d.deptype OPERATOR(pg_catalog.=) 'i';
    END LOOP;
END
$update$;

-- idem_get (SQL and SECURITY DEFINER in 0.1.0, C since 0.2.0: such a
-- function cannot tell who called it) was created again above; what it
-- called is gone.
DROP FUNCTION idempotency._check_key(text, text);

-- idem_purge deletes every role's expired keys: the installer's to grant.
REVOKE EXECUTE ON FUNCTION @extschema@.idem_purge(integer) FROM PUBLIC;

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
           AND p.probin OPERATOR(pg_catalog.=) '$libdir/idempotency-0.1.0'
    LOOP
        EXECUTE pg_catalog.replace(pg_catalog.pg_get_functiondef(f),
                                   '$libdir/idempotency-0.1.0',
                                   '$libdir/idempotency-0.5.0');
    END LOOP;
END
$$;

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
