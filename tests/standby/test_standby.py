"""A hot standby answers what it can without writing, refuses the rest with
25006, and bounds its waits for a primary's transaction by `wait` and by the
session's `lock_timeout`, as the primary does.

scripts/test starts a primary and a streaming standby of it and passes their
connection strings in IDEM_PRIMARY and IDEM_STANDBY.
"""
import os
import threading
import time

import psycopg
import pytest
from psycopg.types.json import Jsonb

PRIMARY = os.environ.get("IDEM_PRIMARY", "")
STANDBY = os.environ.get("IDEM_STANDBY", "")


def connect(conninfo):
    return psycopg.connect(conninfo, autocommit=True)


def caught_up(standby, timeout=20.0):
    """Waits until the standby has replayed all the primary has written so far,
    committed or not: an open transaction's rows reach the standby too, once
    its WAL is flushed, which the segment switch forces."""
    with connect(PRIMARY) as primary:
        lsn = primary.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
        primary.execute("SELECT pg_switch_wal()")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = standby.execute(
            "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)
        ).fetchone()[0]
        if done:
            return
        time.sleep(0.02)
    pytest.fail(f"the standby did not replay up to {lsn} in {timeout} s")


def begin(conn, key, **kw):
    args = ", ".join(f"{k} => %({k})s" for k in kw)
    sql = f"SELECT status, result, attempt FROM idem_begin(%(key)s{', ' + args if args else ''})"
    return conn.execute(sql, {"key": key, **kw}).fetchone()


def sqlstate(conn, sql, params=None):
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        return e.sqlstate
    return None


@pytest.fixture(scope="module")
def nodes():
    with connect(PRIMARY) as primary, connect(STANDBY) as standby:
        primary.execute("CREATE EXTENSION IF NOT EXISTS idempotency")
        primary.execute("DELETE FROM idempotency.keys")
        primary.execute("DELETE FROM idempotency.once")
        # A completed key with a request, a key under a running lease, a
        # key released for a retry, and a recorded idem_once key.
        with primary.transaction():
            begin(primary, "done", request=Jsonb({"amount": 5}))
            primary.execute(
                "SELECT idem_finish('done', '{\"charge\": 1}', response_status => 201, "
                "response_body => '\\x7b2263223a20317d00')"
            )
        begin(primary, "leased", request=Jsonb({"to": "a"}), lease="1 hour")
        with primary.transaction():
            begin(primary, "released")
            primary.execute("SELECT idem_fail('released', '\"boom\"', retryable => true)")
        primary.execute("SELECT idem_once('recorded')")
        caught_up(standby)
        assert standby.execute("SELECT pg_is_in_recovery()").fetchone()[0]
        yield primary, standby


def test_answers_that_need_no_write(nodes):
    _, standby = nodes
    assert begin(standby, "done", request=Jsonb({"amount": 5})) == ("completed", {"charge": 1}, 1)
    assert begin(standby, "done") == ("completed", {"charge": 1}, 1)
    assert begin(standby, "done", request=Jsonb({"amount": 6}))[0] == "mismatch"
    assert begin(standby, "leased", request=Jsonb({"to": "a"}))[0] == "in_progress"
    assert begin(standby, "leased", request=Jsonb({"to": "b"}))[0] == "mismatch"
    assert standby.execute("SELECT idem_once('recorded')").fetchone()[0] is False
    row = standby.execute("SELECT status, result FROM idem_get('done')").fetchone()
    assert row == ("completed", {"charge": 1})
    # The stored response, byte for byte.
    assert standby.execute(
        "SELECT response_status, response_body FROM idem_begin('done')"
    ).fetchone() == (201, b'{"c": 1}\x00')


def test_a_running_lease_is_waited_for_no_longer_than_wait(nodes):
    _, standby = nodes
    t = time.monotonic()
    assert begin(standby, "leased", wait="300 ms")[0] == "in_progress"
    assert 0.28 <= time.monotonic() - t < 3


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM idem_begin('new-key')",
        "SELECT * FROM idem_begin('released')",
        "SELECT idem_once('not-recorded')",
        "SELECT idem_finish('leased', token => 1)",
        "SELECT idem_fail('leased', token => 1)",
        "SELECT idem_checkpoint('leased', 'p', token => 1)",
        "SELECT idem_purge()",
    ],
)
def test_writes_are_refused_with_25006(nodes, sql):
    _, standby = nodes
    assert sqlstate(standby, sql) == "25006"


def test_waits_for_a_primary_transaction_are_bounded(nodes):
    primary, standby = nodes
    with connect(PRIMARY) as holder:
        holder.execute("BEGIN")
        assert begin(holder, "busy")[0] == "started"
        holder.execute("SELECT idem_finish('busy', '\"from the primary\"')")
        holder.execute("SELECT idem_once('busy-once')")
        # The uncommitted rows reach the standby; their transaction is still
        # running there.
        caught_up(standby)

        assert begin(standby, "busy")[0] == "in_progress"
        t = time.monotonic()
        assert begin(standby, "busy", wait="500 ms")[0] == "in_progress"
        assert 0.45 <= time.monotonic() - t < 3

        # A shorter lock_timeout of the session ends the wait with its error.
        standby.execute("SET lock_timeout = '300ms'")
        t = time.monotonic()
        assert sqlstate(standby, "SELECT * FROM idem_begin('busy', wait => '10 s')") == "55P03"
        assert 0.25 <= time.monotonic() - t < 3
        t = time.monotonic()
        assert sqlstate(standby, "SELECT idem_once('busy-once')") == "55P03"
        assert 0.25 <= time.monotonic() - t < 3
        standby.execute("RESET lock_timeout")

        # A wait that the primary's COMMIT ends: the answer is the result.
        answers = []

        def waiter():
            with connect(STANDBY) as c:
                t0 = time.monotonic()
                answers.append((begin(c, "busy", wait="20 s"), time.monotonic() - t0))

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.5)
        holder.execute("COMMIT")
        thread.join(30)
        assert not thread.is_alive()
        (answer, waited) = answers[0]
        assert answer == ("completed", "from the primary", 1)
        assert 0.4 <= waited < 10
    caught_up(standby)
    assert standby.execute("SELECT idem_once('busy-once')").fetchone()[0] is False


def test_nothing_was_written_on_the_primary(nodes):
    primary, _ = nodes
    keys = primary.execute(
        "SELECT key, status, attempt FROM idempotency.keys ORDER BY key"
    ).fetchall()
    assert keys == [
        ("busy", "c", 1),
        ("done", "c", 1),
        ("leased", "p", 1),
        ("released", "r", 1),
    ]
    once = primary.execute("SELECT key FROM idempotency.once ORDER BY key").fetchall()
    assert once == [("busy-once",), ("recorded",)]
