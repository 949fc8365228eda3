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

-- A realistic request body of about 2 kB (a payment with eleven line items,
-- nested metadata, numbers, and strings that need escapes), kept as text so
-- that both sides of a comparison parse it into jsonb on every call, as a
-- request sent by a client is.
DROP TABLE IF EXISTS bench_bodies;
CREATE TABLE bench_bodies (id int PRIMARY KEY, body text NOT NULL);
INSERT INTO bench_bodies VALUES (1, '{"amount": 184250, "currency": "eur", "customer": "cus_Nf8Q2xLw7Hh3kZ", "idempotency_key": "0f8fad5b-d9cb-469f-a165-70867728950e", "description": "Order #A-17 for Zoë O''Brien\nshipped to Köln", "metadata": {"order_id": 9007199254740993, "channel": "web", "campaign": {"source": "newsletter", "medium": "email", "terms": ["winter", "sale\t2026"]}, "notes": "Leave at the door; ring twice \\ call if absent"}, "shipping": {"name": "Zoë O''Brien", "address": {"line1": "Hohe Straße 12", "city": "Köln", "postal_code": "50667", "country": "DE"}, "rate": 4.99}, "line_items": [{"sku": "SKU-1000", "name": "Item 0 \"Deluxe\" – size S", "quantity": 1, "unit_amount": 3378, "tax_rate": 0.1854, "discount": 2.45}, {"sku": "SKU-1001", "name": "Item 1 \"Basic\" – size M", "quantity": 2, "unit_amount": 96630, "tax_rate": 0.0256, "discount": 7.41}, {"sku": "SKU-1002", "name": "Item 2 \"Pro\" – size L", "quantity": 5, "unit_amount": 11495, "tax_rate": 0.1476, "discount": 0.32}, {"sku": "SKU-1003", "name": "Item 3 \"Deluxe\" – size XL", "quantity": 1, "unit_amount": 28757, "tax_rate": 0.0582, "discount": 6.02}, {"sku": "SKU-1004", "name": "Item 4 \"Basic\" – size S", "quantity": 5, "unit_amount": 26162, "tax_rate": 0.179, "discount": 7.01}, {"sku": "SKU-1005", "name": "Item 5 \"Pro\" – size M", "quantity": 4, "unit_amount": 28993, "tax_rate": 0.1123, "discount": 2.78}, {"sku": "SKU-1006", "name": "Item 6 \"Deluxe\" – size L", "quantity": 1, "unit_amount": 99558, "tax_rate": 0.2015, "discount": 6.98}, {"sku": "SKU-1007", "name": "Item 7 \"Basic\" – size XL", "quantity": 3, "unit_amount": 36521, "tax_rate": 0.0389, "discount": 9.57}, {"sku": "SKU-1008", "name": "Item 8 \"Pro\" – size S", "quantity": 3, "unit_amount": 13496, "tax_rate": 0.0232, "discount": 0.97}, {"sku": "SKU-1009", "name": "Item 9 \"Deluxe\" – size M", "quantity": 3, "unit_amount": 79231, "tax_rate": 0.0661, "discount": 0.43}, {"sku": "SKU-1010", "name": "Item 10 \"Basic\" – size L", "quantity": 4, "unit_amount": 70384, "tax_rate": 0.0312, "discount": 9.22}], "capture": true, "statement_descriptor": null}');

-- The hand-written key table with a request fingerprint, as the write-ups
-- build it: sha256 of the request's text.
CREATE OR REPLACE FUNCTION hw_begin_request(p_key text, p_request jsonb, OUT status text, OUT result jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    h text := encode(sha256(convert_to(p_request::text, 'UTF8')), 'hex');
    stored text;
BEGIN
    INSERT INTO hw_keys (key, status, request_hash) VALUES (p_key, 'started', h)
    ON CONFLICT (key) DO NOTHING
    RETURNING hw_keys.status INTO status;
    IF NOT FOUND THEN
        SELECT k.status, k.result, k.request_hash INTO status, result, stored FROM hw_keys k WHERE k.key = p_key;
        IF stored IS DISTINCT FROM h THEN
            status := 'mismatch';
            result := NULL;
        END IF;
    END IF;
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
-- Owned by the role that runs the benchmark, as idem_begin would record
-- them, so that replays pay the owner check.
INSERT INTO idempotency.keys (scope, key, status, attempt, created_at, finished_at, expires_at, result, owner)
SELECT '', 'base:' || i, 'c', 1, now(), now(), now() + interval '1 year', '{"charge_id": 1}', current_user
  FROM generate_series(1, 100000) i;
VACUUM ANALYZE hw_keys, idempotency.keys, bench_accounts;
