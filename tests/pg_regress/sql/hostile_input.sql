-- Hostile input to every function, table-driven: each call either works or
-- fails with the SQLSTATE listed, and nothing stored changes unless the
-- call is meant to store.
CREATE TABLE hostile_target (id int PRIMARY KEY, name text, doc jsonb);
CREATE TEMP TABLE once_before AS SELECT scope, key FROM idempotency.once;
INSERT INTO hostile_target VALUES (1, 'one', '{}');
BEGIN;
SELECT status FROM idem_begin('hostile:done', request => '{"a": 1}');
SELECT idem_finish('hostile:done', '"stored"');
COMMIT;
SELECT idem_once('hostile:once');

CREATE TEMP TABLE cases (n serial, call text);
INSERT INTO cases (call) VALUES
    -- NULLs where a value is needed.
    ($$SELECT * FROM idem_begin(NULL)$$),
    ($$SELECT * FROM idem_begin('k', scope => NULL)$$),
    ($$SELECT idem_finish(NULL)$$),
    ($$SELECT idem_fail(NULL)$$),
    ($$SELECT idem_checkpoint('k', NULL)$$),
    ($$SELECT idem_once(NULL)$$),
    ($$SELECT * FROM idem_get(NULL)$$),
    ($$SELECT idem_upsert(NULL, '{"id": 1}')$$),
    ($$SELECT idem_upsert('hostile_target', NULL)$$),
    ($$SELECT idem_upsert('hostile_target', '{"id": 1}', ARRAY[NULL]::text[])$$),
    ($$SELECT idem_canonical(NULL)$$),
    -- Key lengths: empty, one over the limit, the limit in astral-plane
    -- characters (4 bytes each, one character each).
    ($$SELECT * FROM idem_begin('')$$),
    ($$SELECT * FROM idem_begin(repeat('k', 256))$$),
    ($$SELECT * FROM idem_begin(repeat('😀', 256))$$),
    ($$SELECT status FROM idem_begin('hostile:done', scope => repeat('s', 256))$$),
    ($$SELECT idem_once(repeat('😀', 255))$$),
    ($$SELECT idem_once(repeat('x', 100000))$$),
    -- Control characters and SQL built to inject are keys like any other.
    ($$SELECT idem_once(E'line\nbreak\ttab\x01\x1f')$$),
    ($$SELECT idem_once($q$'); DELETE FROM idempotency.keys; --$q$)$$),
    ($$SELECT * FROM idem_get($q$' OR 1=1 --$q$)$$),
    -- Intervals: not positive, negative, past the end of time.
    ($$SELECT * FROM idem_begin('k', lease => '0')$$),
    ($$SELECT * FROM idem_begin('k', lease => '-1 hour')$$),
    ($$SELECT * FROM idem_begin('k', lease => '1 month -31 days')$$),
    ($$SELECT * FROM idem_begin('k', wait => '-1 second')$$),
    ($$SELECT * FROM idem_begin('k', lease => '100000000 years')$$),
    ($$SELECT status FROM idem_begin('hostile:done', wait => '100000000 years')$$),
    ($$SELECT idem_finish('hostile:done', ttl => '-1 day')$$),
    -- Tokens that were never issued.
    ($$SELECT idem_finish('hostile:done', token => -1)$$),
    ($$SELECT idem_finish('hostile:none', token => 9223372036854775807)$$),
    ($$SELECT idem_checkpoint('hostile:done', 'p', token => 0)$$),
    -- Requests: deep, numbers past a double, a changed request.
    ($$SELECT status FROM idem_begin('hostile:done', request => (repeat('[', 5000) || repeat(']', 5000))::jsonb)$$),
    ($$SELECT status FROM idem_begin('hostile:done', request => '{"a": 1e400}')$$),
    ($$SELECT status FROM idem_begin('hostile:done', request => '{"a": 1.0}')$$),
    ($$SELECT length(idem_canonical((repeat('{"k":', 10000) || '1' || repeat('}', 10000))::jsonb))$$),
    ($$SELECT idem_fingerprint('-0.0e-400')$$),
    -- Upserts: names that are not columns, injection in names, targets
    -- that are not tables.
    ($$SELECT idem_upsert('hostile_target', '{"id": 1, "name\"; DROP TABLE hostile_target; --": 1}')$$),
    ($$SELECT idem_upsert('hostile_target; DROP TABLE hostile_target', '{"id": 1}')$$),
    ($$SELECT idem_upsert('pg_class', '{"oid": 1}')$$),
    ($$SELECT idem_upsert('hostile_target', '[1, 2]')$$),
    ($$SELECT idem_upsert('hostile_target', '{}')$$),
    ($$SELECT idem_upsert('hostile_target', '{"id": "one"}')$$),
    ($$SELECT idem_upsert('hostile_target', '{"id": 99999999999}')$$),
    ($$SELECT idem_upsert('hostile_target', '{"id": 1, "doc": [1, {"x": "''); DROP TABLE hostile_target; --"}]}')$$),
    ($$SELECT idem_upsert('hostile_target', '{"id": 1}', '{nope}')$$),
    ($$SELECT idem_upsert('hostile_target', '{"id": 1}', '{name}')$$),
    -- Purge sizes.
    ($$SELECT idem_purge(-1)$$),
    ($$SELECT idem_purge(0)$$);

CREATE TEMP TABLE outcomes (n int, call text, sqlstate text);
DO $$
DECLARE
    c record;
    state text;
BEGIN
    FOR c IN SELECT * FROM cases ORDER BY n LOOP
        BEGIN
            EXECUTE c.call;
            state := 'ok';
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE;
        END;
        INSERT INTO outcomes VALUES (c.n, c.call, state);
    END LOOP;
END $$;
SELECT n, sqlstate, left(call, 90) AS call FROM outcomes ORDER BY n;

-- What is stored: the finished key unchanged, the injected text as a key,
-- the target's row as it was but for the one upsert meant to change it
-- (its doc holds the injected text as a JSON string).
SELECT key, status, result FROM idempotency.keys WHERE key LIKE 'hostile%' ORDER BY key;
SELECT count(*) AS new_once_keys, count(*) FILTER (WHERE key LIKE '%DELETE FROM%') AS injected_text_kept
  FROM idempotency.once o
 WHERE NOT EXISTS (SELECT FROM once_before b WHERE b.scope = o.scope AND b.key = o.key);
SELECT * FROM hostile_target ORDER BY id;
DELETE FROM idempotency.keys WHERE key LIKE 'hostile%';
DELETE FROM idempotency.once o
 WHERE NOT EXISTS (SELECT FROM once_before b WHERE b.scope = o.scope AND b.key = o.key);
DROP TABLE hostile_target;
