-- idem_stats() on a server with the library preloaded (and the purge
-- worker off, so that only this test purges). Each call counts once, by
-- what it answered.
SELECT idem_stats_reset();
SELECT stats_reset > now() - interval '1 minute' AS reset_just_now FROM idem_stats();
-- Every counter starts at zero.
SELECT begin_started + begin_completed + begin_failed + begin_in_progress + begin_mismatch
       + waits + lease_takeovers + stale_tokens + finishes + fails_retryable + fails_final
       + once_true + once_false + upsert_inserted + upsert_updated + upsert_unchanged
       + upsert_skipped + insert_once_true + insert_once_false + keys_purged AS total,
       wait_time
  FROM idem_stats();

-- begins by answer, finishes and fails
BEGIN;
SELECT status FROM idem_begin('s:done', '{"a": 1}');
SELECT idem_finish('s:done', '"ok"');
SELECT status FROM idem_begin('s:final');
SELECT idem_fail('s:final', '"no"', retryable => false);
SELECT status FROM idem_begin('s:retry');
SELECT idem_fail('s:retry');
COMMIT;
SELECT status FROM idem_begin('s:done', '{"a": 1}');
SELECT status FROM idem_begin('s:done', '{"a": 2}');
SELECT status FROM idem_begin('s:final');
SELECT begin_started, begin_completed, begin_failed, begin_mismatch, finishes,
       fails_retryable, fails_final
  FROM idem_stats();

-- in progress, a bounded wait, a takeover, a stale token
SELECT status FROM idem_begin('s:lease', lease => '1 hour');
SELECT status FROM idem_begin('s:lease');
SELECT status FROM idem_begin('s:lease', wait => '50 milliseconds');
SELECT begin_in_progress, waits, wait_time >= 50 AS waited_50ms, wait_time < 5000 AS bounded
  FROM idem_stats();
SELECT token AS old_token FROM idem_begin('s:short', lease => '1 millisecond') \gset
SELECT pg_sleep(0.01);
SELECT status FROM idem_begin('s:short', lease => '1 hour');
SELECT idem_finish('s:short', token => :old_token);
SELECT lease_takeovers, stale_tokens FROM idem_stats();

-- idem_once and the upsert helpers
SELECT idem_once('s:once'), idem_once('s:once');
CREATE TABLE s_items (id int PRIMARY KEY, name text);
SELECT idem_upsert('s_items', '{"id": 1, "name": "a"}');
SELECT idem_upsert('s_items', '{"id": 1, "name": "b"}');
SELECT idem_upsert('s_items', '{"id": 1, "name": "b"}');
SELECT idem_insert_once('s_items', '{"id": 2, "name": "c"}');
SELECT idem_insert_once('s_items', '{"id": 2, "name": "d"}');
SELECT once_true, once_false, upsert_inserted, upsert_updated, upsert_unchanged,
       insert_once_true, insert_once_false
  FROM idem_stats();

-- purged keys, from idem_purge (the worker counts the same way)
BEGIN;
SELECT count(*) FROM generate_series(1, 4) AS i, idem_begin('s:old:' || i);
SELECT count(*) FROM generate_series(1, 4) AS i, idem_finish('s:old:' || i, ttl => '1 millisecond');
COMMIT;
SELECT pg_sleep(0.01);
SELECT idem_purge(3), idem_purge();
SELECT keys_purged FROM idem_stats();

-- Counters are cluster-wide and not transactional: a rolled-back call
-- still counted.
BEGIN;
SELECT status FROM idem_begin('s:rolled-back');
ROLLBACK;
SELECT begin_started FROM idem_stats();

-- The reset is the installer's to grant.
CREATE ROLE s_app;
SET ROLE s_app;
SELECT begin_started > 0 AS app_reads FROM idem_stats();
SELECT idem_stats_reset();
RESET ROLE;
DROP ROLE s_app;
SELECT idem_stats_reset();
SELECT begin_started, keys_purged FROM idem_stats();

DROP TABLE s_items;
DELETE FROM idempotency.keys WHERE key LIKE 's:%';
DELETE FROM idempotency.once WHERE key LIKE 's:%';
