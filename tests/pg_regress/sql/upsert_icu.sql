-- A nondeterministic collation (ICU): 'ANN' = 'Ann', but the stored text
-- differs, so idem_upsert writes it and answers updated, as INSERT ... ON
-- CONFLICT DO UPDATE would; a key in that collation finds its conflicting
-- row by the index's equality. Skipped on a server built without ICU, as
-- PostgreSQL's own ICU tests are (the other expected file).
DO $$
BEGIN
    CREATE COLLATION icu_probe (provider = icu, locale = 'und');
    DROP COLLATION icu_probe;
EXCEPTION WHEN feature_not_supported THEN
    CREATE TEMP TABLE built_without_icu ();
END
$$;
SELECT to_regclass('built_without_icu') IS NOT NULL AS no_icu \gset
\if :no_icu
\echo 'skipped: this server is built without ICU'
\quit
\endif
CREATE COLLATION case_insensitive (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
CREATE TABLE nicknames (id int PRIMARY KEY, nick text COLLATE case_insensitive);
SELECT idem_upsert('nicknames', '{"id": 1, "nick": "Ann"}');
SELECT idem_upsert('nicknames', '{"id": 1, "nick": "ANN"}');
SELECT nick FROM nicknames;
SELECT idem_upsert('nicknames', '{"id": 1, "nick": "ANN"}');
CREATE TABLE handles (nick text COLLATE case_insensitive PRIMARY KEY, n int);
SELECT idem_upsert('handles', '{"nick": "Bob", "n": 1}');
SELECT idem_upsert('handles', '{"nick": "BOB", "n": 2}');
SELECT idem_insert_once('handles', '{"nick": "bob", "n": 3}');
SELECT * FROM handles;
DROP TABLE nicknames, handles;
DROP COLLATION case_insensitive;
