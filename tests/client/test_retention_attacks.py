"""The purge worker, idem_stats() and idem_held under what a DBA, an
operator or an attacker may do to a server: DDL and maintenance on the key
table while the worker purges and jobs run, a worker terminated or killed
in the middle of a batch, a read-only database, a key table left locked,
a database whose sessions default to REPEATABLE READ or SERIALIZABLE, odd
database names, no free background worker slot, counting under
concurrency, idem_held as roles without privileges and on a hot standby
that is then promoted.

A server of its own, with the installed library in shared_preload_libraries,
purging every second in batches of 100, and each test in a database of its
own, so that a test counts exactly what it made. Settings changed with
ALTER SYSTEM are reset before a test ends. One test kills a worker with
SIGKILL on purpose (the postmaster then restarts every process); the server
log must show no other crash. Skipped where the installed extension has no
purge worker (before 0.4.0).
"""
import contextlib
import os
import re
import shutil
import signal
import threading
import time

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

import preloaded

DIR = "/tmp/idempotency-retention-attacks"
PORT = 5486
# A hot standby of the server, made by pg_basebackup.
STANDBY = os.path.join(DIR, "standby")
STANDBY_PORT = 5480
LAUNCHER = "idempotency purge launcher"
PURGE = "idempotency purge"


@pytest.fixture(scope="module")
def server():
    srv = preloaded.start(DIR, PORT, "idempotency.purge_interval = 1\n"
                                     "idempotency.purge_batch_size = 100\n"
                                     "idempotency.purge_delay = 0\n"
                                     # A prepared transaction that holds the key table locked.
                                     "max_prepared_transactions = 2\n",
                          leftovers=[os.path.join(STANDBY, "data")])
    try:
        yield srv
    finally:
        srv.stop()
    # The shutdown too: a worker that crashed while the server stopped.
    assert srv.crashes() == []


def create_database(server, name, extension=True):
    """A database of the test's own (dropped first if a run left it), with
    the extension in public."""
    with server.connect() as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    if extension:
        with server.connect(name) as conn:
            preloaded.create_extension(conn)
    return name


def finish_keys(conn, prefix, n, ttl):
    """n keys prefix1..prefixN finished in one transaction, kept for ttl."""
    conn.execute(sql.SQL("""DO $$
        BEGIN
            FOR i IN 1..{n} LOOP
                PERFORM idem_begin({prefix} || i);
                PERFORM idem_finish({prefix} || i, '1', ttl => {ttl});
            END LOOP;
        END $$""").format(n=sql.Literal(n), prefix=sql.Literal(prefix), ttl=sql.Literal(ttl)))


def expire_keys(conn, prefix, n):
    """n keys that expire a millisecond after their transaction began."""
    finish_keys(conn, prefix, n, "1 millisecond")


def count(conn, prefix):
    return conn.execute("SELECT count(*) FROM idempotency.keys WHERE starts_with(key, %s)", (prefix,)).fetchone()[0]


def stats(conn):
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM idem_stats()").fetchone()


def launchers(conn):
    return [pid for (pid,) in conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = %s",
                                           (LAUNCHER,)).fetchall()]


def purge_workers_in(conn, dbname):
    return [pid for (pid,) in conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = %s "
                                           "AND datname = %s", (PURGE, dbname)).fetchall()]


def wait_for(check, timeout, what):
    """Polls check() until it returns something true; fails after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def wait_purged(conns, prefix, timeout=15):
    """Waits until no key named prefix... is left in any of conns."""
    wait_for(lambda: all(count(c, prefix) == 0 for c in conns), timeout, f"the worker purged the keys {prefix}*")


def configure(conn, setting, value=None):
    """ALTER SYSTEM SET (or RESET, when value is None) and a reload."""
    if value is None:
        conn.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(*setting.split("."))))
    else:
        conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(*setting.split(".")),
                                                                sql.Literal(str(value))))
    conn.execute("SELECT pg_reload_conf()")


def settle(conn, prefix):
    """Returns once a round that began after the last reload has purged
    conn's database: two waves of expired keys there, the second made
    after the first was purged (a round under way at the reload may have
    purged the first with the old settings)."""
    for wave in ("1-", "2-"):
        expire_keys(conn, prefix + wave, 3)
        wait_purged([conn], prefix + wave, 10)


def errors_in(lines):
    return [line for line in lines if re.search(r"\b(ERROR|FATAL|PANIC):", line)]


# A BEFORE DELETE trigger on the key table that holds a purge up at the
# row of key 'gate' for as long as another session holds advisory lock
# 4242: a batch stopped in its middle, some of its rows deleted already.
# (A trigger on the key table is supported: rows are then inserted with an
# INSERT.)
GATE = """
CREATE FUNCTION public.purge_gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(4242);
    RETURN OLD;
END $$;
CREATE TRIGGER purge_gate BEFORE DELETE ON idempotency.keys
    FOR EACH ROW WHEN (OLD.key = 'gate') EXECUTE FUNCTION public.purge_gate();
