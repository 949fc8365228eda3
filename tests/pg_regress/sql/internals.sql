-- What a DBA can rely on about how the extension is built.

-- The key lock has a fixed definition, so that backends running different
-- builds of the library agree on it, and a DBA can find a key's holder:
-- an advisory lock with objsubid 7648 (7649 for idem_once) whose classid
-- and objid are the high and low halves of
-- hashtextextended(key, hashtextextended(scope, 0)).
CREATE FUNCTION key_lock(key text, scope text, space int)
RETURNS TABLE (pid_is_mine boolean, mode text, granted boolean)
LANGUAGE sql AS $$
    SELECT l.pid = pg_backend_pid(), l.mode, l.granted
      FROM pg_locks l,
           (SELECT hashtextextended(key, hashtextextended(scope, 0)) AS h) x
     WHERE l.locktype = 'advisory' AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND l.objsubid = space
       AND l.classid = ((x.h >> 32) & 4294967295)::oid
       AND l.objid = (x.h & 4294967295)::oid
$$;
BEGIN;
SELECT status FROM idem_begin('order-42', scope => 'shop');
SELECT * FROM key_lock('order-42', 'shop', 7648);
SELECT * FROM key_lock('order-42', '', 7648);
SELECT idem_fail('order-42', scope => 'shop');
ROLLBACK;
BEGIN;
SELECT status FROM idem_begin('ключ-€', scope => 'Ä');
SELECT * FROM key_lock('ключ-€', 'Ä', 7648);
ROLLBACK;

-- The functions call the library of their own version, so that SQL of one
-- release never runs against the library of another.
SELECT DISTINCT probin FROM pg_proc WHERE probin LIKE '%idempotency%';
SELECT DISTINCT probin AS library FROM pg_proc WHERE probin LIKE '%idempotency%' \gset

-- idem_get reads the clock to hide expired keys: it is volatile.
SELECT proname, provolatile FROM pg_proc WHERE proname IN ('idem_get', 'idem_begin') ORDER BY 1;

-- A ttl (or a lease, see lease_mode) is positive when it ends later by calendar arithmetic,
-- which is also how the expiry is computed: a year less 361 days is four or
-- five days (counting months as 30 days, it would be -1 day).
BEGIN;
SELECT status FROM idem_begin('calendar');
SELECT idem_finish('calendar', ttl => '1 year -361 days');
SELECT expires_at = now() + interval '1 year -361 days' AS calendar_expiry,
       expires_at > now() AS in_the_future
  FROM idem_get('calendar');
ROLLBACK;
-- Zero or less by the calendar is refused, whatever the month lengths.
SELECT idem_begin('calendar', lease => '1 year -366 days');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_begin('calendar', wait => '-1 year +364 days');
\echo :LAST_ERROR_SQLSTATE
BEGIN;
SELECT status FROM idem_begin('calendar');
SELECT idem_finish('calendar', ttl => '1 month -31 days');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;

-- A declaration that does not match what the library reads is refused on
-- the first call, instead of reading a datum as the wrong type.
CREATE FUNCTION wrong_begin(key int) RETURNS idem_begin_result
    LANGUAGE c AS :'library', 'idem_begin';
SELECT wrong_begin(1);
\echo :LAST_ERROR_SQLSTATE
CREATE TYPE wrong_result AS (status int);
CREATE FUNCTION wrong_begin(key text, request jsonb, scope text, lease interval, wait interval)
    RETURNS wrong_result LANGUAGE c AS :'library', 'idem_begin';
SELECT wrong_begin('k', NULL, '', NULL, '0');
\echo :LAST_ERROR_SQLSTATE
CREATE FUNCTION wrong_once(key text, scope text) RETURNS text
    LANGUAGE c AS :'library', 'idem_once';
SELECT wrong_once('k', '');
\echo :LAST_ERROR_SQLSTATE
CREATE FUNCTION wrong_get(key text, scope text)
    RETURNS TABLE (status text, result jsonb, attempt bigint) LANGUAGE c AS :'library', 'idem_get';
SELECT * FROM wrong_get('k', '');
\echo :LAST_ERROR_SQLSTATE
DROP FUNCTION wrong_begin(int), wrong_begin(text, jsonb, text, interval, interval), wrong_once(text, text),
    wrong_get(text, text);
DROP TYPE wrong_result;
-- The result type changed under a running backend is noticed too.
BEGIN;
SELECT status FROM idem_begin('typed');
ALTER TYPE idem_begin_result ADD ATTRIBUTE extra int;
SELECT status FROM idem_begin('typed');
ROLLBACK;
\echo :LAST_ERROR_SQLSTATE
BEGIN;
SELECT status FROM idem_begin('typed');
ROLLBACK;
