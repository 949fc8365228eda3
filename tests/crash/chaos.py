"""Jobs delivered more than once while the server crashes under them.

Workers take deliveries from a queue that holds every job one to three
times, and run each as a job worker would. Meanwhile a chaos thread kills
the workers' backends with SIGKILL (the postmaster then resets every
connection and recovers) and stops the server with `pg_ctl stop -m
immediate`, then starts it again (crash recovery). A delivery whose
connection breaks is put back in the queue: the worker cannot know whether
its COMMIT happened, which is the case idempotency keys exist for.

Two modes:

- transaction: BEGIN; idem_begin; INSERT the payment; idem_finish; COMMIT.
- lease: idem_begin with a one-second lease; the side effect (a row in
  `chaos.sent`) is written in one transaction with idem_checkpoint and its
  token, then idem_finish with the token. A worker whose lease ran out
  while it was cut off is fenced (40001) and must not send: the one that
  took the key over resumes from the recovery point.

When every job has been answered, the checks: no job lost (every key is
completed), none stuck in progress, none done twice (one payment, or one
sent row, per job, and the key's stored result names it), and every
redelivery now replays that result. Exits 1 when a check fails.

Usage: chaos.py --mode transaction|lease [--jobs N] [--seconds S]
Environment: PG* for the connection; IDEM_PGDATA and IDEM_PG_BIN for the
immediate stops (without them, only backends are killed).
"""
import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import psycopg

APP = "idempotency-chaos"


def connect(autocommit=False):
    return psycopg.connect(autocommit=autocommit, application_name=APP, connect_timeout=5)


