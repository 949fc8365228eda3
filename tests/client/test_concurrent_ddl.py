"""Concurrent DDL and maintenance against every entry point while calls run.

Worker threads call idem_upsert, idem_insert_once, idem_begin, idem_finish,
idem_fail, idem_checkpoint, idem_get, idem_once and idem_purge in a loop
while one DDL thread alters, rewrites, reindexes, moves, drops and re-creates
the upsert target, and reindexes, rewrites, indexes and puts a trigger on the
extension's own tables. Afterwards: no backend crashed, every answer was
right or one of the errors listed in ALLOWED, and nothing stored changed
(keys, ledger, the target's rows, and the indexes, checked by amcheck).

Every loop is bounded in time (DURATION) and every lock wait by a timeout,
so that a hang fails the test instead of holding it.
"""
import collections
import json
import os
import random
import re
import threading
import time
import uuid
import warnings

import psycopg
import pytest
from psycopg.types.json import Jsonb

DURATION = 14.0  # seconds the workers and the DDL thread run
WORKERS = 4
IDS_PER_WORKER = 12
HOLD = 0.15  # how long the DDL thread leaves each changed shape in place
DDL_LOCK_TIMEOUT = "3s"
# A worker never waits this long unless something hangs: its statements are
# short, and the DDL thread gives up a lock wait after DDL_LOCK_TIMEOUT. Both
# give an error that is not allowed below (55P03, 57014), so a hang fails.
WORKER_LOCK_TIMEOUT = "15s"
STATEMENT_TIMEOUT = "20s"

# The SQLSTATEs a call may raise while the DDL thread works, by kind of
# call. Anything else (XX000 above all, 57P01/57P02 from a crashed server, a
# connection lost without SQLSTATE) is collected and fails the test.
DEADLOCK = "40P01"
ALLOWED = {
    # idem_upsert / idem_insert_once on ddl_target:
    "upsert": {
        # undefined_table: 'ddl_target' does not resolve while the table is
        # dropped (between DROP TABLE and CREATE TABLE) or moved to the
        # schema ddl_other by ALTER TABLE ... SET SCHEMA.
        "42P01",
        # undefined_column: a row with "w" while the column is renamed w2.
        "42703",
        # deadlock_detected: a lock cycle between a worker and a DDL
        # statement (the worker holds the table's RowExclusiveLock and asks
        # for an index's while the DDL holds or queues for stronger ones).
        # PostgreSQL's own answer to it: clear, retryable, nothing written.
        DEADLOCK,
    },
    # idem_begin, idem_finish, idem_fail, idem_checkpoint, idem_get,
    # idem_purge, idem_once: the keys are unique to a worker, so no worker
    # waits for another; only the DDL on idempotency.keys and
    # idempotency.once (VACUUM FULL, REINDEX CONCURRENTLY, CREATE/DROP
    # TRIGGER and INDEX) can be in a lock cycle with a worker transaction.
    "keys": {DEADLOCK},
    # The DDL thread's own statements: lock_not_available when its
    # lock_timeout ends (a worker held the lock); deadlock_detected when it
    # is the one of a cycle that PostgreSQL cancels. Either leaves the table
    # as it was (a failed CREATE INDEX or REINDEX CONCURRENTLY may leave an
    # invalid index, which the thread drops).
    "ddl": {"55P03", DEADLOCK},
}
# Not allowed for the workers, on purpose: 40001, which the README gives
# for an upsert whose row a concurrent insert took three times (each worker
# has its own ids), a lease token no longer current (leases last a minute,
# the test less) and an old REPEATABLE READ snapshot (the workers run READ
# COMMITTED): none of these can happen here. 55P03 and 57014: a worker's
# lock_timeout or statement_timeout only ends a wait that hung.

CRASH = re.compile(r"was terminated by signal|was terminated by exception|PANIC:")
COLUMN_SETS = [("id", "v"), ("id", "v", "w"), ("id", "w")]


class ServerLog:
    """The lines the server logs while a test runs: remembers the log's size
    at the start and reads from there. The log is named by IDEM_SERVER_LOG
    (scripts/test sets it); without it the check is skipped with a
    warning."""

    def __init__(self):
        self.path = os.environ.get("IDEM_SERVER_LOG")
        self.offset = os.path.getsize(self.path) if self.path else 0

    def crashes(self):
        """Each crash line since the start with the 20 lines before it and
        the one after, as check_server_log prints them; "" when none."""
        if not self.path:
            warnings.warn(pytest.PytestWarning("IDEM_SERVER_LOG is not set: the server log was not checked for crashes"))
            return ""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            lines = f.read().decode("utf-8", "replace").splitlines()
        hits = [i for i, line in enumerate(lines) if CRASH.search(line)]
        report = ["\n".join(lines[max(0, i - 20) : i + 2]) for i in hits]
        return f"the server crashed during the test ({self.path}):\n" + "\n----\n".join(report) if hits else ""

    def assert_no_crash(self):
        report = self.crashes()
        assert not report, report


