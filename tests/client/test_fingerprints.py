"""Canonical JSON and fingerprints against an independent RFC 8785
implementation (the `rfc8785` package), as a client computes them.

For documents whose numbers are doubles (what a client's JSON library
parses and prints), idem_canonical must be exactly rfc8785.dumps, and
idem_fingerprint its SHA-256: then a client can compute a request's
fingerprint, or a key built with idem_fingerprint, on its own side.
"""
import hashlib
import json
import math
import random
import shutil
import struct
import subprocess

import rfc8785

# Characters that need escaping, control characters, the UTF-16 ordering
# traps (U+E000..U+FFFF against characters above U+FFFF), and plain text.
# No NUL (jsonb refuses \u0000) and no lone surrogates (not Unicode).
ALPHABET = ['"', "\\", "/", "\b", "\f", "\n", "\r", "\t", "\x01", "\x1f", "\x7f", "\x80",
            "é", "€", "\u2028", "\ud7ff", "\ue000", "\ufb33", "\uffff", "\U00010000",
            "\U0001f600", "a", "b", "Z", "0", " ", "'"]


def random_string(rng, max_len=8):
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, max_len)))


def random_double(rng):
    kind = rng.randrange(6)
    if kind == 0:
        # Any finite double, from its bits.
        while True:
            f = struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0]
            if math.isfinite(f):
                return f
    if kind == 1:
        return rng.randint(-(2**53) + 1, 2**53 - 1)
    if kind == 2:
        # Prices and amounts: a few decimals.
        return round(rng.uniform(-1e6, 1e6), rng.randint(0, 4))
    if kind == 3:
        return rng.choice([0.0, -0.0, 0.1, 0.2, 0.3, 1e21, 1e-7, 5e-324, 1.7976931348623157e308,
                           1424953923781206.25, 333333333.3333333, 9007199254740991])
    if kind == 4:
        return rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30)
    return rng.randint(-1000, 1000)


def random_document(rng, depth=0):
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return random_double(rng)
    if kind in (3, 4):
        return random_string(rng)
    if kind == 5:
        return [random_document(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {random_string(rng, 4): random_document(rng, depth + 1) for _ in range(rng.randint(0, 6))}


def test_canonical_text_is_rfc8785_for_documents_of_doubles(conn):
    rng = random.Random(8785)
    docs = [random_document(rng) for _ in range(3000)]
    mismatches = []
    with conn.cursor() as cur:
        for doc in docs:
            # json.dumps prints every float as its shortest round-trip text,
            # as any client's JSON library does; jsonb keeps that text.
            text = json.dumps(doc)
            cur.execute("SELECT idem_canonical(%s::jsonb), idem_fingerprint(%s::jsonb)", (text, text))
            canonical, fingerprint = cur.fetchone()
            want = rfc8785.dumps(doc)
            if canonical.encode() != want or fingerprint != hashlib.sha256(want).hexdigest():
                mismatches.append((text, canonical, want.decode()))
    assert not mismatches, f"{len(mismatches)} of {len(docs)} differ, first: {mismatches[:3]}"


def test_the_readme_example(conn):
    """The worked example of the README: a client's fingerprint of a
    request is idem_fingerprint's."""
    request = {"amount": 1999, "currency": "eur", "customer": "cus_42",
               "metadata": {"order": "A-17", "note": "café \"deluxe\""}, "rate": 0.1}
    client_side = hashlib.sha256(rfc8785.dumps(request)).hexdigest()
    with conn.cursor() as cur:
        cur.execute("SELECT idem_fingerprint(%s::jsonb), idem_canonical(%s::jsonb)",
                    (json.dumps(request), json.dumps(request)))
        fingerprint, canonical = cur.fetchone()
    assert canonical == ('{"amount":1999,"currency":"eur","customer":"cus_42",'
                         '"metadata":{"note":"café \\"deluxe\\"","order":"A-17"},"rate":0.1}')
    assert fingerprint == client_side
    assert fingerprint == "1ba97ced0d62fa0edf79fdeb094ccd377d489c2fa0725f3d482f5f4271acde44"


# The README's JavaScript, run as it is written there.
README_JS = r"""
const request = JSON.parse(process.argv[1]);
const canon = v => v === null || typeof v !== "object" ? JSON.stringify(v)
  : Array.isArray(v) ? `[${v.map(canon).join(",")}]`
  : `{${Object.keys(v).sort().map(k => JSON.stringify(k) + ":" + canon(v[k])).join(",")}}`;
console.log(require("crypto").createHash("sha256").update(canon(request), "utf8").digest("hex"));
"""


def test_the_readme_javascript_on_random_documents(conn):
    node = shutil.which("node")
    if node is None:
        import pytest
        pytest.skip("node is not installed")
    rng = random.Random(1785)
    with conn.cursor() as cur:
        for _ in range(40):
            doc = {random_string(rng, 4): random_document(rng, 1) for _ in range(6)}
            text = json.dumps(doc)
            js = subprocess.run([node, "-e", README_JS, text], capture_output=True, text=True, check=True)
            cur.execute("SELECT idem_fingerprint(%s::jsonb)", (text,))
            assert js.stdout.strip() == cur.fetchone()[0], text


def test_numbers_past_a_double_keep_their_value(conn):
    """What RFC 8785 libraries cannot print (they refuse integers past 2^53
    or round them) keeps its exact value, so a changed id changes the
    fingerprint."""
    with conn.cursor() as cur:
        cur.execute("""SELECT idem_canonical('{"acct": 9007199254740993}'),
                              idem_fingerprint('{"acct": 9007199254740993}')
                            = idem_fingerprint('{"acct": 9007199254740992}')""")
        canonical, same = cur.fetchone()
    assert canonical == '{"acct":9007199254740993}'
    assert same is False
