"""Runs the Python blocks of docs/drivers.md (psycopg, asyncpg, SQLAlchemy,
Django, pgbouncer, autocommit) and checks what they do.

Prints "RAN <block>" for each block executed, "PASS <check>" and
"FAIL <check>: <why>" for each check; test.sh counts them. The blocks run as
the document shows them, in a namespace per section, compiled with their line
numbers in docs/drivers.md so that a traceback points at the document.
"""
import asyncio
import datetime
import json
import os
import random
import sys
import threading
import time
import uuid

import psycopg
from psycopg.types.json import Jsonb

from common import ORDERS, LIMIT, Blocks, Report, order_base

ADMIN_URL = os.environ["DATABASE_URL"]  # postgres: fixtures, locks, inspection
APP_URL = os.environ["APP_URL"]  # drivers_app: what the recipes run as
BOUNCER_URL = os.environ.get("BOUNCER_URL")  # drivers_app through pgbouncer
BOUNCER_POOL1_URL = os.environ.get("BOUNCER_POOL1_URL")  # a pool of one server connection
BOUNCER_POOL2_URL = os.environ.get("BOUNCER_POOL2_URL")  # a pool of two
RUN_ID = int(os.environ["RUN_ID"])

blocks = Blocks()
report = Report()
check = report.check


def admin():
    return psycopg.connect(ADMIN_URL, autocommit=True)


def unique_key(prefix):
    return f"drivers:{prefix}:{uuid.uuid4().hex}"


def key_row(key):
    with admin() as conn:
        return conn.execute("SELECT status, result FROM idem_get(%s)", (key,)).fetchone()


def payments_of(base):
    with admin() as conn:
        return conn.execute(
            "SELECT order_id, amount, id FROM payments WHERE order_id BETWEEN %s AND %s ORDER BY order_id, id",
            (base, base + 99)).fetchall()


def expect(cond, why):
    if not cond:
        raise AssertionError(why)


def sqlstate_of(exc):
    """The SQLSTATE of an exception of any of the Python drivers here."""
    for e in (exc, getattr(exc, "orig", None), exc.__cause__):
        code = getattr(e, "sqlstate", None)
        if code:
            return code
    return None