def wait_until_gone(pids, timeout=5.0):
    """Waits until the backends `pids` have exited, so that a crash at
    backend exit is in the log before it is read (on a connection of its
    own: the server may have restarted after a crash)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(autocommit=True) as c:
                (n,) = c.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [list(pids)]).fetchone()
        except psycopg.OperationalError:
            n = -1  # restarting after a crash
        if n == 0:
            break
        time.sleep(0.1)
    time.sleep(0.3)  # the postmaster logs a child's death when it reaps it


def describe(e):
    diag = e.diag
    text = f"{type(e).__name__} SQLSTATE {e.sqlstate}: {str(e).strip()}"
    if diag.context:
        text += f" (context: {diag.context.strip()})"
    return text


def grouped(messages):
    """The messages, each once, with how often it came (in order of first
    appearance): a failure that repeats is listed once."""
    counts = collections.Counter(messages)
    return "\n".join(f"{n:6}x {m}" for m, n in counts.items())


class Wrong(Exception):
    """An answer that is not the right one: rolls the transaction back."""


class Worker(threading.Thread):
    """Calls every entry point in a loop on its own connection; keys and the
    target's ids are its own, so each answer is known in advance."""

    def __init__(self, n, prefix, stop_at, seed):
        super().__init__(name=f"worker-{n}")
        self.n = n
        self.prefix = prefix
        self.stop_at = stop_at
        self.rng = random.Random(seed)
        self.ids = list(range(n * 1000, n * 1000 + IDS_PER_WORKER))
        self.seq = 0
        # ddl_target's rows as this worker wrote them, by the table's OID at
        # the call (the DROP/CREATE starts a new, empty table).
        self.rows = collections.defaultdict(dict)
        self.finished = {}  # key -> (request, status, result, attempt): finished keys
        self.released = {}  # key -> (request, error): failed retryably, not retried yet
        self.lease_open = {}  # key -> (request, token): started under a lease, not finished
        self.expiring = set()  # finished with a 1 ms ttl
        self.rolled_back = set()  # keys whose claiming transaction rolled back
        self.once_true = []  # idem_once keys answered true
        self.once_failed = set()  # idem_once calls that raised (rolled back)
        self.starts = collections.Counter()  # (key, attempt) -> 'started' answers
        self.calls = collections.Counter()
        self.errors = collections.Counter()  # (call, SQLSTATE) -> count
        self.unexpected = []
        self.wrong = []
        self.pids = set()
        self.conn = None

    def connect(self):
        self.conn = psycopg.connect(autocommit=True)
        self.conn.execute(f"SET lock_timeout = '{WORKER_LOCK_TIMEOUT}'")
        self.conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")
        self.pids.add(self.conn.info.backend_pid)

    def key(self, kind):
        self.seq += 1
        return f"{self.prefix}:{kind}:{self.n}:{self.seq}"

    def run(self):
        ops = [
            (self.upsert, 26),
            (self.insert_once, 10),
            (self.transaction_job, 18),
            (self.replay, 12),
            (self.mismatch, 2),
            (self.lease_job, 10),
            (self.once_new, 7),
            (self.once_repeat, 5),
            (self.fail_job, 4),
            (self.expiring_job, 2),
            (self.purge, 1),
            (self.get, 3),
        ]
        funcs = [f for f, _ in ops]
        weights = [w for _, w in ops]
        try:
            self.connect()
            while time.monotonic() < self.stop_at and self.conn is not None:
                op = self.rng.choices(funcs, weights)[0]
                op()
        except Exception as e:  # noqa: BLE001 - a bug in the test itself
            self.unexpected.append(f"worker {self.n} stopped: {e!r}")
        finally:
            if self.conn is not None:
                self.conn.close()

    def call(self, name, kind, fn):
        """Runs fn; an error is counted when its SQLSTATE is allowed for
        `kind`, recorded as unexpected otherwise. True when fn succeeded."""
        self.calls[name] += 1
        try:
            fn()
            return True
        except Wrong as e:
            self.wrong.append(f"worker {self.n} {name}: {e}")
            return False
        except psycopg.Error as e:
            if e.sqlstate is not None and e.sqlstate in ALLOWED[kind] and not self.conn.broken:
                self.errors[(name, e.sqlstate)] += 1
            else:
                self.unexpected.append(f"worker {self.n} {name}: {describe(e)}")
                if self.conn.broken or self.conn.closed:
                    self.conn.close()
                    self.conn = None
                    try:
                        self.connect()
                    except psycopg.Error as e2:
                        self.unexpected.append(f"worker {self.n} could not reconnect: {describe(e2)}")
                        self.conn = None
            return False

    def begin(self, key, request, **kw):
        args = "".join(f", {k} => %s" for k in kw)
        row = self.conn.execute(
            f"SELECT status, result, attempt, recovery_point, token FROM idem_begin(%s, request => %s{args})",
            [key, Jsonb(request), *kw.values()],
        ).fetchone()
        if row[0] == "started":
            self.starts[(key, row[2])] += 1
        return row

    # -- idem_upsert and idem_insert_once on ddl_target ---------------------

    def target_row(self):
        cols = self.rng.choice(COLUMN_SETS)
        row = {"id": self.rng.choice(self.ids)}
        if "v" in cols:
            row["v"] = self.rng.randrange(4)  # integers survive v's type changes
        if "w" in cols:
            row["w"] = self.rng.choice(["a", "b", "c"])
        return row

    def write(self, fn, row):
        # One name lookup for both the call and the OID it reports, so the
        # OID is the table the call wrote to.
        answer, oid = self.conn.execute(
            f"SELECT {fn}(t.r, %s), t.r::oid FROM (VALUES ('ddl_target'::regclass)) AS t(r)", [Jsonb(row)]
        ).fetchone()
        return answer, oid

    def upsert(self):
        row = self.target_row()

        def go():
            answer, oid = self.write("idem_upsert", row)
            table = self.rows[oid]
            current = table.get(row["id"])
            if current is None:
                new, expected = {"v": row.get("v"), "w": row.get("w")}, "inserted"
            else:
                new = dict(current)
                new.update({c: row[c] for c in ("v", "w") if c in row})
                expected = "unchanged" if new == current else "updated"
            table[row["id"]] = new
            if answer != expected:
                raise Wrong(f"{row} into {current}: {answer!r}, expected {expected!r}")

        self.call("idem_upsert", "upsert", go)

    def insert_once(self):
        row = self.target_row()

        def go():
            answer, oid = self.write("idem_insert_once", row)
            table = self.rows[oid]
            current = table.get(row["id"])
            if current is None:
                table[row["id"]] = {"v": row.get("v"), "w": row.get("w")}
            if answer != (current is None):
                raise Wrong(f"{row} into {current}: {answer!r}")

        self.call("idem_insert_once", "upsert", go)

    # -- transaction mode -----------------------------------------------------

    def transaction_job(self):
        key = self.key("tx")
        request, result = {"job": self.seq}, {"done": self.seq, "by": self.n}

        def go():
            with self.conn.transaction():
                answer = self.begin(key, request)
                if answer != ("started", None, 1, None, None):
                    raise Wrong(f"{key}: {answer}, expected started")
                self.conn.execute("SELECT idem_finish(%s, result => %s)", [key, Jsonb(result)])
            self.finished[key] = (request, "completed", result, 1)

        if not self.call("tx begin/finish", "keys", go):
            self.rolled_back.add(key)

    def replay(self):
        if not self.finished:
            return
        key = self.rng.choice(list(self.finished))
        request, status, result, attempt = self.finished[key]

        def go():
            answer = self.begin(key, request)
            if answer[:3] != (status, result, attempt):
                raise Wrong(f"replay of {key}: {answer}, expected {(status, result, attempt)}")

        self.call("replay", "keys", go)

    def mismatch(self):
        if not self.finished:
            return
        key = self.rng.choice(list(self.finished))

        def go():
            answer = self.begin(key, {"another": "request"})
            if answer[0] != "mismatch":
                raise Wrong(f"{key} with another request: {answer}")

        self.call("mismatch", "keys", go)

    def get(self):
        if not self.finished:
            return
        key = self.rng.choice(list(self.finished))
        _, status, result, attempt = self.finished[key]

        def go():
            rows = self.conn.execute("SELECT status, result, attempt FROM idem_get(%s)", [key]).fetchall()
            if rows != [(status, result, attempt)]:
                raise Wrong(f"idem_get({key}): {rows}")

        self.call("idem_get", "keys", go)

    def fail_job(self):
        key = self.key("fail")
        request, error = {"job": self.seq}, {"error": self.seq}
        retryable = self.rng.random() < 0.6

        def first():
            with self.conn.transaction():
                answer = self.begin(key, request)
                if answer != ("started", None, 1, None, None):
                    raise Wrong(f"{key}: {answer}, expected started")
                self.conn.execute(
                    "SELECT idem_fail(%s, error => %s, retryable => %s)", [key, Jsonb(error), retryable]
                )

        if not self.call("tx begin/fail", "keys", first):
            self.rolled_back.add(key)
            return
        if not retryable:
            self.finished[key] = (request, "failed", error, 1)
            return
        self.released[key] = (request, error)
        result = {"retried": self.seq}

        def second():
            with self.conn.transaction():
                answer = self.begin(key, request)
                if answer != ("started", None, 2, None, None):
                    raise Wrong(f"retry of {key}: {answer}, expected started attempt 2")
                self.conn.execute("SELECT idem_finish(%s, result => %s)", [key, Jsonb(result)])
            del self.released[key]
            self.finished[key] = (request, "completed", result, 2)

        self.call("tx retry/finish", "keys", second)

    def expiring_job(self):
        key = self.key("ttl")
        request = {"job": self.seq}

        def go():
            with self.conn.transaction():
                answer = self.begin(key, request)
                if answer != ("started", None, 1, None, None):
                    raise Wrong(f"{key}: {answer}, expected started")
                self.conn.execute("SELECT idem_finish(%s, result => '1', ttl => '1 millisecond')", [key])
            self.expiring.add(key)

        if not self.call("tx finish ttl", "keys", go):
            self.rolled_back.add(key)

    def purge(self):
        def go():
            (n,) = self.conn.execute("SELECT idem_purge(100)").fetchone()
            if n is None or n < 0:
                raise Wrong(f"idem_purge: {n}")

        self.call("idem_purge", "keys", go)

    # -- lease mode -----------------------------------------------------------

    def lease_job(self):
        key = self.key("lease")
        request, result = {"job": self.seq}, {"sent": self.seq}
        token = None

        def claim():
            nonlocal token
            status, res, attempt, point, token = self.begin(key, request, lease="1 minute")
            if (status, res, attempt, point) != ("started", None, 1, None) or token is None:
                raise Wrong(f"lease {key}: {(status, res, attempt, point, token)}, expected started")

        if not self.call("lease begin", "keys", claim):
            self.rolled_back.add(key)
            return
        self.lease_open[key] = (request, token)
        if self.rng.random() < 0.5:
            if not self.call(
                "idem_checkpoint",
                "keys",
                lambda: self.conn.execute("SELECT idem_checkpoint(%s, 'sent', token => %s)", [key, token]),
            ):
                return

        def finish():
            self.conn.execute("SELECT idem_finish(%s, result => %s, token => %s)", [key, Jsonb(result), token])
            del self.lease_open[key]
            self.finished[key] = (request, "completed", result, 1)

        self.call("lease finish", "keys", finish)

    # -- idem_once ------------------------------------------------------------

    def once_new(self):
        key = self.key("once")

        def go():
            (answer,) = self.conn.execute("SELECT idem_once(%s, scope => %s)", [key, self.prefix]).fetchone()
            if answer is not True:
                raise Wrong(f"idem_once({key}) the first time: {answer}")
            self.once_true.append(key)

        if not self.call("idem_once new", "keys", go):
            self.once_failed.add(key)

    def once_repeat(self):
        if not self.once_true:
            return
        key = self.rng.choice(self.once_true)

        def go():
            (answer,) = self.conn.execute("SELECT idem_once(%s, scope => %s)", [key, self.prefix]).fetchone()
            if answer is not False:
                raise Wrong(f"idem_once({key}) again: {answer}")

        self.call("idem_once repeat", "keys", go)


