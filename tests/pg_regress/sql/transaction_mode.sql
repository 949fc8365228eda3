-- Transaction mode: the claim, the work and the result commit together.
CREATE TABLE charges (order_id int PRIMARY KEY, amount int);

-- A first delivery claims the key, does its work and stores the result.
BEGIN;
SELECT status, result, attempt, recovery_point, token
  FROM idem_begin('charge:order-42', request => '{"amount": 500}');
INSERT INTO charges VALUES (42, 500);
SELECT idem_finish('charge:order-42', result => '{"charge_id": 991}');
COMMIT;

-- A second delivery replays the stored result and does nothing else.
SELECT status, result, attempt FROM idem_begin('charge:order-42', request => '{"amount": 500}');
-- The same request written differently is the same request.
SELECT status FROM idem_begin('charge:order-42', request => '{ "amount" : 500.0 }');
-- Without a request there is nothing to compare: a replay.
SELECT status FROM idem_begin('charge:order-42');
-- A different request under the same key is a mismatch (HTTP 422).
SELECT status, result, attempt FROM idem_begin('charge:order-42', request => '{"amount": 700}');
SELECT count(*) FROM charges;

-- idem_get shows the committed state.
SELECT status, result, attempt, recovery_point, fingerprint = idem_fingerprint('{"amount": 500}') AS same_request,
       created_at IS NOT NULL AS has_created, finished_at IS NOT NULL AS has_finished,
       expires_at - finished_at AS kept_for, locked_until
  FROM idem_get('charge:order-42');
SELECT count(*) AS unknown_rows FROM idem_get('never-seen');

-- Calling idem_begin again in the holding transaction: the same attempt.
BEGIN;
SELECT status, attempt FROM idem_begin('job:1', '{"n": 1}');
SELECT status, attempt FROM idem_begin('job:1', '{"n": 1}');
SELECT status FROM idem_begin('job:1', '{"n": 2}');
-- idem_get shows rows; a new key's claim is written with its outcome.
SELECT count(*) AS rows_while_held FROM idem_get('job:1');
SELECT idem_finish('job:1', '"done"');
-- After finishing in this transaction, a begin replays.
SELECT status, result FROM idem_begin('job:1');
COMMIT;

-- ROLLBACK leaves the key as if it had never been begun.
BEGIN;
SELECT status FROM idem_begin('job:2');
INSERT INTO charges VALUES (2, 1);
SELECT idem_finish('job:2', '{"x": 1}');
ROLLBACK;
SELECT count(*) AS rows_after_rollback FROM idem_get('job:2');
SELECT count(*) FROM charges WHERE order_id = 2;

-- COMMIT without idem_finish or idem_fail fails, and nothing of it commits.
BEGIN;
SELECT status FROM idem_begin('job:3');
INSERT INTO charges VALUES (3, 1);
COMMIT;
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) AS rows_after_failed_commit FROM idem_get('job:3');
SELECT count(*) FROM charges WHERE order_id = 3;

-- The error names every key left open.
BEGIN;
SELECT status FROM idem_begin('job:4a');
SELECT status FROM idem_begin('job:4b', scope => 'tenant-1');
COMMIT;

-- A key begun inside a rolled-back savepoint is forgotten: COMMIT succeeds.
BEGIN;
SAVEPOINT s;
SELECT status FROM idem_begin('job:5');
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT count(*) AS rows_after_savepoint FROM idem_get('job:5');

-- A finish inside a rolled-back savepoint is undone: the key is open again.
BEGIN;
SELECT status FROM idem_begin('job:6');
SAVEPOINT s;
SELECT idem_finish('job:6', '1');
ROLLBACK TO SAVEPOINT s;
COMMIT;
\echo :LAST_ERROR_SQLSTATE

-- A released savepoint keeps what it did.
BEGIN;
SAVEPOINT s1;
SELECT status FROM idem_begin('job:7');
SAVEPOINT s2;
SELECT idem_finish('job:7', '7');
RELEASE SAVEPOINT s2;
RELEASE SAVEPOINT s1;
COMMIT;
SELECT status, result FROM idem_get('job:7');

-- A nested savepoint rolled back after its parent committed into the top.
BEGIN;
SAVEPOINT a;
SELECT status FROM idem_begin('job:8');
RELEASE SAVEPOINT a;
SAVEPOINT b;
SELECT idem_finish('job:8', '8');
ROLLBACK TO SAVEPOINT b;
SELECT idem_finish('job:8', '"eight"');
COMMIT;
SELECT status, result FROM idem_get('job:8');

-- PL/pgSQL exception blocks are savepoints too.
DO $$
BEGIN
  BEGIN
    PERFORM idem_begin('job:9');
    RAISE EXCEPTION 'work failed';
  EXCEPTION WHEN raise_exception THEN
    NULL;
  END;
END $$;
SELECT count(*) AS rows_after_exception FROM idem_get('job:9');

