-- Observability on a server without the library preloaded: idem_held works,
-- idem_stats() says what is missing (tests/pg_regress/preloaded has the
-- counters).

-- idem_held: the keys in progress now. Leases and claim rows by key, keys
-- claimed by lock alone counted per backend; nothing once they finish.
CREATE ROLE idem_held_other;
CREATE ROLE idem_held_monitor IN ROLE pg_read_all_stats;
GRANT ALL ON SCHEMA public TO idem_held_other;

-- A lease held across transactions: no process, a token and an end.
SELECT status FROM idem_begin('held:lease', lease => '1 hour');
-- A key released for a retry, so that claiming it again writes a row.
BEGIN;
SELECT status FROM idem_begin('held:retry');
SELECT idem_fail('held:retry');
COMMIT;

BEGIN;
SELECT status FROM idem_begin('held:new-1');
SELECT status FROM idem_begin('held:new-2');
SELECT status, attempt FROM idem_begin('held:retry');
SELECT scope, key, owner, mode, pid = pg_backend_pid() AS this_backend,
       token IS NOT NULL AS has_token, attempt, keys,
       since IS NOT NULL AS has_since, locked_until > now() AS lease_running
  FROM idem_held WHERE key IS NULL OR key LIKE 'held:%' ORDER BY mode, key;
-- A finished key is no longer in progress; its lock is kept to the end of
-- the transaction, so it still counts among the keys held by lock.
SELECT idem_finish('held:new-1');
SELECT key, mode, keys FROM idem_held WHERE key IS NULL OR key LIKE 'held:%' ORDER BY mode, key;
SELECT idem_finish('held:new-2');
SELECT idem_finish('held:retry');
COMMIT;
SELECT key, mode, pid IS NULL AS no_process FROM idem_held
 WHERE key IS NULL OR key LIKE 'held:%' ORDER BY mode, key;

-- Another role's keys are left out, as idem_get leaves them out; members of
-- pg_read_all_stats see every key.
SET ROLE idem_held_other;
-- (the earlier tests' leases are postgres's, like held:lease)
SELECT count(*) AS others_keys_seen FROM idem_held WHERE key IS NOT NULL;
SELECT status FROM idem_begin('held:other', lease => '1 hour');
SELECT key, owner FROM idem_held WHERE key IS NOT NULL;
RESET ROLE;
SET ROLE idem_held_monitor;
SELECT key, owner FROM idem_held WHERE key LIKE 'held:%' ORDER BY key;
RESET ROLE;

-- Finishing with the token ends the hold.
SELECT idem_finish('held:lease', token => (SELECT token FROM idem_held WHERE key = 'held:lease'));
SELECT key FROM idem_held WHERE key LIKE 'held:%' ORDER BY key;

-- Its columns, as documented.
SELECT attname, format_type(atttypid, atttypmod)
  FROM pg_attribute WHERE attrelid = 'idem_held'::regclass AND attnum > 0 ORDER BY attnum;

DELETE FROM idempotency.keys WHERE key LIKE 'held:%';
REVOKE ALL ON SCHEMA public FROM idem_held_other;
DROP ROLE idem_held_other, idem_held_monitor;

-- Without the library in shared_preload_libraries there are no counters:
-- idem_stats() says what to add, and every other function works (the
-- other tests run on such a server).
SELECT * FROM idem_stats();
SELECT idem_stats_reset();
-- Only the installer may reset the counters.
SELECT has_function_privilege('public', 'idem_stats_reset()', 'EXECUTE') AS public_may_reset,
       has_function_privilege('public', 'idem_stats()', 'EXECUTE') AS public_may_read;