TARGET_DDL = "CREATE TABLE public.ddl_target (id int PRIMARY KEY, v numeric, w text)"


class DDLThread(threading.Thread):
    """Loops a sequence of DDL and maintenance statements, each in autocommit
    with a lock_timeout, until stop_at; puts every shape back before it
    stops. Drops and re-creates ddl_target once, a little before half-time."""

    def __init__(self, stop_at, drop_at):
        super().__init__(name="ddl")
        self.stop_at = stop_at
        self.drop_at = drop_at
        self.dropped_oid = None
        self.statements = collections.Counter()  # statement kind -> runs that succeeded
        self.errors = collections.Counter()  # (statement kind, SQLSTATE) -> count
        self.unexpected = []
        self.checks = 0
        self.partial_compared = 0
        self.loops = 0
        self.pid = None
        self.conn = None

    def run(self):
        try:
            self.conn = psycopg.connect(autocommit=True)
            self.pid = self.conn.info.backend_pid
            self.conn.execute(f"SET lock_timeout = '{DDL_LOCK_TIMEOUT}'")
            self.conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")
            while time.monotonic() < self.stop_at and not self.unexpected:
                self.sequence()
                self.loops += 1
        except Exception as e:  # noqa: BLE001 - a bug in the test itself
            self.unexpected.append(f"DDL thread stopped: {e!r}")
        finally:
            if self.conn is not None:
                self.conn.close()

    def do(self, sql, must=False):
        """Runs one statement; True when it succeeded. A `must` statement
        (putting a shape back) is retried until it succeeds."""
        kind = re.sub(r"\s+", " ", sql)
        for _ in range(20 if must else 1):
            try:
                self.conn.execute(sql)
                self.statements[kind] += 1
                return True
            except psycopg.Error as e:
                if e.sqlstate in ALLOWED["ddl"] and not self.conn.broken:
                    self.errors[(kind, e.sqlstate)] += 1
                    time.sleep(0.05)
                    continue
                self.unexpected.append(f"DDL {sql}: {describe(e)}")
                raise
        if must:
            self.unexpected.append(f"DDL {sql}: could not put the shape back in 20 tries")
            raise RuntimeError(f"could not run {sql}")
        return False

    def hold(self):
        time.sleep(HOLD)

    def drop_invalid_indexes(self):
        """A REINDEX or CREATE INDEX CONCURRENTLY that failed leaves an
        invalid index behind (that inserts still maintain): drop it."""
        rows = self.conn.execute(
            """SELECT format('%I.%I', n.nspname, c.relname) FROM pg_index i
               JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE NOT i.indisvalid AND i.indrelid IN (SELECT oid FROM pg_class
                     WHERE relname IN ('ddl_target', 'keys', 'once')
                       AND relnamespace::regnamespace::text IN ('public', 'idempotency', 'ddl_other'))"""
        ).fetchall()
        for (name,) in rows:
            self.do(f"DROP INDEX CONCURRENTLY IF EXISTS {name}", must=True)

    def check_new_index(self, name, predicate):
        """While the workers still write: amcheck on an index just built
        concurrently, and for a partial index the same rows through it as
        through the heap (an entry for a row outside the predicate would
        come back through the index, which does not recheck the predicate)."""
        self.checks += 1
        self.conn.execute("SELECT bt_index_check(%s::regclass, heapallindexed => true)", [name])
        if predicate is None:
            return
        with self.conn.transaction():
            self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            self.conn.execute("SET LOCAL enable_seqscan = off")
            self.conn.execute("SET LOCAL enable_bitmapscan = off")
            query = f"SELECT scope, key FROM idempotency.keys WHERE {predicate}"
            plan = json.dumps(self.conn.execute(f"EXPLAIN (FORMAT JSON) {query}").fetchone()[0])
            via_index = set(self.conn.execute(query).fetchall())
            self.conn.execute("SET LOCAL enable_seqscan = on")
            self.conn.execute("SET LOCAL enable_indexscan = off")
            self.conn.execute("SET LOCAL enable_indexonlyscan = off")
            via_heap = set(self.conn.execute(query).fetchall())
        if name.split(".")[-1] not in plan:
            return
        self.partial_compared += 1
        if via_index != via_heap:
            self.unexpected.append(
                f"{name}: rows through the index and through the heap differ: "
                f"only in the index {sorted(via_index - via_heap)[:5]}, only in the heap {sorted(via_heap - via_index)[:5]}"
            )

    def index_cycle(self, create, name, predicate=None, check=False):
        ok = self.do(create)
        if ok:
            self.hold()
            if check:
                self.check_new_index(name, predicate)
        self.do(f"DROP INDEX CONCURRENTLY IF EXISTS {name}", must=True)

    def sequence(self):
        do, hold = self.do, self.hold
        if do("ALTER TABLE ddl_target ALTER COLUMN v TYPE int USING v::int"):
            hold()
            do("ALTER TABLE ddl_target ALTER COLUMN v TYPE numeric USING v::numeric", must=True)
        if do("REINDEX TABLE CONCURRENTLY idempotency.keys"):
            hold()
        else:
            self.drop_invalid_indexes()
        if do("ALTER TABLE ddl_target ADD COLUMN x text"):
            hold()
            do("ALTER TABLE ddl_target DROP COLUMN x", must=True)
        self.index_cycle(
            "CREATE INDEX CONCURRENTLY ddl_keys_expires ON idempotency.keys (expires_at)",
            "idempotency.ddl_keys_expires",
            check=True,
        )
        if do("ALTER TABLE ddl_target RENAME COLUMN w TO w2"):
            hold()
            do("ALTER TABLE ddl_target RENAME COLUMN w2 TO w", must=True)
        if do("VACUUM FULL idempotency.keys"):
            hold()
        if do("VACUUM FULL ddl_target"):
            hold()
        if do("REINDEX TABLE CONCURRENTLY ddl_target"):
            hold()
        else:
            self.drop_invalid_indexes()
        self.index_cycle(
            "CREATE INDEX CONCURRENTLY ddl_keys_pending ON idempotency.keys (scope, key) WHERE status = 'p'",
            "idempotency.ddl_keys_pending",
            predicate="status = 'p'",
            check=True,
        )
        self.index_cycle(
            "CREATE UNIQUE INDEX CONCURRENTLY ddl_target_id_w ON ddl_target (id, w)", "ddl_target_id_w", check=True
        )
        if do("REINDEX TABLE CONCURRENTLY idempotency.once"):
            hold()
        else:
            self.drop_invalid_indexes()
        self.index_cycle("CREATE INDEX CONCURRENTLY ddl_target_w ON ddl_target (w)", "ddl_target_w")
        if do("VACUUM FULL idempotency.once"):
            hold()
        if do("ALTER TABLE ddl_target SET SCHEMA ddl_other"):
            hold()
            do("ALTER TABLE ddl_other.ddl_target SET SCHEMA public", must=True)
        if do(
            "CREATE TRIGGER ddl_count AFTER INSERT ON idempotency.keys"
            " FOR EACH ROW EXECUTE FUNCTION public.ddl_count_insert()"
        ):
            hold()
            do("DROP TRIGGER ddl_count ON idempotency.keys", must=True)
        if self.dropped_oid is None and time.monotonic() >= self.drop_at:
            (oid,) = self.conn.execute("SELECT 'ddl_target'::regclass::oid").fetchone()
            if do("DROP TABLE ddl_target"):
                self.dropped_oid = oid
                hold()
                do(TARGET_DDL, must=True)


