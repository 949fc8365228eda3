SELECT encode(sha256(convert_to(body::jsonb::text, 'UTF8')), 'hex') FROM bench_bodies WHERE id = 1;
