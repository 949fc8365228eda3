-- Lease mode: for side effects outside the database. The claim commits on
-- its own (here: autocommit), and the holder proves itself with its token.
CREATE TEMP TABLE held AS
SELECT status, attempt, recovery_point, token FROM idem_begin('email:welcome:42', lease => '2 minutes');
SELECT status, attempt, recovery_point, token IS NOT NULL AS has_token FROM held;
-- The claim is committed: the key is in progress for everyone else.
SELECT status, attempt, locked_until > now() + interval '1 minute' AS leased FROM idem_get('email:welcome:42');
SELECT status, result, attempt, token FROM idem_begin('email:welcome:42', lease => '2 minutes');
SELECT status FROM idem_begin('email:welcome:42');
-- Progress is recorded with the token.
SELECT idem_checkpoint('email:welcome:42', 'sent', token => (SELECT token FROM held));
SELECT recovery_point FROM idem_get('email:welcome:42');
-- Without the token the holder is not recognised (55000).
SELECT idem_finish('email:welcome:42', '{"message_id": "m-1"}');
\echo :LAST_ERROR_SQLSTATE
-- A token that was never the key's is refused (40001).
SELECT idem_finish('email:welcome:42', '{"message_id": "m-1"}', token => (SELECT token FROM held) + 1000);
\echo :LAST_ERROR_SQLSTATE
SELECT idem_finish('email:welcome:42', '{"message_id": "m-1"}', token => (SELECT token FROM held));
SELECT status, result, recovery_point, locked_until FROM idem_get('email:welcome:42');
SELECT status, result FROM idem_begin('email:welcome:42', lease => '2 minutes');
-- Finishing twice with the same token: the token is no longer current.
SELECT idem_finish('email:welcome:42', '{"message_id": "m-2"}', token => (SELECT token FROM held));
\echo :LAST_ERROR_SQLSTATE
SELECT result FROM idem_get('email:welcome:42');

-- A lease that ends is taken over: attempt + 1, a larger token, the last
-- recovery point.
DELETE FROM held;
INSERT INTO held SELECT status, attempt, recovery_point, token FROM idem_begin('pay:7', lease => '50 milliseconds');
SELECT idem_checkpoint('pay:7', 'authorized', token => (SELECT token FROM held));
SELECT pg_sleep(0.1);
CREATE TEMP TABLE taken AS
SELECT status, attempt, recovery_point, token FROM idem_begin('pay:7', lease => '2 minutes');
SELECT t.status, t.attempt, t.recovery_point, t.token > h.token AS larger_token FROM taken t, held h;
-- The old holder is fenced off: nothing it sends changes the key (40001).
SELECT idem_checkpoint('pay:7', 'captured', token => (SELECT token FROM held));
\echo :LAST_ERROR_SQLSTATE
SELECT idem_fail('pay:7', '"gave up"', token => (SELECT token FROM held));
\echo :LAST_ERROR_SQLSTATE
SELECT idem_finish('pay:7', '"late"', token => (SELECT token FROM held));
\echo :LAST_ERROR_SQLSTATE
SELECT status, recovery_point, result FROM idem_get('pay:7');
SELECT idem_finish('pay:7', '"captured"', token => (SELECT token FROM taken));
SELECT status, result, attempt FROM idem_get('pay:7');

-- idem_fail with the token: retryable releases at once, permanent is replayed.
DELETE FROM held;
INSERT INTO held SELECT status, attempt, recovery_point, token FROM idem_begin('sms:1', lease => '1 hour');
SELECT idem_fail('sms:1', '{"error": "gateway timeout"}', token => (SELECT token FROM held));
SELECT status, attempt, token > (SELECT token FROM held) AS larger_token
  FROM idem_begin('sms:1', lease => '1 hour');
SELECT idem_fail('sms:1', '{"error": "invalid number"}', retryable => false,
                 token => (SELECT token FROM idempotency.keys WHERE key = 'sms:1'));
SELECT status, result, attempt FROM idem_begin('sms:1', lease => '1 hour');

-- A lease claim inside an explicit transaction commits with it.
BEGIN;
SELECT status FROM idem_begin('push:1', lease => '1 hour');
ROLLBACK;
SELECT count(*) AS rows_after_rollback FROM idem_get('push:1');
-- And COMMIT does not ask for idem_finish: the lease is the holder's promise.
BEGIN;
SELECT status FROM idem_begin('push:1', lease => '1 hour');
COMMIT;
SELECT status FROM idem_get('push:1');
-- The lease's own mismatch check works as in transaction mode.
SELECT status FROM idem_begin('push:2', '{"to": "a"}', lease => '1 hour');
SELECT status FROM idem_begin('push:2', '{"to": "b"}', lease => '1 hour');

-- A lease is positive when it ends later by calendar arithmetic: a year
-- less 361 days is four or five days (counting months as 30 days, -1 day).
SELECT status, token IS NOT NULL AS has_token FROM idem_begin('calendar-lease', lease => '1 year -361 days');
SELECT locked_until > now() + interval '3 days' AS days_ahead FROM idem_get('calendar-lease');
SELECT idem_begin('calendar-lease-2', lease => '1 year -366 days');
\echo :LAST_ERROR_SQLSTATE