@pytest.fixture
def ddl_setup(conn):
    """The target table, the other schema and the trigger's function and
    side table; removed afterwards with this test's keys, on a connection
    of its own (the test's may be gone if the server crashed)."""

    def clean():
        with psycopg.connect(autocommit=True) as c:
            c.execute("DROP TABLE IF EXISTS public.ddl_target, public.ddl_trigger_log")
            c.execute("DROP SCHEMA IF EXISTS ddl_other CASCADE")
            c.execute("DROP TRIGGER IF EXISTS ddl_count ON idempotency.keys")
            c.execute("DROP FUNCTION IF EXISTS public.ddl_count_insert()")
            for name in ("ddl_keys_expires", "ddl_keys_pending"):
                c.execute(f"DROP INDEX IF EXISTS idempotency.{name}")
            c.execute(r"DELETE FROM idempotency.keys WHERE key LIKE 'ddl-%'")

    clean()
    conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
    conn.execute(TARGET_DDL)
    conn.execute("CREATE SCHEMA ddl_other")
    conn.execute("CREATE TABLE public.ddl_trigger_log (scope text, key text)")
    conn.execute(
        """CREATE FUNCTION public.ddl_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               INSERT INTO public.ddl_trigger_log VALUES (NEW.scope, NEW.key);
               RETURN NULL;
           END $$"""
    )
    yield
    clean()