"""


def gated_keys(conn, prefix, before, after):
    """Expired keys prefix1..prefixN with the key 'gate' among them: `before`
    keys, the gate, `after` keys, in this physical order (a fresh table),
    which is the order the purge deletes them in."""
    conn.execute(sql.SQL("""DO $$
        BEGIN
            FOR i IN 1..{total} LOOP
                IF i = {gate} THEN
                    PERFORM idem_begin('gate');
                    PERFORM idem_finish('gate', '1', ttl => '1 millisecond');
                END IF;
                PERFORM idem_begin({prefix} || i);
                PERFORM idem_finish({prefix} || i, '1', ttl => '1 millisecond');
            END LOOP;
        END $$""").format(total=sql.Literal(before + after), gate=sql.Literal(before + 1),
                          prefix=sql.Literal(prefix)))


def blocked_at_gate(conn, dbname):
    """The pid of the purge worker of dbname waiting at the gate, if it is."""
    row = conn.execute(
        "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND l.objid = 4242 AND NOT l.granted "
        "AND a.backend_type = %s AND a.datname = %s", (PURGE, dbname)).fetchone()
    return row and row[0]


def test_ddl_maintenance_and_idem_held_while_the_worker_purges_under_load(server):
    """For 15 s, 4 clients run jobs (a key each, kept 50 ms; every tenth
    kept an hour), another reclaims a few keys as soon as they expire, the
    worker purges them in batches of 100, and a DBA adds and drops a
    column, VACUUM FULLs, reindexes, builds and drops an index
    concurrently, and reads idem_held in a loop. Every call works (the
    README: calls keep working during all of these), nothing crashes,
    every expired key is purged, none that had not expired is."""
    db = create_database(server, "attack_ddl")
    mark = server.log_mark()
    stop = threading.Event()
    errors = []
    kept = []          # keys finished with a ttl of an hour
    short = [0]        # keys finished with a ttl of 50 ms
    lock = threading.Lock()
    with server.connect(db) as admin:
        purged_before = stats(admin)["keys_purged"]
        # Held for the whole test: a lease and a lease that ended.
        admin.execute("SELECT idem_begin('lease-held', lease => '1 hour')")
        admin.execute("SELECT idem_begin('lease-lapsed', lease => '1 millisecond')")

    def jobs(n):
        with server.connect(db) as conn:
            i = 0
            while not stop.is_set():
                key = f"job-{n}-{i}"
                ttl = "1 hour" if i % 10 == 0 else "50 milliseconds"
                try:
                    with conn.transaction():
                        status = conn.execute("SELECT status FROM idem_begin(%s)", (key,)).fetchone()[0]
                        assert status == "started", (key, status)
                        conn.execute("SELECT idem_finish(%s, '1', ttl => %s::interval)", (key, ttl))
                except Exception as e:  # noqa: BLE001 - every failure is reported below
                    errors.append((key, repr(e)))
                else:
                    with lock:
                        if i % 10 == 0:
                            kept.append(key)
                        else:
                            short[0] += 1
                i += 1

    reclaims = {}

    def reclaim():
        # Keys claimed again and again as soon as they expire: the purge
        # races each claim (the isolation spec purge_race shows the
        # interleavings). A claim of a key whose row the purge is deleting
        # answers in_progress, or completed while the key has not expired.
        with server.connect(db) as conn:
            while not stop.is_set():
                for j in range(5):
                    key = f"pool-{j}"
                    try:
                        with conn.transaction():
                            status = conn.execute("SELECT status FROM idem_begin(%s)", (key,)).fetchone()[0]
                            assert status in ("started", "completed", "in_progress"), (key, status)
                            if status == "started":
                                conn.execute("SELECT idem_finish(%s, '1', ttl => '20 milliseconds')", (key,))
                    except Exception as e:  # noqa: BLE001
                        errors.append((key, repr(e)))
                    else:
                        reclaims[status] = reclaims.get(status, 0) + 1

    ddl_runs = {}

    def ddl():
        statements = [
            "ALTER TABLE idempotency.keys ADD COLUMN x int",
            "ALTER TABLE idempotency.keys DROP COLUMN x",
            "VACUUM FULL idempotency.keys",
            "REINDEX TABLE CONCURRENTLY idempotency.keys",
            "CREATE INDEX CONCURRENTLY attack_idx ON idempotency.keys (expires_at)",
            "DROP INDEX CONCURRENTLY idempotency.attack_idx",
        ]
        with server.connect(db) as conn:
            while not stop.is_set():
                for statement in statements:
                    try:
                        conn.execute(statement)
                    except Exception as e:  # noqa: BLE001
                        errors.append((statement, repr(e)))
                    ddl_runs[statement] = ddl_runs.get(statement, 0) + 1
                    time.sleep(0.2)

    held_reads = [0]

    def held():
        with server.connect(db) as conn:
            while not stop.is_set():
                try:
                    rows = conn.execute("SELECT key, mode FROM idem_held WHERE mode = 'lease'").fetchall()
                    assert ("lease-held", "lease") in rows, rows
                except Exception as e:  # noqa: BLE001
                    errors.append(("idem_held", repr(e)))
                held_reads[0] += 1

    threads = [threading.Thread(target=jobs, args=(n,)) for n in range(4)]
    threads += [threading.Thread(target=f) for f in (reclaim, ddl, held)]
    for t in threads:
        t.start()
    time.sleep(15)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    # Every statement ran, several times over.
    assert len(ddl_runs) == 6 and min(ddl_runs.values()) >= 3, ddl_runs
    assert held_reads[0] > 100 and short[0] > 1000 and reclaims.get("started", 0) > 100, \
        (held_reads, short, reclaims)
    with server.connect(db) as conn:
        # The pool keys, claimed once more (once expired, and not while the
        # purge deletes its row) and kept an hour.
        def keep_for_an_hour(key):
            with conn.transaction():
                if conn.execute("SELECT status FROM idem_begin(%s)", (key,)).fetchone()[0] != "started":
                    return False
                conn.execute("SELECT idem_finish(%s, '1', ttl => '1 hour')", (key,))
                return True

        for j in range(5):
            wait_for(lambda: keep_for_an_hour(f"pool-{j}"), 5, f"pool-{j} claimed again")
        # Every key kept 50 ms is purged, and counted once.
        wait_for(lambda: count(conn, "job-") == len(kept), 15, "the worker purged every expired job key")
        # None kept an hour is: each still replays.
        replayed = conn.execute("SELECT count(*) FROM unnest(%s::text[]) k, idem_begin(k) b "
                                "WHERE b.status = 'completed'", (kept,)).fetchone()[0]
        assert replayed == len(kept)
        assert count(conn, "pool-") == 5
        assert conn.execute("SELECT key FROM idem_held WHERE mode = 'lease' ORDER BY key").fetchall() == \
            [("lease-held",), ("lease-lapsed",)]
        # Purged: the short job keys and the pool keys' expired rows (each
        # purged at most once; a row claimed again is not purged).
        purged = stats(conn)["keys_purged"] - purged_before
        assert short[0] <= purged <= short[0] + reclaims["started"]
        # The table as the extension made it.
        assert conn.execute("SELECT count(*) FROM pg_attribute WHERE attrelid = 'idempotency.keys'::regclass "
                            "AND attname = 'x' AND NOT attisdropped").fetchone()[0] == 0
    # No error in the log (the worker's included), no crash.
    assert errors_in(server.log_since(mark)) == []
    assert server.crashes() == []


def test_a_terminated_worker_rolls_its_batch_back_and_the_next_round_finishes(server):
    """pg_terminate_backend of a purge worker in the middle of a batch
    (some of its rows deleted, waiting at the gate), with batches of 100 and
    100 ms between them: the batch rolls back (its rows are there again,
    unlocked, and not counted), the worker exits with a FATAL, the launcher
    goes on, and a later round purges everything."""
    db = create_database(server, "attack_term")
    with server.connect(db) as conn, server.connect(db) as holder:
        conn.execute(GATE)
        configure(conn, "idempotency.purge_delay", "100ms")
        try:
            launcher = launchers(conn)
            holder.execute("SELECT pg_advisory_lock(4242)")
            purged_before = stats(conn)["keys_purged"]
            mark = server.log_mark()
            # About 15 whole batches, then 49 keys and the gate.
            gated_keys(conn, "t-", 1549, 1451)
            pid = wait_for(lambda: blocked_at_gate(conn, db), 15, "the worker waits at the gate")
            # The batches before committed, and were counted.
            done = stats(conn)["keys_purged"] - purged_before
            assert done % 100 == 0 and 1000 <= done <= 1500, done
            # No new round until this one is over, so that what follows sees
            # this batch alone.
            configure(conn, "idempotency.purge_interval", 0)
            assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0] is True
            wait_for(lambda: not purge_workers_in(conn, db), 10, "the terminated worker is gone")
            # Rolled back: the 49 rows and the gate are there, locked by no
            # one, and were not counted.
            left = conn.execute("SELECT count(*) FROM (SELECT 1 FROM idempotency.keys "
                                "WHERE starts_with(key, 't-') OR key = 'gate' FOR UPDATE NOWAIT) s").fetchone()[0]
            assert left == 3001 - done
            assert stats(conn)["keys_purged"] - purged_before == done
            lines = server.log_since(mark)
            assert [line for line in lines if "terminating background worker" in line], lines
            assert all("FATAL:  terminating background worker" in line for line in errors_in(lines)), lines
            # The launcher was not ended with it.
            assert launchers(conn) == launcher
            holder.execute("SELECT pg_advisory_unlock(4242)")
            configure(conn, "idempotency.purge_interval")
            wait_purged([conn], "t-", 15)
            assert count(conn, "gate") == 0
            assert stats(conn)["keys_purged"] - purged_before == 3001
            assert launchers(conn) == launcher
        finally:
            configure(conn, "idempotency.purge_interval")
            configure(conn, "idempotency.purge_delay")
            conn.execute("DROP TRIGGER purge_gate ON idempotency.keys")


def test_a_read_only_database_is_left_alone_quietly(server):
    """A database whose sessions are read-only (ALTER DATABASE ... SET
    default_transaction_read_only) is skipped, with nothing in the log each
    round; other databases are purged; once the setting is reset, it is
    purged too."""
    ro = create_database(server, "attack_ro")
    rw = create_database(server, "attack_rw")
    with server.connect() as admin:
        admin.execute("ALTER DATABASE attack_ro SET default_transaction_read_only = on")
    with server.connect(ro) as r, server.connect(rw) as w:
        assert r.execute("SHOW default_transaction_read_only").fetchone()[0] == "on"
        # This session may write (as a DBA's would).
        r.execute("SET default_transaction_read_only = off")
        mark = server.log_mark()
        expire_keys(r, "ro-", 100)
        expire_keys(w, "rw-", 100)
        wait_purged([w], "rw-", 10)
        time.sleep(3)
        assert count(r, "ro-") == 100
        # Expired all the same: unknown to the functions.
        assert r.execute("SELECT count(*) FROM idem_get('ro-1')").fetchone()[0] == 0
        assert errors_in(server.log_since(mark)) == []
    with server.connect() as admin:
        admin.execute("ALTER DATABASE attack_ro RESET default_transaction_read_only")
    with server.connect(ro) as r:
        wait_purged([r], "ro-", 10)


# What keeps idempotency.keys of a database locked, in a mode that
# conflicts with the purge's ROW EXCLUSIVE, while the worker comes round:
# an idle transaction that locked it in SHARE mode (as CREATE INDEX does)
# or ACCESS EXCLUSIVE mode (as ALTER TABLE, VACUUM FULL and TRUNCATE do), a
# prepared transaction that holds it in EXCLUSIVE mode, and an ALTER TABLE
# waiting for its lock behind an idle reader (a lock request in the queue
# conflicts as a granted lock does), and an index alone locked (ALTER INDEX
# ... SET TABLESPACE in an idle transaction: the table's own lock is free).
LOCK_HOLDERS = ("share", "access exclusive", "prepared", "waiting alter", "index")


@contextlib.contextmanager
def key_table_locked(server, dbname, holder):
    """Holds idempotency.keys of dbname locked as LOCK_HOLDERS says; yields
    a function that lets it go (called again on the way out)."""
    conns = []
    released = [False]
    waiter = None
    try:
        holding = server.connect(dbname)
        conns.append(holding)
        holding.execute("BEGIN")
        if holder in ("share", "access exclusive"):
            holding.execute(sql.SQL("LOCK TABLE idempotency.keys IN {} MODE").format(sql.SQL(holder.upper())))
        elif holder == "index":
            holding.execute("ALTER INDEX idempotency.keys_pkey SET TABLESPACE pg_default")
        elif holder == "prepared":
            holding.execute("LOCK TABLE idempotency.keys IN EXCLUSIVE MODE")
            holding.execute("PREPARE TRANSACTION 'attack_lock'")
        else:
            holding.execute("SELECT count(*) FROM idempotency.keys")
            altering = server.connect(dbname)
            conns.append(altering)
            pid = altering.execute("SELECT pg_backend_pid()").fetchone()[0]

            def alter():
                # Rolled back once it has its lock: the table is left as it was.
                with altering.transaction(force_rollback=True):
                    altering.execute("ALTER TABLE idempotency.keys ADD COLUMN attack_x int")

            waiter = threading.Thread(target=alter)
            waiter.start()
            wait_for(lambda: holding.execute(
                "SELECT count(*) FROM pg_locks WHERE pid = %s AND relation = 'idempotency.keys'::regclass "
                "AND mode = 'AccessExclusiveLock' AND NOT granted", (pid,)).fetchone()[0], 5,
                "the ALTER TABLE waits for its lock")

        def release():
            if released[0]:
                return
            released[0] = True
            if holder == "prepared":
                holding.execute("ROLLBACK PREPARED 'attack_lock'")
            else:
                holding.execute("ROLLBACK")
            if waiter is not None:
                waiter.join()

        try:
            yield release
        finally:
            # (A prepared transaction outlives its session.)
            release()
    finally:
        for conn in conns:
            conn.close()


def waiting_purge_workers(conn):
    """The purge workers (of any database) waiting for a lock."""
    return conn.execute("SELECT l.pid, a.datname, l.locktype, l.mode FROM pg_locks l JOIN pg_stat_activity a "
                        "USING (pid) WHERE NOT l.granted AND a.backend_type = %s", (PURGE,)).fetchall()


@pytest.mark.parametrize("holder", LOCK_HOLDERS)
def test_a_locked_key_table_is_skipped_and_other_databases_are_purged(server, holder):
    """While idempotency.keys of one database stays locked for 6 s (longer
    than the worker's lock_timeout of 5 s), the worker of that database
    does not wait for the lock: it skips the database until the next round
    (a DEBUG1 line, no ERROR), so the launcher goes on and the other
    database is purged round after round. Once the lock goes, the next
    round purges the keys of the locked database."""
    with server.connect() as admin:
        if holder == "prepared" and admin.execute("SHOW max_prepared_transactions").fetchone()[0] == "0":
            pytest.skip("the server allows no prepared transaction")
    locked = create_database(server, "attack_locked")
    free = create_database(server, "attack_free")
    with server.connect() as admin:
        # The worker's line when it skips the database.
        admin.execute("ALTER DATABASE attack_locked SET log_min_messages = debug1")
    # The key table can be read while it is locked in these modes (ACCESS
    # EXCLUSIVE, or an ACCESS EXCLUSIVE request in the queue, forbid it).
    readable = holder in ("share", "prepared")
    with server.connect(locked) as a, server.connect(free) as b:
        expire_keys(a, "lk-", 200)
        purged_before = stats(b)["keys_purged"]
        mark = server.log_mark()
        with key_table_locked(server, locked, holder) as release:
            since = time.monotonic()
            # Each wave made once the one before was purged: three rounds
            # at least went past the locked database.
            for wave in range(3):
                expire_keys(b, f"fr-{wave}-", 100)
                wait_purged([b], f"fr-{wave}-", 5)
            while time.monotonic() - since < 6:
                assert waiting_purge_workers(b) == []
                time.sleep(0.2)
            if readable:
                assert count(a, "lk-") == 200
            release()
        wait_purged([a], "lk-", 10)
        assert stats(b)["keys_purged"] - purged_before >= 500
    lines = server.log_since(mark)
    assert errors_in(lines) == []
    assert [line for line in lines if "idempotency purge: skipped, idempotency.keys is locked" in line]
    with server.connect() as admin:
        for name in (locked, free):
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
def test_a_database_defaulting_to_a_higher_isolation_level_is_purged_under_reclaims(server, isolation):
    """A database whose sessions default to REPEATABLE READ or SERIALIZABLE
    (ALTER DATABASE ... SET default_transaction_isolation), 4 clients
    claiming 20 keys each again and again as soon as they expire, in that
    level: the worker runs its batches in READ COMMITTED all the same, so a
    key claimed again while a batch deletes is skipped, not a serialization
    failure of the whole batch. No ERROR from the worker; 1000 expired keys
    made while the claims go on are purged (and counted) while they go on;
    every expired key is gone once they stop."""
    db = create_database(server, "attack_" + isolation.replace(" ", "_"))
    with server.connect() as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_isolation = {}").format(
            sql.Identifier(db), sql.Literal(isolation)))
    stop = threading.Event()
    errors = []
    statuses = {}
    # A claim refused with 40001 (the key was changed or purged after the
    # claim's snapshot was taken): the client retries, as the README says.
    serialization_failures = [0]
    clients = []
    lock = threading.Lock()

    def reclaim(n):
        with server.connect(db) as conn:
            clients.append(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
            while not stop.is_set():
                for j in range(20):
                    key = f"hot-{n}-{j}"
                    try:
                        with conn.transaction():
                            status = conn.execute("SELECT status FROM idem_begin(%s)", (key,)).fetchone()[0]
                            if status == "started":
                                conn.execute("SELECT idem_finish(%s, '1', ttl => '1 millisecond')", (key,))
                    except psycopg.errors.SerializationFailure:
                        with lock:
                            serialization_failures[0] += 1
                    except Exception as e:  # noqa: BLE001
                        errors.append((key, repr(e)))
                    else:
                        with lock:
                            statuses[status] = statuses.get(status, 0) + 1

    with server.connect(db) as conn:
        assert conn.execute("SHOW transaction_isolation").fetchone()[0] == isolation
        purged_before = stats(conn)["keys_purged"]
        mark = server.log_mark()
        threads = [threading.Thread(target=reclaim, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(1)
            expire_keys(conn, "old-", 1000)
            wait_for(lambda: count(conn, "old-") == 0, 10, "the worker purged the old keys during the claims")
            # More rounds meeting the claims.
            time.sleep(2)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert errors == []
        assert statuses.get("started", 0) > 500, (statuses, serialization_failures)
        assert stats(conn)["keys_purged"] - purged_before >= 1000
        wait_for(lambda: conn.execute("SELECT count(*) FROM idempotency.keys").fetchone()[0] == 0, 10,
                 "the worker purged every expired key")
    # The clients' own refusals (40001) are in the log under their pids;
    # anything else is not.
    others = [line for line in server.log_since(mark) if not any(f"[{pid}]" in line for pid in clients)]
    assert errors_in(others) == []
    print(f"{isolation}: claims {statuses}, 40001 {serialization_failures[0]}")


# Database names the purge_databases list can name: spaces, a double
# quote, letters outside ASCII, mixed case, 63 bytes (the longest). The
# list is split on commas and each name trimmed, compared as it is with
# pg_database.datname (no case folding, no quoting).
ODD_NAMES = ['Ünï code "db"', "MixedCase", "with  space", "é" * 31 + "x"]


def test_purge_databases_names_odd_database_names(server):
    names = [create_database(server, name) for name in ODD_NAMES]
    unlisted = create_database(server, "attack_unlisted")
    conns = {name: server.connect(name) for name in names + [unlisted]}
    try:
        admin = conns[unlisted]
        # Spaces around the commas are trimmed.
        listed = " , ".join(names) + " ,"
        configure(admin, "idempotency.purge_databases", listed)
        try:
            # (This session rereads the file at its next command after the
            # postmaster signals it.)
            wait_for(lambda: admin.execute("SHOW idempotency.purge_databases").fetchone()[0] == listed, 5,
                     "the setting was reloaded")
            settle(conns[names[0]], "odd-witness-")
            for conn in conns.values():
                expire_keys(conn, "odd-", 50)
            wait_purged([conns[name] for name in names], "odd-", 10)
            time.sleep(2.5)
            assert count(conns[unlisted], "odd-") == 50
        finally:
            configure(admin, "idempotency.purge_databases")
        wait_purged([conns[unlisted]], "odd-", 10)
    finally:
        for conn in conns.values():
            conn.close()


def parallel_sleep(conn, seconds):
    """Runs pg_sleep(seconds) in a parallel worker: a background worker slot
    taken for that long."""
    # Its name from PostgreSQL 16 on; force_parallel_mode before.
    modern = int(conn.execute("SHOW server_version_num").fetchone()[0]) >= 160000
    conn.execute(sql.SQL("SET {} = on").format(
        sql.Identifier("debug_parallel_query" if modern else "force_parallel_mode")))
    conn.execute("SET max_parallel_workers_per_gather = 1")
    conn.execute("SET parallel_setup_cost = 0")
    conn.execute(sql.SQL("SELECT pg_sleep({})").format(sql.Literal(seconds)))


def test_no_free_worker_slot_leaves_the_launcher_running(server):
    """With max_worker_processes = 2 and no logical replication launcher,
    the purge launcher takes one slot and a database's worker needs the
    other: while a parallel query holds it, each round logs a WARNING and
    purges nothing, the launcher keeps running, and the round after the
    query ends purges."""
    db = create_database(server, "attack_slots")
    with server.connect() as admin:
        admin.execute("ALTER SYSTEM SET max_worker_processes = 2")
        admin.execute("ALTER SYSTEM SET max_logical_replication_workers = 0")
    server.restart()
    try:
        with server.connect(db) as conn, server.connect(db) as query:
            assert conn.execute("SHOW max_worker_processes").fetchone()[0] == "2"
            launcher = wait_for(lambda: launchers(conn), 10, "the launcher runs")
            # Off while the parallel query takes the slot (a round under way
            # could hold it then).
            configure(conn, "idempotency.purge_interval", 0)
            time.sleep(1.5)
            sleeper = threading.Thread(target=parallel_sleep, args=(query, 5))
            sleeper.start()
            try:
                wait_for(lambda: conn.execute("SELECT count(*) FROM pg_stat_activity "
                                              "WHERE backend_type = 'parallel worker'").fetchone()[0] == 1,
                         5, "a parallel worker took the free slot")
                mark = server.log_mark()
                expire_keys(conn, "slot-", 100)
                configure(conn, "idempotency.purge_interval")
                time.sleep(2.5)
                assert count(conn, "slot-") == 100
                assert launchers(conn) == launcher
                warnings = [line for line in server.log_since(mark) if "WARNING:" in line]
                assert warnings and all("idempotency purge launcher could not start a worker for database" in line
                                        for line in warnings), warnings
            finally:
                sleeper.join()
            # The slot is free again.
            wait_purged([conn], "slot-", 10)
            assert launchers(conn) == launcher
    finally:
        with server.connect() as admin:
            admin.execute("ALTER SYSTEM RESET idempotency.purge_interval")
            admin.execute("ALTER SYSTEM RESET max_worker_processes")
            admin.execute("ALTER SYSTEM RESET max_logical_replication_workers")
        server.restart()


def test_counters_are_exact_under_concurrency(server):
    """4 backends, each running 5000 jobs (begin, finish, a replay, two
    idem_once) as fast as the server goes, after a reset: every call is
    counted, none twice, none lost."""
    db = create_database(server, "attack_stats")
    n = 5000
    with server.connect(db) as conn:
        conn.execute("SELECT idem_stats_reset()")
        before = stats(conn)
    start = threading.Barrier(4)
    errors = []

    def client(c):
        try:
            with server.connect(db) as conn:
                start.wait()
                conn.execute(sql.SQL("""DO $$
                    BEGIN
                        FOR i IN 1..{n} LOOP
                            PERFORM idem_begin({p} || i);
                            PERFORM idem_finish({p} || i, '1');
                            PERFORM idem_begin({p} || i);
                            PERFORM idem_once({p} || i);
                            PERFORM idem_once({p} || i);
                        END LOOP;
                    END $$""").format(n=sql.Literal(n), p=sql.Literal(f"st-{c}-")))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with server.connect(db) as conn:
        after = stats(conn)
    assert after["stats_reset"] == before["stats_reset"]
    total = 4 * n
    assert {k: after[k] for k in ("begin_started", "finishes", "begin_completed", "once_true", "once_false",
                                  "begin_in_progress", "begin_mismatch", "waits")} == {
        "begin_started": total, "finishes": total, "begin_completed": total, "once_true": total,
        "once_false": total, "begin_in_progress": 0, "begin_mismatch": 0, "waits": 0}


def test_idem_held_shows_a_role_its_own_keys(server):
    """Keys of roles whose privileges the caller lacks are left out; a
    member of the owner sees them, and so does a member of
    pg_read_all_stats. The lock lines show any backend."""
    db = create_database(server, "attack_roles")
    with server.connect() as admin:
        for role in ("atk_alice", "atk_bob", "atk_carol", "atk_dave"):
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        admin.execute("CREATE ROLE atk_alice LOGIN")
        admin.execute("CREATE ROLE atk_bob LOGIN")
        admin.execute("CREATE ROLE atk_carol LOGIN IN ROLE pg_read_all_stats")
        admin.execute("CREATE ROLE atk_dave LOGIN IN ROLE atk_alice")
    try:
        with server.connect(db, "atk_alice") as alice, server.connect(db, "atk_bob") as bob, \
                server.connect(db, "atk_carol") as carol, server.connect(db, "atk_dave") as dave, \
                server.connect(db) as su:
            alice.execute("SELECT idem_begin('alice-lease', lease => '1 hour')")
            bob.execute("SELECT idem_begin('bob-lease', lease => '1 hour')")
            # A claim row of alice's open transaction (a retry).
            with alice.transaction():
                alice.execute("SELECT idem_begin('alice-retry')")
                alice.execute("SELECT idem_fail('alice-retry')")
            alice.execute("BEGIN")
            assert alice.execute("SELECT status FROM idem_begin('alice-retry')").fetchone()[0] == "started"
            alice_pid = alice.execute("SELECT pg_backend_pid()").fetchone()[0]
            # A new key of bob's, held by its lock alone.
            bob.execute("BEGIN")
            assert bob.execute("SELECT status FROM idem_begin('bob-new')").fetchone()[0] == "started"
            bob_pid = bob.execute("SELECT pg_backend_pid()").fetchone()[0]

            def keys(conn):
                return conn.execute("SELECT key, owner, mode, pid FROM idem_held WHERE mode <> 'lock' "
                                    "ORDER BY key").fetchall()

            def locks(conn):
                return conn.execute("SELECT owner, pid, keys FROM idem_held WHERE mode = 'lock'").fetchall()

            alices = [("alice-lease", "atk_alice", "lease", None),
                      ("alice-retry", "atk_alice", "transaction", alice_pid)]
            bobs = [("bob-lease", "atk_bob", "lease", None)]
            everyone = sorted(alices + bobs)
            try:
                assert keys(alice) == alices
                assert keys(bob) == bobs
                assert keys(dave) == alices
                assert keys(carol) == everyone
                assert keys(su) == everyone
                # idem_held_keys() itself, called directly, filters the same.
                assert alice.execute("SELECT count(*) FROM idem_held_keys() WHERE owner <> 'atk_alice'") \
                    .fetchone()[0] == 0
                for conn in (alice, bob, carol, dave, su):
                    assert locks(conn) == [("atk_bob", bob_pid, 1)]
            finally:
                alice.execute("ROLLBACK")
                bob.execute("ROLLBACK")
            alice.execute("SELECT idem_fail('alice-lease', token => token) FROM idem_held WHERE key = 'alice-lease'")
            bob.execute("SELECT idem_fail('bob-lease', token => token) FROM idem_held WHERE key = 'bob-lease'")
    finally:
        with server.connect() as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
            for role in ("atk_alice", "atk_bob", "atk_carol", "atk_dave"):
                admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def start_standby(server):
    """A hot standby of the server, streaming from it, as scripts/lib.sh's
    start_standby makes one."""
    data = os.path.join(STANDBY, "data")
    shutil.rmtree(STANDBY, ignore_errors=True)
    os.makedirs(STANDBY)
    shutil.chown(STANDBY, "postgres", "postgres")
    preloaded.as_postgres(os.path.join(preloaded.PG_BIN, "pg_basebackup"), "-h", DIR, "-p", str(PORT), "-U", "postgres",
                "-D", data, "-R", "-X", "stream", "-c", "fast")
    with open(os.path.join(data, "postgresql.conf"), "a") as conf:
        conf.write(f"port = {STANDBY_PORT}\nunix_socket_directories = '{STANDBY}'\nhot_standby = on\n")
    standby = preloaded.Server(server.version, data=data, log=os.path.join(STANDBY, "server.log"), socket=STANDBY,
                     port=STANDBY_PORT)
    standby.start()
    return standby


def test_on_a_standby_idem_held_and_idem_stats_work_and_the_launcher_starts_on_promotion(server):
    db = create_database(server, "attack_standby")
    with server.connect(db) as primary:
        # The primary leaves this database's expired keys alone, so that the
        # standby has some to purge once promoted.
        configure(primary, "idempotency.purge_databases", "postgres")
        time.sleep(1.5)
        primary.execute("SELECT idem_begin('sb-lease', lease => '1 hour')")
        finish_keys(primary, "sb-done-", 10, "1 hour")
        expire_keys(primary, "sb-exp-", 100)
        # The standby is made after the setting: it inherits it.
        standby = start_standby(server)
        try:
            with standby.connect(db) as replica:
                assert replica.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
                wait_for(lambda: count(replica, "sb-") == 111, 10, "the standby caught up")
                time.sleep(2)
                # No launcher on a standby (nothing can be deleted there).
                assert launchers(replica) == []
                assert count(replica, "sb-exp-") == 100
                held = replica.execute("SELECT key, mode, pid, token IS NOT NULL FROM idem_held").fetchall()
                assert held == [("sb-lease", "lease", None, True)]
                # Counters per server: replays on the standby count there only.
                primary_before = stats(primary)
                replica_before = stats(replica)
                assert replica_before["stats_reset"] != primary_before["stats_reset"]
                for i in range(1, 6):
                    assert replica.execute("SELECT status FROM idem_begin(%s)", (f"sb-done-{i}",)) \
                        .fetchone()[0] == "completed"
                assert stats(replica)["begin_completed"] - replica_before["begin_completed"] == 5
                assert stats(primary)["begin_completed"] == primary_before["begin_completed"]
                # A claim is refused read-only, and not counted.
                with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                    replica.execute("SELECT idem_begin('sb-new', lease => '1 minute')")
                assert stats(replica)["begin_started"] == replica_before["begin_started"]
            preloaded.as_postgres(standby.pg_ctl, "-D", standby.data, "-w", "promote")
            with standby.connect(db) as promoted:
                assert promoted.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False
                wait_for(lambda: launchers(promoted), 15, "the launcher starts on the promoted server")
                configure(promoted, "idempotency.purge_databases")
                wait_purged([promoted], "sb-exp-", 15)
                assert count(promoted, "sb-done-") == 10
                assert promoted.execute("SELECT key, mode FROM idem_held").fetchall() == [("sb-lease", "lease")]
                assert stats(promoted)["keys_purged"] >= 100
        finally:
            standby.stop()
        assert standby.crashes() == []
        configure(primary, "idempotency.purge_databases")
        wait_purged([primary], "sb-exp-", 10)


def test_sigkill_of_a_purge_worker_restarts_the_server_and_purging_goes_on(server):
    """A purge worker killed with SIGKILL in the middle of a batch: the
    postmaster, as for any child that crashed, ends every process and
    restarts them after recovery. The launcher is back, the counters start
    from zero again, and the next rounds purge what is left."""
    db = create_database(server, "attack_kill")
    with server.connect(db) as conn:
        conn.execute(GATE)
        finish_keys(conn, "k-keep-", 10, "1 hour")
        holder = server.connect(db)
        holder.execute("SELECT pg_advisory_lock(4242)")
        before = stats(conn)
        old = launchers(conn)
        gated_keys(conn, "k-", 349, 651)
        pid = wait_for(lambda: blocked_at_gate(conn, db), 15, "the worker waits at the gate")
        server.kills += 1
        os.kill(pid, signal.SIGKILL)
    # Every backend is ended too, the holder's and ours.
    time.sleep(1)
    holder.close()

    def reconnect():
        try:
            return server.connect(db)
        except psycopg.OperationalError:
            return None

    conn = wait_for(reconnect, 30, "the server accepts connections after the crash")
    with conn:
        new = wait_for(lambda: launchers(conn), 15, "the launcher is back")
        assert new != old
        after = stats(conn)
        assert after["stats_reset"] > before["stats_reset"]
        wait_for(lambda: count(conn, "k-") == 10, 15, "the worker purged the rest")
        assert count(conn, "gate") == 0
        assert count(conn, "k-keep-") == 10
        # Counted since the restart: at most the keys left after the crash.
        assert 0 < stats(conn)["keys_purged"] <= 1001
        conn.execute("DROP TRIGGER purge_gate ON idempotency.keys")
    with open(server.log) as f:
        assert len([line for line in f if preloaded.KILLED.search(line)]) == server.kills


def test_idem_held_over_200k_keys(server):
    """idem_held reads the whole key table in one pass: on 200 000 keys of
    which 20 000 are leases it returns exactly those, in well under a
    second or two."""
    db = create_database(server, "attack_big")
    with server.connect(db) as conn:
        with conn.transaction():
            conn.execute("SELECT idem_begin('tmpl-done')")
            conn.execute("SELECT idem_finish('tmpl-done', '{\"a\": 1}', ttl => '1 hour')")
        conn.execute("SELECT idem_begin('tmpl-lease', lease => '1 hour')")
        columns = [c for (c,) in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'idempotency.keys'::regclass "
            "AND attnum > 0 AND NOT attisdropped ORDER BY attnum")]
        # Copies of the two rows under other keys, made by SQL.
        copy = sql.SQL("INSERT INTO idempotency.keys ({cols}) SELECT {vals} FROM idempotency.keys t, "
                       "generate_series(1, %s) i WHERE t.key = %s").format(
            cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
            vals=sql.SQL(", ").join(sql.SQL("t.key || '-' || i") if c == "key" else sql.Identifier("t", c)
                                    for c in columns))
        conn.execute(copy, (180_000, "tmpl-done"))
        conn.execute(copy, (20_000, "tmpl-lease"))
        conn.execute("VACUUM ANALYZE idempotency.keys")
        assert conn.execute("SELECT count(*) FROM idempotency.keys").fetchone()[0] == 200_002
        timings = []
        for _ in range(3):
            start = time.monotonic()
            held = conn.execute("SELECT count(*), count(DISTINCT key) FROM idem_held WHERE mode = 'lease'") \
                .fetchone()
            timings.append(time.monotonic() - start)
            assert held == (20_001, 20_001)
        print(f"idem_held over 200 000 keys, 20 001 held: {min(timings) * 1000:.0f} ms")
        assert min(timings) < 2
