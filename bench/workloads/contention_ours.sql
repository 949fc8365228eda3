\set n random(1, 100)
SELECT 'hot:' || (extract(epoch FROM clock_timestamp()) * 10)::bigint || ':' || :n AS k \gset
BEGIN;
SELECT status FROM idem_begin(:'k') \gset
INSERT INTO bench_business (job_key, amount) SELECT :'k', 1 WHERE :'status' = 'started';
SELECT idem_finish(:'k', '"done"') WHERE :'status' = 'started';
COMMIT;
