"""Real HTTP requests to the app, started as a server process on 127.0.0.1:
concurrent duplicate deliveries, a request still in progress, a changed
payload, a missing key, a failing handler, a binary response."""

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import psycopg
import pytest

DSN = os.environ["DATABASE_URL"]
STORED = ("content-type", "location")
KEYS, COPIES = 20, 8


@pytest.fixture(scope="session")
def base_url(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=Path(__file__).parent, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            assert server.poll() is None, f"the server exited:\n{log.read_text()}"
            try:
                httpx.get(f"{url}/payments/0", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail(f"the server did not start:\n{log.read_text()}")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=15)


def sql(query, *args):
    with psycopg.connect(DSN, autocommit=True) as conn:
        return conn.execute(query, args).fetchone()[0]


def new_key():
    return str(uuid.uuid4())


def assert_replay(original, response):
    assert response.headers.get("idempotent-replayed") == "true"
    assert response.status_code == original.status_code
    for name in STORED:
        assert response.headers.get_list(name) == original.headers.get_list(name)
    assert response.content == original.content


def assert_problem(response, status):
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == status


def test_concurrent_duplicates_run_once_and_replay_byte_for_byte(base_url):
    keys = [new_key() for _ in range(KEYS)]
    amount = {key: 1.1 + i for i, key in enumerate(keys)}
    deliveries = [key for key in keys for _ in range(COPIES)]
    random.shuffle(deliveries)
    before = sql("SELECT count(*) FROM payments")

    async def deliver(keys):
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            async def one(key):
                return key, await client.post("/payments", json={"amount": amount[key], "currency": "EUR"},
                                              headers={"Idempotency-Key": key})
            return await asyncio.gather(*map(one, keys))

    by_key = defaultdict(list)
    for key, response in asyncio.run(deliver(deliveries)):
        by_key[key].append(response)
    outcomes = Counter()
    originals = {}
    for key, responses in by_key.items():
        firsts = [r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers]
        assert len(firsts) == 1, [(r.status_code, r.headers, r.content) for r in responses]
        original = originals[key] = firsts[0]
        payment_id = json.loads(original.content)["id"]
        assert original.headers["location"] == f"/payments/{payment_id}"
        assert original.content.startswith(b'{"id": %d,  "amount":' % payment_id)
        for response in responses:
            if response is original:
                outcomes["original"] += 1
            elif response.status_code == 409:
                assert_problem(response, 409)
                assert int(response.headers["retry-after"]) >= 1
                outcomes["in progress"] += 1
            else:
                assert_replay(original, response)
                outcomes["replayed"] += 1

    ids = [json.loads(o.content)["id"] for o in originals.values()]
    assert len(set(ids)) == KEYS
    assert sql("SELECT count(*) FROM payments") - before == KEYS
    assert sql("SELECT count(*) FROM payments WHERE id = ANY(%s)", ids) == KEYS

    for key, response in asyncio.run(deliver(keys)):
        assert_replay(originals[key], response)
    print(f"{KEYS * COPIES} deliveries of {KEYS} keys: {dict(outcomes)}")


def test_a_repeat_while_the_first_runs_gets_409(base_url):
    key = new_key()
    payment = {"amount": 3, "currency": "EUR"}

    async def scenario(blocker):
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            first = asyncio.create_task(client.post("/payments", json=payment, headers={"Idempotency-Key": key}))
            for _ in range(400):  # until its INSERT waits for the test's lock
                if sql("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                       " AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO payments%%'"):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the first request never reached its INSERT")
            repeat = await client.post("/payments", json=payment, headers={"Idempotency-Key": key})
            assert_problem(repeat, 409)
            assert repeat.headers["retry-after"] == "1"  # transaction mode: no lease to tell the end of
            blocker.rollback()
            original = await first
            assert original.status_code == 201 and "idempotent-replayed" not in original.headers
            assert_replay(original, await client.post("/payments", json=payment, headers={"Idempotency-Key": key}))

    with psycopg.connect(DSN) as blocker:
        blocker.execute("LOCK TABLE payments IN SHARE MODE")  # holds every INSERT INTO payments
        asyncio.run(scenario(blocker))


def test_changed_request_is_422_while_formatting_is_not_a_change(base_url):
    key = new_key()
    before = sql("SELECT count(*) FROM payments")
    with httpx.Client(base_url=base_url) as client:
        def post(body, key_header=key):
            return client.post("/payments", content=body, headers={
                "Idempotency-Key": key_header, "content-type": "application/json"})

        first = post(b'{"amount": 5, "currency": "EUR"}')
        assert first.status_code == 201
        assert_replay(first, post(b'{ "currency" : "EUR",\n  "amount": 5.0 }'))
        assert_replay(first, post(b'{"amount": 5, "currency": "EUR"}', key_header=f'"{key}"'))  # sf-string form
        assert_problem(post(b'{"amount": 6, "currency": "EUR"}'), 422)
        payment_id = json.loads(first.content)["id"]
        assert_problem(client.patch(f"/payments/{payment_id}", json={"refund": 1},
                                    headers={"Idempotency-Key": key}), 422)
    assert sql("SELECT count(*) FROM payments") - before == 1
    assert sql("SELECT refunded FROM payments WHERE id = %s", payment_id) == 0


def test_missing_key_is_400(base_url):
    before = sql("SELECT count(*) FROM payments")
    with httpx.Client(base_url=base_url) as client:
        assert_problem(client.post("/payments", json={"amount": 2, "currency": "EUR"}), 400)
        assert_problem(client.post("/payments", json={"amount": 2, "currency": "EUR"},
                                   headers={"Idempotency-Key": '""'}), 400)
        assert_problem(client.patch("/payments/1", json={"refund": 1}), 400)
        assert_problem(client.post("/payments", json={"amount": 2, "currency": "EUR"},
                                   headers={"Idempotency-Key": "k" * 1000}), 400)
    assert sql("SELECT count(*) FROM payments") == before


def test_a_failed_handler_is_rolled_back_and_runs_again_on_retry(base_url):
    key = new_key()
    payment = {"amount": 7, "currency": "USD"}
    before = sql("SELECT count(*) FROM payments")
    with httpx.Client(base_url=base_url) as client:
        failed = client.post("/payments", json=payment, headers={"Idempotency-Key": key, "X-Fail": "after-insert"})
        assert_problem(failed, 500)
        assert sql("SELECT count(*) FROM payments") == before  # its insert was rolled back with the key
        retried = client.post("/payments", json=payment, headers={"Idempotency-Key": key})
        assert retried.status_code == 201 and "idempotent-replayed" not in retried.headers
        assert_replay(retried, client.post("/payments", json=payment, headers={"Idempotency-Key": key}))
    assert sql("SELECT count(*) FROM payments") - before == 1


def test_a_binary_response_replays_byte_for_byte(base_url):
    note = b"\x00paid in cash \xff\xfe"
    with httpx.Client(base_url=base_url) as client:
        created = client.post("/payments", json={"amount": 9, "currency": "EUR"}, headers={"Idempotency-Key": new_key()})
        payment_id = json.loads(created.content)["id"]
        key = new_key()

        async def deliver():
            async with httpx.AsyncClient(base_url=base_url, timeout=60) as aclient:
                return await asyncio.gather(*(aclient.post(
                    f"/payments/{payment_id}/receipt", content=note,
                    headers={"Idempotency-Key": key, "content-type": "application/octet-stream"})
                    for _ in range(COPIES)))

        responses = asyncio.run(deliver())
        [original] = [r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers]
        assert original.headers["content-type"] == "application/pdf"
        assert original.content.startswith(b"%PDF-") and b"\x00" in original.content
        with pytest.raises(UnicodeDecodeError):
            original.content.decode()
        for response in responses:
            if response is not original and response.status_code != 409:
                assert_replay(original, response)
        again = client.post(f"/payments/{payment_id}/receipt", content=note,
                            headers={"Idempotency-Key": key, "content-type": "application/octet-stream"})
        assert_replay(original, again)
        changed = client.post(f"/payments/{payment_id}/receipt", content=note + b"!",
                              headers={"Idempotency-Key": key, "content-type": "application/octet-stream"})
        assert_problem(changed, 422)
    assert sql("SELECT count(*) FROM receipts WHERE payment_id = %s", payment_id) == 1


def test_concurrent_duplicate_patches_refund_once(base_url):
    with httpx.Client(base_url=base_url) as client:
        created = client.post("/payments", json={"amount": 10, "currency": "EUR"}, headers={"Idempotency-Key": new_key()})
    payment_id = json.loads(created.content)["id"]

    async def refund(key):
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            return await asyncio.gather(*(client.patch(f"/payments/{payment_id}", json={"refund": 0.25},
                                                       headers={"Idempotency-Key": key}) for _ in range(COPIES)))

    for key in (new_key(), new_key()):
        responses = asyncio.run(refund(key))
        assert sum(r.status_code == 200 and "idempotent-replayed" not in r.headers for r in responses) == 1
        assert all(r.status_code in (200, 409) for r in responses)
    assert str(sql("SELECT refunded FROM payments WHERE id = %s", payment_id)) == "0.50"


def test_keys_are_per_client(base_url):
    key = new_key()
    payment = {"amount": 4, "currency": "EUR"}
    with httpx.Client(base_url=base_url) as client:
        a = client.post("/payments", json=payment, headers={"Idempotency-Key": key, "X-Client-Id": "client-a"})
        b = client.post("/payments", json=payment, headers={"Idempotency-Key": key, "X-Client-Id": "client-b"})
        assert_replay(a, client.post("/payments", json=payment, headers={"Idempotency-Key": key, "X-Client-Id": "client-a"}))
    assert a.status_code == b.status_code == 201
    assert "idempotent-replayed" not in a.headers and "idempotent-replayed" not in b.headers
    assert json.loads(a.content)["id"] != json.loads(b.content)["id"]
