-- idem_distribute() on a server without Citus: it refuses (0A000) and
-- changes nothing; only the installer may call it. The Citus tier
-- (tests/citus) covers what it does on a cluster.
\set VERBOSITY default
CREATE TABLE idem_tenants (tenant text PRIMARY KEY);
\set ON_ERROR_STOP 0
SELECT idem_distribute('idem_tenants');
\echo :LAST_ERROR_SQLSTATE
\set ON_ERROR_STOP 1
-- Nothing changed: the keys work as before, scope keeps its collation.
BEGIN;
SELECT status FROM idem_begin('distribute:1', scope => 'acme');
SELECT idem_finish('distribute:1', '{"ok": true}', scope => 'acme');
COMMIT;
SELECT status, result FROM idem_get('distribute:1', scope => 'acme');
SELECT attcollation::regcollation AS scope_collation
  FROM pg_attribute WHERE attrelid = 'idempotency.keys'::regclass AND attname = 'scope';
-- Not for PUBLIC: it alters the extension's tables.
SELECT has_function_privilege('public', 'idem_distribute(regclass)', 'EXECUTE') AS public_may_distribute;
CREATE ROLE idem_distribute_stranger;
SET ROLE idem_distribute_stranger;
\set ON_ERROR_STOP 0
SELECT idem_distribute('idem_tenants');
\set ON_ERROR_STOP 1
RESET ROLE;
DROP ROLE idem_distribute_stranger;
DROP TABLE idem_tenants;
DELETE FROM idempotency.keys WHERE key = 'distribute:1';
