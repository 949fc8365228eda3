"""The churn benchmark (bench/churn.py) in small form: 20 000 keys written
through the job's path, expired and purged in 5 cycles, the table after the
last cycle at most 1.5 x its size after the first, and every expired key
purged. The background worker purges when the server preloads the
extension; otherwise idem_purge does, in a loop (the client tier's server
does not preload it). About 40 s.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[2]


def preloaded(conn):
    try:
        conn.execute("SELECT keys_purged FROM idem_stats()")
        return True
    except psycopg.Error:
        return False


def test_churn_keeps_the_table_small_and_purges_every_expired_key(conn, fresh_keys, tmp_path):
    purge = "worker" if preloaded(conn) else "manual"
    env = dict(os.environ)
    # pgbench of the server under test, as scripts/test names its binaries.
    pg_bin = os.environ.get("IDEM_PG_BIN")
    if pg_bin and os.path.exists(os.path.join(pg_bin, "pgbench")):
        env["PATH"] = pg_bin + os.pathsep + env["PATH"]
    auto_conf = ("SELECT name, setting FROM pg_file_settings WHERE sourcefile LIKE '%/postgresql.auto.conf' "
                 "ORDER BY seqno")
    before = conn.execute(auto_conf).fetchall()
    out = tmp_path / "churn.json"
    # A generation of 4 000 keys every 6 s, each living 9 s; autovacuum
    # wakes every second, so it takes each cycle's purged rows back before
    # the next generation is written.
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "churn.py"), "--keys", "20000", "--cycles", "5", "--ttl", "9",
         "--naptime", "1", "--purge", purge, "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.exists(), p.stdout + p.stderr
    result = json.loads(out.read_text())
    report = p.stdout + p.stderr
    assert [r["purged"] for r in result["rows"]] == [4000] * 5, report
    assert [r["expired_left"] for r in result["rows"]] == [0] * 5, report
    assert result["unpurged"] == 0, report
    assert result["ratio"] <= 1.5, report
    assert p.returncode == 0, report
    # The settings the run changed (ALTER SYSTEM) are back as they were.
    assert conn.execute(auto_conf).fetchall() == before
