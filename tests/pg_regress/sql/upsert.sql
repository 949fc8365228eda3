-- idem_upsert and idem_insert_once: retry-safe writes to your own tables.
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE accounts (
    id int PRIMARY KEY,
    email text UNIQUE,
    name text,
    balance numeric(12, 2) DEFAULT 0,
    active boolean DEFAULT true,
    born date,
    seen_at timestamptz,
    token uuid,
    tags text[],
    scores int[],
    prefs jsonb,
    raw json,
    mood mood,
    big bigint,
    updated_count int DEFAULT 0
);
SET TimeZone = 'UTC';

SELECT idem_upsert('accounts', '{"id": 1, "email": "a@example.com", "name": "Ann"}');
SELECT idem_upsert('accounts', '{"id": 1, "email": "a@example.com", "name": "Ann"}');
SELECT idem_upsert('accounts', '{"id": 1, "name": "Anne"}');
-- Columns missing from row keep their value on update, their default on insert.
SELECT id, email, name, balance, active FROM accounts;

-- Every column type round-trips from JSON.
SELECT idem_upsert('accounts', '{"id": 2, "email": "b@example.com", "name": "Bob", "balance": 12.5,
  "active": false, "born": "1990-02-03", "seen_at": "2024-05-06T07:08:09Z",
  "token": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "tags": ["x", "y"], "scores": [1, 2, 3],
  "prefs": {"theme": "dark", "n": [1, 2]}, "raw": {"kept": "as is"}, "mood": "happy", "big": 9007199254740993}');
SELECT * FROM accounts WHERE id = 2;
SELECT idem_upsert('accounts', '{"id": 2, "email": "b@example.com", "name": "Bob", "balance": 12.50,
  "active": false, "born": "1990-02-03", "seen_at": "2024-05-06T07:08:09Z",
  "token": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "tags": ["x", "y"], "scores": [1, 2, 3],
  "prefs": {"n": [1, 2], "theme": "dark"}, "raw": {"kept": "as is"}, "mood": "happy", "big": 9007199254740993}');
-- NULL is a value like any other.
SELECT idem_upsert('accounts', '{"id": 2, "name": null}');
SELECT idem_upsert('accounts', '{"id": 2, "name": null}');
SELECT name IS NULL AS name_is_null FROM accounts WHERE id = 2;

-- unchanged writes nothing: the row keeps its version (xmin) and is not locked.
CREATE TEMP TABLE before AS SELECT xmin::text AS x, ctid AS place FROM accounts WHERE id = 1;
SELECT idem_upsert('accounts', '{"id": 1, "name": "Anne"}');
SELECT a.xmin::text = b.x AS same_version, a.ctid = b.place AS same_place
  FROM accounts a, before b WHERE a.id = 1;
-- A transaction that only did an unchanged upsert has no transaction id:
-- it wrote no row version and took no row lock (both would need one).
BEGIN;
SELECT idem_upsert('accounts', '{"id": 1, "name": "Anne"}');
SELECT txid_current_if_assigned() IS NULL AS nothing_written;
SELECT idem_upsert('accounts', '{"id": 1, "name": "Anne!"}');
SELECT txid_current_if_assigned() IS NULL AS nothing_written;
ROLLBACK;

-- Another unique index as the conflict target.
SELECT idem_upsert('accounts', '{"id": 1, "email": "a@example.com", "name": "Ann E."}', conflict_columns => '{email}');
SELECT idem_upsert('accounts', '{"id": 3, "email": "c@example.com"}', ARRAY['email']);
SELECT id, email, name FROM accounts ORDER BY id;

-- idem_insert_once never changes an existing row.
SELECT idem_insert_once('accounts', '{"id": 4, "name": "Dee"}');
SELECT idem_insert_once('accounts', '{"id": 4, "name": "Changed"}');
SELECT idem_insert_once('accounts', '{"id": 5, "email": "a@example.com"}', '{email}');
SELECT id, name FROM accounts WHERE id IN (4, 5) ORDER BY id;

-- Names that need quoting: spaces, quotes, mixed case, another schema.
CREATE SCHEMA "Billing Dept";
CREATE TABLE "Billing Dept"."Invoice ""Lines""" ("Line No" int PRIMARY KEY, "Amount €" numeric, "it's" text);
SELECT idem_upsert('"Billing Dept"."Invoice ""Lines"""', '{"Line No": 1, "Amount €": 9.5, "it''s": "quoted"}');
SELECT idem_upsert('"Billing Dept"."Invoice ""Lines"""', '{"Line No": 1, "Amount €": 10}');
SELECT * FROM "Billing Dept"."Invoice ""Lines""";

