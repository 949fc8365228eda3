\set n random(1, 9000000000000000000)
BEGIN;
SELECT status FROM idem_begin('churn:' || :n || '/' || :gen);
SELECT idem_finish('churn:' || :n || '/' || :gen, '{"charge_id": 991}', ttl => :ttl_ms * interval '1 millisecond');
COMMIT;
