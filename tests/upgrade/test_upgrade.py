"""ALTER EXTENSION idempotency UPDATE from an earlier release.

scripts/test installs every earlier release (built from its git tag) beside
this version, starts a cluster, and runs this file once for each, passing
the two versions in IDEM_PREVIOUS and IDEM_CURRENT. The test creates the previous version, fills it with keys
in every state under two roles, keeps a session open that has used the old
library, updates, and then checks that every key answers as it should, that
the old session goes on working, and that the extension's objects are those
of a fresh install of the current version.
"""
import os
import subprocess
import time

import psycopg
import psycopg.sql
import pytest
from psycopg.types.json import Jsonb

PREVIOUS = os.environ.get("IDEM_PREVIOUS", "")
CURRENT = os.environ.get("IDEM_CURRENT", "")
UPGRADED = "idem_upgraded"
FRESH = "idem_fresh"
GRANTED = "idem_granted"
# 0.1.0 recorded a role only for leases (holder); from 0.2.0 every key has
# its owner.
OWNERS_FOR_ALL = PREVIOUS != "0.1.0"


def connect(dbname, **kw):
    return psycopg.connect(dbname=dbname, autocommit=True, **kw)


def begin(conn, key, **kw):
    args = "".join(f", {k} => %({k})s" for k in kw)
    return conn.execute(
        f"SELECT status, result, attempt, recovery_point, token FROM idem_begin(%(key)s{args})",
        {"key": key, **kw},
    ).fetchone()


def sqlstate(conn, sql, params=None):
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        return e.sqlstate
    return None


def key_rows(dbname):
    """Every stored key, by (scope, key), with the columns both versions have
    (the previous release's `holder`, a role's OID, is this one's `owner`,
    the role's name)."""
    with connect(dbname) as conn:
        return rows_of(conn)


def rows_of(conn):
    cols = [
        r[0]
        for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'idempotency.keys'::regclass "
            "AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
        )
    ]
    select = ["pg_get_userbyid(holder)" if c == "holder" else c for c in cols]
    rows = conn.execute(
        f"SELECT {', '.join(select)} FROM idempotency.keys ORDER BY scope, key"
    ).fetchall()
    renamed = ["owner" if c == "holder" else c for c in cols]
    return {(r["scope"], r["key"]): r for r in (dict(zip(renamed, row)) for row in rows)}


def fill(conn):
    """Keys in every state, claimed by the role idem_up_app."""
    conn.execute("SET ROLE idem_up_app")
    conn.execute("BEGIN")
    begin(conn, "completed", request=Jsonb({"card": "4242", "amount": 10}))
    conn.execute("SELECT idem_finish('completed', '{\"charge\": \"ch_1\"}')")
    begin(conn, "failed")
    conn.execute("SELECT idem_fail('failed', '{\"code\": \"declined\"}', retryable => false)")
    begin(conn, "released")
    conn.execute("SELECT idem_fail('released', '\"timeout\"')")
    begin(conn, "expired")
    conn.execute("SELECT idem_finish('expired', '1', ttl => '1 millisecond')")
    conn.execute("COMMIT")
    held = begin(conn, "leased", request=Jsonb({"to": "a@example.com"}), lease="1 hour")
    conn.execute("SELECT idem_checkpoint('leased', 'step-1', token => %s)", (held[4],))
    lapsed = begin(conn, "lapsed", lease="10 milliseconds")
    conn.execute("SELECT idem_checkpoint('lapsed', 'step-2', token => %s)", (lapsed[4],))
    conn.execute("BEGIN")
    begin(conn, "scoped", scope="tenant:9")
    conn.execute("SELECT idem_finish('scoped', '\"t9\"', scope => 'tenant:9')")
    conn.execute("COMMIT")
    conn.execute("SELECT idem_once('event-1'), idem_once('event-2', 'hooks')")
    conn.execute("RESET ROLE")
    time.sleep(0.05)  # the lapsed lease and the expired key run out
    return {"leased": held[4], "lapsed": lapsed[4]}


