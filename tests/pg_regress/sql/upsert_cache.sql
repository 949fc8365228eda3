-- What a backend keeps for the tables it upserts into: one description
-- per table, in a memory context of its own that pg_backend_memory_contexts
-- shows by the table's name. A changed table gets a new description and
-- the old one is freed (at the start of the next call, since a call may be
-- running the old plans when the change arrives).
CREATE TABLE c1 (id int PRIMARY KEY, v text);
CREATE TABLE c2 (id int PRIMARY KEY, v text);
CREATE SCHEMA cs;
CREATE TABLE cs.c3 (id int PRIMARY KEY, v text);
CREATE VIEW described AS
    SELECT ident, count(*) AS contexts
      FROM pg_backend_memory_contexts
     WHERE name = 'idempotency upsert target'
     GROUP BY ident ORDER BY ident;

SELECT idem_upsert('c1', '{"id": 1, "v": "a"}'), idem_upsert('c2', '{"id": 1, "v": "a"}'),
       idem_upsert('cs.c3', '{"id": 1, "v": "a"}');
SELECT * FROM described;

-- A hundred changes to c1, each followed by a call: still one description
-- of c1, and no memory left behind by the input functions of the old ones.
DO $$
BEGIN
    FOR i IN 1..100 LOOP
        EXECUTE 'ALTER TABLE c1 ADD COLUMN x' || i || ' int';
        PERFORM idem_upsert('c1', jsonb_build_object('id', 1, 'v', 'a' || i, 'x' || i, i));
    END LOOP;
END $$;
SELECT idem_upsert('c1', '{"id": 1, "v": "b"}'), idem_upsert('c2', '{"id": 1, "v": "a"}');
SELECT * FROM described;

-- A new schema (every session's first temporary table makes one) changes
-- pg_namespace: descriptions of tables in other schemas are kept.
CREATE TEMP TABLE scratch (x int);
SELECT idem_upsert('c2', '{"id": 1, "v": "b"}');
SELECT * FROM described;
-- A renamed schema changes the names of its tables: their descriptions go.
ALTER SCHEMA cs RENAME TO cs2;
SELECT idem_upsert('c2', '{"id": 1, "v": "c"}');
SELECT * FROM described;
SELECT idem_upsert('cs2.c3', '{"id": 1, "v": "b"}');
SELECT * FROM described;
-- A dropped table's description goes too.
DROP TABLE c1;
SELECT idem_upsert('c2', '{"id": 1, "v": "d"}');
SELECT * FROM described;

-- The cache is bounded: past idempotency.upsert_cache_size statements, or
-- tables described, the least recently used are freed (at the start of the
-- next call). Twenty tables, three statements each (update, look, insert),
-- with room for five: the last five statements and the last five tables
-- stay.
CREATE VIEW statements AS
    SELECT count(*) AS statements
      FROM pg_backend_memory_contexts
     WHERE name = 'CachedPlanSource' AND ident LIKE '%lru%';
SET idempotency.upsert_cache_size = 5;
DO $$
BEGIN
    FOR i IN 1..20 LOOP
        EXECUTE format('CREATE TABLE lru%s (id int PRIMARY KEY, a int, b int, c int, d int)', i);
    END LOOP;
END $$;
-- (Created and committed first: the commit of a CREATE TABLE forgets what
-- the same transaction described of the new table.)
SELECT count(idem_upsert(format('lru%s', i)::regclass, '{"id": 1, "a": 1}'))
  FROM generate_series(1, 20) i;
SELECT idem_upsert('lru20', '{"id": 1, "a": 2}');
SELECT * FROM statements;
SELECT count(*) AS tables FROM pg_backend_memory_contexts
 WHERE name = 'idempotency upsert target' AND ident LIKE '%lru%';
-- One table upserted with every subset of four columns: fifteen sets of
-- columns, three statements each; five kept.
SELECT count(*) AS upserts
  FROM generate_series(1, 15) m,
       LATERAL (SELECT idem_upsert('lru20', jsonb_object_agg(c, m) || '{"id": 2}')
                  FROM unnest(ARRAY['a', 'b', 'c', 'd']) WITH ORDINALITY AS u(c, n)
                 WHERE m & (1 << (n - 1)::int) <> 0) AS u;
-- (A call that prepares a statement retires the least recently used one,
-- which the next call frees when it starts: the first two calls here
-- prepare the update and the look for these columns, the third prepares
-- nothing.)
SELECT idem_upsert('lru20', '{"id": 2, "a": 1}');
SELECT idem_upsert('lru20', '{"id": 2, "a": 1}');
SELECT idem_upsert('lru20', '{"id": 2, "a": 1}');
SELECT * FROM statements;
SELECT count(*) AS tables FROM pg_backend_memory_contexts
 WHERE name = 'idempotency upsert target' AND ident LIKE '%lru%';
RESET idempotency.upsert_cache_size;
