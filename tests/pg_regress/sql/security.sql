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
SELECT key, status, owner, recovery_point, result FROM idempotency.keys WHERE key = 'app:guarded';
-- A member of the owner's role may act for it.
SET ROLE idem_member;
SELECT idem_checkpoint('app:guarded', 'half-way', token => :app_token);
SET ROLE idem_app;
SELECT idem_finish('app:guarded', '"sent"', token => :app_token);
RESET ROLE;
SELECT key, status, owner, recovery_point, result FROM idempotency.keys WHERE key = 'app:guarded';
DELETE FROM idempotency.keys WHERE key = 'app:guarded';

-- Keys belong to the role that claimed them. Another role gets no answer
-- about one, whatever its state: not its result (completed, failed), not
-- whether its request matches (mismatch), not a retry of it (released), not
-- its lease (in progress); idem_get shows it no row.
SET ROLE idem_app;
BEGIN;
SELECT status FROM idem_begin('app:charge', '{"card": "4242", "amount": 10}');
SELECT idem_finish('app:charge', '{"charge": "ch_1"}');
SELECT status FROM idem_begin('app:declined');
SELECT idem_fail('app:declined', '{"code": "declined"}', retryable => false);
SELECT status FROM idem_begin('app:flaky');
SELECT idem_fail('app:flaky', retryable => true);
COMMIT;
SELECT status FROM idem_begin('app:leased', lease => '1 hour');
SET ROLE idem_other;
SELECT status, result FROM idem_begin('app:charge', '{"card": "4242", "amount": 10}');
\echo :LAST_ERROR_SQLSTATE
SELECT status FROM idem_begin('app:charge', '{"card": "4242", "amount": 99}');
\echo :LAST_ERROR_SQLSTATE
SELECT status FROM idem_begin('app:declined');
\echo :LAST_ERROR_SQLSTATE
SELECT status FROM idem_begin('app:flaky');
\echo :LAST_ERROR_SQLSTATE
SELECT status FROM idem_begin('app:leased', wait => '10 s');
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) AS rows_seen FROM generate_series(1, 1) g,
       LATERAL (SELECT * FROM idem_get('app:charge') UNION ALL SELECT * FROM idem_get('app:declined')
                UNION ALL SELECT * FROM idem_get('app:flaky') UNION ALL SELECT * FROM idem_get('app:leased')) k;
-- A key of its own, in the same scope, is answered as usual.
BEGIN;
SELECT status FROM idem_begin('other:1');
SELECT idem_finish('other:1', '1');
COMMIT;
SELECT status, result FROM idem_get('other:1');
-- The owner, a member of the owner's role and a superuser see the key.
SET ROLE idem_app;
SELECT status, result, fingerprint IS NOT NULL AS has_fingerprint FROM idem_get('app:charge');
SELECT status FROM idem_begin('app:charge', '{"card": "4242", "amount": 99}');
SET ROLE idem_member;
SELECT status, result FROM idem_begin('app:charge', '{"card": "4242", "amount": 10}');
SELECT status FROM idem_get('app:declined');
RESET ROLE;
SELECT status FROM idem_get('app:flaky');
-- A retry by a member keeps the key its owner's.
SET ROLE idem_member;
BEGIN;
SELECT status, attempt FROM idem_begin('app:flaky');
SELECT idem_finish('app:flaky', '"second try"');
COMMIT;
RESET ROLE;
SELECT key, owner FROM idempotency.keys WHERE key IN ('app:flaky', 'other:1') ORDER BY key;

-- In transaction mode the transaction holds the key, under the role that
-- claimed it: after SET ROLE to a role without its privileges, the same
-- transaction may not begin or finish it again.
SET ROLE idem_app;
BEGIN;
SELECT status FROM idem_begin('app:switch');
SET LOCAL ROLE idem_other;
SAVEPOINT s;
SELECT status FROM idem_begin('app:switch');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT idem_finish('app:switch', '"forged"');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;

-- An expired key is unknown: any role may claim it afresh, and it becomes
-- that role's.
RESET ROLE;
UPDATE idempotency.keys SET expires_at = now() - interval '1 s' WHERE key = 'app:declined';
SET ROLE idem_other;
BEGIN;
SELECT status, attempt FROM idem_begin('app:declined');
SELECT idem_finish('app:declined', '"mine now"');
COMMIT;
SELECT status, result FROM idem_get('app:declined');
SET ROLE idem_app;
SELECT count(*) AS app_sees FROM idem_get('app:declined');
SELECT status FROM idem_begin('app:declined');
\echo :LAST_ERROR_SQLSTATE

