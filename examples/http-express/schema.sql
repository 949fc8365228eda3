CREATE TABLE IF NOT EXISTS payments (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    amount numeric(12, 2) NOT NULL CHECK (amount > 0),
    currency text NOT NULL,
    refunded numeric(12, 2) NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS receipts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payment_id bigint NOT NULL REFERENCES payments,
    note bytea NOT NULL
);