@pytest.fixture(scope="module")
def upgrade():
    assert PREVIOUS and CURRENT and PREVIOUS != CURRENT, "scripts/test sets both versions"
    with connect("postgres") as admin:
        # (GRANTED, from an earlier run, holds privileges of the roles.)
        admin.execute(f"DROP DATABASE IF EXISTS {GRANTED}")
        for db in (UPGRADED, FRESH):
            admin.execute(f"DROP DATABASE IF EXISTS {db}")
            admin.execute(f"CREATE DATABASE {db}")
        for role in ("idem_up_app", "idem_up_other"):
            admin.execute(f"DROP ROLE IF EXISTS {role}")
            admin.execute(f"CREATE ROLE {role}")
    with connect(FRESH) as fresh:
        fresh.execute("CREATE EXTENSION idempotency SCHEMA public")
    db = connect(UPGRADED)
    db.execute(
        psycopg.sql.SQL("CREATE EXTENSION idempotency VERSION {} SCHEMA public").format(
            psycopg.sql.Literal(PREVIOUS)
        )
    )
    tokens = fill(db)
    # A session that has loaded the previous release's library, and stays.
    old = connect(UPGRADED)
    old.execute("BEGIN")
    assert old.execute("SELECT status FROM idem_begin('old-session')").fetchone()[0] == "started"
    old.execute("SELECT idem_finish('old-session', '1')")
    old.execute("COMMIT")
    assert old.execute("SELECT idem_once('old-session-once')").fetchone()[0] is True
    before = key_rows(UPGRADED)
    next_token = db.execute("SELECT last_value FROM idempotency.tokens").fetchone()[0]
    db.execute("ALTER EXTENSION idempotency UPDATE")
    yield {"db": db, "old": old, "before": before, "tokens": tokens, "next_token": next_token}
    old.close()
    db.close()


def test_the_extension_is_at_the_current_version(upgrade):
    version = upgrade["db"].execute(
        "SELECT extversion FROM pg_extension WHERE extname = 'idempotency'"
    ).fetchone()[0]
    assert version == CURRENT


def test_every_key_row_is_kept(upgrade):
    after = key_rows(UPGRADED)
    before = upgrade["before"]
    assert set(after) == set(before)
    assert len(after) >= 6
    for k, row in before.items():
        # The columns the previous release had are unchanged.
        assert {c: after[k][c] for c in row} == row, k
    assert after[("", "leased")]["owner"] == "idem_up_app"
    if OWNERS_FOR_ALL:
        assert after[("", "completed")]["owner"] == "idem_up_app"
    else:
        # Leases were 0.1.0's only keys with a role: they keep it.
        assert after[("", "completed")]["owner"] is None
    # Rows from before responses were stored have none.
    for row in after.values():
        assert (row["response_status"], row["response_headers"], row["response_body"]) == (None, None, None)


