\set n random(1, 9000000000000000000)
BEGIN;
SELECT status FROM idem_begin('jobb:' || :n, (SELECT body::jsonb FROM bench_bodies WHERE id = 1));
INSERT INTO bench_business (job_key, amount) VALUES ('jobb:' || :n, 500);
SELECT idem_finish('jobb:' || :n, '{"charge_id": 991}');
COMMIT;
