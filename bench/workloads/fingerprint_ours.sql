SELECT idem_fingerprint(body::jsonb) FROM bench_bodies WHERE id = 1;