-- Injection attempts are data or clean errors, never SQL.
SELECT idem_upsert('accounts', '{"id": 6, "name": "x''); DROP TABLE accounts; --"}');
SELECT name FROM accounts WHERE id = 6;
SELECT idem_upsert('accounts', '{"id": 7, "name = ''pwned'' --": "x"}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('accounts', '{"id\" = 1; DROP TABLE accounts; --": 1}');
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) AS accounts_still_there FROM accounts;

-- Generated and identity columns.
CREATE TABLE items (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sku text UNIQUE NOT NULL,
    price numeric,
    price_with_tax numeric GENERATED ALWAYS AS (price * 1.2) STORED
);
SELECT idem_upsert('items', '{"sku": "A-1", "price": 10}', '{sku}');
SELECT idem_upsert('items', '{"sku": "A-1", "price": 12}', '{sku}');
SELECT idem_upsert('items', '{"id": 100, "sku": "B-2", "price": 1}');
SELECT idem_upsert('items', '{"id": 100, "sku": "B-2", "price": 1}');
SELECT id, sku, price, price_with_tax FROM items ORDER BY id;
SELECT idem_upsert('items', '{"sku": "C-3", "price_with_tax": 5}', '{sku}');
\echo :LAST_ERROR_SQLSTATE

-- A table without a primary key needs conflict_columns.
CREATE TABLE events (source text, event_id text, payload jsonb, UNIQUE (source, event_id));
SELECT idem_insert_once('events', '{"source": "s", "event_id": "e1", "payload": {}}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_insert_once('events', '{"source": "s", "event_id": "e1", "payload": {}}', '{event_id, source}');
SELECT idem_insert_once('events', '{"source": "s", "event_id": "e1", "payload": {"v": 2}}', '{source, event_id}');
SELECT idem_upsert('events', '{"source": "s", "event_id": "e1", "payload": {"v": 2}}', '{source, event_id}');
SELECT payload FROM events;

-- Plans follow the table: ALTER TABLE and DROP/CREATE are picked up.
SELECT idem_upsert('events', '{"source": "s", "event_id": "e2", "payload": {}}', '{source, event_id}');
ALTER TABLE events ADD COLUMN received_at date;
SELECT idem_upsert('events', '{"source": "s", "event_id": "e2", "received_at": "2024-01-01"}', '{source, event_id}');
ALTER TABLE events DROP COLUMN payload;
SELECT idem_upsert('events', '{"source": "s", "event_id": "e2", "received_at": "2024-01-02"}', '{source, event_id}');
SELECT idem_upsert('events', '{"source": "s", "event_id": "e2", "payload": {}}', '{source, event_id}');
\echo :LAST_ERROR_SQLSTATE
DROP TABLE events;
CREATE TABLE events (source text, event_id text, n int, PRIMARY KEY (source, event_id));
SELECT idem_upsert('events', '{"source": "s", "event_id": "e2", "n": 1}', '{source, event_id}');
SELECT * FROM events;

-- Errors, each with its SQLSTATE.
CREATE VIEW accounts_view AS SELECT * FROM accounts;
SELECT idem_upsert('accounts_view', '{"id": 1}');
\echo :LAST_ERROR_SQLSTATE
CREATE SEQUENCE a_sequence;
SELECT idem_insert_once('a_sequence', '{"id": 1}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('accounts', '{"id": 1, "nope": 2}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('accounts', '{"id": 1}', '{nope}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('accounts', '{"id": 1, "name": "x"}', '{name}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('accounts', '{"id": 1}', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('accounts', '[1, 2]');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('accounts', '"a string"');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('accounts', '{}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('accounts', '{"id": "not a number"}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('accounts', '{"id": 1, "born": "yesterday-ish"}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('accounts', '{"id": 1, "mood": "angry"}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('accounts', '{"id": 99999999999}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('accounts', NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('no_such_table', '{"id": 1}');
\echo :LAST_ERROR_SQLSTATE

-- The caller's privileges apply: GRANTs and row-level security.
CREATE ROLE upsert_user;
GRANT SELECT, INSERT ON accounts TO upsert_user;
SET ROLE upsert_user;
SELECT idem_insert_once('accounts', '{"id": 10, "name": "allowed"}');
SELECT idem_upsert('accounts', '{"id": 10, "name": "needs UPDATE"}');
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
CREATE TABLE notes (id int PRIMARY KEY, owner text, body text);
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_notes ON notes USING (owner = current_user) WITH CHECK (owner = current_user);
GRANT SELECT, INSERT, UPDATE ON notes TO upsert_user;
SET ROLE upsert_user;
SELECT idem_upsert('notes', '{"id": 1, "owner": "upsert_user", "body": "mine"}');
SELECT idem_upsert('notes', '{"id": 2, "owner": "someone_else", "body": "theirs"}');
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
-- A row the policy hides, with the key the caller upserts: 42501, as
-- INSERT ... ON CONFLICT DO UPDATE gives, not a 40001 that no retry
-- fixes; idem_insert_once answers false, as ON CONFLICT DO NOTHING does.
INSERT INTO notes VALUES (3, 'someone_else', 'hidden');
SET ROLE upsert_user;
SELECT idem_upsert('notes', '{"id": 3, "owner": "upsert_user", "body": "mine now"}');
\echo :LAST_ERROR_SQLSTATE
INSERT INTO notes VALUES (3, 'upsert_user', 'plain') ON CONFLICT (id) DO UPDATE SET body = excluded.body;
\echo :LAST_ERROR_SQLSTATE
SELECT idem_insert_once('notes', '{"id": 3, "owner": "upsert_user", "body": "mine now"}');
RESET ROLE;
SELECT * FROM notes ORDER BY id;
DROP TABLE notes;
-- The same through a partitioned table.
CREATE TABLE notes_p (id int PRIMARY KEY, owner text, body text) PARTITION BY RANGE (id);
CREATE TABLE notes_p1 PARTITION OF notes_p FOR VALUES FROM (0) TO (100);
ALTER TABLE notes_p ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_notes ON notes_p USING (owner = current_user) WITH CHECK (owner = current_user);
GRANT SELECT, INSERT, UPDATE ON notes_p TO upsert_user;
INSERT INTO notes_p VALUES (3, 'someone_else', 'hidden');
SET ROLE upsert_user;
SELECT idem_upsert('notes_p', '{"id": 3, "owner": "upsert_user", "body": "mine now"}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('notes_p', '{"id": 4, "owner": "upsert_user", "body": "mine"}');
RESET ROLE;
SELECT * FROM notes_p ORDER BY id;
DROP TABLE notes_p;

-- A BEFORE INSERT trigger that returns NULL skips the row: `skipped`
-- (nothing written, no row conflicts), not a 40001 that no retry fixes;
-- idem_insert_once answers false. A rule that does nothing instead of the
-- insert is the same.
CREATE TABLE filtered (id int PRIMARY KEY, v text);
CREATE FUNCTION drop_odd() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN IF NEW.id % 2 = 1 THEN RETURN NULL; END IF; RETURN NEW; END $$;
CREATE TRIGGER drop_odd BEFORE INSERT ON filtered FOR EACH ROW EXECUTE FUNCTION drop_odd();
SELECT idem_upsert('filtered', '{"id": 1, "v": "odd"}');
SELECT idem_upsert('filtered', '{"id": 2, "v": "even"}');
SELECT idem_upsert('filtered', '{"id": 2, "v": "even, again"}');
SELECT idem_insert_once('filtered', '{"id": 3, "v": "odd"}');
SELECT * FROM filtered ORDER BY id;
DROP TRIGGER drop_odd ON filtered;
CREATE RULE nothing AS ON INSERT TO filtered DO INSTEAD NOTHING;
SELECT idem_upsert('filtered', '{"id": 5, "v": "ruled out"}');
SELECT idem_upsert('filtered', '{"id": 2, "v": "updates still work"}');
SELECT * FROM filtered ORDER BY id;
DROP TABLE filtered;
-- The same for a partitioned table, whose partitions have the triggers.
CREATE TABLE filtered_p (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
CREATE TABLE filtered_p1 PARTITION OF filtered_p FOR VALUES FROM (0) TO (100);
CREATE TABLE filtered_p2 PARTITION OF filtered_p FOR VALUES FROM (100) TO (200)
    PARTITION BY RANGE (id);
CREATE TABLE filtered_p2a PARTITION OF filtered_p2 FOR VALUES FROM (100) TO (200);
CREATE TRIGGER drop_odd BEFORE INSERT ON filtered_p2a FOR EACH ROW EXECUTE FUNCTION drop_odd();
SELECT idem_upsert('filtered_p', '{"id": 101, "v": "odd, in a sub-partition"}');
SELECT idem_upsert('filtered_p', '{"id": 102, "v": "even"}');
SELECT idem_upsert('filtered_p', '{"id": 1, "v": "no trigger here"}');
SELECT * FROM filtered_p ORDER BY id;
DROP TABLE filtered_p;
DROP FUNCTION drop_odd();
REVOKE ALL ON accounts FROM upsert_user;
DROP ROLE upsert_user;

-- The conflict columns must have values: a missing or NULL one would match
-- nothing, and every retry would insert again.
SELECT idem_insert_once('accounts', '{"name": "no id"}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('accounts', '{"id": null, "name": "null id"}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('accounts', '{"id": 20, "email": null}', '{email}');
\echo :LAST_ERROR_SQLSTATE

-- A hostile "=" first on the caller's search_path does not change which row
-- an upsert matches: its operators are written schema-qualified.
CREATE SCHEMA evil;
CREATE FUNCTION evil.always(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT true';
CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.always);
CREATE TABLE tags (name text PRIMARY KEY, n int);
INSERT INTO tags VALUES ('a', 1), ('b', 2);
SET search_path = evil, public, pg_catalog;
SELECT idem_upsert('tags', '{"name": "b", "n": 20}');
SELECT idem_upsert('tags', '{"name": "b", "n": 20}');
RESET search_path;
SELECT * FROM tags ORDER BY name;
DROP SCHEMA evil CASCADE;

-- Renaming the table's schema is picked up too.
CREATE SCHEMA before_rename;
CREATE TABLE before_rename.t (id int PRIMARY KEY, v int);
SELECT idem_upsert('before_rename.t', '{"id": 1, "v": 1}');
ALTER SCHEMA before_rename RENAME TO after_rename;
SELECT idem_upsert('after_rename.t', '{"id": 1, "v": 2}');
SELECT * FROM after_rename.t;
DROP SCHEMA after_rename CASCADE;

-- A row of scalar columns is bound value by value, each through its type's
-- input function; the values are exactly what jsonb_populate_record makes.
CREATE TABLE scalars (id int PRIMARY KEY, short varchar(3), fixed char(3), amount numeric(5, 2),
  flag boolean, label text, doc jsonb, span int4range, wait interval, at timestamptz, mood mood);
CREATE TEMP TABLE inputs (n int, r jsonb);
INSERT INTO inputs VALUES
  (1, '{"id": 1, "short": "ab", "fixed": "x", "amount": 1.005, "flag": "t", "label": 12.50, "doc": "plain",
        "span": "[1,5)", "wait": "1 day", "at": "2024-01-01 12:00+02", "mood": "sad"}'),
  (2, '{"id": "2", "short": null, "fixed": "abc", "amount": "3", "flag": true, "label": {"b": 1, "a": [true]},
        "doc": {"n": 1.50}, "span": "empty", "wait": "PT1H", "at": "2024-06-01T00:00:00Z", "mood": "happy"}'),
  (3, '{"id": 3, "label": false, "doc": [1, "two", null], "flag": "yes", "amount": -0.5, "span": [1, 2]}');
SELECT n, idem_upsert('scalars', r) FROM inputs ORDER BY n;
SELECT * FROM scalars ORDER BY id;
SELECT n, s::text = jsonb_populate_record(NULL::scalars, i.r)::text AS as_populate_record
  FROM inputs i JOIN scalars s ON s.id = (i.r->>'id')::int ORDER BY n;
-- The same rows again change nothing.
SELECT n, idem_upsert('scalars', r) FROM inputs ORDER BY n;
-- Values that do not fit fail with their type's own error; nothing is written.
SELECT idem_upsert('scalars', '{"id": 4, "short": "abcd"}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('scalars', '{"id": 4, "amount": 1000}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('scalars', '{"id": 4.5}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_upsert('scalars', '{"id": 1, "mood": "angry"}');
\echo :LAST_ERROR_SQLSTATE
SELECT idem_insert_once('scalars', '{"id": 4, "at": "soon"}');
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) AS rows, count(*) FILTER (WHERE mood = 'sad') AS still_sad FROM scalars;
DROP TABLE scalars;
