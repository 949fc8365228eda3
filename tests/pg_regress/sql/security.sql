-- The key table is the extension's: dumped with the data, closed to PUBLIC.
SELECT extconfig::regclass[] AS dumped FROM pg_extension WHERE extname = 'idempotency';
SELECT has_table_privilege('public', 'idempotency.keys', 'SELECT') AS public_select,
       has_table_privilege('public', 'idempotency.keys', 'INSERT') AS public_insert,
       has_schema_privilege('public', 'idempotency', 'USAGE') AS public_usage;
-- The idem_* functions live in the schema the extension was installed into.
SELECT p.proname, n.nspname, p.prosecdef, p.provolatile, p.proparallel
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE p.proname LIKE 'idem\_%' ORDER BY p.proname;

-- An application role can use the functions but not touch the table.
CREATE ROLE idem_app LOGIN;
SET ROLE idem_app;
BEGIN;
SELECT status FROM idem_begin('app:1', '{"a": 1}');
SELECT idem_finish('app:1', '{"done": true}');
COMMIT;
SELECT status, result FROM idem_begin('app:1', '{"a": 1}');
SELECT status, result FROM idem_get('app:1');
-- The paths that run prepared statements (lease claims and their fencing
-- tokens, checkpoints, retryable failures, claim rows past the lock budget)
-- run them as the tables' owner and hand the caller's role back.
SELECT token AS lease_token FROM idem_begin('app:lease', lease => '1 minute') \gset
SELECT :lease_token > 0 AS has_token;
SELECT idem_checkpoint('app:lease', 'step-1', token => :lease_token);
SELECT idem_finish('app:lease', '{"sent": true}', token => :lease_token);
SELECT status, result FROM idem_begin('app:lease');
SELECT current_user;
BEGIN;
SELECT count(*) FILTER (WHERE status = 'started') AS started
  FROM generate_series(1, 12) g, idem_begin('app:many:' || g);
SELECT count(idem_finish('app:many:' || g, to_jsonb(g))) AS finished FROM generate_series(1, 12) g;
COMMIT;
SELECT count(*) FILTER (WHERE status = 'completed') AS completed
  FROM generate_series(1, 12) g, idem_begin('app:many:' || g);
BEGIN;
SELECT status FROM idem_begin('app:retry');
SELECT idem_fail('app:retry', retryable => true);
COMMIT;
BEGIN;
SELECT status, attempt FROM idem_begin('app:retry');
SELECT idem_finish('app:retry');
COMMIT;
SELECT idem_once('app:event') AS first, idem_once('app:event') AS again;
SELECT current_user;
SELECT count(*) FROM idempotency.keys;
\echo :LAST_ERROR_SQLSTATE
DELETE FROM idempotency.keys;
\echo :LAST_ERROR_SQLSTATE
-- A hostile search_path does not change what the functions do: with an
-- "=" that matches everything first on the path, finishing app:2 must not
-- touch app:1.
RESET ROLE;
CREATE SCHEMA evil;
GRANT ALL ON SCHEMA evil TO idem_app;
SET ROLE idem_app;
CREATE FUNCTION evil.texteq_always(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT true';
CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.texteq_always);
SET search_path = evil, public, pg_catalog;
BEGIN;
SELECT status FROM idem_begin('app:2');
SELECT 'app:1'::text = 'anything'::text AS evil_equals;
SELECT idem_finish('app:2', '2');
COMMIT;
-- A lease claim and its finish run prepared statements, here under the
-- hostile path.
SELECT token AS evil_token FROM idem_begin('app:3', lease => '1 minute') \gset
SELECT idem_finish('app:3', '3', token => :evil_token);
RESET search_path;
RESET ROLE;
SELECT key, result FROM idempotency.keys WHERE key IN ('app:1', 'app:2', 'app:3') ORDER BY key;
DROP SCHEMA evil CASCADE;

-- A lease's token is not enough to act for it: only the role that began
-- the lease, or one with its privileges, may checkpoint, fail or finish it
-- (42501); another role that guessed the token (they come from one
-- sequence) changes nothing.
CREATE ROLE idem_other;
CREATE ROLE idem_member IN ROLE idem_app;
SET ROLE idem_app;
SELECT token AS app_token FROM idem_begin('app:guarded', lease => '1 hour') \gset
SET ROLE idem_other;
SELECT idem_checkpoint('app:guarded', 'forged', token => :app_token);
\echo :LAST_ERROR_SQLSTATE
SELECT idem_finish('app:guarded', '"forged"', token => :app_token);
\echo :LAST_ERROR_SQLSTATE
SELECT idem_fail('app:guarded', '"forged"', token => :app_token);
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
SELECT key, status, holder::regrole, recovery_point, result FROM idempotency.keys WHERE key = 'app:guarded';
-- A member of the holder's role may act for it.
SET ROLE idem_member;
SELECT idem_checkpoint('app:guarded', 'half-way', token => :app_token);
SET ROLE idem_app;
SELECT idem_finish('app:guarded', '"sent"', token => :app_token);
RESET ROLE;
SELECT key, status, holder::regrole, recovery_point, result FROM idempotency.keys WHERE key = 'app:guarded';
DELETE FROM idempotency.keys WHERE key = 'app:guarded';
DROP ROLE idem_member;
DROP ROLE idem_other;
DROP ROLE idem_app;
