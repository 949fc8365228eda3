-- idem_once: the deduplication ledger. True the first time a key is
-- recorded, false after; the record commits with the caller's transaction.
SELECT idem_once('webhook:evt_1');
SELECT idem_once('webhook:evt_1');
SELECT idem_once('webhook:evt_1', scope => 'stripe');
SELECT idem_once('webhook:evt_1', 'stripe');

-- A rolled-back record never happened.
BEGIN;
SELECT idem_once('webhook:evt_2');
ROLLBACK;
SELECT idem_once('webhook:evt_2');

-- Inside one transaction: true once, then false.
BEGIN;
SELECT idem_once('webhook:evt_3'), idem_once('webhook:evt_3');
COMMIT;

-- A savepoint rolled back forgets the record.
BEGIN;
SAVEPOINT s;
SELECT idem_once('webhook:evt_4');
ROLLBACK TO SAVEPOINT s;
SELECT idem_once('webhook:evt_4');
COMMIT;

-- Skipping the side effect of a duplicate, in one statement.
CREATE TABLE emails_sent (event text);
INSERT INTO emails_sent SELECT e FROM unnest(ARRAY['evt_5', 'evt_6', 'evt_5']) AS e WHERE idem_once('mail:' || e);
SELECT event, count(*) FROM emails_sent GROUP BY event ORDER BY event;

-- The ledger is separate from idem_begin's keys.
SELECT count(*) FROM idem_get('webhook:evt_1');

-- Errors: as for every key.
SELECT idem_once(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT idem_once('k', NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT idem_once('');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_once(repeat('x', 300));
\echo :LAST_ERROR_SQLSTATE
SELECT scope, key FROM idempotency.once ORDER BY scope, key;
