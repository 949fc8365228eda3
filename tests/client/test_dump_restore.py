"""pg_dump and pg_restore keep every key, in every state, row for row, with
the token sequence's position, and the restored database answers as the
original did."""
import os
import subprocess

import psycopg
from psycopg.types.json import Jsonb

PG_BIN = os.environ.get("IDEM_PG_BIN", "/usr/lib/postgresql/15/bin")


def run(*cmd):
    subprocess.run([os.path.join(PG_BIN, cmd[0]), *cmd[1:]], check=True,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# A response body that is no text: restored byte for byte.
RECEIPT = b"%PDF-1.4\n\x00\xff\xfe receipt \r\n"


def fill(conn):
    """Keys in every state a key can be in."""
    def begin(key, **kw):
        args = "".join(f", {k} => %({k})s" for k in kw)
        return conn.execute(f"SELECT status, token FROM idem_begin(%(key)s{args})", {"key": key, **kw}).fetchone()

    with conn.transaction():
        begin("completed", request=Jsonb({"amount": 1}))
        conn.execute("SELECT idem_checkpoint('completed', 'half-way')")
        conn.execute(
            "SELECT idem_finish('completed', '{\"charge\": 7}', ttl => '30 days', response_status => 201, "
            "response_headers => '{\"content-type\": \"application/pdf\"}', response_body => %s)",
            (RECEIPT,),
        )
    with conn.transaction():
        begin("failed", scope="tenant-1")
        conn.execute("SELECT idem_fail('failed', '{\"error\": \"card declined\"}', scope => 'tenant-1', retryable => false)")
    with conn.transaction():
        begin("released")
        conn.execute("SELECT idem_fail('released', '\"timeout\"', retryable => true)")
    _, token = begin("leased", lease="1 hour", request=Jsonb({"to": "a@example.com"}))
    conn.execute("SELECT idem_checkpoint('leased', 'sent', token => %s)", (token,))
    _, token = begin("leased-done", lease="1 hour")
    conn.execute("SELECT idem_finish('leased-done', '\"ok\"', token => %s)", (token,))
    with conn.transaction():
        begin("expired")
        conn.execute("SELECT idem_finish('expired', '1')")
    conn.execute("UPDATE idempotency.keys SET expires_at = now() - interval '1 minute' WHERE key = 'expired'")
    conn.execute("SELECT idem_once('webhook-1'), idem_once('webhook-2', scope => 'tenant-1')")


def snapshot(conn):
    keys = conn.execute("SELECT * FROM idempotency.keys ORDER BY scope, key").fetchall()
    once = conn.execute("SELECT * FROM idempotency.once ORDER BY scope, key").fetchall()
    seq = conn.execute("SELECT last_value, is_called FROM idempotency.tokens").fetchone()
    return keys, once, seq


def test_dump_and_restore_keep_every_key(tmp_path):
    with psycopg.connect(autocommit=True) as admin:
        for db in ("idem_dump_src", "idem_dump_dst"):
            admin.execute(f"DROP DATABASE IF EXISTS {db}")
        admin.execute("CREATE DATABASE idem_dump_src")
        admin.execute("CREATE DATABASE idem_dump_dst")
    with psycopg.connect(dbname="idem_dump_src", autocommit=True) as src:
        src.execute("CREATE EXTENSION idempotency")
        fill(src)
        before = snapshot(src)
    assert len(before[0]) == 6 and len(before[1]) == 2
    dump = tmp_path / "keys.dump"
    os.chmod(tmp_path, 0o777)
    run("pg_dump", "-Fc", "-d", "idem_dump_src", "-f", str(dump))
    run("pg_restore", "-d", "idem_dump_dst", "--exit-on-error", str(dump))
    with psycopg.connect(dbname="idem_dump_dst", autocommit=True) as dst:
        assert snapshot(dst) == before
        # The restored database answers as the original did.
        assert dst.execute("SELECT status, result FROM idem_begin('completed', request => '{\"amount\": 1}')").fetchone() \
            == ("completed", {"charge": 7})
        assert dst.execute(
            "SELECT response_status, response_headers, response_body FROM idem_begin('completed')"
        ).fetchone() == (201, {"content-type": "application/pdf"}, RECEIPT)
        assert dst.execute("SELECT status FROM idem_begin('completed', request => '{\"amount\": 2}')").fetchone() \
            == ("mismatch",)
        assert dst.execute("SELECT status, result FROM idem_begin('failed', scope => 'tenant-1')").fetchone() \
            == ("failed", {"error": "card declined"})
        assert dst.execute("SELECT status FROM idem_begin('leased')").fetchone() == ("in_progress",)
        assert dst.execute("SELECT idem_once('webhook-1')").fetchone() == (False,)
        # A new lease's token is larger than every token dumped.
        old_max = max(k for k in dst.execute("SELECT max(token) FROM idempotency.keys").fetchone())
        with dst.transaction():
            status, _ = dst.execute("SELECT status, attempt FROM idem_begin('released')").fetchone()
            assert status == "started"
            dst.execute("SELECT idem_finish('released', '\"done\"')")
        status, token = dst.execute("SELECT status, token FROM idem_begin('new-lease', lease => '1 minute')").fetchone()
        assert status == "started" and token > old_max
    with psycopg.connect(autocommit=True) as admin:
        admin.execute("DROP DATABASE idem_dump_src")
        admin.execute("DROP DATABASE idem_dump_dst")


def test_restore_keeps_keys_their_roles_by_name(tmp_path):
    """A key records the role that claimed it by name. The dump restores
    where that role does not exist (the key is then a superuser's alone),
    and a role created again under that name, with another OID as in
    another cluster, has its key again; other roles do not."""
    with psycopg.connect(autocommit=True) as admin:
        for db in ("idem_dump_roles", "idem_dump_roles_dst"):
            admin.execute(f"DROP DATABASE IF EXISTS {db}")
        admin.execute("DROP ROLE IF EXISTS idem_gone")
        admin.execute("DROP ROLE IF EXISTS idem_stranger")
        admin.execute("CREATE DATABASE idem_dump_roles")
        admin.execute("CREATE DATABASE idem_dump_roles_dst")
        admin.execute("CREATE ROLE idem_gone")
    with psycopg.connect(dbname="idem_dump_roles", autocommit=True) as src:
        src.execute("CREATE EXTENSION idempotency")
        gone_oid = src.execute("SELECT 'idem_gone'::regrole::oid").fetchone()[0]
        src.execute("SET ROLE idem_gone")
        _, token = src.execute("SELECT status, token FROM idem_begin('leased', lease => '1 hour')").fetchone()
        src.execute("SELECT idem_finish('leased', '\"sent\"', token => %s)", (token,))
        src.execute("RESET ROLE")
        before = snapshot(src)
    dump = tmp_path / "roles.dump"
    run("pg_dump", "-Fc", "-d", "idem_dump_roles", "-f", str(dump))
    with psycopg.connect(autocommit=True) as admin:
        admin.execute("DROP DATABASE idem_dump_roles")
        admin.execute("DROP ROLE idem_gone")
    run("pg_restore", "-d", "idem_dump_roles_dst", "--exit-on-error", str(dump))
    with psycopg.connect(dbname="idem_dump_roles_dst", autocommit=True) as dst:
        assert snapshot(dst) == before
        assert dst.execute("SELECT status, result FROM idem_begin('leased')").fetchone() == ("completed", "sent")
        dst.execute("CREATE ROLE idem_gone")
        dst.execute("CREATE ROLE idem_stranger")
        assert dst.execute("SELECT 'idem_gone'::regrole::oid").fetchone()[0] != gone_oid
        dst.execute("SET ROLE idem_gone")
        assert dst.execute("SELECT status, result FROM idem_begin('leased')").fetchone() == ("completed", "sent")
        dst.execute("SET ROLE idem_stranger")
        try:
            dst.execute("SELECT * FROM idem_begin('leased')")
            raise AssertionError("another role replayed the key")
        except psycopg.errors.InsufficientPrivilege:
            pass
        dst.execute("RESET ROLE")
    with psycopg.connect(autocommit=True) as admin:
        admin.execute("DROP DATABASE idem_dump_roles_dst")
        admin.execute("DROP ROLE idem_gone")
        admin.execute("DROP ROLE idem_stranger")
