-- Stored HTTP responses: status, chosen headers and a body of any bytes,
-- replayed exactly, beside the jsonb result.
\pset null '∅'
CREATE FUNCTION body_of(r bytea) RETURNS text LANGUAGE sql AS $$ SELECT encode(r, 'hex') $$;

-- A new key (claimed by its lock: the response goes into the one row
-- written at idem_finish). The body keeps its member order and white space,
-- and bytes that are no text at all.
BEGIN;
SELECT status FROM idem_begin('pay-1', '{"amount": 100}');
SELECT idem_finish('pay-1', '{"id": 7}',
    response_status => 201,
    response_headers => '{"content-type": "application/json", "location": "/payments/7", "set-cookie": ["a=1", "b=2"]}',
    response_body => convert_to('{"id": 7,  "amount":100}', 'UTF8') || '\x00ff0a'::bytea);
COMMIT;
SELECT status, result, response_status, response_headers, body_of(response_body), retry_after
  FROM idem_begin('pay-1', '{"amount": 100}');
SELECT convert_from(substr(response_body, 1, 24), 'UTF8') AS body_text,
       response_body = convert_to('{"id": 7,  "amount":100}', 'UTF8') || '\x00ff0a'::bytea AS exact
  FROM idem_begin('pay-1', '{"amount": 100}');
-- idem_get shows it too.
SELECT status, response_status, response_headers->'set-cookie' AS cookies, body_of(response_body)
  FROM idem_get('pay-1');
-- A changed payload is a mismatch: no response is given away.
SELECT status, response_status, response_body FROM idem_begin('pay-1', '{"amount": 200}');

-- A leased key: the response is written by the update of its row.
SELECT status, token IS NOT NULL AS has_token FROM idem_begin('lease-1', lease => '1 minute');
SELECT idem_finish('lease-1', token => (SELECT token FROM idempotency.keys WHERE key = 'lease-1'),
    response_status => 200, response_body => '\x');
SELECT status, response_status, body_of(response_body), response_headers FROM idem_begin('lease-1');

-- A body of a megabyte (stored out of line) comes back byte for byte.
BEGIN;
SELECT status FROM idem_begin('big');
SELECT idem_finish('big', response_status => 200,
    response_body => (SELECT string_agg(decode(md5(i::text), 'hex'), ''::bytea) FROM generate_series(1, 65536) i));
COMMIT;
SELECT length(response_body),
       response_body = (SELECT string_agg(decode(md5(i::text), 'hex'), ''::bytea) FROM generate_series(1, 65536) i) AS exact
  FROM idem_begin('big');

-- A result without a response, and a response without headers or body.
BEGIN;
SELECT status FROM idem_begin('job-1');
SELECT idem_finish('job-1', '{"sent": true}');
COMMIT;
SELECT status, result, response_status, response_headers, response_body FROM idem_begin('job-1');
BEGIN;
SELECT status FROM idem_begin('no-content');
SELECT idem_finish('no-content', response_status => 204);
COMMIT;
SELECT status, result, response_status, response_headers, response_body FROM idem_begin('no-content');

-- A permanent failure replays its error and its response, kept for its own
-- ttl.
BEGIN;
SELECT status FROM idem_begin('declined');
SELECT idem_fail('declined', '{"code": "card_declined"}', retryable => false, ttl => '1 hour',
    response_status => 402, response_headers => '{"content-type": "text/plain"}',
    response_body => convert_to('declined', 'UTF8'));
COMMIT;
SELECT status, result, response_status, response_headers, convert_from(response_body, 'UTF8') AS body
  FROM idem_begin('declined');