def btree_indexes(conn):
    return conn.execute(
        """SELECT c.oid::regclass::text, i.indisvalid FROM pg_index i
           JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
           WHERE am.amname = 'btree'
             AND i.indrelid IN ('idempotency.keys'::regclass, 'idempotency.once'::regclass, 'ddl_target'::regclass)
           ORDER BY 1"""
    ).fetchall()


def test_concurrent_ddl_and_maintenance_against_every_entry_point(conn, ddl_setup):
    log = ServerLog()
    prefix = f"ddl-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    stop_at = t0 + DURATION
    workers = [Worker(n, prefix, stop_at, seed=n * 7919 + 17) for n in range(WORKERS)]
    ddl = DDLThread(stop_at, drop_at=t0 + DURATION * 0.4)
    for t in [*workers, ddl]:
        t.start()
    for t in [*workers, ddl]:
        t.join(timeout=DURATION + 60)
    hung = [t.name for t in [*workers, ddl] if t.is_alive()]
    assert not hung, f"threads still running long after the end: {hung}"
    elapsed = time.monotonic() - t0

    # -- every call: a right answer or an allowed error -----------------------
    calls = sum((w.calls for w in workers), collections.Counter())
    errors = sum((w.errors for w in workers), collections.Counter())
    print(f"\n{sum(calls.values())} calls in {elapsed:.1f} s by {WORKERS} workers:")
    for name, n in sorted(calls.items()):
        print(f"  {name:20} {n}")
    print(f"allowed errors of calls: {dict(errors) or 'none'}")
    print(
        f"DDL: {ddl.loops} loops, {sum(ddl.statements.values())} statements succeeded, "
        f"{sum(ddl.errors.values())} gave an allowed error, {ddl.checks} mid-run amcheck runs, "
        f"{ddl.partial_compared} partial-index/heap comparisons"
    )
    for kind, n in sorted(ddl.statements.items()):
        print(f"  {n:4}  {kind}")
    for (kind, state), n in sorted(ddl.errors.items()):
        print(f"  {n:4}  {state} {kind}")
    # A crash, unexpected errors and wrong answers are reported together.
    wait_until_gone({ddl.pid, *(p for w in workers for p in w.pids)} - {None})
    problems = [log.crashes()]
    unexpected = [*ddl.unexpected, *(u for w in workers for u in w.unexpected)]
    wrong = [x for w in workers for x in w.wrong]
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected errors:\n" + grouped(unexpected))
    if wrong:
        problems.append(f"{len(wrong)} wrong answers:\n" + grouped(wrong))
    problems = [p for p in problems if p]
    assert not problems, "\n\n".join(problems)
    assert ddl.dropped_oid is not None, "the DDL thread never dropped and re-created ddl_target"
    assert all(w.calls["idem_upsert"] > 0 for w in workers)

    # -- nothing stored changed -----------------------------------------------
    # Leases still open (their finish hit an allowed error) are finished now.
    for w in workers:
        for key, (request, token) in list(w.lease_open.items()):
            conn.execute("SELECT idem_finish(%s, result => '\"late\"', token => %s)", [key, token])
            w.finished[key] = (request, "completed", "late", 1)
    finished = {k: v for w in workers for k, v in w.finished.items()}
    released = {k: v for w in workers for k, v in w.released.items()}
    gone = set().union(*(w.rolled_back | w.expiring for w in workers))

    # No key was started twice: at most one 'started' per (key, attempt)
    # (a key failed retryably is started again with attempt 2).
    starts = sum((w.starts for w in workers), collections.Counter())
    twice = {k: n for k, n in starts.items() if n > 1}
    assert not twice, f"keys started more than once: {twice}"

    # Every finished key replays its stored result, in one statement (an
    # answer 'started' there would also fail its COMMIT with 55000).
    keys = sorted(finished)
    replays = conn.execute(
        """SELECT k.key, b.status, b.result, b.attempt
           FROM unnest(%s::text[], %s::text[]) AS k(key, request)
           CROSS JOIN LATERAL idem_begin(k.key, request => k.request::jsonb) AS b""",
        [keys, [json.dumps(finished[k][0]) for k in keys]],
    ).fetchall()
    bad = [(k, s, r, a) for k, s, r, a in replays if (s, r, a) != finished[k][1:]]
    assert len(replays) == len(keys) and not bad, f"replays that changed: {bad[:20]}"

    # Released keys still hold their error; rolled-back and expired keys are
    # unknown.
    got = dict(
        (k, (s, r, a))
        for k, s, r, a in conn.execute(
            """SELECT k, g.status, g.result, g.attempt FROM unnest(%s::text[]) AS k
               CROSS JOIN LATERAL idem_get(k) AS g""",
            [sorted(released) + sorted(gone)],
        ).fetchall()
    )
    for k, (_, error) in released.items():
        assert got.get(k) == ("released", error, 1), k
    assert not gone & got.keys(), f"keys that should be unknown: {sorted(gone & got.keys())[:20]}"

    # The key table holds exactly these keys, once each (read from the heap:
    # the indexes are checked by amcheck below). Expired keys are purged now.
    conn.execute("SELECT idem_purge(NULL)")
    with conn.transaction():
        conn.execute("SET LOCAL enable_indexscan = off")
        conn.execute("SET LOCAL enable_indexonlyscan = off")
        conn.execute("SET LOCAL enable_bitmapscan = off")
        stored = conn.execute(
            "SELECT key, count(*) FROM idempotency.keys WHERE key LIKE %s GROUP BY key", [prefix + ":%"]
        ).fetchall()
        ledger = conn.execute(
            "SELECT key, count(*) FROM idempotency.once WHERE scope = %s GROUP BY key", [prefix]
        ).fetchall()
        target = conn.execute("SELECT id, v, w, count(*) OVER (PARTITION BY id) FROM ddl_target").fetchall()
    assert [k for k, n in stored if n > 1] == [], "keys stored twice"
    assert {k for k, _ in stored} == finished.keys() | released.keys()

    # idem_once: true exactly once for each recorded key, false from then on,
    # and the ledger holds exactly those keys.
    once_true = [k for w in workers for k in w.once_true]
    once_failed = set().union(*(w.once_failed for w in workers))
    assert len(once_true) == len(set(once_true))
    assert [k for k, n in ledger if n > 1] == [], "ledger keys stored twice"
    assert {k for k, _ in ledger} == set(once_true)
    assert not once_failed & {k for k, _ in ledger}
    again = conn.execute(
        "SELECT count(*) FILTER (WHERE idem_once(k, scope => %s)) FROM unnest(%s::text[]) AS k",
        [prefix, once_true],
    ).fetchone()
    assert again == (0,), "idem_once answered true again"

    # ddl_target holds what each id's last successful write set, in the
    # table as it is now; rows written before the DROP TABLE are gone.
    (final_oid,) = conn.execute("SELECT 'ddl_target'::regclass::oid").fetchone()
    assert final_oid != ddl.dropped_oid
    expected = {}
    lost = set()
    for w in workers:
        expected.update({i: (r["v"], r["w"]) for i, r in w.rows.get(final_oid, {}).items()})
        lost |= set(w.rows.get(ddl.dropped_oid, {}))
    assert [i for i, _, _, n in target if n > 1] == [], "ddl_target ids stored twice"
    actual = {i: (None if v is None else int(v), w) for i, v, w, _ in target}
    assert all(v is None or v == int(v) for _, v, _, _ in target)
    assert actual == expected
    stray = {oid for w in workers for oid in w.rows} - {final_oid, ddl.dropped_oid}
    assert not stray, f"writes reported for tables other than ddl_target's two: {stray}"

    # -- the indexes: amcheck on every btree index of the three tables --------
    invalid = [name for name, valid in btree_indexes(conn) if not valid]
    assert not invalid, f"invalid indexes left behind: {invalid}"
    for name, _ in btree_indexes(conn):
        conn.execute("SELECT bt_index_check(%s::regclass, heapallindexed => true)", [name])
    (triggered,) = conn.execute("SELECT count(*) FROM public.ddl_trigger_log").fetchone()
    print(
        f"keys: {len(finished)} finished, {len(released)} released, {len(gone)} unknown; "
        f"{len(once_true)} idem_once keys; ddl_target: {len(expected)} rows now, "
        f"{len(lost)} ids had rows in the dropped table; trigger rows: {triggered}; "
        f"amcheck: {len(btree_indexes(conn))} indexes"
    )

    # -- no crash, also during the checks --------------------------------------
    log.assert_no_crash()


