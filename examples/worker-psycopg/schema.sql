CREATE TABLE IF NOT EXISTS customers (
    id            text PRIMARY KEY,
    charged_cents bigint NOT NULL DEFAULT 0
);

-- No UNIQUE (job_key) on purpose: the idempotency key is what keeps a job
-- from charging twice, and a second charge would show up as a second row.
CREATE TABLE IF NOT EXISTS payments (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_key      text NOT NULL,
    customer_id  text NOT NULL REFERENCES customers,
    amount_cents bigint NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