def test_keys_answer_after_the_update(upgrade):
    db, tokens = upgrade["db"], upgrade["tokens"]
    db.execute("SET ROLE idem_up_app")
    try:
        status, result, attempt, _, _ = begin(
            db, "completed", request=Jsonb({"card": "4242", "amount": 10})
        )
        assert (status, result, attempt) == ("completed", {"charge": "ch_1"}, 1)
        assert begin(db, "completed", request=Jsonb({"card": "4242", "amount": 99}))[0] == "mismatch"
        assert begin(db, "failed")[:2] == ("failed", {"code": "declined"})
        assert db.execute("SELECT count(*) FROM idem_get('expired')").fetchone()[0] == 0
        assert db.execute("SELECT idem_once('event-1'), idem_once('event-2', 'hooks')").fetchone() == (
            False,
            False,
        )
        # The lease taken under the previous release is still its holder's,
        # token and all: in progress for others, finished with its token.
        assert begin(db, "leased")[0] == "in_progress"
        db.execute("SET ROLE idem_up_other")
        assert sqlstate(db, "SELECT idem_finish('leased', '\"forged\"', token => %s)", (tokens["leased"],)) == "42501"
        assert sqlstate(db, "SELECT * FROM idem_begin('leased')") == "42501"
        db.execute("SET ROLE idem_up_app")
        # Its holder stores a response with it, which is replayed.
        db.execute(
            "SELECT idem_finish('leased', '\"sent\"', token => %s, response_status => 202, "
            "response_headers => '{\"content-type\": \"text/plain\"}', response_body => '\\x73656e7400')",
            (tokens["leased"],),
        )
        assert begin(db, "leased")[:2] == ("completed", "sent")
        assert db.execute(
            "SELECT response_status, response_headers, response_body FROM idem_begin('leased')"
        ).fetchone() == (202, {"content-type": "text/plain"}, b"sent\x00")
        # The lapsed lease is taken over from its recovery point, with a
        # token larger than any the previous release gave.
        status, _, attempt, recovery_point, token = begin(db, "lapsed", lease="1 minute")
        assert (status, attempt, recovery_point) == ("started", 2, "step-2")
        assert token > upgrade["next_token"]
        db.execute("SELECT idem_finish('lapsed', '\"done\"', token => %s)", (token,))
        # The released key is retried, and now belongs to the role retrying it.
        db.execute("BEGIN")
        status, _, attempt, _, _ = begin(db, "released")
        assert (status, attempt) == ("started", 2)
        db.execute("SELECT idem_finish('released', '\"second try\"')")
        db.execute("COMMIT")
        db.execute("SET ROLE idem_up_other")
        assert sqlstate(db, "SELECT * FROM idem_begin('released')") == "42501"
        if OWNERS_FOR_ALL:
            assert sqlstate(db, "SELECT * FROM idem_begin('completed')") == "42501"
        else:
            # Keys claimed in transaction mode under 0.1.0 have no owner:
            # open to every role, as they were.
            assert begin(db, "completed", request=Jsonb({"card": "4242", "amount": 10}))[0] == "completed"
        # New keys work, and belong to their role.
        db.execute("BEGIN")
        assert begin(db, "new")[0] == "started"
        db.execute("SELECT idem_finish('new', '\"n\"')")
        db.execute("COMMIT")
        db.execute("SET ROLE idem_up_app")
        assert db.execute("SELECT count(*) FROM idem_get('new')").fetchone()[0] == 0
    finally:
        db.execute("RESET ROLE")


def test_a_session_that_used_the_previous_library_goes_on(upgrade):
    old = upgrade["old"]
    # Its key, begun with the previous library, replays through the new one.
    assert old.execute("SELECT status, result FROM idem_begin('old-session')").fetchone() == ("completed", 1)
    old.execute("BEGIN")
    assert old.execute("SELECT status FROM idem_begin('old-session:2')").fetchone()[0] == "started"
    old.execute("SELECT idem_finish('old-session:2', '2')")
    old.execute("COMMIT")
    assert old.execute("SELECT result FROM idem_get('old-session:2')").fetchone()[0] == 2
    assert old.execute("SELECT idem_once('old-session-once')").fetchone()[0] is False
    # Its settings, defined by the previous library, still apply.
    old.execute("SET idempotency.max_key_length = 5")
    assert sqlstate(old, "SELECT idem_begin('sixsix')") == "22023"
    old.execute("RESET idempotency.max_key_length")
    assert old.execute("SELECT DISTINCT probin FROM pg_proc WHERE probin LIKE '%idempotency%'").fetchall() == [
        (f"$libdir/idempotency-{CURRENT}",)
    ]


