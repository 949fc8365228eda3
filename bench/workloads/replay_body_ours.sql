\set n random(1, 100000)
SELECT status, result FROM idem_begin('replayb:' || :n, (SELECT body::jsonb FROM bench_bodies WHERE id = 1));
