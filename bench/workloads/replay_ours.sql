\set n random(1, 100000)
SELECT status, result FROM idem_begin('replay:' || :n);
