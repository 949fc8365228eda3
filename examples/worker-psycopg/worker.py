"""Charge a customer exactly once per job, however often the queue delivers it.

Transaction mode: the claim (idem_begin), the payment and the stored result
(idem_finish) commit together or not at all.
"""
import random
import time
from collections import Counter

import psycopg
from psycopg.types.json import Jsonb

# Errors after which the whole transaction is simply run again:
#   40001 serialization failure: at REPEATABLE READ, another worker charged the
#         same customer after our snapshot was taken (the UPDATE below), or the
#         key was released after it (idem_begin)
#   40P01 deadlock detected
#   55P03 lock_timeout ran out waiting for a row lock
RETRYABLE = {"40001", "40P01", "55P03"}
MAX_TRIES = 30


class Mismatch(Exception):
    """The key was used before for a different request: a bug upstream, never retried."""


def backoff(attempt: int, base: float = 0.01, cap: float = 0.5) -> float:
    """Exponential backoff with full jitter, capped."""
    return random.uniform(0, min(cap, base * 2**attempt))


def charge(conn: psycopg.Connection, job: dict, before_commit=None) -> tuple[str, dict | None]:
    """One transaction. Returns idem_begin's status and the job's result."""
    key = f"charge:{job['id']}"
    request = Jsonb({"customer": job["customer"], "amount": job["amount"]})
    with conn.transaction():
        status, result = conn.execute(
            "SELECT status, result FROM idem_begin(%s, %s)", (key, request)
        ).fetchone()
        if status != "started":
            return status, result  # completed: result is the stored one; in_progress; mismatch
        (payment_id,) = conn.execute(
            "INSERT INTO payments (job_key, customer_id, amount_cents) VALUES (%s, %s, %s) RETURNING id",
            (key, job["customer"], job["amount"]),
        ).fetchone()
        conn.execute(
            "UPDATE customers SET charged_cents = charged_cents + %s WHERE id = %s",
            (job["amount"], job["customer"]),
        )
        result = {"payment_id": payment_id}
        conn.execute("SELECT idem_finish(%s, %s)", (key, Jsonb(result)))
        if before_commit:
            before_commit()  # an exception here rolls back the payment and the claim
    return "started", result


def handle(conn: psycopg.Connection, job: dict, before_commit=None, stats: Counter | None = None):
    """Work one delivery to its end: ('started' | 'completed', result). Raises Mismatch."""
    stats = Counter() if stats is None else stats
    for attempt in range(MAX_TRIES):
        try:
            status, result = charge(conn, job, before_commit)
        except psycopg.Error as e:
            if e.sqlstate not in RETRYABLE:
                raise
            stats[e.sqlstate] += 1
        else:
            if status in ("started", "completed"):
                return status, result
            if status == "mismatch":
                raise Mismatch(f"job {job['id']} was delivered before with another request")
            # in_progress: another worker's open transaction holds the key;
            # when it ends, the key is completed (replay) or free again (started).
            stats["in_progress"] += 1
        time.sleep(backoff(attempt))
    raise TimeoutError(f"job {job['id']}: gave up after {MAX_TRIES} tries")


def connect(conninfo: str = "") -> psycopg.Connection:
    """A worker's connection: autocommit, so that each `conn.transaction()` is one
    transaction, at REPEATABLE READ (READ COMMITTED works as well, without the 40001s)."""
    conn = psycopg.connect(conninfo, autocommit=True)
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.execute("SET lock_timeout = '5s'")
    return conn
