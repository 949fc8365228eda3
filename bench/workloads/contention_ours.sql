\set n random(1, 100)
SELECT (extract(epoch FROM clock_timestamp()) * 10)::bigint AS bucket \gset
BEGIN;
SELECT (status = 'started')::int AS started FROM idem_begin('hot:' || :bucket || ':' || :n) \gset
INSERT INTO bench_business (job_key, amount) SELECT 'hot:' || :bucket || ':' || :n, 1 WHERE :started = 1;
SELECT idem_finish('hot:' || :bucket || ':' || :n, '"done"') WHERE :started = 1;
COMMIT;