def test_upsert_after_alter_type_in_an_open_transaction(conn):
    """A known crash of the old code: session A has t1's description cached
    and a transaction open when B changes v's type; A's next upsert with a
    new set of columns, and the one after its COMMIT, must use the new
    type."""
    log = ServerLog()
    conn.execute("DROP TABLE IF EXISTS t1")
    conn.execute("CREATE TABLE t1 (id int PRIMARY KEY, v numeric, w text)")
    try:
        with psycopg.connect(autocommit=True) as a, psycopg.connect(autocommit=True) as b:
            answers = [a.execute("""SELECT idem_upsert('t1', '{"id":1,"v":1.5}')""").fetchone()[0]]
            a.execute("BEGIN")
            a.execute("SELECT 1")
            b.execute("ALTER TABLE t1 ALTER COLUMN v TYPE int USING v::int")
            answers.append(a.execute("""SELECT idem_upsert('t1', '{"id":2,"v":2,"w":"x"}')""").fetchone()[0])
            a.execute("COMMIT")
            answers.append(a.execute("""SELECT idem_upsert('t1', '{"id":3,"v":7,"w":"y"}')""").fetchone()[0])
            assert answers == ["inserted"] * 3
            rows = conn.execute("SELECT id, v, w FROM t1 WHERE id IN (2, 3) ORDER BY id").fetchall()
            assert rows == [(2, 2, "x"), (3, 7, "y")]
            assert a.execute("SELECT 1").fetchone() == (1,)
            pids = {a.info.backend_pid, b.info.backend_pid}
        wait_until_gone(pids)
    finally:
        conn.execute("DROP TABLE IF EXISTS t1")
    log.assert_no_crash()
