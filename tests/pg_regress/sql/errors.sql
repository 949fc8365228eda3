-- Every error a caller can branch on, with its SQLSTATE.
-- NULL key or scope: 22004.
SELECT * FROM idem_begin(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM idem_begin('k', scope => NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT idem_finish(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT idem_fail('k', scope => NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM idem_get(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT idem_checkpoint(NULL, 'p');
\echo :LAST_ERROR_SQLSTATE

-- Empty or too long key or scope: 22023.
SELECT * FROM idem_begin('');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM idem_begin('', scope => 'tenant-1');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM idem_begin(repeat('k', 256));
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM idem_begin('k', scope => repeat('s', 256));
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM idem_get(repeat('k', 256));
\echo :LAST_ERROR_SQLSTATE
-- 255 characters is the default limit, counted in characters, not bytes.
BEGIN;
SELECT status FROM idem_begin(repeat('€', 255));
ROLLBACK;
SET idempotency.max_key_length = 8;
SELECT * FROM idem_begin('123456789');
\echo :LAST_ERROR_SQLSTATE
RESET idempotency.max_key_length;
SET idempotency.max_key_length = 100000;
\echo :LAST_ERROR_SQLSTATE

-- lease and ttl must be positive, wait not negative: 22023.
SELECT * FROM idem_begin('k', lease => '0 seconds');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM idem_begin('k', lease => '-1 minute');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM idem_begin('k', wait => '-1 second');
\echo :LAST_ERROR_SQLSTATE
BEGIN;
SELECT status FROM idem_begin('k');
SELECT idem_finish('k', ttl => '0 seconds');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
SET idempotency.ttl = 0;
\echo :LAST_ERROR_SQLSTATE

-- Finishing a key this transaction does not hold: 55000.
SELECT idem_finish('not-begun');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_fail('not-begun', scope => 'tenant-1');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_checkpoint('not-begun', 'step-1');
\echo :LAST_ERROR_SQLSTATE
BEGIN;
SELECT status FROM idem_begin('twice');
SELECT idem_finish('twice');
SELECT idem_finish('twice');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
-- A key finished in an earlier transaction is not held either.
BEGIN;
SELECT status FROM idem_begin('done');
SELECT idem_finish('done');
COMMIT;
BEGIN;
SELECT status FROM idem_begin('done');
SELECT idem_finish('done');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;

-- COMMIT after 'started' without finish or fail: 55000.
BEGIN;
SELECT status FROM idem_begin('left-open', scope => 'tenant-1');
COMMIT;
\echo :LAST_ERROR_SQLSTATE
-- PREPARE TRANSACTION is held to the same rule.
BEGIN;
SELECT status FROM idem_begin('left-open-2pc');
PREPARE TRANSACTION 'idem-left-open';
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) FROM pg_prepared_xacts;

-- Any request jsonb holds is accepted, a number beyond a double included
-- (it keeps its exact value in the fingerprint).
BEGIN;
SELECT status FROM idem_begin('k', request => ('[1' || repeat('0', 400) || ']')::jsonb);
SELECT status FROM idem_begin('k', request => ('[1' || repeat('0', 399) || '1]')::jsonb);
ROLLBACK;

-- A read-only transaction (or a standby) gets every answer that needs no
-- write: a replay, mismatch, in_progress for a running lease, false from
-- idem_once for a recorded key. A claim or a new record is refused: 25006.
-- (A running lease, written directly so that the token sequence, which
-- lease_mode's expected output counts on, does not move.)
INSERT INTO idempotency.keys (scope, key, status, attempt, created_at, locked_until, lease, token, fingerprint)
VALUES ('', 'ro-leased', 'p', 1, now(), now() + interval '1 hour', interval '1 hour', 424242,
        decode(idem_fingerprint('{"a": 1}'), 'hex'));
BEGIN;
SELECT status FROM idem_begin('ro-done', request => '{"a": 1}');
SELECT idem_finish('ro-done', '"stored"');
COMMIT;
SELECT idem_once('ro-once');
BEGIN READ ONLY;
SELECT status, result FROM idem_begin('done');
SELECT status, result FROM idem_begin('ro-done', request => '{"a": 1}');
SELECT status, result FROM idem_begin('ro-done', request => '{"a": 2}');
SELECT status, attempt, token IS NULL AS no_token FROM idem_begin('ro-leased', request => '{"a": 1}');
SELECT status FROM idem_begin('ro-leased', request => '{"a": 2}');
SELECT status FROM idem_begin('ro-leased', request => '{"a": 1}', wait => '50ms');
SELECT idem_once('ro-once');
SELECT status FROM idem_begin('new-in-read-only');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
BEGIN READ ONLY;
SELECT idem_once('once-in-read-only');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
-- A lease that has ended would be taken over: a claim, so 25006.
UPDATE idempotency.keys SET locked_until = now() - interval '1 second' WHERE key = 'ro-leased';
BEGIN READ ONLY;
SELECT status FROM idem_begin('ro-leased', request => '{"a": 1}');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
-- Nothing changed.
SELECT key, status, attempt FROM idempotency.keys WHERE key LIKE 'ro-%' ORDER BY key;
SELECT count(*) FROM idempotency.once WHERE key IN ('ro-once', 'once-in-read-only');
DELETE FROM idempotency.keys WHERE key LIKE 'ro-%';
DELETE FROM idempotency.once WHERE key = 'ro-once';

-- A key held in transaction mode cannot be begun again with a lease in the
-- same transaction: 55000.
BEGIN;
SELECT status FROM idem_begin('mode-switch');
SELECT status FROM idem_begin('mode-switch', lease => '1 minute');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;

-- Nothing of the above left a key behind.
SELECT count(*) FROM idempotency.keys WHERE key <> 'done';
