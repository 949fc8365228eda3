"""Lease mode through a real driver: a worker killed after its claim
committed, a takeover from the recovery point, and fencing of the late
first worker."""
import os
import signal
import threading
import time

import psycopg
import pytest

import mailer


def begin(conn, key, **kw):
    args = ", ".join(["%s"] + [f"{k} => %s" for k in kw])
    return conn.execute(
        f"SELECT status, result, attempt, recovery_point, token FROM idem_begin({args})", [key, *kw.values()]
    ).fetchone()


def test_a_killed_worker_is_taken_over_and_fenced(conn, fresh_keys):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the first worker: claim, do half the job, die
        os.close(read_end)
        with psycopg.connect(autocommit=True) as c:
            status, _, attempt, _, token = begin(c, "email:welcome:7", lease="1 second")
            assert status == "started"
            # ... the email went out ...
            c.execute("SELECT idem_checkpoint('email:welcome:7', 'sent', token => %s)", [token])
            os.write(write_end, str(token).encode())
            os.close(write_end)
            os.kill(os.getpid(), signal.SIGKILL)
    os.close(write_end)
    first_token = int(os.read(read_end, 64))
    os.close(read_end)
    os.waitpid(pid, 0)

    # The claim survived the crash: the key is in progress until the lease ends.
    status, _, attempt, _, _ = begin(conn, "email:welcome:7", lease="1 minute")
    assert (status, attempt) == ("in_progress", 1)

    # A second worker waits for the lease to end and takes over.
    t0 = time.monotonic()
    status, _, attempt, recovery_point, token = begin(conn, "email:welcome:7", lease="1 minute", wait="10 seconds")
    assert time.monotonic() - t0 < 5
    assert (status, attempt, recovery_point) == ("started", 2, "sent")
    assert token > first_token
    # It resumes after 'sent': no second email. Then it finishes.
    conn.execute("SELECT idem_finish('email:welcome:7', '{\"message_id\": \"m-1\"}', token => %s)", [token])

    # The first worker comes back from the dead and tries to finish: refused.
    with pytest.raises(psycopg.errors.SerializationFailure, match="no longer current"):
        conn.execute("SELECT idem_finish('email:welcome:7', '{\"message_id\": \"m-0\"}', token => %s)", [first_token])
    status, result, attempt, _, _ = begin(conn, "email:welcome:7")
    assert (status, result, attempt) == ("completed", {"message_id": "m-1"}, 2)


def test_a_waiter_wakes_when_the_lease_holder_finishes(conn, fresh_keys):
    status, _, _, _, token = begin(conn, "pay:1", lease="1 minute")
    assert status == "started"
    answers = []

    def waiter():
        with psycopg.connect(autocommit=True) as c:
            t0 = time.monotonic()
            answers.append((begin(c, "pay:1", wait="20 seconds")[:2], time.monotonic() - t0))

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.3)
    conn.execute("SELECT idem_finish('pay:1', '\"captured\"', token => %s)", [token])
    t.join()
    (answer, elapsed), = answers
    assert answer == ("completed", "captured")
    assert 0.25 < elapsed < 5  # woke at the finish, not at the lease's or the wait's end


def test_the_mailer_sends_every_email_once(conn, capsys):
    assert mailer.run(emails=6, workers=4, seed=3) == 0
    out = capsys.readouterr().out
    assert "took over after the lease" in out
    assert "every email sent exactly once" in out