def expect_sqlstate(code, fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        got = sqlstate_of(e)
        expect(got == code, f"expected SQLSTATE {code}, got {got}: {type(e).__name__}: {e}")
        return e
    raise AssertionError(f"expected SQLSTATE {code}, got no error")


# --- the concurrent deliveries, the same for every driver --------------------

def deliveries_scenario(driver_no, attempt, lock=True):
    """Delivers ORDERS (each 1 to 3 times) at the same time through
    attempt(order_id, amount) -> (outcome, status, result), then again each
    delivery answered 'retry', until all are acknowledged; checks that every
    order was charged exactly once and every answer names its payment.

    With lock, a transaction of the test holds a lock on payments while the
    first wave runs, so that each order's first delivery waits inside its
    transaction, holding the key, until every other delivery has answered:
    the duplicates of every charged order meet a key in progress."""
    base = order_base(RUN_ID, driver_no)
    orders = {base + i: (amount, copies) for i, amount, copies in ORDERS}
    charged = [oid for oid, (amount, _) in orders.items() if amount <= LIMIT]
    deliveries = [oid for oid, (_, copies) in orders.items() for _ in range(copies)]
    random.Random(driver_no).shuffle(deliveries)
    answers = []
    mutex = threading.Lock()

    def one(oid):
        try:
            got = attempt(oid, orders[oid][0])
        except Exception as e:  # noqa: BLE001
            got = ("exception", None, f"{type(e).__name__}: {e}")
        with mutex:
            answers.append((oid, *got))

    holder = admin()
    if lock:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE payments IN SHARE ROW EXCLUSIVE MODE")
    threads = [threading.Thread(target=one, args=(oid,)) for oid in deliveries]
    for t in threads:
        t.start()
    if lock:
        # Bounded: the checks below fail if the deliveries did not get there.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with admin() as conn:
                waiting = conn.execute("SELECT count(*) FROM pg_locks "
                                       "WHERE relation = 'payments'::regclass AND NOT granted").fetchone()[0]
            with mutex:
                answered = len(answers)
            if waiting == len(charged) and answered == len(deliveries) - len(charged):
                break
            time.sleep(0.02)
        holder.execute("COMMIT")
    holder.close()
    for t in threads:
        t.join(120)
    expect(not any(t.is_alive() for t in threads), "a delivery did not return")
    first_wave = list(answers)
    errors = [a for a in first_wave if a[1] not in ("ack", "retry")]
    expect(not errors, f"unexpected answers: {errors}")
    if lock:
        for oid in charged:
            statuses = [a[2] for a in first_wave if a[0] == oid]
            expect(statuses.count("started") == 1 and statuses.count("in_progress") == len(statuses) - 1,
                   f"order {oid}: first wave answered {statuses}, expected one started and the "
                   "duplicates in_progress")
    # Redeliver what was answered 'retry' until acknowledged (bounded).
    final = [a for a in first_wave if a[1] == "ack"]
    pending = [a[0] for a in first_wave if a[1] == "retry"]
    for _ in range(50):
        if not pending:
            break
        again = []
        for oid in pending:
            got = attempt(oid, orders[oid][0])
            answers.append((oid, *got))
            (final.append((oid, *got)) if got[0] == "ack" else again.append(oid))
        pending = again
        time.sleep(0.02)
    expect(not pending, f"never acknowledged: {pending}")
    rows = payments_of(base)
    expect(sorted(r[0] for r in rows) == sorted(charged),
           f"payments of orders {sorted(r[0] for r in rows)}, expected one for each of {sorted(charged)}")
    payment = {r[0]: r[2] for r in rows}
    for oid, amount, _ in rows:
        expect(amount == orders[oid][0], f"order {oid}: payment of {amount}, expected {orders[oid][0]}")
    for oid, outcome, status, result in answers:
        if status in ("started", "completed"):
            expect(result == {"payment_id": payment.get(oid)},
                   f"order {oid}: {status} with {result!r}, expected payment {payment.get(oid)}")
        elif status == "failed":
            expect(orders[oid][0] > LIMIT and result == {"error": "amount_over_limit", "limit": LIMIT},
                   f"order {oid}: failed with {result!r}")
        else:
            expect(status == "in_progress" and outcome == "retry", f"order {oid}: {outcome} {status} {result!r}")
    for oid, (amount, copies) in orders.items():
        statuses = [a[2] for a in answers if a[0] == oid]
        if amount <= LIMIT:
            expect(statuses.count("started") == 1, f"order {oid}: {statuses}")
        else:
            expect(statuses.count("failed") == copies, f"order {oid}: {statuses}")
    # The same key with another request.
    oid = charged[0]
    got = attempt(oid, orders[oid][0] + 1)
    expect(got[:2] == ("reject", "mismatch"), f"another amount for order {oid}: {got}")
    statuses = [a[2] for a in answers]
    return (f"{len(answers)} deliveries of {len(orders)} orders: " + ", ".join(
        f"{statuses.count(s)} {s}" for s in ("started", "completed", "failed", "in_progress")))


def common_checks(label, driver_no, attempt, provoke):
    """The scenario, then each SQLSTATE deliver() reads.

    provoke(sql, params) -> outcome runs one statement in a transaction of the
    driver, through the recipe's deliver()."""
    check(f"{label}: concurrent duplicate deliveries charge each order once")(
        lambda: deliveries_scenario(driver_no, attempt))

    def another_role():
        oid = order_base(RUN_ID, driver_no) + 90  # claimed by drivers_other (test.sh)
        got = attempt(oid, 100)
        expect(got[0] == "reject" and got[1] is None, f"{got}")
        expect(all(r[0] != oid for r in payments_of(oid - 90)), "a payment was made")
    check(f"{label}: 42501 (the key belongs to another role) -> reject")(another_role)

    def stale():
        got = provoke("SELECT idem_finish(key, NULL, '', token) FROM drivers_fixture WHERE name = 'stale'", ())
        expect(got == "retry", f"{got}")
    check(f"{label}: 40001 (a token no longer current) -> retry")(stale)

    def unfinished():
        key = unique_key(f"{label}-unfinished")
        got = provoke("SELECT status FROM idem_begin(%s)", (key,))
        expect(got == "dead-letter", f"{got}")
        expect(key_row(key) is None, "the key was stored")
    check(f"{label}: 55000 (begun, neither finished nor failed) -> dead-letter")(unfinished)


def response_fixture():
    """A key finished with a result and a response (0.3.0), and a key held in
    lease mode: (finished key, leased key)."""
    done, leased = unique_key("response"), unique_key("leased")
    with psycopg.connect(APP_URL, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("SELECT idem_begin(%s)", (done,))
            conn.execute("SELECT idem_finish(%s, '{\"ok\": true}', response_status => 201, "
                         "response_headers => '{\"content-type\": \"application/json\"}', "
                         "response_body => '\\x7b7d')", (done,))
        conn.execute("SELECT idem_begin(%s, lease => '1 hour')", (leased,))
    return done, leased


TYPES_SQL = ("SELECT status, result, attempt, recovery_point, token, response_status, "
             "response_headers, response_body, retry_after FROM idem_begin({k}) "
             "UNION ALL SELECT status, result, attempt, recovery_point, token, response_status, "
             "response_headers, response_body, retry_after FROM idem_begin({l})")


def check_types(rows, headers, body, interval, token_type=int):
    (done, leased) = rows
    expect(done[0] == "completed" and done[5] == 201, f"{done}")
    expect(done[6] == headers, f"response_headers {done[6]!r}")
    expect(done[7] == body and type(done[7]) is type(body), f"response_body {done[7]!r}")
    expect(leased[0] == "in_progress" and isinstance(leased[8], interval), f"retry_after {leased[8]!r}")
    expect(done[4] is None and done[8] is None, f"{done}")


# --- psycopg ------------------------------------------------------------------

def psycopg_checks():
    ns = blocks.run("psycopg-charge", "psycopg-deliver")
    charge, deliver = ns["charge"], ns["deliver"]

    def attempt(oid, amount, url=APP_URL, **connect):
        got = []
        with psycopg.connect(url, **connect) as conn:
            outcome = deliver(lambda: got.append(charge(conn, oid, amount)) or got[0])
        return (outcome, *(got[0] if got else (None, None)))

    def provoke(sql, params):
        with psycopg.connect(APP_URL) as conn:
            def job():
                with conn.transaction():
                    conn.execute(sql, params)
                return "started", None
            return deliver(job)

    common_checks("psycopg", 1, attempt, provoke)

    def wrap_or_fail():
        with psycopg.connect(APP_URL, autocommit=True) as conn:
            q = "SELECT status FROM idem_begin('drivers:wrap', request => %s, lease => '1 second')"
            try:
                conn.execute(q, ({"amount": 1},))
                raise AssertionError("a dict was accepted")
            except psycopg.ProgrammingError as e:
                expect("cannot adapt type 'dict'" in str(e), str(e))
            expect(conn.execute("SELECT pg_typeof(%s)::text", ([1, 2],)).fetchone()[0] == "smallint[]", "list")
            expect_sqlstate("22P02", conn.execute, q, ("tok",))
            expect(conn.execute("SELECT %s::jsonb", (Jsonb(["a", {"b": 1}]),)).fetchone()[0] == ["a", {"b": 1}],
                   "Jsonb round trip")
    check("psycopg: a bare dict, list or str is no jsonb; Jsonb() is")(wrap_or_fail)

    def classes():
        import psycopg.errors as E
        expect(E.SerializationFailure.sqlstate == "40001" and E.InsufficientPrivilege.sqlstate == "42501"
               and E.ObjectNotInPrerequisiteState.sqlstate == "55000", "class names")
    check("psycopg: the error classes named")(classes)

    def types():
        done, leased = response_fixture()
        with psycopg.connect(APP_URL, autocommit=True) as conn:
            rows = conn.execute(TYPES_SQL.format(k="%s", l="%s"), (done, leased)).fetchall()
            leased_token = conn.execute("SELECT token FROM idem_begin(%s, lease => '1 hour')",
                                        (unique_key("token"),)).fetchone()[0]
        check_types(rows, {"content-type": "application/json"}, b"{}", datetime.timedelta)
        expect(type(leased_token) is int, f"token {leased_token!r}")
    check("psycopg: the other columns' Python types")(types)


# --- asyncpg ------------------------------------------------------------------

class Loop:
    """An event loop in a thread of its own, so that threads can run
    coroutines on it at the same time."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def asyncpg_checks():
    import asyncpg
    ns = blocks.run("asyncpg-charge", "asyncpg-deliver")
    charge, deliver, init = ns["charge"], ns["deliver"], ns["init"]
    loop = Loop()
    try:
        async def create_pool():
            return await asyncpg.create_pool(APP_URL, init=init)
        pool = loop.run(create_pool())

        async def attempt_async(oid, amount):
            got = []

            async def job():
                got.append(await charge(pool, oid, amount))
                return got[0]
            outcome = await deliver(job)
            return (outcome, *(got[0] if got else (None, None)))

        def provoke(sql, params):
            sql = sql.replace("%s", "$1")

            async def go():
                async def job():
                    async with pool.acquire() as conn, conn.transaction():
                        await conn.execute(sql, *params)
                    return "started", None
                return await deliver(job)
            return loop.run(go())

        common_checks("asyncpg", 2, lambda oid, amount: loop.run(attempt_async(oid, amount)), provoke)

        def codec():
            async def go():
                conn = await asyncpg.connect(APP_URL)
                try:
                    q = "SELECT status, result FROM idem_begin($1, request => $2, lease => '1 second')"
                    try:
                        await conn.fetchrow(q, unique_key("codec"), {"amount": 1})
                        raise AssertionError("a dict was accepted without the codec")
                    except asyncpg.DataError as e:
                        expect("expected str, got dict" in str(e), str(e))
                    got = await conn.fetchval("SELECT '{\"a\": 1}'::jsonb")
                    expect(got == '{"a": 1}', f"without the codec: {got!r}")
                    await init(conn)
                    got = await conn.fetchval("SELECT $1::jsonb", {"a": [1, "x"]})
                    expect(got == {"a": [1, "x"]}, f"with the codec: {got!r}")
                finally:
                    await conn.close()
            loop.run(go())
        check("asyncpg: jsonb is str without the codec, Python values with it")(codec)

        def composite():
            async def go():
                key = unique_key("composite")
                async with pool.acquire() as conn:
                    async with conn.transaction():
                        await conn.execute("SELECT status FROM idem_begin($1)", key)
                        await conn.execute("SELECT idem_finish($1, $2)", key, {"a": 1})
                    try:
                        await conn.fetchrow("SELECT idem_begin($1)", key)
                        raise AssertionError("the bare composite was decoded with the text codec")
                    except asyncpg.UnsupportedClientFeatureError as e:
                        expect("text encoding of composite types is not supported" in str(e), str(e))
                raw = await asyncpg.connect(APP_URL)
                try:
                    rec = await raw.fetchval("SELECT idem_begin($1)", key)
                    expect(rec["status"] == "completed" and rec["result"] == '{"a": 1}', f"{rec!r}")
                finally:
                    await raw.close()
            loop.run(go())
        check("asyncpg: the bare composite fails with the codec, has a str result without it")(composite)

        def autocommit():
            async def go():
                async with pool.acquire() as conn:
                    try:
                        await conn.fetchrow("SELECT status FROM idem_begin($1)", unique_key("asyncpg-auto"))
                        raise AssertionError("no error")
                    except asyncpg.PostgresError as e:
                        expect(e.sqlstate == "55000" and isinstance(e, asyncpg.ObjectNotInPrerequisiteStateError),
                               f"{e.sqlstate} {type(e)}")
            loop.run(go())
        check("asyncpg: outside conn.transaction() a claim fails with 55000")(autocommit)

        def classes():
            expect(asyncpg.SerializationError.sqlstate == "40001"
                   and asyncpg.InsufficientPrivilegeError.sqlstate == "42501"
                   and asyncpg.ObjectNotInPrerequisiteStateError.sqlstate == "55000", "class names")
        check("asyncpg: the error classes named")(classes)

        def types():
            done, leased = response_fixture()

            async def go():
                async with pool.acquire() as conn:
                    rows = await conn.fetch(TYPES_SQL.format(k="$1", l="$2"), done, leased)
                    token = await conn.fetchval("SELECT token FROM idem_begin($1, lease => '1 hour')",
                                                unique_key("token"))
                return [tuple(r) for r in rows], token
            rows, token = loop.run(go())
            check_types(rows, {"content-type": "application/json"}, b"{}", datetime.timedelta)
            expect(type(token) is int, f"token {token!r}")
        check("asyncpg: the other columns' Python types")(types)
        loop.run(pool.close())
    finally:
        loop.close()


# --- SQLAlchemy ---------------------------------------------------------------

def sqlalchemy_url(url):
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def sqlalchemy_checks():
    from sqlalchemy import create_engine, exc, func, select, text
    ns = blocks.run("sqlalchemy-charge", "sqlalchemy-deliver")
    charge, deliver = ns["charge"], ns["deliver"]
    engine = create_engine(sqlalchemy_url(APP_URL))

    def attempt(oid, amount):
        got = []
        outcome = deliver(lambda: got.append(charge(engine, oid, amount)) or got[0])
        return (outcome, *(got[0] if got else (None, None)))

    def provoke(sql, params):
        stmt = text(sql.replace("%s", ":p"))

        def job():
            with engine.begin() as conn:
                conn.execute(stmt, {"p": params[0]} if params else {})
            return "started", None
        return deliver(job)

    common_checks("sqlalchemy", 3, attempt, provoke)

    def bare_dict():
        try:
            with engine.begin() as conn:
                conn.execute(select(func.idem_begin("drivers:sa-bare", {"amount": 1}).table_valued("status")))
            raise AssertionError("a bare dict was accepted")
        except exc.ProgrammingError as e:
            expect("cannot adapt type 'dict'" in str(e), str(e))
    check("sqlalchemy: a bare dict argument fails")(bare_dict)

    def classes():
        def in_tx(sql, params=None):
            with engine.begin() as conn:
                conn.execute(text(sql), params or {})
        e = expect_sqlstate("40001", in_tx,
                            "SELECT idem_finish(key, NULL, '', token) FROM drivers_fixture WHERE name = 'stale'")
        expect(isinstance(e, exc.OperationalError), f"40001: {type(e)}")
        e = expect_sqlstate("55000", in_tx, "SELECT idem_begin(:k)", {"k": unique_key("sa-class")})
        expect(isinstance(e, exc.OperationalError), f"55000: {type(e)}")
        e = expect_sqlstate("42501", in_tx, "SELECT idem_begin(:k)",
                            {"k": f"charge:order-{order_base(RUN_ID, 3) + 90}"})
        expect(isinstance(e, exc.ProgrammingError), f"42501: {type(e)}")
    check("sqlalchemy: 40001 and 55000 arrive as OperationalError, 42501 as ProgrammingError")(classes)

    def types():
        done, leased = response_fixture()
        with engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(text(TYPES_SQL.format(k=":k", l=":l")), {"k": done, "l": leased})]
            token = conn.execute(text("SELECT token FROM idem_begin(:k, lease => '1 hour')"),
                                 {"k": unique_key("token")}).scalar_one()
            conn.commit()
        check_types(rows, {"content-type": "application/json"}, b"{}", datetime.timedelta)
        expect(type(token) is int, f"token {token!r}")
    check("sqlalchemy: the other columns' Python types, as psycopg's")(types)
    engine.dispose()


# --- Django -------------------------------------------------------------------

def django_setup(url):
    from urllib.parse import urlsplit

    import django
    from django.conf import settings
    u = urlsplit(url)
    settings.configure(DATABASES={"default": {
        "ENGINE": "django.db.backends.postgresql", "HOST": u.hostname, "PORT": u.port,
        "NAME": u.path.lstrip("/"), "USER": u.username}}, USE_TZ=True)
    django.setup()


def django_checks():
    django_setup(APP_URL)
    from django.db import OperationalError, ProgrammingError, connection, transaction
    ns = blocks.run("django-charge", "django-deliver")
    charge, deliver = ns["charge"], ns["deliver"]

    def attempt(oid, amount):
        got = []
        try:
            outcome = deliver(lambda: got.append(charge(oid, amount)) or got[0])
        finally:
            connection.close()  # the thread's connection
        return (outcome, *(got[0] if got else (None, None)))

    def provoke(sql, params):
        def job():
            with transaction.atomic(), connection.cursor() as cur:
                cur.execute(sql, list(params))
            return "started", None
        try:
            return deliver(job)
        finally:
            connection.close()

    common_checks("django", 4, attempt, provoke)

    def strings():
        with connection.cursor() as cur:
            try:
                cur.execute("SELECT %s::jsonb", [{"a": 1}])
                raise AssertionError("a dict was accepted")
            except ProgrammingError as e:
                expect("cannot adapt type 'dict'" in str(e), str(e))
        with connection.cursor() as cur:
            cur.execute("SELECT %s::jsonb", [json.dumps({"a": [1, "x"]})])
            got = cur.fetchone()[0]
            expect(got == '{"a": [1, "x"]}', f"{got!r}")
    check("django: a dict argument fails; jsonb comes back as str")(strings)

    def autocommit():
        e = expect_sqlstate("55000", lambda: connection.cursor().execute(
            "SELECT idem_begin(%s)", [unique_key("django-auto")]))
        expect(isinstance(e, OperationalError), f"{type(e)}")
    check("django: outside transaction.atomic() a claim fails with 55000")(autocommit)

    def classes():
        def in_tx(sql, params):
            with transaction.atomic(), connection.cursor() as cur:
                cur.execute(sql, params)
        e = expect_sqlstate("40001", in_tx,
                            "SELECT idem_finish(key, NULL, '', token) FROM drivers_fixture WHERE name = 'stale'", [])
        expect(isinstance(e, OperationalError), f"40001: {type(e)}")
        e = expect_sqlstate("42501", in_tx, "SELECT idem_begin(%s)", [f"charge:order-{order_base(RUN_ID, 4) + 90}"])
        expect(isinstance(e, ProgrammingError), f"42501: {type(e)}")
        e = expect_sqlstate("55000", in_tx, "SELECT idem_begin(%s)", [unique_key("django-class")])
        expect(isinstance(e, OperationalError), f"55000: {type(e)}")
    check("django: 40001 and 55000 arrive as OperationalError, 42501 as ProgrammingError")(classes)

    def types():
        done, leased = response_fixture()
        with connection.cursor() as cur:
            cur.execute(TYPES_SQL.format(k="%s", l="%s"), [done, leased])
            rows = cur.fetchall()
            cur.execute("SELECT token FROM idem_begin(%s, lease => '1 hour')", [unique_key("token")])
            token = cur.fetchone()[0]
        check_types(rows, '{"content-type": "application/json"}', b"{}", datetime.timedelta)
        expect(rows[0][1] == '{"ok": true}', f"result {rows[0][1]!r}")
        expect(type(token) is int, f"token {token!r}")
    check("django: the other columns' Python types")(types)
    connection.close()


# --- pgbouncer ----------------------------------------------------------------

def bouncer_checks():
    ns = blocks.run("psycopg-charge", "psycopg-deliver", "pgbouncer-psycopg", "pgbouncer-ttl")
    charge, deliver, connect = ns["charge"], ns["deliver"], ns["connect"]
    expect(BOUNCER_URL and BOUNCER_POOL1_URL, "no pgbouncer (BOUNCER_URL)")
    blocks.code("pgbouncer-ini")  # test.sh started pgbouncer with it
    print("RAN pgbouncer-ini", flush=True)

    def attempt(oid, amount, url=BOUNCER_URL):
        got = []
        with connect(url) as conn:
            outcome = deliver(lambda: got.append(charge(conn, oid, amount)) or got[0])
        return (outcome, *(got[0] if got else (None, None)))

    def provoke(sql, params):
        with connect(BOUNCER_URL) as conn:
            def job():
                with conn.transaction():
                    conn.execute(sql, params)
                return "started", None
            return deliver(job)

    common_checks("pgbouncer/psycopg", 9, attempt, provoke)

    def two_clients(make_conn):
        """Two clients through one server connection charge orders in turn;
        returns the answers, or the first exception."""
        base = order_base(RUN_ID, 13) + (0 if make_conn is connect else 40)
        a, b = make_conn(BOUNCER_POOL1_URL), make_conn(BOUNCER_POOL1_URL)
        try:
            answers = []
            for i in range(1, 31):
                conn = a if (i // 6) % 2 == 0 else b
                answers.append(deliver(lambda: charge(conn, base + i, 100)))
            return answers
        finally:
            a.close()
            b.close()

    def prepared():
        e = expect_sqlstate("42P05", two_clients, psycopg.connect)
        expect("_pg3_" in str(e), str(e))
        answers = two_clients(connect)
        expect(answers == ["ack"] * 30, f"{answers}")
    check("pgbouncer: psycopg's default prepare_threshold fails (42P05), prepare_threshold=None works")(prepared)

    def ttl_of(key):
        with admin() as conn:
            return conn.execute("SELECT expires_at - finished_at FROM idem_get(%s)", (key,)).fetchone()[0]

    def settings():
        week, day = datetime.timedelta(days=7), datetime.timedelta(days=1)
        base = order_base(RUN_ID, 14)
        a = psycopg.connect(BOUNCER_POOL1_URL, autocommit=True, prepare_threshold=None)
        b = connect(BOUNCER_POOL1_URL)
        try:
            def b_charges(n):
                expect(charge(b, base + n, 100)[0] == "started", "b's charge")
                return ttl_of(f"charge:order-{base + n}")
            expect(b_charges(1) == day, "the default ttl")
            a.execute("SET idempotency.ttl = '7d'")
            leaked = b_charges(2)
            expect(leaked == week, f"b's key after a's SET: kept {leaked}, expected the leak (7 days)")
            a.execute("RESET idempotency.ttl")
            expect(b_charges(3) == day, "after RESET")
            k1, k2 = unique_key("set-local"), unique_key("ttl-arg")
            with a.transaction():
                a.execute("SELECT status FROM idem_begin(%s)", (k1,))
                ns["keep_a_week"](a)
                a.execute("SELECT idem_finish(%s)", (k1,))
            expect(ttl_of(k1) == week, f"SET LOCAL: {ttl_of(k1)}")
            expect(b_charges(4) == day, "b's key after a's SET LOCAL")
            with a.transaction():
                a.execute("SELECT status FROM idem_begin(%s)", (k2,))
                ns["finish_kept_a_week"](a, k2, {"ok": True})
            expect(ttl_of(k2) == week, f"ttl =>: {ttl_of(k2)}")
            expect(b_charges(5) == day, "b's key after a's ttl =>")
        finally:
            a.close()
            b.close()
        return "SET leaked 7 days to the other client; SET LOCAL and ttl => did not"
    check("pgbouncer: a session SET idempotency.ttl leaks to another client, SET LOCAL and ttl => do not")(settings)

    def sqlalchemy_prepare():
        from sqlalchemy import create_engine
        sa = blocks.run("sqlalchemy-charge", "sqlalchemy-deliver")
        base = order_base(RUN_ID, 15)
        for n, connect_args in enumerate(({}, {"prepare_threshold": None})):
            engine = create_engine(sqlalchemy_url(BOUNCER_POOL1_URL), connect_args=connect_args,
                                   pool_size=2, max_overflow=0)
            try:
                a, b = engine.connect(), engine.connect()  # two clients of pgbouncer
                a.close()
                b.close()

                def run():
                    return [sa["deliver"](lambda: sa["charge"](engine, base + 40 * n + i, 100)) for i in range(1, 31)]
                if not connect_args:
                    # The pool hands out its connections in turn; prepared names clash.
                    e = expect_sqlstate("42P05", run)
                    expect("_pg3_" in str(e), str(e))
                else:
                    answers = run()
                    expect(answers == ["ack"] * 30, f"{answers}")
            finally:
                engine.dispose()
    check("pgbouncer: SQLAlchemy needs connect_args prepare_threshold=None")(sqlalchemy_prepare)


def bouncer_asyncpg_checks():
    import asyncpg
    ns = blocks.run("asyncpg-charge", "asyncpg-deliver", "pgbouncer-asyncpg")
    charge, deliver = ns["charge"], ns["deliver"]
    loop = Loop()
    try:
        pool = loop.run(ns["create_pool"](BOUNCER_URL))

        async def attempt_async(oid, amount):
            got = []

            async def job():
                got.append(await charge(pool, oid, amount))
                return got[0]
            outcome = await deliver(job)
            return (outcome, *(got[0] if got else (None, None)))

        def provoke(sql, params):
            sql = sql.replace("%s", "$1")

            async def go():
                async def job():
                    async with pool.acquire() as conn, conn.transaction():
                        await conn.execute(sql, *params)
                    return "started", None
                return await deliver(job)
            return loop.run(go())

        common_checks("pgbouncer/asyncpg", 10, lambda oid, amount: loop.run(attempt_async(oid, amount)), provoke)

        def cache():
            async def go(**kw):
                # Two server connections: a prepares on one, then b's
                # transaction ends and a is given b's connection.
                a = await asyncpg.connect(BOUNCER_POOL2_URL, **kw)
                b = await asyncpg.connect(BOUNCER_POOL2_URL, **kw)
                try:
                    tx = b.transaction()
                    await tx.start()
                    await b.execute("SELECT 1")
                    await a.fetchval("SELECT status FROM idem_get($1)", "drivers:none")
                    await tx.commit()
                    await a.fetchval("SELECT status FROM idem_get($1)", "drivers:none")
                finally:
                    await a.close()
                    await b.close()
            e = expect_sqlstate("26000", loop.run, go())
            expect("__asyncpg_stmt_" in str(e), str(e))
            loop.run(go(statement_cache_size=0))
        check("pgbouncer: asyncpg's statement cache fails (26000), statement_cache_size=0 works")(cache)
        loop.run(pool.close())
    finally:
        loop.close()


def bouncer_django_checks():
    """Django through a pool of one server connection, two clients (threads),
    default settings: its cursors prepare nothing."""
    django_setup(BOUNCER_POOL1_URL)
    from django.db import connection
    ns = blocks.run("django-charge", "django-deliver")
    base = order_base(RUN_ID, 16)
    answers = []

    def client(first):
        try:
            for i in range(first, first + 20):
                answers.append(ns["deliver"](lambda: ns["charge"](base + i, 100)))
        finally:
            connection.close()

    def two_clients():
        # Two threads, so two Django connections (two pgbouncer clients),
        # one after the other on the one server connection, each running the
        # same statements many times.
        for first in (1, 21, 41, 61):
            t = threading.Thread(target=client, args=(first,))
            t.start()
            t.join(60)
        expect(answers == ["ack"] * 80, f"{answers}")
    check("pgbouncer: Django's defaults work through it")(two_clients)


# --- autocommit ---------------------------------------------------------------

def autocommit_checks():
    def fails():
        ns = {"psycopg": psycopg, "url": APP_URL}
        try:
            e = expect_sqlstate("55000", lambda: blocks.run("autocommit-fails", ns=ns))
            expect('"report:2024-06" was begun outside a transaction block' in str(e), str(e))
        finally:
            ns["conn"].close()
        expect(key_row("report:2024-06") is None, "the key was stored")
    check("autocommit: a lone idem_begin fails with 55000 and stores nothing")(fails)

    def psycopg_default():
        key = unique_key("psycopg-default")
        with psycopg.connect(APP_URL) as conn:
            conn.execute("SELECT status FROM idem_begin(%s)", (key,))
            expect(conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS, "no transaction")
            expect_sqlstate("55000", conn.commit)
    check("autocommit: psycopg's default opens a transaction; 55000 at conn.commit()")(psycopg_default)

    def sqlalchemy_default():
        from sqlalchemy import create_engine, text
        engine = create_engine(sqlalchemy_url(APP_URL))
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT status FROM idem_begin(:k)"), {"k": unique_key("sa-default")})
                expect(conn.in_transaction(), "no transaction")
                expect_sqlstate("55000", conn.commit)
        finally:
            engine.dispose()
    check("autocommit: SQLAlchemy's connect() opens a transaction; 55000 at commit()")(sqlalchemy_default)

    def lease():
        ns = blocks.run("psycopg-charge", "autocommit-lease")
        month = f"{RUN_ID}-06"
        sent, answers, mutex = [], [], threading.Lock()

        def send(m):
            sent.append(m)
            deadline = time.monotonic() + 30  # until the duplicates have answered
            while time.monotonic() < deadline and len(answers) < 2:
                time.sleep(0.01)
            return f"r-{m}"

        def worker():
            with psycopg.connect(APP_URL, autocommit=True) as conn:
                status = ns["send_report_once"](conn, month, send)
            with mutex:
                answers.append(status)
        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        expect(sorted(answers) == ["in_progress", "in_progress", "started"], f"{answers}")
        with psycopg.connect(APP_URL, autocommit=True) as conn:
            expect(ns["send_report_once"](conn, month, send) == "completed", "the redelivery")
            row = conn.execute("SELECT status, result FROM idem_get(%s)", (f"report:{month}",)).fetchone()
        expect(sent == [month], f"sent {sent}")
        expect(row == ("completed", {"report_id": f"r-{month}"}), f"{row}")
        return "3 deliveries at once: 1 started, 2 in_progress; sent once; then completed"
    check("autocommit: lease mode in autocommit sends once")(lease)


SECTIONS = {
    "psycopg": psycopg_checks,
    "asyncpg": asyncpg_checks,
    "sqlalchemy": sqlalchemy_checks,
    "django": django_checks,
    "pgbouncer": bouncer_checks,
    "pgbouncer-asyncpg": bouncer_asyncpg_checks,
    "pgbouncer-django": bouncer_django_checks,
    "autocommit": autocommit_checks,
}

if __name__ == "__main__":
    for name in sys.argv[1:] or SECTIONS:
        with report.section(name):
            SECTIONS[name]()
    sys.exit(report.exit_code())