def describe(dbname):
    """The extension's objects as text, without OIDs: what each member is and
    how it is defined, its privileges, initial privileges and comment."""
    conn = connect(dbname)
    members = """
        SELECT d.classid, d.objid FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
         WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e' AND e.extname = 'idempotency'"""
    out = []
    out += conn.execute(
        f"""SELECT pg_describe_object(m.classid, m.objid, 0),
                   coalesce(obj_description(m.objid, m.classid::regclass::text), ''),
                   coalesce(array_to_string(i.initprivs, ','), '')
              FROM ({members}) m
              LEFT JOIN pg_init_privs i ON i.classoid = m.classid AND i.objoid = m.objid AND i.objsubid = 0"""
    ).fetchall()
    out += conn.execute(
        f"""SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid),
                   coalesce(array_to_string(p.proacl, ','), ''), p.proowner::regrole::text
              FROM ({members}) m JOIN pg_proc p ON m.classid = 'pg_proc'::regclass AND p.oid = m.objid"""
    ).fetchall()
    out += conn.execute(
        f"""SELECT c.oid::regclass::text, c.relkind, coalesce(array_to_string(c.reloptions, ','), ''),
                   coalesce(array_to_string(c.relacl, ','), ''), c.relowner::regrole::text
              FROM ({members}) m JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid"""
    ).fetchall()
    # Columns in storage order (a dropped column leaves a gap in attnum,
    # not in the order).
    out += conn.execute(
        f"""SELECT a.attrelid::regclass::text,
                   row_number() OVER (PARTITION BY a.attrelid ORDER BY a.attnum), a.attname, format_type(a.atttypid, a.atttypmod),
                   a.attnotnull, coalesce(co.collname, ''), coalesce(pg_get_expr(ad.adbin, ad.adrelid), '')
              FROM ({members}) m
              JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
                   OR m.classid = 'pg_type'::regclass AND c.reltype = m.objid
              JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
              LEFT JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> 100
              LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum"""
    ).fetchall()
    out += conn.execute(
        f"""SELECT x.conrelid::regclass::text, x.conname, pg_get_constraintdef(x.oid)
              FROM ({members}) m JOIN pg_constraint x ON m.classid = 'pg_class'::regclass AND x.conrelid = m.objid"""
    ).fetchall()
    out += conn.execute(
        f"""SELECT i.indrelid::regclass::text, pg_get_indexdef(i.indexrelid)
              FROM ({members}) m JOIN pg_index i ON m.classid = 'pg_class'::regclass AND i.indrelid = m.objid"""
    ).fetchall()
    out += conn.execute(
        f"""SELECT s.seqrelid::regclass::text, s.seqtypid::regtype::text, s.seqstart, s.seqincrement,
                   s.seqmax, s.seqmin, s.seqcache, s.seqcycle
              FROM ({members}) m JOIN pg_sequence s ON m.classid = 'pg_class'::regclass AND s.seqrelid = m.objid"""
    ).fetchall()
    out += conn.execute(
        f"""SELECT n.nspname, coalesce(array_to_string(n.nspacl, ','), ''), n.nspowner::regrole::text
              FROM ({members}) m JOIN pg_namespace n ON m.classid = 'pg_namespace'::regclass AND n.oid = m.objid"""
    ).fetchall()
    out += conn.execute(
        """SELECT extname, extnamespace::regnamespace::text, extrelocatable, extconfig::regclass[]::text,
                  array_to_string(extcondition, ',')
             FROM pg_extension WHERE extname = 'idempotency'"""
    ).fetchall()
    conn.close()
    return sorted(tuple(str(v) for v in row) for row in out)


def test_objects_match_a_fresh_install(upgrade):
    upgraded, fresh = describe(UPGRADED), describe(FRESH)
    assert len(fresh) > 40
    missing = [r for r in fresh if r not in upgraded]
    extra = [r for r in upgraded if r not in fresh]
    assert (missing, extra) == ([], [])


