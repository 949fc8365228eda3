\set id random(1, 100000)
\set v random(1, 1000000)
INSERT INTO bench_accounts (id, name, balance) VALUES (:id, 'n' || :v, :v)
ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, balance = EXCLUDED.balance;
