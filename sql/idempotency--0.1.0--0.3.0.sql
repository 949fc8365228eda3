-- idempotency 0.1.0 to 0.3.0 in one step: what idempotency--0.1.0--0.2.0.sql
-- and idempotency--0.2.0--0.3.0.sql do, with every C function on the
-- library of 0.3.0. ALTER EXTENSION UPDATE takes this shortest path, so an
-- update from 0.1.0 needs no library of 0.2.0 installed (the two steps would:
-- the first one's functions name it). Run with search_path set to the
-- extension's schema; every name outside it is qualified.

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
           AND p.probin OPERATOR(pg_catalog.=) '$libdir/idempotency-0.1.0'
    LOOP
        EXECUTE pg_catalog.replace(pg_catalog.pg_get_functiondef(f),
                                   '$libdir/idempotency-0.1.0',
                                   '$libdir/idempotency-0.3.0');
    END LOOP;
END
$$;