-- A key without an owner (claimed in transaction mode before 0.2.0) is open
-- to every role, as it was; the first retry of it makes it the claimer's.
RESET ROLE;
UPDATE idempotency.keys SET owner = NULL WHERE key IN ('other:1', 'app:leased');
UPDATE idempotency.keys SET status = 'r' WHERE key = 'app:leased';
SET ROLE idem_app;
SELECT status, result FROM idem_begin('other:1');
BEGIN;
SELECT status, attempt FROM idem_begin('app:leased');
SELECT idem_finish('app:leased');
COMMIT;
RESET ROLE;
SELECT key, owner FROM idempotency.keys WHERE key IN ('app:leased', 'other:1') ORDER BY key;

-- A key records its owner by name, as a dump restores ownership: when the
-- role is dropped its keys are a superuser's alone; a role created again
-- under that name (as when a dump is restored into another cluster, where
-- roles get other OIDs) has them again.
CREATE ROLE idem_gone;
SET ROLE idem_gone;
BEGIN;
SELECT status FROM idem_begin('app:named');
SELECT idem_finish('app:named', '"kept"');
COMMIT;
RESET ROLE;
DROP ROLE idem_gone;
SET ROLE idem_other;
SELECT status FROM idem_begin('app:named');
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
SELECT status, result FROM idem_get('app:named');
CREATE ROLE idem_gone;
SET ROLE idem_gone;
SELECT status, result FROM idem_begin('app:named');
RESET ROLE;
DROP ROLE idem_gone;

-- After a rename the role's keys stay with the old name, in this session
-- too (the name it looked up is forgotten when a role changes).
CREATE ROLE idem_renamed;
SET ROLE idem_renamed;
BEGIN;
SELECT status FROM idem_begin('app:renamed');
SELECT idem_finish('app:renamed', '"r"');
COMMIT;
RESET ROLE;
ALTER ROLE idem_renamed RENAME TO idem_renamed2;
SET ROLE idem_renamed2;
SELECT status FROM idem_begin('app:renamed');
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
DROP ROLE idem_renamed2;

-- idem_purge deletes every role's expired keys: PUBLIC may not run it
-- until the installer grants it.
SET ROLE idem_app;
SELECT idem_purge();
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
GRANT EXECUTE ON FUNCTION idem_purge TO idem_app;
SET ROLE idem_app;
SELECT idem_purge() >= 0 AS purged;
RESET ROLE;
REVOKE EXECUTE ON FUNCTION idem_purge FROM idem_app;
DELETE FROM idempotency.keys WHERE key LIKE 'app:%' OR key LIKE 'other:%';

-- Tenants kept apart by roles, with row-level security on their own table:
-- each tenant's job claims its key and writes its order in one transaction.
-- A tenant cannot replay, claim or see the other's key even with the same
-- scope and key, and sees only its own orders; a support role that is a
-- member of both tenants' roles sees the key.
CREATE TABLE tenant_orders (tenant name NOT NULL DEFAULT current_user, id text, amount int,
                            PRIMARY KEY (tenant, id));
ALTER TABLE tenant_orders ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON tenant_orders USING (tenant = current_user) WITH CHECK (tenant = current_user);
CREATE ROLE idem_tenant_a;
CREATE ROLE idem_tenant_b;
CREATE ROLE idem_support IN ROLE idem_tenant_a, idem_tenant_b;
GRANT SELECT, INSERT, UPDATE ON tenant_orders TO idem_tenant_a, idem_tenant_b;
SET ROLE idem_tenant_a;
BEGIN;
SELECT status FROM idem_begin('order:1', '{"amount": 10}', scope => 'orders');
INSERT INTO tenant_orders (id, amount) VALUES ('1', 10);
SELECT idem_finish('order:1', '{"order": "1"}', scope => 'orders');
COMMIT;
SET ROLE idem_tenant_b;
BEGIN;
SELECT status FROM idem_begin('order:1', '{"amount": 10}', scope => 'orders');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
SELECT idem_upsert('tenant_orders', '{"tenant": "idem_tenant_b", "id": "1", "amount": 20}');
SELECT count(*) AS b_sees_keys FROM idem_get('order:1', 'orders');
SELECT tenant, id, amount FROM tenant_orders;
SET ROLE idem_tenant_a;
SELECT status, result FROM idem_begin('order:1', '{"amount": 10}', scope => 'orders');
SELECT tenant, id, amount FROM tenant_orders;
SET ROLE idem_support;
SELECT status, result FROM idem_get('order:1', 'orders');
RESET ROLE;
DROP TABLE tenant_orders;
DELETE FROM idempotency.keys WHERE scope = 'orders';
DROP ROLE idem_support;
DROP ROLE idem_tenant_a;
DROP ROLE idem_tenant_b;
DROP ROLE idem_member;
DROP ROLE idem_other;
DROP ROLE idem_app;