-- Retryable failure: the next attempt starts with attempt + 1.
BEGIN;
SELECT status, attempt FROM idem_begin('job:10', '{"p": 1}');
SELECT idem_fail('job:10', '{"error": "timeout"}');
COMMIT;
SELECT status, result, attempt FROM idem_get('job:10');
BEGIN;
SELECT status, result, attempt FROM idem_begin('job:10', '{"p": 1}');
SELECT idem_finish('job:10', '{"ok": true}');
COMMIT;
SELECT status, result, attempt FROM idem_get('job:10');
-- The request's fingerprint stays with the key across attempts.
SELECT status FROM idem_begin('job:10', '{"p": 2}');

-- Permanent failure: replayed as failed.
BEGIN;
SELECT status FROM idem_begin('job:11');
SELECT idem_fail('job:11', '{"error": "card declined"}', retryable => false);
COMMIT;
SELECT status, result, attempt FROM idem_begin('job:11');

-- Scopes keep equal keys apart.
BEGIN;
SELECT status FROM idem_begin('order-1', scope => 'tenant-a');
SELECT status FROM idem_begin('order-1', scope => 'tenant-b');
SELECT idem_finish('order-1', '"a"', scope => 'tenant-a');
SELECT idem_finish('order-1', '"b"', scope => 'tenant-b');
COMMIT;
SELECT result FROM idem_get('order-1', 'tenant-a');
SELECT result FROM idem_get('order-1', scope => 'tenant-b');
SELECT count(*) FROM idem_get('order-1');

-- Expiry: past expires_at a key is unknown, even before it is purged.
BEGIN;
SELECT status FROM idem_begin('job:12', '{"v": 1}');
SELECT idem_finish('job:12', '"first"', ttl => '1 millisecond');
COMMIT;
SELECT pg_sleep(0.01);
SELECT count(*) AS rows_after_expiry FROM idem_get('job:12');
BEGIN;
-- A new request is no mismatch: the old one is gone with the key.
SELECT status, attempt FROM idem_begin('job:12', '{"v": 2}');
SELECT idem_finish('job:12', '"second"');
COMMIT;
SELECT status, result, attempt FROM idem_get('job:12');

-- The idempotency.ttl setting is the default ttl.
SET idempotency.ttl = '2h';
SHOW idempotency.ttl;
BEGIN;
SELECT status FROM idem_begin('job:13');
SELECT idem_finish('job:13');
COMMIT;
SELECT expires_at - finished_at AS kept_for, result IS NULL AS no_result FROM idem_get('job:13');
RESET idempotency.ttl;
SHOW idempotency.ttl;

-- idem_checkpoint in transaction mode records a recovery point.
BEGIN;
SELECT status FROM idem_begin('job:14');
SELECT idem_checkpoint('job:14', 'step-1');
SELECT status, recovery_point FROM idem_begin('job:14');
SELECT idem_fail('job:14');
COMMIT;
BEGIN;
SELECT status, attempt, recovery_point FROM idem_begin('job:14');
SELECT idem_finish('job:14');
COMMIT;

-- Unicode keys and scopes are kept as given.
BEGIN;
SELECT status FROM idem_begin('überweisung:€42', scope => 'Zürich');
SELECT idem_finish('überweisung:€42', '"ok"', scope => 'Zürich');
COMMIT;
SELECT result FROM idem_get('überweisung:€42', 'Zürich');

-- One transaction may hold 100 000 keys with default settings.
SHOW max_locks_per_transaction;
BEGIN;
SELECT count(*) FILTER (WHERE status = 'started') AS started
  FROM generate_series(1, 100000) AS i, idem_begin('batch:' || i);
SELECT count(*) FROM (SELECT idem_finish('batch:' || i, to_jsonb(i)) FROM generate_series(1, 100000) AS i) AS f;
COMMIT;
SELECT count(*) FILTER (WHERE status = 'completed') AS replayed
  FROM generate_series(1, 100000) AS i, idem_begin('batch:' || i);

-- Past its first 8 new keys a transaction claims keys by writing a claim
-- row (so a batch needs no more lock-table entries than that). The rules
-- are the same; the claim row shows in idem_get.
BEGIN;
SELECT count(*) FROM generate_series(1, 8) AS i, idem_begin('filler:' || i);
SELECT status, attempt FROM idem_begin('row:1', '{"r": 1}');
SELECT status, attempt FROM idem_begin('row:1', '{"r": 1}');
SELECT status FROM idem_begin('row:1', '{"r": 2}');
SELECT status FROM idem_get('row:1');
SAVEPOINT s;
SELECT status FROM idem_begin('row:2');
ROLLBACK TO SAVEPOINT s;
SELECT idem_checkpoint('row:1', 'half');
SELECT idem_finish('row:1', '"r1"');
SELECT count(*) FROM generate_series(1, 8) AS i, idem_finish('filler:' || i);
COMMIT;
SELECT status, result, recovery_point FROM idem_get('row:1');
SELECT count(*) AS forgotten FROM idem_get('row:2');
BEGIN;
SELECT count(*) FROM generate_series(1, 8) AS i, idem_begin('filler2:' || i);
SELECT status FROM idem_begin('row:3');
COMMIT;
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) AS nothing_committed FROM idem_get('row:3');
