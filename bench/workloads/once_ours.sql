\set n random(1, 9000000000000000000)
SELECT idem_once('evt:' || :n);