SELECT expires_at - finished_at AS kept FROM idempotency.keys WHERE key = 'declined';
-- A retryable failure releases the key; the next attempt starts with no
-- response, and the response it stores is the one replayed.
BEGIN;
SELECT status FROM idem_begin('flaky');
SELECT idem_fail('flaky', '{"code": "timeout"}', ttl => '5 minutes', response_status => 503);
COMMIT;
SELECT status, response_status FROM idem_get('flaky');
SELECT expires_at - finished_at AS kept FROM idempotency.keys WHERE key = 'flaky';
BEGIN;
SELECT status, attempt, response_status, response_body FROM idem_begin('flaky');
SELECT idem_finish('flaky', response_status => 200, response_body => convert_to('second', 'UTF8'));
COMMIT;
SELECT status, attempt, response_status, convert_from(response_body, 'UTF8') AS body FROM idem_begin('flaky');
-- An expired key claimed again has forgotten its old response.
UPDATE idempotency.keys SET expires_at = now() - interval '1 second' WHERE key = 'declined';
BEGIN;
SELECT status, response_status, response_body FROM idem_begin('declined');
SELECT response_status, response_body FROM idempotency.keys WHERE key = 'declined';
ROLLBACK;

-- In lease mode an in_progress answer says when the lease ends.
SELECT status FROM idem_begin('held', lease => '10 minutes');
SELECT status, retry_after > interval '9 minutes' AND retry_after <= interval '10 minutes' AS until_lease_ends
  FROM idem_begin('held');

-- Bad responses: 22023, and nothing is stored.
BEGIN;
SELECT status FROM idem_begin('bad');
SAVEPOINT s;
SELECT idem_finish('bad', response_status => 103);
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT idem_finish('bad', response_status => 600);
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT idem_finish('bad', response_body => 'x');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT idem_finish('bad', response_status => 200, response_headers => '[["content-type", "text/plain"]]');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT idem_finish('bad', response_status => 200, response_headers => '{"content type": "text/plain"}');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT idem_finish('bad', response_status => 200, response_headers => '{"": "x"}');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT idem_finish('bad', response_status => 200, response_headers => '{"x-note": "a\r\nset-cookie: session=evil"}');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT idem_finish('bad', response_status => 200, response_headers => '{"x-note": "a\nb"}');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT idem_finish('bad', response_status => 200, response_headers => '{"x-note": "a\u001b[2Jb"}');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT idem_finish('bad', response_status => 200, response_headers => '{"content-disposition": "attachment; filename=\"reçu.pdf\""}');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT idem_finish('bad', response_status => 200, response_headers => '{"Content-Length": "5"}');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT idem_finish('bad', response_status => 200, response_headers => '{"transfer-encoding": "chunked"}');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT idem_finish('bad', response_status => 200, response_headers => '{"X-Up": "5", "x-up": "6"}');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT idem_finish('bad', response_status => 200, response_headers => '{"x-count": 3}');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT idem_finish('bad', response_status => 200, response_headers => '{"vary": ["accept", null]}');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT idem_fail('bad', retryable => false, response_status => 1000);
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT idem_fail('bad', ttl => '-1 hour');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
-- The key is still held, and a good response is taken.
SELECT idem_finish('bad', response_status => 200,
    response_headers => '{"x-empty": "", "vary": [], "content-disposition": "attachment; filename*=UTF-8''''re%C3%A7u.pdf", "x-tab": "a\tb"}');
COMMIT;
SELECT status, response_status, response_headers FROM idem_begin('bad');

-- Another role sees nothing of a stored response.
CREATE ROLE response_other;
GRANT USAGE ON SCHEMA public TO response_other;
SET ROLE response_other;
SELECT status, response_body FROM idem_begin('pay-1', '{"amount": 100}');
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) FROM idem_get('pay-1');
RESET ROLE;
DROP OWNED BY response_other;
DROP ROLE response_other;

-- A lone idem_begin in autocommit: its statement is its own transaction,
-- which the message says, with what to do instead.
SELECT status FROM idem_begin('autocommit');
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) FROM idempotency.keys WHERE key = 'autocommit';
-- In a transaction block the message is the usual one.
BEGIN;
SELECT status FROM idem_begin('forgotten');
COMMIT;
\echo :LAST_ERROR_SQLSTATE

-- The upsert helpers' row argument is called data, which needs no quotes.
CREATE TABLE response_orders (id int PRIMARY KEY, total numeric);
SELECT idem_upsert('response_orders', data => '{"id": 1, "total": 5}');
SELECT idem_insert_once('response_orders', data => '{"id": 1, "total": 6}');
SELECT * FROM response_orders;
DROP TABLE response_orders;
DELETE FROM idempotency.keys;
