-- What the harness needs besides the document's schema block (run before
-- this): an application role, another role, and keys in the states that
-- provoke the errors deliver() reads. psql variable run_id: this run's id.
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'drivers_app') AS create_app,
       NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'drivers_other') AS create_other \gset
\if :create_app
CREATE ROLE drivers_app LOGIN;
\endif
\if :create_other
CREATE ROLE drivers_other LOGIN;
\endif
GRANT SELECT, INSERT ON payments TO drivers_app;

CREATE TABLE drivers_fixture (name text PRIMARY KEY, key text NOT NULL, token bigint);
GRANT SELECT ON drivers_fixture TO drivers_app;

-- 40001: a lease token of drivers_app's that is no longer current.
SET ROLE drivers_app;
SELECT 'drivers:stale:' || :run_id AS stale_key \gset
SELECT token AS stale_token FROM idem_begin(:'stale_key', lease => '1 hour') \gset
SELECT idem_finish(:'stale_key', NULL, '', :stale_token);
RESET ROLE;
INSERT INTO drivers_fixture VALUES ('stale', :'stale_key', :stale_token);

-- 42501: for each driver (order_base in common.py), the order base + 90 was
-- charged by another role.
SET ROLE drivers_other;
BEGIN;
SELECT count(*) FROM (SELECT idem_begin('charge:order-' || (:run_id::bigint * 10000 + n * 100 + 90))
                      FROM generate_series(1, 20) n) claims;
SELECT count(*) FROM (SELECT idem_finish('charge:order-' || (:run_id::bigint * 10000 + n * 100 + 90))
                      FROM generate_series(1, 20) n) finishes;
COMMIT;
RESET ROLE;
