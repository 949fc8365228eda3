"""Charge a customer exactly once per job, however often the queue delivers it:
a SQLAlchemy 2 ORM Session in transaction mode. The claim (idem_begin), the
payment and the stored result (idem_finish) commit together or not at all.
"""
import random
import time
from collections import Counter

from sqlalchemy import BigInteger, ForeignKey, Identity, Text, column, func, select, type_coerce, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    charged_cents: Mapped[int] = mapped_column(BigInteger, default=0)


class Payment(Base):
    # No unique constraint on job_key on purpose: the idempotency key is what
    # keeps a job from charging twice, and a second charge would be a second row.
    __tablename__ = "payments"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    job_key: Mapped[str] = mapped_column(Text)
    customer_id: Mapped[str] = mapped_column(ForeignKey("customers.id"))
    amount_cents: Mapped[int] = mapped_column(BigInteger)


def idem_begin(key: str, request: dict):
    """SELECT anon_1.status, anon_1.result FROM idem_begin(:key, :request::JSONB) AS anon_1"""
    claim = func.idem_begin(key, type_coerce(request, JSONB)).table_valued(
        column("status", Text), column("result", JSONB)
    )
    return select(claim.c.status, claim.c.result)


def idem_finish(key: str, result: dict):
    return select(func.idem_finish(key, type_coerce(result, JSONB)))


# Errors after which the whole transaction is simply run again:
#   40001 serialization failure (REPEATABLE READ or SERIALIZABLE: a concurrent
#         update after our snapshot, or a key released after it)
#   40P01 deadlock detected
#   55P03 lock_timeout ran out waiting for a row lock
RETRYABLE = {"40001", "40P01", "55P03"}
MAX_TRIES = 30


class Mismatch(Exception):
    """The key was used before for a different request: a bug upstream, never retried."""


def backoff(attempt: int, base: float = 0.01, cap: float = 0.5) -> float:
    """Exponential backoff with full jitter, capped."""
    return random.uniform(0, min(cap, base * 2**attempt))


def charge(session: Session, job: dict, before_commit=None) -> tuple[str, dict | None]:
    """One transaction. Returns idem_begin's status and the job's result."""
    key = f"charge:{job['id']}"
    with session.begin():
        status, result = session.execute(
            idem_begin(key, {"customer": job["customer"], "amount": job["amount"]})
        ).one()
        if status != "started":
            return status, result  # completed: result is the stored one; in_progress; mismatch
        payment = Payment(job_key=key, customer_id=job["customer"], amount_cents=job["amount"])
        session.add(payment)
        session.execute(
            update(Customer)
            .where(Customer.id == job["customer"])
            .values(charged_cents=Customer.charged_cents + job["amount"])
        )
        session.flush()  # INSERT now, to know payment.id
        result = {"payment_id": payment.id}
        session.execute(idem_finish(key, result))
        if before_commit:
            before_commit()  # an exception here rolls back the payment and the claim
    return "started", result


def handle(session: Session, job: dict, before_commit=None, stats: Counter | None = None):
    """Work one delivery to its end: ('started' | 'completed', result). Raises Mismatch."""
    stats = Counter() if stats is None else stats
    for attempt in range(MAX_TRIES):
        try:
            status, result = charge(session, job, before_commit)
        except DBAPIError as e:
            sqlstate = getattr(e.orig, "sqlstate", None)
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
