\set n random(1, 100000)
SELECT status, result FROM replay_results WHERE key = 'replay:' || :n;
