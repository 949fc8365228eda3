"""An email sender, made safe by idempotency keys in lease mode.

Sending an email cannot be rolled back, so the claim must commit before the
email goes out and must outlive a crashed worker. Each delivery does:

    SELECT status, recovery_point, token
      FROM idem_begin('email:N', lease => '1 second', wait => '3 seconds');
    -- started: send unless recovery_point says it was sent, then
    --          idem_checkpoint('email:N', 'sent:<message id>', token => ...)
    --          idem_finish('email:N', result => ..., token => ...)
    -- completed: a duplicate; the stored result names the message sent

Some workers crash (SIGKILL) after sending and before finishing. Their claim
stays until the lease ends; the redelivery waits for that, takes the key
over with attempt + 1 and the recovery point 'sent:...', and finishes
without sending again. The outbox file stands in for the mail provider: at
the end every email must be in it exactly once. Exits 1 otherwise.
"""
import argparse
import json
import os
import random
import sys
import tempfile

import psycopg

import flaky_queue

OUTBOX = os.path.join(tempfile.gettempdir(), "idempotency-demo-outbox.txt")


def send(email_id: str, attempt: int) -> str:
    """The side effect outside the database: one line in the outbox."""
    message_id = f"m-{email_id}-{attempt}"
    with open(OUTBOX, "a") as f:
        f.write(f"{email_id} {message_id}\n")
        f.flush()
        os.fsync(f.fileno())
    return message_id


def deliver(job: dict, crash: bool, pipe):
    key = f"email:{job['id']}"
    with psycopg.connect(autocommit=True) as conn:
        status, result, attempt, recovery_point, token = conn.execute(
            "SELECT status, result, attempt, recovery_point, token "
            "FROM idem_begin(%s, lease => '1 second', wait => '3 seconds')",
            (key,),
        ).fetchone()
        if status != "started":
            pipe.send((status, result))
            return
        if recovery_point and recovery_point.startswith("sent:"):
            message_id = recovery_point.removeprefix("sent:")
        else:
            message_id = send(job["id"], attempt)
            conn.execute("SELECT idem_checkpoint(%s, %s, token => %s)", (key, f"sent:{message_id}", token))
        if crash:
            flaky_queue.crash()
        conn.execute("SELECT idem_finish(%s, %s, token => %s)", (key, json.dumps({"message_id": message_id}), token))
        pipe.send(("started", {"attempt": attempt, "message_id": message_id, "resumed": recovery_point}))


def describe(job, status, payload):
    if status == "started" and payload["resumed"]:
        return (f"took over after the lease (attempt {payload['attempt']}), resumed from "
                f"'{payload['resumed']}': finished without sending again")
    if status == "started":
        return f"started (attempt {payload['attempt']}), sent {payload['message_id']}"
    if status == "completed":
        return f"completed already: {payload['message_id']} was sent, nothing sent now"
    if status == "in_progress":
        return "still in progress after waiting -> redelivered later"
    if status == "crashed":
        return "sent, checkpointed, then the worker crashed -> redelivered"
    return f"{status} {payload}"


def run(emails: int, workers: int, seed: int) -> int:
    rng = random.Random(seed)
    with psycopg.connect(autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS idempotency")
        conn.execute("DELETE FROM idempotency.keys WHERE key LIKE 'email:%'")
    open(OUTBOX, "w").close()
    jobs = [{"id": f"welcome-{i}"} for i in range(emails)]
    crash_once = {j["id"] for j in jobs if rng.random() < 1 / 4}
    counts = flaky_queue.run(flaky_queue.deliveries(jobs, rng), workers, deliver, describe, crash_once)
    print()
    print(f"{counts['deliveries']} deliveries of {emails} emails: {counts['started']} started and finished, "
          f"{counts['completed']} replayed, {counts['crashed']} crashed and taken over, "
          f"{counts['in_progress']} still in progress")
    return check(jobs)


def check(jobs) -> int:
    sent = {}
    with open(OUTBOX) as f:
        for line in f:
            email_id, message_id = line.split()
            sent.setdefault(email_id, []).append(message_id)
    with psycopg.connect(autocommit=True) as conn:
        stored = {
            j["id"]: conn.execute("SELECT status, result->>'message_id' FROM idem_get(%s)", (f"email:{j['id']}",)).fetchone()
            for j in jobs
        }
    bad = [j["id"] for j in jobs
           if len(sent.get(j["id"], [])) != 1 or stored[j["id"]] != ("completed", sent[j["id"]][0])]
    if bad:
        print(f"CHECK FAILED: {len(bad)} emails not sent exactly once: {bad[:5]}")
        return 1
    print(f"check: {len(jobs)} emails, {sum(len(v) for v in sent.values())} sent, every email sent exactly once "
          f"and its key's stored result names that message: OK")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--emails", type=int, default=12)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    sys.exit(run(args.emails, args.workers, args.seed))


if __name__ == "__main__":
    main()
