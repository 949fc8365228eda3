\set n random(1, 9000000000000000000)
BEGIN;
SELECT 1;
INSERT INTO bench_business (job_key, amount) VALUES ('job:' || :n, 500);
SELECT 1;
COMMIT;
