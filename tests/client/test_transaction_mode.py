"""Transaction mode through a real driver: crashes, kills and crowds."""
import os
import signal
import threading
import time

import psycopg

import worker


def begin(conn, key, **kw):
    args = ", ".join(["%s"] + [f"{k} => %s" for k in kw])
    return conn.execute(f"SELECT status, result, attempt FROM idem_begin({args})", [key, *kw.values()]).fetchone()


def test_a_killed_client_leaves_the_key_as_never_begun(conn, fresh_keys):
    pid = os.fork()
    if pid == 0:  # the worker: claim, then die without a word
        c = psycopg.connect()
        c.execute("SELECT idem_begin('crash:1')")
        c.execute("SELECT pg_sleep(0)")
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    with psycopg.connect() as other:
        status, _, attempt = begin(other, "crash:1", wait="10 seconds")
        assert (status, attempt) == ("started", 1)
        other.execute("SELECT idem_finish('crash:1', '\"second worker\"')")
        other.commit()
    assert begin(conn, "crash:1")[:2] == ("completed", "second worker")


def test_a_terminated_backend_releases_its_keys(conn, fresh_keys):
    holder = psycopg.connect()
    assert begin(holder, "term:1")[0] == "started"
    assert begin(holder, "term:2")[0] == "started"
    assert begin(conn, "term:1")[0] == "in_progress"
    pid = holder.info.backend_pid
    conn.execute("SELECT pg_terminate_backend(%s, 10000)", [pid])
    with psycopg.connect() as other:
        assert begin(other, "term:1")[0] == "started"
        assert begin(other, "term:2")[0] == "started"
        other.rollback()


def test_a_crowd_on_one_key_gets_exactly_one_started(conn, fresh_keys):
    n = 12
    barrier = threading.Barrier(n)
    answers = []
    holders = []
    lock = threading.Lock()

    def client():
        c = psycopg.connect()
        barrier.wait()
        status = begin(c, "crowd:1")[0]
        with lock:
            answers.append(status)
            if status == "started":
                holders.append(c)
            else:
                c.close()

    threads = [threading.Thread(target=client) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == ["in_progress"] * (n - 1) + ["started"]
    (holder,) = holders
    holder.execute("SELECT idem_finish('crowd:1', '42')")
    holder.commit()
    holder.close()
    assert begin(conn, "crowd:1")[:2] == ("completed", 42)


def test_waiters_get_the_holders_result_as_soon_as_it_commits(conn, fresh_keys):
    holder = psycopg.connect()
    assert begin(holder, "wait:1")[0] == "started"
    results = []

    def waiter():
        with psycopg.connect() as c:
            t0 = time.monotonic()
            results.append((begin(c, "wait:1", wait="30 seconds"), time.monotonic() - t0))

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    holder.execute("SELECT idem_finish('wait:1', '\"done\"')")
    holder.commit()
    for t in threads:
        t.join()
    assert [r[0][:2] for r in results] == [("completed", "done")] * 3
    # They waited for the commit, not for the 30 seconds.
    assert all(0.4 < elapsed < 10 for _, elapsed in results)


def test_the_demo_charges_every_order_exactly_once(conn, capsys):
    worker.prepare_schema(reset=True)
    assert worker.run(jobs=20, workers=6, seed=7) == 0
    payments = conn.execute("SELECT count(*), count(DISTINCT order_id) FROM shop.payments").fetchone()
    assert payments == (20, 20)
    # A second run over the same orders replays every one and charges nothing.
    assert worker.run(jobs=20, workers=6, seed=7) == 0
    assert conn.execute("SELECT count(*) FROM shop.payments").fetchone() == (20,)
    out = capsys.readouterr().out
    assert "every order charged exactly once" in out


def test_two_phase_commit_wakes_a_waiting_caller(conn, fresh_keys):
    """A caller waiting for a key held by a prepared transaction gets the
    stored result as soon as COMMIT PREPARED runs, not when its wait ends."""
    holder = psycopg.connect()
    holder.execute("SELECT status FROM idem_begin('2pc-wake')")
    holder.execute("SELECT idem_finish('2pc-wake', '\"prepared\"')")
    holder.execute("PREPARE TRANSACTION 'idem-2pc-wake'")
    holder.close()
    answers = []

    def waiter():
        with psycopg.connect(autocommit=True) as c:
            t0 = time.monotonic()
            row = c.execute("SELECT status, result FROM idem_begin('2pc-wake', wait => '20s')").fetchone()
            answers.append((row, time.monotonic() - t0))

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.5)
    conn.execute("COMMIT PREPARED 'idem-2pc-wake'")
    thread.join(30)
    (row, waited) = answers[0]
    assert row == ("completed", "prepared")
    assert 0.4 <= waited < 5
