\set id random(1, 100000)
\set v random(1, 1000000)
SELECT idem_upsert('bench_accounts', ('{"id": ' || :id || ', "name": "n' || :v || '", "balance": ' || :v || '}')::jsonb);
