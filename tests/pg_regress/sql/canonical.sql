-- RFC 8785 canonical JSON and SHA-256 fingerprints.
-- The RFC's example (section 3.2.3).
SELECT idem_canonical('{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
  "string": "\u20ac$\u000F\u000aA''\u0042\u0022\u005c\\\"\/",
  "literals": [null, true, false]}');
-- Sorting by UTF-16 code units (section 3.2.3): the emoji's surrogates sort
-- before U+FB33 although its code point is larger.
SELECT idem_canonical('{"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh",
  "1": "One", "\ud83d\ude00": "Emoji: Grinning Face", "\u0080": "Control",
  "\u00f6": "Latin Small Letter O With Diaeresis"}');
-- Numbers as ECMAScript prints them (Appendix B).
SELECT v AS input, idem_canonical(v::jsonb) AS canonical
  FROM unnest(ARRAY['0', '-0', '1', '-1.5', '1e21', '1e20', '123e-20', '0.000001', '0.0000001',
                    '9007199254740993', '1.7976931348623157e308', '5e-324', '100', '1.10',
                    '333333333.33333329', '-0.0000033333333333333333']) AS v;
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
-- Numbers beyond a double are refused: 22023.
SELECT idem_canonical(('1' || repeat('0', 400))::jsonb);
\echo :LAST_ERROR_SQLSTATE
-- Labelled for the planner.
SELECT proname, provolatile, proisstrict, proparallel FROM pg_proc
 WHERE proname IN ('idem_canonical', 'idem_fingerprint') ORDER BY proname;
