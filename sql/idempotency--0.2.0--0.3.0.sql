-- idempotency 0.2.0 to 0.3.0: stored HTTP responses, replayed byte for byte;
-- retry_after for in_progress answers; a per-call ttl for idem_fail; the
-- upsert helpers' "row" parameter renamed data (row is a reserved word).
-- Run by ALTER EXTENSION idempotency UPDATE, with search_path set to the
-- extension's schema; every name outside it is qualified.

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
-- created again (CREATE OR REPLACE cannot add or rename parameters). The
-- privileges a DBA gave or took on the old one are given to the new one, so
-- that an application keeps, and gets no more than, the rights it had.
DO $update$
DECLARE
    f record;
    acl pg_catalog.aclitem[];
    g record;
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
AS '$libdir/idempotency-0.3.0', 'idem_finish'
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
AS '$libdir/idempotency-0.3.0', 'idem_fail'
$def$,
             'Release a held key for a retry, or store a permanent failure'),
            ('@extschema@.idem_upsert(regclass, jsonb, text[])',
             '@extschema@.idem_upsert(regclass, jsonb, text[])',
             $def$
CREATE FUNCTION @extschema@.idem_upsert(target regclass, data jsonb, conflict_columns text[] DEFAULT NULL)
RETURNS text
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS '$libdir/idempotency-0.3.0', 'idem_upsert'
$def$,
             'Insert a row, or update the row it conflicts with: inserted, updated or unchanged'),
            ('@extschema@.idem_insert_once(regclass, jsonb, text[])',
             '@extschema@.idem_insert_once(regclass, jsonb, text[])',
             $def$
CREATE FUNCTION @extschema@.idem_insert_once(target regclass, data jsonb, conflict_columns text[] DEFAULT NULL)
RETURNS boolean
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS '$libdir/idempotency-0.3.0', 'idem_insert_once'
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
AS '$libdir/idempotency-0.3.0', 'idem_get'
$def$,
             'The committed state of a key, or no row when it is unknown, expired or another role''s'))
          AS t(old, new, definition, comment)
    LOOP
        SELECT p.proacl INTO acl FROM pg_catalog.pg_proc AS p
         WHERE p.oid OPERATOR(pg_catalog.=) f.old::pg_catalog.regprocedure;
        EXECUTE 'DROP FUNCTION ' OPERATOR(pg_catalog.||) f.old;
        EXECUTE f.definition;
        EXECUTE pg_catalog.format('COMMENT ON FUNCTION %s IS %L', f.new, f.comment);
        -- NULL is the default (EXECUTE for PUBLIC), which the new one has.
        IF acl IS NOT NULL THEN
            EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f.new);
            FOR g IN SELECT * FROM pg_catalog.aclexplode(acl) LOOP
                EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %s%s', f.new,
                    CASE WHEN g.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC'
                         ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(g.grantee)) END,
                    CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
            END LOOP;
        END IF;
    END LOOP;
END
$update$;

-- Every other C function now calls the library of 0.3.0: each is defined
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
           AND p.probin OPERATOR(pg_catalog.=) '$libdir/idempotency-0.2.0'
    LOOP
        EXECUTE pg_catalog.replace(pg_catalog.pg_get_functiondef(f),
                                   '$libdir/idempotency-0.2.0',
                                   '$libdir/idempotency-0.3.0');
    END LOOP;
END
$$;