def prepare():
    with psycopg.connect(autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS idempotency")
        conn.execute("DROP SCHEMA IF EXISTS chaos CASCADE")
        conn.execute("CREATE SCHEMA chaos")
        # No unique constraint on job: a second charge or a second send
        # would be a second row, and the checks would see it.
        conn.execute("CREATE TABLE chaos.payments (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, job int NOT NULL)")
        conn.execute("CREATE TABLE chaos.sent (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, job int NOT NULL, token bigint NOT NULL)")
        conn.execute("DELETE FROM idempotency.keys WHERE scope = 'chaos'")


def request(job):
    return json.dumps({"job": job, "amount": 100 + job})


def deliver_transaction(job):
    """One delivery in transaction mode; returns the answer's status."""
    key = f"pay:{job}"
    with connect() as conn, conn.transaction():
        status, result = conn.execute(
            "SELECT status, result FROM idem_begin(%s, request => %s, scope => 'chaos')",
            (key, request(job)),
        ).fetchone()
        if status != "started":
            return status
        (pid,) = conn.execute("INSERT INTO chaos.payments (job) VALUES (%s) RETURNING id", (job,)).fetchone()
        time.sleep(random.random() * 0.02)
        conn.execute("SELECT idem_finish(%s, %s, scope => 'chaos')", (key, json.dumps({"payment": pid})))
    return "done"


def deliver_lease(job):
    """One delivery in lease mode; returns the answer's status."""
    key = f"send:{job}"
    with connect(autocommit=True) as conn:
        status, token, point = conn.execute(
            "SELECT status, token, recovery_point FROM idem_begin(%s, request => %s, scope => 'chaos', lease => '1 second')",
            (key, request(job)),
        ).fetchone()
        if status != "started":
            return status
        try:
            if point is None:
                # The side effect and its record commit together, fenced by
                # the token: a holder whose lease was taken over sends nothing.
                with conn.transaction():
                    (sent,) = conn.execute(
                        "INSERT INTO chaos.sent (job, token) VALUES (%s, %s) RETURNING id", (job, token)
                    ).fetchone()
                    time.sleep(random.random() * 0.02)
                    conn.execute(
                        "SELECT idem_checkpoint(%s, %s, scope => 'chaos', token => %s)",
                        (key, f"sent:{sent}", token),
                    )
            else:
                sent = int(point.split(":")[1])
            conn.execute(
                "SELECT idem_finish(%s, %s, scope => 'chaos', token => %s)",
                (key, json.dumps({"sent": sent}), token),
            )
        except psycopg.errors.SerializationFailure:
            return "fenced"
    return "done"


class Chaos(threading.Thread):
    """Kills workers' backends, and now and then stops the server at once."""

    def __init__(self, stop, pgdata, pg_bin, restart_every):
        super().__init__(daemon=True)
        self.stop, self.pgdata, self.pg_bin = stop, pgdata, pg_bin
        self.restart_every = restart_every
        self.kills = 0
        self.restarts = 0

    def pg_ctl(self, *args):
        cmd = [os.path.join(self.pg_bin, "pg_ctl"), "-D", self.pgdata, "-w", *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def run(self):
        last_restart = time.monotonic()
        while not self.stop.wait(random.uniform(0.05, 0.3)):
            if self.pgdata and time.monotonic() - last_restart > self.restart_every:
                self.pg_ctl("-m", "immediate", "stop")
                time.sleep(0.2)
                self.pg_ctl("-l", os.path.join(os.path.dirname(self.pgdata), "server.log"), "start")
                self.restarts += 1
                last_restart = time.monotonic()
                continue
            try:
                with psycopg.connect(autocommit=True, connect_timeout=5) as admin:
                    pids = [r[0] for r in admin.execute(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                        " AND state IN ('active', 'idle in transaction')",
                        (APP,),
                    ).fetchall()]
            except psycopg.Error:
                continue
            if pids:
                try:
                    os.kill(random.choice(pids), signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass


def run(mode, jobs, seconds, restart_every):
    deliver = deliver_transaction if mode == "transaction" else deliver_lease
    # Every job one to three times, released at an even pace over most of
    # the run, so that the chaos always meets new work; redeliveries of
    # broken or answered deliveries come back through `queue`.
    deliveries = [j for j in range(jobs) for _ in range(random.randint(1, 3))]
    random.shuffle(deliveries)
    spacing = 0.8 * seconds / len(deliveries)
    released = 0
    queue = collections.deque()
    answered = set()
    counts = collections.Counter()
    unexpected = []
    lock = threading.Lock()
    chaos = Chaos(threading.Event(), os.environ.get("IDEM_PGDATA"), os.environ.get("IDEM_PG_BIN", ""),
                  restart_every)
    start = time.monotonic()
    deadline = start + seconds
    give_up = deadline + 120

    def take():
        nonlocal released
        with lock:
            if queue:
                return queue.popleft()
            if released < len(deliveries) and time.monotonic() >= start + released * spacing:
                released += 1
                return deliveries[released - 1]
            if released == len(deliveries) and len(answered) == jobs:
                return "done"
            return None

    def worker():
        while time.monotonic() < give_up:
            job = take()
            if job == "done":
                return
            if job is None:
                time.sleep(0.01)
                continue
            try:
                status = deliver(job)
            except psycopg.OperationalError:
                # The connection broke (a killed backend, a restart): the
                # worker cannot know whether its work committed.
                status = "broken"
            except Exception as e:  # reported as a problem
                status = "unexpected"
                unexpected.append(f"job {job}: {type(e).__name__}: {e}")
            with lock:
                counts[status] += 1
                if status in ("done", "completed"):
                    answered.add(job)
                    # A late duplicate now and then while the chaos lasts.
                    if time.monotonic() < deadline and random.random() < 0.2:
                        queue.append(job)
                else:
                    queue.append(job)
            if status in ("broken", "in_progress", "fenced", "unexpected"):
                time.sleep(0.1)

    chaos.start()
    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    while time.monotonic() < deadline and any(t.is_alive() for t in threads):
        time.sleep(0.2)
    chaos.stop.set()
    chaos.join(60)
    for t in threads:
        t.join(150)
    return answered, counts, chaos, unexpected


def wait_for_server(timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with psycopg.connect(autocommit=True, connect_timeout=5) as c:
                c.execute("SELECT 1")
                return
        except psycopg.Error:
            time.sleep(0.2)
    raise SystemExit("the server did not come back")


def check(mode, jobs):
    """The problems found: jobs lost, stuck, or done twice."""
    problems = []
    table, field, prefix = ("chaos.payments", "payment", "pay") if mode == "transaction" else ("chaos.sent", "sent", "send")
    # Leases of crashed holders end within a second; a key still in
    # progress after that is stuck.
    time.sleep(1.2)
    with psycopg.connect(autocommit=True) as conn:
        rows = conn.execute(
            f"""SELECT j, k.status, (k.result->>'{field}')::bigint,
                       (SELECT count(*) FROM {table} t WHERE t.job = j),
                       (SELECT min(id) FROM {table} t WHERE t.job = j)
                  FROM generate_series(0, %s - 1) j
                  LEFT JOIN idempotency.keys k ON k.scope = 'chaos' AND k.key = '{prefix}:' || j""",
            (jobs,),
        ).fetchall()
        for job, status, stored, done, first in rows:
            if status is None:
                problems.append(f"job {job}: lost (no key)")
            elif status != "c":
                problems.append(f"job {job}: stuck in status {status!r}")
            elif done != 1:
                problems.append(f"job {job}: done {done} times")
            elif stored != first:
                problems.append(f"job {job}: the stored result names {stored}, the row is {first}")
    # Every redelivery now replays the stored result.
    for job in range(jobs):
        answer = deliver_transaction(job) if mode == "transaction" else deliver_lease(job)
        if answer != "completed":
            problems.append(f"job {job}: a redelivery answered {answer!r}")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["transaction", "lease"], required=True)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--restart-every", type=float, default=6, help="seconds between immediate stops")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    random.seed(args.seed)
    prepare()
    answered, counts, chaos, unexpected = run(args.mode, args.jobs, args.seconds, args.restart_every)
    wait_for_server()
    problems = unexpected + check(args.mode, args.jobs)
    print(f"{args.mode} mode: {sum(counts.values())} deliveries of {args.jobs} jobs ({dict(counts)}); "
          f"{chaos.kills} backends killed, {chaos.restarts} immediate stops")
    if chaos.kills == 0 or (chaos.pgdata and chaos.restarts == 0):
        problems.append("the chaos did not happen: no backend killed, or no immediate stop")
    if len(answered) != args.jobs:
        problems.append(f"only {len(answered)} of {args.jobs} jobs were answered in time")
    for p in problems[:20]:
        print("PROBLEM:", p)
    print(json.dumps({"kills": chaos.kills, "restarts": chaos.restarts, "problems": len(problems)}))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
