-- idempotency 0.1.0 to 0.2.0: keys belong to the role that claimed them.
-- Run by ALTER EXTENSION idempotency UPDATE, with search_path set to the
-- extension's schema; every name outside it is qualified.

-- The role of a lease becomes the owner of every key, by name, in a column
-- of its own at the end (see schema.sql); only leased rows are updated, and
-- the table is not rewritten. Keys claimed in transaction mode under 0.1.0
-- have no owner: they stay open to every role until they expire, as before.
ALTER TABLE idempotency.keys ADD COLUMN owner pg_catalog.text;
UPDATE idempotency.keys SET owner = pg_catalog.pg_get_userbyid(holder) WHERE holder IS NOT NULL;
ALTER TABLE idempotency.keys DROP COLUMN holder;

-- idem_get judges the caller's role, which a SECURITY DEFINER function
-- cannot see: it is now C, and hides keys of other roles.
CREATE OR REPLACE FUNCTION @extschema@.idem_get(key text, scope text DEFAULT '')
RETURNS TABLE (
    status text,
    result jsonb,
    attempt integer,
    recovery_point text,
    fingerprint text,
    created_at timestamptz,
    finished_at timestamptz,
    expires_at timestamptz,
    locked_until timestamptz)
LANGUAGE c VOLATILE PARALLEL SAFE ROWS 1
AS '$libdir/idempotency-0.2.0', 'idem_get';
COMMENT ON FUNCTION @extschema@.idem_get IS 'The committed state of a key, or no row when it is unknown, expired or another role''s';
DROP FUNCTION idempotency._check_key(text, text);

-- idem_purge deletes every role's expired keys: the installer's to grant.
REVOKE EXECUTE ON FUNCTION @extschema@.idem_purge(integer) FROM PUBLIC;

-- Every other C function now calls the library of 0.2.0: each is defined
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
                                   '$libdir/idempotency-0.2.0');
    END LOOP;
END
$$;
