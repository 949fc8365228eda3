\set n random(1, 9000000000000000000)
BEGIN;
SELECT status FROM idem_begin('job:' || :n);
INSERT INTO bench_business (job_key, amount) VALUES ('job:' || :n, 500);
SELECT idem_finish('job:' || :n, '{"charge_id": 991}');
COMMIT;
