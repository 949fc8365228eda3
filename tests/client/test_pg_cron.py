"""Scheduled clean-up with pg_cron, as the README's Retention section shows it.

A server of its own (pg_cron must be preloaded), on PostgreSQL 15, where
Debian packages pg_cron (postgresql-15-cron, which the set-up installs);
skipped on a server without it. pg_cron 1.4 schedules by the minute, so the
test waits for the first run, up to two minutes and a half.
"""
import os
import shutil
import subprocess
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

PG_BIN = os.environ.get("IDEM_PG_BIN", "/usr/lib/postgresql/15/bin")
DIR = "/tmp/idempotency-pg-cron"
PORT = 5489


def pkglibdir():
    pg_config = os.path.join(PG_BIN, "pg_config")
    if not os.path.exists(pg_config):
        return None
    return subprocess.run([pg_config, "--pkglibdir"], check=True, capture_output=True, text=True).stdout.strip()


def as_postgres(*cmd):
    subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True)


@pytest.fixture(scope="module")
def server():
    lib = pkglibdir()
    if lib is None or not os.path.exists(os.path.join(lib, "pg_cron.so")):
        pytest.skip("pg_cron is not installed for this server (Debian packages it for PostgreSQL 15 only)")
    pg_ctl = os.path.join(PG_BIN, "pg_ctl")
    data = os.path.join(DIR, "data")
    if os.path.exists(os.path.join(data, "postmaster.pid")):
        subprocess.run(["runuser", "-u", "postgres", "--", pg_ctl, "-D", data, "-m", "immediate", "stop"])
    shutil.rmtree(DIR, ignore_errors=True)
    os.makedirs(DIR)
    shutil.chown(DIR, "postgres", "postgres")
    as_postgres(os.path.join(PG_BIN, "initdb"), "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                "--locale=C.UTF-8")
    with open(os.path.join(data, "postgresql.conf"), "a") as conf:
        conf.write(f"listen_addresses = ''\nport = {PORT}\nunix_socket_directories = '{DIR}'\nfsync = off\n"
                   "shared_preload_libraries = 'pg_cron'\ncron.database_name = 'postgres'\n"
                   "cron.use_background_workers = on\n")
    log = os.path.join(DIR, "server.log")
    as_postgres(pg_ctl, "-D", data, "-l", log, "-w", "start")
    try:
        yield {"host": DIR, "port": PORT, "user": "postgres", "dbname": "postgres"}
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", pg_ctl, "-D", data, "-m", "fast", "-w", "stop"],
                       capture_output=True)
    with open(log) as f:
        crashed = [line for line in f if "terminated by signal" in line or "PANIC:" in line]
    assert crashed == []


def test_pg_cron_purges_expired_keys_on_schedule(server):
    with psycopg.connect(autocommit=True, **server) as conn:
        conn.execute("CREATE EXTENSION idempotency")
        conn.execute("CREATE EXTENSION pg_cron")
        # 300 keys: 200 expired a minute ago, 100 kept for a day.
        for i in range(300):
            with conn.transaction():
                conn.execute("SELECT idem_begin(%s)", (f"job-{i}",))
                conn.execute("SELECT idem_finish(%s, %s::jsonb)", (f"job-{i}", str(i)))
        conn.execute(
            "UPDATE idempotency.keys SET expires_at = now() - interval '1 minute' "
            "WHERE key::text ~ '^job-' AND substr(key, 5)::int < 200"
        )
        # The README's schedule: every minute, at most 10 000 keys a run.
        job = conn.execute(
            "SELECT cron.schedule('idempotency-purge', '* * * * *', 'SELECT idem_purge(10000)')"
        ).fetchone()[0]
        scheduled = datetime.now(timezone.utc)
        deadline = time.monotonic() + 150
        run = None
        while time.monotonic() < deadline:
            run = conn.execute(
                "SELECT status, return_message, start_time FROM cron.job_run_details "
                "WHERE jobid = %s ORDER BY start_time LIMIT 1",
                (job,),
            ).fetchone()
            if run and run[0] in ("succeeded", "failed"):
                break
            time.sleep(1)
        assert run is not None, "pg_cron did not run the purge within 150 s"
        status, message, started = run
        assert (status, message) == ("succeeded", "SELECT 1")
        assert started >= scheduled - timedelta(seconds=1)
        left = conn.execute(
            "SELECT count(*) FILTER (WHERE expires_at < now()), count(*) FROM idempotency.keys"
        ).fetchone()
        assert left == (0, 100)
        # The kept keys still replay.
        assert conn.execute("SELECT status, result FROM idem_begin('job-250')").fetchone() == ("completed", 250)
        conn.execute("SELECT cron.unschedule(%s)", (job,))
