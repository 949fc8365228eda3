-- CREATE EXTENSION with a hostile schema first on the installer's
-- search_path. The installer names the schema (README, Security): the
-- functions then land there, whatever the path says, and calls made later
-- under the hostile path do what they should.
CREATE DATABASE idem_install;
\c idem_install
CREATE ROLE idem_attacker;
CREATE SCHEMA evil AUTHORIZATION idem_attacker;
SET ROLE idem_attacker;
-- Look-alikes of what the scripts and statements call.
CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT 'epoch'::timestamptz $$;
CREATE FUNCTION evil.texteq_always(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT true';
CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.texteq_always);
RESET ROLE;
SET search_path = evil, public;
CREATE EXTENSION idempotency SCHEMA public;
SELECT DISTINCT n.nspname AS schema_of_functions
  FROM pg_depend d
  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'idempotency'
  JOIN pg_proc p ON p.oid = d.objid AND d.classid = 'pg_proc'::regclass
  JOIN pg_namespace n ON n.oid = p.pronamespace;
-- The attacker owns nothing of the extension.
SELECT count(*) AS owned_by_attacker
  FROM pg_depend d
  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'idempotency'
  JOIN pg_proc p ON p.oid = d.objid AND d.classid = 'pg_proc'::regclass
 WHERE p.proowner = 'idem_attacker'::regrole;
-- Calls under the hostile path: the look-alikes are not used.
BEGIN;
SELECT status FROM public.idem_begin('install:1');
SELECT public.idem_finish('install:1', '"one"');
COMMIT;
SELECT status, result FROM public.idem_begin('install:1');
SELECT key, result, finished_at > 'epoch' AS real_clock FROM idempotency.keys ORDER BY key;
-- Without SCHEMA, the extension's functions would go into the first schema
-- of the path, which the attacker owns and may drop objects from: an
-- installer names the schema.
RESET search_path;
\c idem_regress
DROP DATABASE idem_install;
DROP ROLE idem_attacker;
