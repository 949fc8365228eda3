"""Several worker threads drain a queue that delivers every job one to three
times (duplicates side by side, so they run at the same time, and some late),
crashes some workers after their payment and before COMMIT, and loses the
acknowledgment of others after COMMIT (the job is redelivered). Then it checks
that every job charged exactly once. Connection settings: the PG* variables."""
import pathlib
import queue
import random
import sys
import threading
import time
from collections import Counter

import psycopg

import worker

JOBS, WORKERS = 40, 6
RUN = f"{time.time_ns():x}"  # keys of earlier runs stay stored: name this run's jobs apart
rng = random.Random(7)
customers = [f"cus_{i}" for i in range(4)]  # few customers: concurrent charges of one customer
jobs = [{"id": f"{RUN}-job-{i}", "customer": rng.choice(customers), "amount": rng.randrange(100, 10_000)}
        for i in range(JOBS)]
crash_before_commit = set(rng.sample([j["id"] for j in jobs], 6))
lose_ack = set(rng.sample([j["id"] for j in jobs if j["id"] not in crash_before_commit], 6))


class SimulatedCrash(Exception):
    pass


def deliveries():
    out = []
    for job in jobs:
        out += [job] * rng.randint(1, 3)  # duplicates side by side: worked concurrently
    out += rng.sample(jobs, 8)  # late duplicates: replayed
    return list(enumerate(out))


def run(stats: Counter, acked: dict):
    q: queue.Queue = queue.Queue()
    todo = deliveries()
    for d in todo:
        q.put(d)

    def work():
        with worker.connect() as conn:
            while (item := q.get()) is not None:
                delivery_id, job = item

                def before_commit():
                    time.sleep(0.02)  # the rest of the job's work, with the key held
                    if job["id"] in crash_before_commit:
                        crash_before_commit.discard(job["id"])
                        raise SimulatedCrash

                try:
                    status, result = worker.handle(conn, job, before_commit, stats)
                except SimulatedCrash:
                    stats["crashed"] += 1
                    q.put(item)
                else:
                    if status == "started" and job["id"] in lose_ack:
                        lose_ack.discard(job["id"])  # committed, but the ack never reached the queue
                        stats["ack_lost"] += 1
                        q.put(item)
                    else:
                        stats[status] += 1
                        acked[delivery_id] = (job["id"], result)
                finally:
                    q.task_done()

    threads = [threading.Thread(target=work) for _ in range(WORKERS)]
    for t in threads:
        t.start()
    q.join()
    for _ in threads:
        q.put(None)
    for t in threads:
        t.join()
    return len(todo)


def main() -> int:
    with psycopg.connect(autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS payments, customers")
        conn.execute(pathlib.Path(__file__).with_name("schema.sql").read_text())
        conn.execute("INSERT INTO customers (id) SELECT unnest(%s::text[])", (customers,))

    stats, acked = Counter(), {}
    n_deliveries = run(stats, acked)
    n_charged = stats["started"] + stats["ack_lost"]
    print(f"{n_deliveries} deliveries of {JOBS} jobs by {WORKERS} workers: {n_charged} charged, "
          f"{stats['completed']} replayed the stored result; {stats['crashed']} crashed before COMMIT "
          f"and {stats['ack_lost']} lost their ack after COMMIT, all redelivered; retried "
          f"{stats['in_progress']} in_progress, {stats['40001']} 40001, {stats['55P03']} 55P03")

    passed = failed = 0

    def check(name, ok, detail=""):
        nonlocal passed, failed
        passed, failed = passed + bool(ok), failed + (not ok)
        print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else ': ' + str(detail)}")

    with worker.connect() as conn:
        # A producer bug: a job id reused for another amount is reported, never charged.
        mismatches = 0
        for job in jobs[:3]:
            try:
                worker.handle(conn, {**job, "amount": job["amount"] + 1})
            except worker.Mismatch:
                mismatches += 1
        check("a reused job id with another amount is a mismatch", mismatches == 3, mismatches)

        per_key = dict(conn.execute(
            "SELECT job_key, array_agg(id) FROM payments GROUP BY job_key").fetchall())
        total = conn.execute("SELECT coalesce(sum(amount_cents), 0) FROM payments").fetchone()[0]
        charged = dict(conn.execute("SELECT id, charged_cents FROM customers").fetchall())
        expected = Counter()
        for j in jobs:
            expected[j["customer"]] += j["amount"]
        check("every delivery was acknowledged", len(acked) == n_deliveries, f"{len(acked)}/{n_deliveries}")
        check("every injected failure happened", not crash_before_commit and not lose_ack)
        payments_per_key = {k: len(ids) for k, ids in per_key.items()}
        one_each = {f"charge:{j['id']}": 1 for j in jobs}
        check("one payment per distinct job key", payments_per_key == one_each,
              {k: n for k, n in payments_per_key.items() if one_each.get(k) != n})
        check("sum of payments = sum of job amounts", total == sum(j["amount"] for j in jobs),
              f"{total} != {sum(j['amount'] for j in jobs)}")
        check("each customer charged the sum of its jobs", charged == dict(expected), charged)

        bad = []
        for job in jobs:
            key = f"charge:{job['id']}"
            status, result = conn.execute("SELECT status, result FROM idem_get(%s)", (key,)).fetchone() or (None, None)
            seen = {str(r) for jid, r in acked.values() if jid == job["id"]}
            if status != "completed" or seen != {str(result)} or [result["payment_id"]] != per_key.get(key):
                bad.append((job["id"], status, result, seen))
        check("every delivery ended with the key completed and its one stored result", not bad, bad[:3])

    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
