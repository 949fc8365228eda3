-- idem_purge deletes expired keys, a batch at a time.
BEGIN;
SELECT count(*) FROM generate_series(1, 5) AS i, idem_begin('old:' || i);
SELECT count(*) FROM generate_series(1, 5) AS i, idem_finish('old:' || i, ttl => '1 millisecond');
SELECT count(*) FROM generate_series(1, 3) AS i, idem_begin('new:' || i);
SELECT count(*) FROM generate_series(1, 3) AS i, idem_finish('new:' || i);
COMMIT;
SELECT pg_sleep(0.01);
SELECT count(*) AS expired_still_stored FROM idempotency.keys WHERE key LIKE 'old:%';
SELECT idem_purge(2);
SELECT idem_purge();
SELECT idem_purge();
SELECT key FROM idempotency.keys WHERE key LIKE 'old:%' OR key LIKE 'new:%' ORDER BY key;
-- A purged key starts afresh.
BEGIN;
SELECT status, attempt FROM idem_begin('old:1');
ROLLBACK;
SELECT idem_purge(NULL);
