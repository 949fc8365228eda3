-- The worker's own tables. No unique constraint on payments.job_id on
-- purpose: a second charge would be a second row, and the tests would see it.
CREATE TABLE IF NOT EXISTS accounts (
    id      text PRIMARY KEY,
    balance bigint NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS payments (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id    text NOT NULL,
    account   text NOT NULL REFERENCES accounts,
    amount    bigint NOT NULL,
    charge_id text  -- lease mode: the provider's charge
);
