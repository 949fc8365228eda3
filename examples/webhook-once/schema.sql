-- No UNIQUE (delivery_id) on purpose: idem_once is what keeps a delivery from
-- being handled twice, and a second handling would show up as a second row.
CREATE TABLE IF NOT EXISTS events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id text NOT NULL,
    type        text NOT NULL,
    payload     jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS counters (
    name text PRIMARY KEY,
    n    bigint NOT NULL
);
