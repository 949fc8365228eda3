-- The extension's tables under a DBA's maintenance: indexes added, a
-- trigger, constraints and columns added, REINDEX, VACUUM FULL. Calls keep
-- working, every index stays complete (amcheck), and what the table needs
-- (a trigger, a constraint, a default) applies to the rows it writes.
CREATE EXTENSION amcheck;
CREATE FUNCTION check_indexes() RETURNS SETOF text LANGUAGE sql AS $$
    SELECT c.relname::text || ': ok'
      FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid,
           LATERAL bt_index_check(i.indexrelid, heapallindexed => true)
     WHERE i.indrelid IN ('idempotency.keys'::regclass, 'idempotency.once'::regclass)
     ORDER BY 1
$$;
CREATE FUNCTION job(k text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE s text;
BEGIN
    SELECT status INTO s FROM idem_begin(k, request => jsonb_build_object('k', k));
    IF s = 'started' THEN
        PERFORM idem_finish(k, jsonb_build_object('done', k));
    END IF;
    RETURN s;
END $$;

SELECT job('m1'), job('m1'), idem_once('m1'), idem_once('m1');

-- A second index on plain columns: rows go on being inserted without SQL,
-- into both indexes.
CREATE INDEX keys_expiry ON idempotency.keys (expires_at);
CREATE INDEX once_recorded ON idempotency.once (recorded_at);
SELECT job('m2'), job('m2'), idem_once('m2'), idem_once('m2');
-- More claims than a transaction takes by its lock alone: claim rows too.
BEGIN;
SELECT count(*) FILTER (WHERE status = 'started') AS started
  FROM generate_series(1, 20) g, idem_begin('batch-' || g);
SELECT count(idem_finish('batch-' || g)) FROM generate_series(1, 20) g;
COMMIT;
SELECT * FROM check_indexes();

-- Indexes on expressions and with a WHERE clause need the executor: rows
-- are then inserted with SQL, and the indexes are complete too.
CREATE INDEX keys_lower ON idempotency.keys (lower(key));
CREATE INDEX keys_open ON idempotency.keys (key) WHERE status = 'p';
CREATE INDEX once_lower ON idempotency.once (lower(key));
SELECT job('m3'), job('m3'), idem_once('m3'), idem_once('m3');
BEGIN;
SELECT count(*) FILTER (WHERE status = 'started') AS started
  FROM generate_series(21, 40) g, idem_begin('batch-' || g);
SELECT count(*) FROM idempotency.keys WHERE status = 'p';
SELECT count(idem_finish('batch-' || g)) FROM generate_series(21, 40) g;
COMMIT;
SELECT * FROM check_indexes();
DROP INDEX idempotency.keys_lower, idempotency.keys_open, idempotency.once_lower,
           idempotency.keys_expiry, idempotency.once_recorded;

-- A trigger fires for the rows the functions insert (pg_repack adds one
-- for its run).
CREATE TABLE audit (key text, status "char");
CREATE FUNCTION audit_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit VALUES (NEW.key, NEW.status);
    RETURN NEW;
END $$;
CREATE TRIGGER keys_audit AFTER INSERT ON idempotency.keys
    FOR EACH ROW EXECUTE FUNCTION audit_key();
SELECT job('m4'), job('m4');
SELECT * FROM audit;
-- Once dropped, nothing fires, although pg_class.relhastriggers stays set
-- until the next VACUUM.
DROP TRIGGER keys_audit ON idempotency.keys;
SELECT relhastriggers FROM pg_class WHERE oid = 'idempotency.keys'::regclass;
SELECT job('m5'), job('m5');
SELECT * FROM audit;

-- A CHECK constraint applies (to new rows: NOT VALID skips the old ones).
ALTER TABLE idempotency.keys ADD CONSTRAINT short_keys CHECK (length(key) < 10) NOT VALID;
SELECT job('fits');
\set VERBOSITY terse
SELECT job('does-not-fit');
\set VERBOSITY default
\echo :LAST_ERROR_SQLSTATE
ALTER TABLE idempotency.keys DROP CONSTRAINT short_keys;
-- So does a column's default, and NOT NULL on a column left NULL.
ALTER TABLE idempotency.keys ADD COLUMN note text NOT NULL DEFAULT 'kept';
SELECT job('m6');
SELECT key, note FROM idempotency.keys WHERE key IN ('m5', 'm6') ORDER BY key;
ALTER TABLE idempotency.keys DROP COLUMN note;
BEGIN;
DELETE FROM idempotency.keys WHERE recovery_point IS NULL;
ALTER TABLE idempotency.keys ALTER COLUMN recovery_point SET NOT NULL;
\set VERBOSITY terse
SELECT job('m7');
\set VERBOSITY default
ROLLBACK;
\echo :LAST_ERROR_SQLSTATE
-- With the dropped column still in the descriptor, rows go in directly.
SELECT job('m7'), job('m7');

-- REINDEX and VACUUM FULL rewrite the tables and indexes under new file
-- numbers; stored keys are unchanged.
REINDEX TABLE idempotency.keys;
VACUUM FULL idempotency.keys;
VACUUM FULL idempotency.once;
SELECT job('m1'), job('m2'), job('m3'), job('m8'), job('m8'), idem_once('m1'), idem_once('m8');
SELECT result FROM idem_begin('m1');
SELECT * FROM check_indexes();

-- A change that would make the extension read or write the wrong column is
-- refused with a clear error, not a crash; undoing it makes calls work again.
BEGIN;
ALTER TABLE idempotency.keys RENAME COLUMN result TO outcome;
SELECT job('m9');
ROLLBACK;
\echo :LAST_ERROR_SQLSTATE
BEGIN;
ALTER TABLE idempotency.keys ALTER COLUMN attempt TYPE bigint;
SELECT job('m9');
ROLLBACK;
BEGIN;
ALTER TABLE idempotency.keys DROP COLUMN fingerprint;
SELECT job('m9');
ROLLBACK;
BEGIN;
ALTER TABLE idempotency.keys DROP CONSTRAINT keys_pkey;
ALTER TABLE idempotency.keys ADD PRIMARY KEY (key, scope);
SELECT job('m9');
ROLLBACK;
BEGIN;
ALTER TABLE idempotency.once RENAME COLUMN key TO k;
SELECT idem_once('m9');
ROLLBACK;
SELECT job('m9'), job('m9'), idem_once('m9');
SELECT * FROM check_indexes();

-- Leave the tables as the other tests expect them.
DELETE FROM idempotency.keys WHERE key ~ '^(m[0-9]|batch-[0-9]+|fits)$';
DELETE FROM idempotency.once WHERE key ~ '^m[0-9]$';
