-- Objects the benchmark workloads use, next to the extension.
CREATE EXTENSION IF NOT EXISTS idempotency;

-- The business row every job writes.
DROP TABLE IF EXISTS bench_business;
CREATE TABLE bench_business (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_key text NOT NULL,
    amount int NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The hand-written alternative, as the well-known write-ups build it: a key
-- table, INSERT ... ON CONFLICT DO NOTHING to claim, UPDATE to finish.
DROP TABLE IF EXISTS hw_keys CASCADE;
CREATE TABLE hw_keys (
    key text PRIMARY KEY,
    status text NOT NULL,
    request_hash text,
    result jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);

CREATE OR REPLACE FUNCTION hw_begin(p_key text, OUT status text, OUT result jsonb)
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO hw_keys (key, status) VALUES (p_key, 'started')
    ON CONFLICT (key) DO NOTHING
    RETURNING hw_keys.status INTO status;
    IF NOT FOUND THEN
        SELECT k.status, k.result INTO status, result FROM hw_keys k WHERE k.key = p_key;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION hw_finish(p_key text, p_result jsonb)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE hw_keys SET status = 'completed', result = p_result, finished_at = now()
     WHERE key = p_key;
END $$;

-- Completed keys to replay, in both stores.
DROP TABLE IF EXISTS replay_results;
CREATE TABLE replay_results (key text PRIMARY KEY, status text NOT NULL, result jsonb);

-- The hand-written deduplication ledger.
DROP TABLE IF EXISTS hw_once;
CREATE TABLE hw_once (key text PRIMARY KEY, recorded_at timestamptz NOT NULL DEFAULT now());

-- The table both upsert variants write.
DROP TABLE IF EXISTS bench_accounts;
CREATE TABLE bench_accounts (id int PRIMARY KEY, name text, balance int);
INSERT INTO bench_accounts SELECT i, 'n' || i, i FROM generate_series(1, 100000) i;

-- Both key stores start with 100 000 finished keys and fresh statistics, as
-- a live system has: plans are then what production would use.
INSERT INTO hw_keys (key, status, result, finished_at)
SELECT 'base:' || i, 'completed', '{"charge_id": 1}', now() FROM generate_series(1, 100000) i;
DELETE FROM idempotency.keys WHERE key LIKE 'base:%';
INSERT INTO idempotency.keys (scope, key, status, attempt, created_at, finished_at, expires_at, result)
SELECT '', 'base:' || i, 'c', 1, now(), now(), now() + interval '1 year', '{"charge_id": 1}'
  FROM generate_series(1, 100000) i;
VACUUM ANALYZE hw_keys, idempotency.keys, bench_accounts;
