"""A payment job worker, made safe by idempotency keys in transaction mode.

The queue (flaky_queue.py) delivers every job one to three times, runs
duplicates at the same time, and some workers crash half-way through a job
(SIGKILL, after charging and before committing). Each delivery does:

    BEGIN;
    SELECT status, result FROM idem_begin('charge:order-N', request => ...);
    -- started:     charge (INSERT INTO shop.payments), idem_finish, COMMIT
    -- completed:   a duplicate: ack with the stored result, charge nothing
    -- in_progress: another worker has it right now: redeliver later
    COMMIT;

A crash rolls the charge back together with the claim, so the redelivery
starts afresh. At the end it checks that every order was charged exactly
once and that every key's stored result names that one payment; it exits 1
otherwise. Connection settings come from the PG* environment variables.
"""
import argparse
import json
import random
import sys
import time

import psycopg

import flaky_queue


def prepare_schema(reset: bool):
    with psycopg.connect(autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS idempotency")
        if reset:
            conn.execute("DROP TABLE IF EXISTS shop.payments")
            conn.execute("DELETE FROM idempotency.keys WHERE key LIKE 'charge:%'")
        conn.execute("CREATE SCHEMA IF NOT EXISTS shop")
        # No unique constraint on order_id on purpose: a second charge would
        # be a second row, and the final check would see it.
        conn.execute(
            """CREATE TABLE IF NOT EXISTS shop.payments (
                   payment_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                   order_id int NOT NULL,
                   amount int NOT NULL,
                   charged_at timestamptz NOT NULL DEFAULT clock_timestamp())"""
        )


def deliver(job: dict, crash: bool, pipe, work_seconds: float = 0.05):
    key = f"charge:order-{job['order']}"
    with psycopg.connect() as conn, conn.transaction():
        status, result, attempt = conn.execute(
            "SELECT status, result, attempt FROM idem_begin(%s, request => %s)",
            (key, json.dumps({"order": job["order"], "amount": job["amount"]})),
        ).fetchone()
        if status != "started":
            pipe.send((status, result))
            return
        (payment_id,) = conn.execute(
            "INSERT INTO shop.payments (order_id, amount) VALUES (%s, %s) RETURNING payment_id",
            (job["order"], job["amount"]),
        ).fetchone()
        time.sleep(work_seconds)  # the rest of the job's work
        if crash:
            flaky_queue.crash()
        conn.execute("SELECT idem_finish(%s, result => %s)", (key, json.dumps({"payment_id": payment_id})))
    pipe.send(("started", {"payment_id": payment_id, "attempt": attempt}))


def describe(job, status, payload):
    if status == "started":
        return f"started (attempt {payload['attempt']}), charged {job['amount']}: payment {payload['payment_id']}"
    if status == "completed":
        return f"completed already: replayed payment {payload['payment_id']}, charged nothing"
    if status == "in_progress":
        return "in progress in another worker -> redelivered later"
    if status == "crashed":
        return "started, charged, then the worker crashed -> redelivered"
    return f"{status} {payload}"


def run(jobs: int, workers: int, seed: int) -> int:
    rng = random.Random(seed)
    orders = [{"id": f"order-{1000 + i}", "order": 1000 + i, "amount": rng.randrange(100, 10000, 100)}
              for i in range(jobs)]
    crash_once = {o["id"] for o in orders if rng.random() < 1 / 6}
    counts = flaky_queue.run(flaky_queue.deliveries(orders, rng), workers, deliver, describe, crash_once)
    print()
    print(f"{counts['deliveries']} deliveries of {jobs} jobs: "
          f"{counts['started']} started and finished, {counts['completed']} replayed, "
          f"{counts['in_progress']} in progress elsewhere, {counts['crashed']} crashed and retried")
    return check(orders)


def check(orders) -> int:
    with psycopg.connect(autocommit=True) as conn:
        rows = conn.execute(
            """SELECT o.order_id, count(p.payment_id), min(p.payment_id)::text,
                      (SELECT result->>'payment_id' FROM idem_get('charge:order-' || o.order_id))
                 FROM unnest(%s::int[]) AS o(order_id)
                 LEFT JOIN shop.payments p ON p.order_id = o.order_id
                GROUP BY o.order_id ORDER BY o.order_id""",
            ([o["order"] for o in orders],),
        ).fetchall()
    bad = [r for r in rows if r[1] != 1 or r[2] != r[3]]
    if bad:
        print(f"CHECK FAILED: {len(bad)} of {len(rows)} orders not charged exactly once: {bad[:5]}")
        return 1
    print(f"check: {len(rows)} orders, {sum(r[1] for r in rows)} payments, every order charged exactly once "
          f"and its key's stored result names that payment: OK")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=30)
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--keep", action="store_true", help="keep earlier runs' payments and keys")
    args = ap.parse_args()
    prepare_schema(reset=not args.keep)
    sys.exit(run(args.jobs, args.workers, args.seed))


if __name__ == "__main__":
    main()