def test_privileges_given_on_changed_functions_are_kept():
    """Functions whose parameters change are dropped and created again by
    the update: what a DBA granted or revoked on them must hold after it,
    and be in a dump; default privileges of the role running the update
    must not change them; their owner stays."""
    with connect("postgres") as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {GRANTED}")
        admin.execute(f"CREATE DATABASE {GRANTED}")
        admin.execute("DROP ROLE IF EXISTS idem_up_admin")
        admin.execute("CREATE ROLE idem_up_admin SUPERUSER")
    with connect(GRANTED) as db:
        db.execute(
            psycopg.sql.SQL("CREATE EXTENSION idempotency VERSION {} SCHEMA public").format(
                psycopg.sql.Literal(PREVIOUS)
            )
        )
        db.execute("REVOKE EXECUTE ON FUNCTION idem_finish FROM PUBLIC")
        db.execute("GRANT EXECUTE ON FUNCTION idem_finish TO idem_up_app WITH GRANT OPTION")
        db.execute("REVOKE EXECUTE ON FUNCTION idem_upsert FROM PUBLIC")
        # Another superuser runs the update, with default privileges that
        # would take EXECUTE from PUBLIC on every function it creates.
        db.execute("ALTER DEFAULT PRIVILEGES FOR ROLE idem_up_admin REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC")
        db.execute("SET ROLE idem_up_admin")
        db.execute("ALTER EXTENSION idempotency UPDATE")
        db.execute("RESET ROLE")
        rights = db.execute(
            """SELECT r, f, has_function_privilege(r, f, 'EXECUTE'),
                      has_function_privilege(r, f, 'EXECUTE WITH GRANT OPTION')
                 FROM unnest(ARRAY['idem_up_app', 'idem_up_other']) r,
                      unnest(ARRAY['idem_finish', 'idem_upsert', 'idem_fail', 'idem_get']) n,
                      LATERAL (SELECT p.oid::regprocedure::text AS f FROM pg_proc p
                                WHERE p.proname = n AND p.pronamespace = 'public'::regnamespace) x
                ORDER BY r, f"""
        ).fetchall()
        by = {(r, f.split("(")[0]): (ex, grant) for r, f, ex, grant in rights}
        assert by == {
            ("idem_up_app", "idem_finish"): (True, True),
            ("idem_up_app", "idem_upsert"): (False, False),
            ("idem_up_app", "idem_fail"): (True, False),
            ("idem_up_app", "idem_get"): (True, False),
            ("idem_up_other", "idem_finish"): (False, False),
            ("idem_up_other", "idem_upsert"): (False, False),
            ("idem_up_other", "idem_fail"): (True, False),
            ("idem_up_other", "idem_get"): (True, False),
        }
        # They are the new functions, owned as before.
        assert db.execute(
            "SELECT pg_get_function_arguments('idem_finish'::regproc)"
        ).fetchone()[0].endswith("response_body bytea DEFAULT NULL::bytea")
        owners = db.execute(
            """SELECT DISTINCT proowner::regrole::text FROM pg_proc
                WHERE proname IN ('idem_finish', 'idem_fail', 'idem_get', 'idem_upsert', 'idem_insert_once')"""
        ).fetchall()
        assert owners == [("postgres",)]
        # A dump carries the DBA's privileges: they are not recorded as the
        # functions' initial ones.
        initial = db.execute(
            """SELECT p.proname FROM pg_init_privs i JOIN pg_proc p ON p.oid = i.objoid
                WHERE i.classoid = 'pg_proc'::regclass
                  AND p.proname IN ('idem_finish', 'idem_fail', 'idem_get', 'idem_upsert', 'idem_insert_once')"""
        ).fetchall()
        assert initial == []
    dump = subprocess.run(
        [os.path.join(os.environ["IDEM_PG_BIN"], "pg_dump"), "--schema-only", "-d", GRANTED],
        check=True, capture_output=True, text=True,
    ).stdout
    assert "REVOKE ALL ON FUNCTION public.idem_finish(" in dump
    assert "GRANT ALL ON FUNCTION public.idem_finish(" in dump and "TO idem_up_app WITH GRANT OPTION;" in dump
    assert "REVOKE ALL ON FUNCTION public.idem_upsert(" in dump
    assert "ON FUNCTION public.idem_fail(" not in dump
