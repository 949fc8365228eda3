-- RFC 8785 canonical JSON and SHA-256 fingerprints.
-- The RFC's example (section 3.2.3), with 333333333.3333333, the double its
-- 333333333.33333329 stands for: a number that a double does not hold keeps
-- its exact value (see below).
SELECT idem_canonical('{"numbers": [333333333.3333333, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
  "string": "\u20ac$\u000F\u000aA''\u0042\u0022\u005c\\\"\/",
  "literals": [null, true, false]}');
-- Sorting by UTF-16 code units (section 3.2.3): the emoji's surrogates sort
-- before U+FB33 although its code point is larger.
SELECT idem_canonical('{"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh",
  "1": "One", "\ud83d\ude00": "Emoji: Grinning Face", "\u0080": "Control",
  "\u00f6": "Latin Small Letter O With Diaeresis"}');
-- Numbers as ECMAScript prints the double (Appendix B), when that text has
-- exactly the number's value; otherwise the exact decimal, so that numbers
-- of different value never share a text (or a fingerprint).
SELECT v AS input, idem_canonical(v::jsonb) AS canonical
  FROM unnest(ARRAY['0', '-0', '1', '-1.5', '1e21', '1e20', '123e-20', '0.000001', '0.0000001',
                    '9007199254740992', '9007199254740993', '1.7976931348623157e308', '5e-324',
                    '100', '1.10', '0.1', '0.1000000000000000055511151231257827',
                    '333333333.3333333', '333333333.33333329', '295147905179352830000',
                    '295147905179352825856', '-0.0000033333333333333333']) AS v;
-- Beyond a double's range: the exact decimal too.
SELECT idem_canonical(('1' || repeat('0', 400))::jsonb) = '1' || repeat('0', 400) AS exact_large,
       idem_canonical('1e-400') = '0.' || repeat('0', 399) || '1' AS exact_small;
-- Different values, different fingerprints; equal values (as jsonb compares
-- them), the same.
SELECT a, b, a::jsonb = b::jsonb AS jsonb_equal, idem_fingerprint(a::jsonb) = idem_fingerprint(b::jsonb) AS same_fingerprint
  FROM (VALUES ('{"acct": 9007199254740993}', '{"acct": 9007199254740992}'),
               ('0.1', '0.1000000000000000055511151231257827'),
               ('[1.0, 2.50]', '[1, 2.5]'),
               ('{"a": {"b": 1}, "c": []}', '{"c": [], "a": {"b": 1.000}}')) AS t(a, b);
-- Any depth jsonb holds: the canonicaliser keeps its stack on the heap.
SELECT length(idem_canonical((repeat('[', 5000) || repeat(']', 5000))::jsonb)) AS arrays,
       length(idem_canonical((repeat('{"a":', 5000) || '1' || repeat('}', 5000))::jsonb)) AS objects,
       idem_fingerprint((repeat('[', 5000) || repeat(']', 5000))::jsonb)
     = encode(sha256(convert_to(repeat('[', 5000) || repeat(']', 5000), 'UTF8')), 'hex') AS deep_fingerprint;
-- Deeper than the server's stack allows: refused by jsonb itself, 54001.
SELECT idem_fingerprint((repeat('[', 1000000) || repeat(']', 1000000))::jsonb);
\echo :LAST_ERROR_SQLSTATE
-- Nesting, white space, escapes.
SELECT idem_canonical('{"b": [ {"z": 1, "a": 2}, [] , {} ], "a": "tab\tquote\"back\\slash\u0001"}');
SELECT idem_canonical('"\u2028 stays as is"');
SELECT idem_canonical('null'), idem_canonical('true'), idem_canonical('[]');
-- The fingerprint is the hex SHA-256 of the canonical text's UTF-8 bytes.
SELECT idem_fingerprint('{}') = encode(sha256(convert_to('{}', 'UTF8')), 'hex') AS matches_sha256;
SELECT idem_fingerprint('{"a": 1, "b": [1.0, "€"]}')
     = encode(sha256(convert_to(idem_canonical('{"b": [1.0, "€"], "a": 1}'), 'UTF8')), 'hex') AS order_free;
SELECT length(idem_fingerprint('[1,2,3]')) AS hex_digits;
SELECT idem_fingerprint('{"a": 1}') = idem_fingerprint('{"a": 1.0}') AS numbers_by_value;
-- NULL in, NULL out.
SELECT idem_canonical(NULL) IS NULL AS canonical_null, idem_fingerprint(NULL) IS NULL AS fingerprint_null;
-- Labelled for the planner.
SELECT proname, provolatile, proisstrict, proparallel FROM pg_proc
 WHERE proname IN ('idem_canonical', 'idem_fingerprint') ORDER BY proname;
-- The README's worked example (the same fingerprint as Python's rfc8785 and
-- the JavaScript snippet there).
SELECT idem_fingerprint('{"amount": 1999, "currency": "eur", "customer": "cus_42",
  "metadata": {"order": "A-17", "note": "café \"deluxe\""}, "rate": 0.1}');
