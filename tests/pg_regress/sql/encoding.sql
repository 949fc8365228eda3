-- Keys are UTF-8 text: a database of another encoding is refused at
-- CREATE EXTENSION, before anything is created.
SELECT current_database() AS home \gset
DROP DATABASE IF EXISTS idem_latin1;
CREATE DATABASE idem_latin1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0;
\c idem_latin1
-- Where the error was raised differs between versions (18 names the
-- install script's line too): the message, hint and SQLSTATE are the test.
\set SHOW_CONTEXT never
CREATE EXTENSION idempotency;
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) FROM pg_namespace WHERE nspname = 'idempotency';
\c :home
DROP DATABASE idem_latin1;
