"""Charge a customer exactly once per job, however often the queue delivers it.

Transaction mode: the claim (idem_begin), the payment and the stored result
(idem_finish) commit together in one transaction.atomic(), or not at all.
"""
import random
import time
from collections import Counter

from django.db import OperationalError, transaction
from django.db.models import F

from .models import Claim, Customer, Payment

# Errors after which the whole transaction is simply run again:
#   40001 serialization failure (only at REPEATABLE READ or SERIALIZABLE: a
#         concurrent update after the snapshot, or a key released after it)
#   40P01 deadlock detected
#   55P03 lock_timeout ran out waiting for a row lock
RETRYABLE = {"40001", "40P01", "55P03"}
MAX_TRIES = 30


class Mismatch(Exception):
    """The key was used before for a different request: a bug upstream, never retried."""


def backoff(attempt: int, base: float = 0.01, cap: float = 0.5) -> float:
    """Exponential backoff with full jitter, capped."""
    return random.uniform(0, min(cap, base * 2**attempt))


def charge(job: dict, before_commit=None) -> tuple[str, dict | None]:
    """One transaction. Returns idem_begin's status and the job's result."""
    key = f"charge:{job['id']}"
    with transaction.atomic():
        claim = Claim.begin(key, {"customer": job["customer"], "amount": job["amount"]})
        if claim.status != "started":
            return claim.status, claim.result  # completed: the stored result; in_progress; mismatch
        payment = Payment.objects.create(job_key=key, customer_id=job["customer"], amount_cents=job["amount"])
        Customer.objects.filter(pk=job["customer"]).update(charged_cents=F("charged_cents") + job["amount"])
        result = {"payment_id": payment.pk}
        Claim.finish(key, result)
        if before_commit:
            before_commit()  # an exception here rolls back the payment and the claim
    return "started", result


def handle(job: dict, before_commit=None, stats: Counter | None = None):
    """Work one delivery to its end: ('started' | 'completed', result). Raises Mismatch."""
    stats = Counter() if stats is None else stats
    for attempt in range(MAX_TRIES):
        try:
            status, result = charge(job, before_commit)
        except OperationalError as e:  # wraps the driver's error, which has the SQLSTATE
            sqlstate = getattr(e.__cause__, "sqlstate", None)
            if sqlstate not in RETRYABLE:
                raise
            stats[sqlstate] += 1
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
