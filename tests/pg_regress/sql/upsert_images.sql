-- unchanged means the row already holds exactly what the write would store.
-- Values are compared by their stored images, not by the type's equality:
-- INSERT ... ON CONFLICT DO UPDATE would write each of these, so idem_upsert
-- answers updated and writes them too.
CREATE EXTENSION IF NOT EXISTS citext;
CREATE TABLE people (
    id int PRIMARY KEY,
    email citext,
    amount numeric,
    doc jsonb,
    code char(4),
    label varchar(10)
);
SELECT idem_upsert('people', '{"id": 1, "email": "Anne@x.com", "amount": 1.0, "doc": {"a": 1.0}, "code": "ab"}');
-- citext: equal by =, not the same text.
SELECT idem_upsert('people', '{"id": 1, "email": "anne@x.com"}');
-- numeric: 1.00 = 1.0, but the scale is stored.
SELECT idem_upsert('people', '{"id": 1, "amount": 1.00}');
-- jsonb keeps the numbers as given.
SELECT idem_upsert('people', '{"id": 1, "doc": {"a": 1.00}}');
SELECT email, amount, doc FROM people;
-- The same values again write nothing.
SELECT idem_upsert('people', '{"id": 1, "email": "anne@x.com", "amount": 1.00, "doc": {"a": 1.00}}');
-- Type modifiers apply before comparing: char(4) stores 'ab' padded.
SELECT idem_upsert('people', '{"id": 1, "code": "ab"}');
SELECT idem_upsert('people', '{"id": 1, "code": "ab  "}');
-- NULL matches NULL.
SELECT idem_upsert('people', '{"id": 1, "label": null}');
SELECT idem_upsert('people', '{"id": 1, "label": "x"}');
SELECT idem_upsert('people', '{"id": 1, "label": null}');
-- Rows with an array column are converted by jsonb_populate_record; the
-- comparison is the same.
ALTER TABLE people ADD COLUMN tags text[];
SELECT idem_upsert('people', '{"id": 1, "tags": ["a"], "amount": 1.0}');
SELECT idem_upsert('people', '{"id": 1, "tags": ["a"], "amount": 1.0}');
SELECT idem_upsert('people', '{"id": 1, "tags": ["a"], "amount": 1.00}');
SELECT amount, tags FROM people;

-- What INSERT ... ON CONFLICT DO UPDATE stores, side by side: the same.
CREATE TABLE people_by_hand (LIKE people INCLUDING ALL);
INSERT INTO people_by_hand SELECT * FROM people;
INSERT INTO people_by_hand (id, email, amount) VALUES (1, 'ANNE@x.com', 1.000)
    ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email, amount = EXCLUDED.amount;
SELECT idem_upsert('people', '{"id": 1, "email": "ANNE@x.com", "amount": 1.000}');
SELECT (SELECT ROW(p.*)::text FROM people p) = (SELECT ROW(h.*)::text FROM people_by_hand h) AS same_row;

-- The conflicting row is still found by the unique index's equality: with a
-- citext key, 'b@x.com' conflicts with 'B@x.com', and the key column is not
-- rewritten (as ON CONFLICT DO UPDATE SET of the other columns would not).
CREATE TABLE subscribers (email citext PRIMARY KEY, plan text);
SELECT idem_upsert('subscribers', '{"email": "B@x.com", "plan": "free"}');
SELECT idem_upsert('subscribers', '{"email": "b@x.com", "plan": "free"}');
SELECT idem_upsert('subscribers', '{"email": "b@x.com", "plan": "pro"}');
SELECT * FROM subscribers;
SELECT idem_insert_once('subscribers', '{"email": "b@X.COM", "plan": "none"}');
SELECT * FROM subscribers;
