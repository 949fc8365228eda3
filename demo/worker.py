"""A job worker whose queue misbehaves, made safe by idempotency keys.

The queue delivers every job one to three times, hands duplicates to
workers running at the same time, and some workers crash half-way through a
job (SIGKILL, after charging and before committing). Each delivery runs in
its own worker process:

    BEGIN;
    SELECT status, result FROM idem_begin('charge:order-N', request => ...);
    -- started:     charge (INSERT INTO payments), idem_finish, COMMIT
    -- completed:   a duplicate: ack with the stored result, charge nothing
    -- in_progress: another worker has it right now: redeliver later
    COMMIT;

At the end it checks that every order was charged exactly once, and that
every key's stored result names that one payment. It exits 1 otherwise.

Connection settings come from the usual PG* environment variables.
"""
import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from collections import Counter, deque

import psycopg


def connect():
    return psycopg.connect(autocommit=True)


def prepare_schema(reset: bool):
    with connect() as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS idempotency")
        if reset:
            conn.execute("DROP SCHEMA IF EXISTS shop CASCADE")
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


def deliver(job: dict, crash: bool, work_seconds: float, pipe):
    """One delivery of one job, in its own process. Reports through `pipe`."""
    key = f"charge:order-{job['order']}"
    with psycopg.connect() as conn:
        with conn.transaction():
            status, result, attempt = conn.execute(
                "SELECT status, result, attempt FROM idem_begin(%s, request => %s)",
                (key, json.dumps(job)),
            ).fetchone()
            if status != "started":
                pipe.send((status, result, attempt))
                return
            (payment_id,) = conn.execute(
                "INSERT INTO shop.payments (order_id, amount) VALUES (%s, %s) RETURNING payment_id",
                (job["order"], job["amount"]),
            ).fetchone()
            time.sleep(work_seconds)  # the rest of the job's work
            if crash:
                pipe.send(("crashing", None, attempt))
                os.kill(os.getpid(), signal.SIGKILL)
            conn.execute(
                "SELECT idem_finish(%s, result => %s)",
                (key, json.dumps({"payment_id": payment_id})),
            )
        pipe.send((status, {"payment_id": payment_id}, attempt))


def run(jobs: int, workers: int, seed: int, work_seconds: float) -> int:
    rng = random.Random(seed)
    orders = [{"order": 1000 + i, "amount": rng.randrange(100, 10000, 100)} for i in range(jobs)]
    # Duplicates are delivered next to each other, so they often run at the
    # same time; about one job in six crashes on its first delivery.
    queue = deque()
    for job in orders:
        for _ in range(rng.choice([1, 1, 2, 2, 3])):
            queue.append(job)
    crash_once = {job["order"] for job in orders if rng.random() < 1 / 6}

    counts = Counter()
    running = []  # (process, pipe, job, delivery number)
    delivery = 0
    ctx = mp.get_context("fork")
    while queue or running:
        while queue and len(running) < workers:
            job = queue.popleft()
            delivery += 1
            crash = job["order"] in crash_once
            crash_once.discard(job["order"])
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=deliver, args=(job, crash, work_seconds, child))
            p.start()
            child.close()
            running.append((p, parent, job, delivery))
        time.sleep(0.005)
        for entry in list(running):
            p, pipe, job, n = entry
            if p.is_alive():
                continue
            p.join()
            running.remove(entry)
            messages = []
            try:
                while pipe.poll():
                    messages.append(pipe.recv())
            except EOFError:
                pass
            last = messages[-1] if messages else ("lost", None, None)
            label = f"delivery {n:3d}  order {job['order']}"
            status, result, attempt = last
            if status == "crashing" or p.exitcode == -signal.SIGKILL:
                counts["crashed"] += 1
                print(f"{label}  started (attempt {attempt}), charged, then the worker crashed -> redelivered")
                queue.append(job)
            elif status == "started":
                counts["started"] += 1
                print(f"{label}  started (attempt {attempt}), charged {job['amount']}: payment {result['payment_id']}")
            elif status == "completed":
                counts["replayed"] += 1
                print(f"{label}  completed already: replayed payment {result['payment_id']}, charged nothing")
            elif status == "in_progress":
                counts["in_progress"] += 1
                print(f"{label}  in progress in another worker -> redelivered later")
                queue.append(job)
            else:
                counts[status] += 1
                print(f"{label}  {status} {result} (exit code {p.exitcode})")
                if status == "lost":
                    queue.append(job)

    print()
    print(f"{delivery} deliveries of {jobs} jobs: "
          f"{counts['started']} started and finished, {counts['replayed']} replayed, "
          f"{counts['in_progress']} in progress elsewhere, {counts['crashed']} crashed and retried")
    return check(orders)


def check(orders) -> int:
    with connect() as conn:
        rows = conn.execute(
            """SELECT o.order_id, count(p.payment_id), min(p.payment_id),
                      (SELECT result->>'payment_id' FROM idem_get('charge:order-' || o.order_id))
                 FROM unnest(%s::int[]) AS o(order_id)
                 LEFT JOIN shop.payments p ON p.order_id = o.order_id
                GROUP BY o.order_id ORDER BY o.order_id""",
            ([job["order"] for job in orders],),
        ).fetchall()
    bad = [r for r in rows if r[1] != 1 or str(r[2]) != r[3]]
    charged = sum(r[1] for r in rows)
    if bad:
        print(f"CHECK FAILED: {len(bad)} of {len(rows)} orders not charged exactly once: {bad[:5]}")
        return 1
    print(f"check: {len(rows)} orders, {charged} payments, every order charged exactly once "
          f"and its key's stored result names that payment: OK")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=30)
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--work-seconds", type=float, default=0.05)
    ap.add_argument("--keep", action="store_true", help="keep earlier runs' payments and keys")
    args = ap.parse_args()
    prepare_schema(reset=not args.keep)
    sys.exit(run(args.jobs, args.workers, args.seed, args.work_seconds))


if __name__ == "__main__":
    main()
