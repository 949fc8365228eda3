\set n random(1, 9000000000000000000)
SELECT token FROM idem_begin('churn:' || :n || '/' || :gen, lease => '1 minute') \gset
SELECT idem_finish('churn:' || :n || '/' || :gen, '{"charge_id": 991}', token => :token, ttl => :ttl_ms * interval '1 millisecond');
