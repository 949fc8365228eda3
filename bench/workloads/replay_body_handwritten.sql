\set n random(1, 100000)
SELECT CASE WHEN k.request_hash = encode(sha256(convert_to(b.body::jsonb::text, 'UTF8')), 'hex')
            THEN k.status ELSE 'mismatch' END AS status, k.result
  FROM hw_keys k, bench_bodies b
 WHERE k.key = 'replayb:' || :n AND b.id = 1;
