"""The purge worker: expired keys deleted on a schedule by the server itself.

A server of its own, with the installed library in shared_preload_libraries
(the worker and the counters of idem_stats() exist only then), purging every
second in batches of 50 with no pause, so that a purge takes several
batches. Each test waits for what it expects within a bounded time and
leaves the server as it found it (settings reset, no expired key left in
the databases that are purged), so that the next one counts exactly.

The databases: idem_purge_a and idem_purge_b have the extension;
idem_purge_plain has none, but a table idempotency.keys of its own with
expired rows, which the worker must leave alone; idem_purge_tmpl has the
extension and expired keys but is a template, which the worker never visits
(CREATE DATABASE copies a template only while no one is connected to it).
template1 is left as initdb made it, and the databases created and dropped
below are copied from it while the worker runs.

Last, every query of the postgres_exporter file in docs/monitoring.md runs
on this server, and its log is checked for crashes.

Skipped where the installed extension has no purge worker (before 0.4.0).
"""
import re
import textwrap
import time
from pathlib import Path

import pytest
from psycopg.rows import dict_row

import preloaded

DIR = "/tmp/idempotency-purge-worker"
PORT = 5487
LAUNCHER = "idempotency purge launcher"
MONITORING = Path(__file__).resolve().parents[2] / "docs" / "monitoring.md"


@pytest.fixture(scope="module")
def server():
    srv = preloaded.start(DIR, PORT, "idempotency.purge_interval = 1\n"
                                     "idempotency.purge_batch_size = 50\n"
                                     "idempotency.purge_delay = 0\n")
    try:
        yield srv
    finally:
        srv.stop()
    # The shutdown too: a worker that crashed while the server stopped.
    assert srv.crashes() == []


# Database name -> whether it has the extension.
DATABASES = {"idem_purge_a": True, "idem_purge_b": True, "idem_purge_plain": False, "idem_purge_tmpl": True}
A, B = "idem_purge_a", "idem_purge_b"


@pytest.fixture(scope="module")
def databases(server):
    with server.connect() as conn:
        for name in DATABASES:
            # A template from the start: the worker never visits it.
            template = " IS_TEMPLATE true" if name == "idem_purge_tmpl" else ""
            conn.execute(f"CREATE DATABASE {name}{template}")
    for name, extension in DATABASES.items():
        with server.connect(name) as conn:
            if extension:
                preloaded.create_extension(conn)
                assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'idempotency'") \
                    .fetchone()[0] == server.version
            else:
                # A table named as the extension's, that is not the
                # extension's: the worker must not purge it.
                conn.execute("CREATE SCHEMA idempotency")
                conn.execute("CREATE TABLE idempotency.keys (key text PRIMARY KEY, expires_at timestamptz)")
    return list(DATABASES)


def finish_keys(conn, prefix, n, ttl):
    """n keys prefix1..prefixN finished in one transaction, kept for ttl."""
    conn.execute(f"""DO $$
        BEGIN
            FOR i IN 1..{n} LOOP
                PERFORM idem_begin('{prefix}' || i);
                PERFORM idem_finish('{prefix}' || i, '1', ttl => '{ttl}');
            END LOOP;
        END $$""")


def expire_keys(conn, prefix, n):
    """n keys that expire a millisecond after their transaction began."""
    finish_keys(conn, prefix, n, "1 millisecond")


def count(conn, prefix):
    return conn.execute("SELECT count(*) FROM idempotency.keys WHERE starts_with(key, %s)", (prefix,)).fetchone()[0]


def stats(conn):
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM idem_stats()").fetchone()


def launchers(conn):
    return conn.execute("SELECT pid, datname FROM pg_stat_activity WHERE backend_type = %s",
                        (LAUNCHER,)).fetchall()


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


def wait_purged(conns, prefix, timeout=20):
    """Waits until no key named prefix... is left in any of conns; returns
    how long that took."""
    start = time.monotonic()
    wait_for(lambda: all(count(c, prefix) == 0 for c in conns), timeout,
             f"the worker purged the keys {prefix}*")
    return time.monotonic() - start


def configure(conn, setting, value=None):
    """ALTER SYSTEM SET (or RESET, when value is None) and a reload."""
    if value is None:
        conn.execute(f"ALTER SYSTEM RESET {setting}")
    else:
        conn.execute(f"ALTER SYSTEM SET {setting} = '{value}'")
    conn.execute("SELECT pg_reload_conf()")


def test_launcher_runs_connected_to_no_database(server):
    with server.connect() as conn:
        found = wait_for(lambda: launchers(conn), 10, "the launcher is in pg_stat_activity")
        # One launcher, holding no database (DROP DATABASE is never kept
        # waiting by it).
        assert len(found) == 1 and found[0][1] is None


def test_expired_keys_purged_in_every_database_with_the_extension(server, databases):
    conns = {name: server.connect(name) for name in databases}
    try:
        a, b, plain, tmpl = (conns[name] for name in databases)
        purged_before = stats(a)["keys_purged"]
        for conn in (a, b):
            finish_keys(conn, "b-keep-", 20, "1 hour")
            # A lease held for an hour, and one whose lease has ended (its
            # holder crashed; the next idem_begin takes it over): neither
            # has expired.
            assert conn.execute("SELECT status FROM idem_begin('b-held', lease => '1 hour')").fetchone()[0] == "started"
            assert conn.execute("SELECT status FROM idem_begin('b-lapsed', lease => '1 millisecond')").fetchone()[0] \
                == "started"
        plain.execute("INSERT INTO idempotency.keys SELECT 'b-exp-' || i, now() - interval '1 day' "
                      "FROM generate_series(1, 300) i")
        expire_keys(tmpl, "b-exp-", 300)
        for conn in (a, b):
            expire_keys(conn, "b-exp-", 300)
        took = wait_purged([a, b], "b-exp-")
        # 600 keys purged, 50 a batch: every one counted, once.
        assert stats(a)["keys_purged"] - purged_before == 600
        # A few more rounds, in which nothing else may go.
        time.sleep(2.5)
        for conn in (a, b):
            assert count(conn, "b-keep-") == 20
            held = conn.execute("SELECT key, mode, token IS NOT NULL FROM idem_held WHERE starts_with(key, 'b-') "
                                "ORDER BY key").fetchall()
            assert held == [("b-held", "lease", True), ("b-lapsed", "lease", True)]
            # The lapsed lease is still there to be taken over.
            assert conn.execute("SELECT status, attempt FROM idem_begin('b-lapsed', lease => '1 minute')") \
                .fetchone() == ("started", 2)
        assert stats(a)["keys_purged"] - purged_before == 600
        assert plain.execute("SELECT count(*) FROM idempotency.keys").fetchone()[0] == 300
        assert count(tmpl, "b-exp-") == 300
        assert took < 20
    finally:
        for conn in conns.values():
            conn.close()


def test_purge_databases_limits_the_worker_to_the_databases_named(server, databases):
    with server.connect(A) as a, server.connect(B) as b:
        configure(a, "idempotency.purge_databases", A)
        try:
            # Once a round that began after the reload has visited A, no
            # round is left that started with the old setting: two waves of
            # keys in A, the second made after the first was purged.
            time.sleep(0.2)
            for wave in ("c-witness-1-", "c-witness-2-"):
                expire_keys(a, wave, 5)
                wait_purged([a], wave, 10)
            expire_keys(a, "c-exp-", 100)
            expire_keys(b, "c-exp-", 100)
            wait_purged([a], "c-exp-", 10)
            time.sleep(3.5)
            assert count(b, "c-exp-") == 100
        finally:
            configure(a, "idempotency.purge_databases")
        wait_purged([b], "c-exp-", 10)


def test_interval_zero_stops_the_worker_and_one_resumes_it(server, databases):
    with server.connect(A) as a:
        pid = launchers(a)[0][0]
        configure(a, "idempotency.purge_interval", 0)
        try:
            # Lets a round under way end.
            time.sleep(1.5)
            expire_keys(a, "d-exp-", 100)
            time.sleep(4)
            assert count(a, "d-exp-") == 100
            # Off is not gone: the launcher waits for the setting.
            assert launchers(a) == [(pid, None)]
        finally:
            configure(a, "idempotency.purge_interval")
        wait_purged([a], "d-exp-", 10)


def test_a_terminated_launcher_is_started_again(server, databases):
    with server.connect(A) as a:
        old = launchers(a)[0][0]
        assert a.execute("SELECT pg_terminate_backend(%s)", (old,)).fetchone()[0] is True
        # Its restart time is 10 s.
        found = wait_for(lambda: [pid for pid, _ in launchers(a) if pid != old], 20,
                         "the launcher was started again")
        assert len(found) == 1
        assert a.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (old,)).fetchone()[0] == 0
        expire_keys(a, "e-exp-", 100)
        wait_purged([a], "e-exp-", 10)


def test_after_a_restart_keys_that_expired_before_it_are_purged(server, databases):
    with server.connect(A) as a, server.connect(B) as b:
        # The worker off, so that these keys outlive the server.
        configure(a, "idempotency.purge_interval", 0)
        try:
            time.sleep(1.5)
            expire_keys(a, "f-exp-", 120)
            expire_keys(b, "f-exp-", 80)
            time.sleep(1.5)
            assert (count(a, "f-exp-"), count(b, "f-exp-")) == (120, 80)
            before = stats(a)["stats_reset"]
            stopped_at = a.execute("SELECT clock_timestamp()").fetchone()[0]
            old = launchers(a)[0][0]
        finally:
            # On again from the restart on (postgresql.conf says 1 second).
            a.execute("ALTER SYSTEM RESET idempotency.purge_interval")
    server.restart()
    with server.connect(A) as a, server.connect(B) as b:
        found = wait_for(lambda: launchers(a), 10, "the launcher runs after the restart")
        assert len(found) == 1 and found[0][0] != old
        wait_purged([a, b], "f-exp-", 20)
        after = stats(a)
        # New shared memory: counted from zero since the server started.
        assert after["stats_reset"] > before and after["stats_reset"] > stopped_at
        assert after["keys_purged"] == 200


def purge_workers_in(conn, dbname):
    return conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'idempotency purge' "
                        "AND datname = %s", (dbname,)).fetchall()


def test_drop_database_succeeds_while_the_worker_runs(server, databases):
    drop = "idem_purge_drop"

    def create(keys):
        # From template1, which the worker must not be connected to.
        admin.execute(f"CREATE DATABASE {drop}")
        with server.connect(drop) as conn:
            preloaded.create_extension(conn)
            expire_keys(conn, "g-exp-", keys)

    def timed_drop(statement):
        start = time.monotonic()
        admin.execute(statement)
        return time.monotonic() - start

    with server.connect() as admin:
        launcher = launchers(admin)[0][0]
        # Dropped at different points of the worker's second: before,
        # during or after its visit.
        for i in range(4):
            create(300)
            time.sleep(0.25 * i)
            # DROP DATABASE waits up to 5 s for other sessions to leave,
            # then fails; a visit is much shorter.
            assert timed_drop(f"DROP DATABASE {drop}") < 5
        # Dropped while a worker is surely in it: its visit made longer by
        # a pause of 100 ms between batches.
        configure(admin, "idempotency.purge_delay", "100ms")
        try:
            time.sleep(0.3)
            # 10 batches: a visit of a second.
            create(500)
            wait_for(lambda: purge_workers_in(admin, drop), 10, "a purge worker is connected to the database")
            # DROP DATABASE waits for the visit to end.
            assert timed_drop(f"DROP DATABASE {drop}") < 5
            # 80 batches, eight seconds of purging: more than DROP DATABASE
            # waits. A visit lasts 2 s at most (the backlog is taken up
            # again after a pause), so a plain DROP still succeeds.
            create(4000)
            wait_for(lambda: purge_workers_in(admin, drop), 10, "a purge worker is connected to the database")
            assert timed_drop(f"DROP DATABASE {drop}") < 5
            # 40 batches, four seconds: WITH (FORCE) ends the visit at once
            # (its batch under way rolls back).
            create(2000)
            wait_for(lambda: purge_workers_in(admin, drop), 10, "a purge worker is connected to the database")
            assert timed_drop(f"DROP DATABASE {drop} WITH (FORCE)") < 2
        finally:
            configure(admin, "idempotency.purge_delay")
        assert admin.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (drop,)).fetchone()[0] == 0
        # The launcher went on through it all.
        assert launchers(admin) == [(launcher, None)]
        # And the worker still purges.
        with server.connect(A) as a:
            expire_keys(a, "g-exp-", 100)
            wait_purged([a], "g-exp-", 10)


def exporter_queries():
    """The postgres_exporter queries file of docs/monitoring.md: its YAML
    block that reads idem_stats()."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", MONITORING.read_text(), re.S | re.M)
    blocks = [b for b in blocks if "idem_stats()" in b]
    assert len(blocks) == 1
    try:
        import yaml
    except ImportError:
        return parse_queries(blocks[0])
    return yaml.safe_load(blocks[0])


def parse_queries(text):
    """What PyYAML would make of the queries file, for the part of YAML it
    uses: top-level namespaces, each with options (master, cache_seconds),
    a literal block `query: |`, and `metrics:`, a list of one-key maps of
    a quoted usage and description."""
    namespaces = {}
    for name, body in re.findall(r"^(\w+):[ \t]*\n((?:(?:[ \t].*)?\n)*)", text, re.M):
        query = re.search(r"^  query: \|\n((?:(?:    .*)?\n)+)", body, re.M)
        assert query, f"{name}: no query: | block"
        spec = {"query": textwrap.dedent(query.group(1))}
        for option, value in re.findall(r"^  (master|cache_seconds): *(\S+) *$", body, re.M):
            spec[option] = value == "true" if option == "master" else int(value)
        spec["metrics"] = [
            {column: {"usage": usage, "description": description}}
            for column, usage, description in re.findall(
                r'^    - (\w+):\n {8}usage: "(\w+)"\n {8}description: "([^"\\]*)"\n', body, re.M)
        ]
        # Every metric was read, none skipped for a shape not foreseen.
        assert len(spec["metrics"]) == len(re.findall(r"^    - ", body, re.M)), name
        namespaces[name] = spec
    return namespaces


def test_monitoring_queries_return_the_columns_they_name(server, databases):
    queries = exporter_queries()
    assert {"idempotency", "idempotency_held", "idempotency_purge"} <= set(queries)
    # idem_stats() is cluster-wide: read once per server.
    assert queries["idempotency"].get("master") is True
    with server.connect() as admin:
        admin.execute("CREATE ROLE idem_exporter LOGIN IN ROLE pg_monitor")
    results = {}
    with server.connect(A) as a, server.connect(A) as holder:
        # A key held in each mode: a lease (and one whose lease ended), a
        # claim row of an open transaction (a released key claimed again),
        # and a key claimed by lock alone.
        a.execute("SELECT idem_begin('m-lease', lease => '1 hour')")
        a.execute("SELECT idem_begin('m-lapsed', lease => '1 millisecond')")
        with a.transaction():
            a.execute("SELECT idem_begin('m-retry')")
            a.execute("SELECT idem_fail('m-retry')")
        holder.execute("BEGIN")
        holder.execute("SELECT idem_begin('m-retry')")
        holder.execute("SELECT idem_begin('m-lock')")
        try:
            with server.connect(A, user="idem_exporter") as exporter:
                for name, spec in queries.items():
                    metrics = {column: m for item in spec["metrics"] for column, m in item.items()}
                    for column, m in metrics.items():
                        assert m["usage"] in ("COUNTER", "GAUGE", "LABEL") and m["description"], (name, column)
                    cur = exporter.execute(spec["query"])
                    columns = [c.name for c in cur.description]
                    assert columns == list(metrics), name
                    rows = cur.fetchall()
                    assert rows, name
                    for row in rows:
                        for column, value in zip(columns, row):
                            kind = str if metrics[column]["usage"] == "LABEL" else (int, float)
                            assert isinstance(value, kind), (name, column, value)
                    results[name] = [dict(zip(columns, row)) for row in rows]
        finally:
            holder.execute("ROLLBACK")
        stats_row = a.execute("SELECT wait_time / 1000, extract(epoch FROM stats_reset)::float8 FROM idem_stats()") \
            .fetchone()
    with server.connect() as admin:
        admin.execute("DROP ROLE idem_exporter")
    [counters] = results["idempotency"]
    assert counters["begin_started"] > 0 and counters["keys_purged"] > 0
    assert (counters["wait_seconds"], counters["stats_reset"]) == pytest.approx(stats_row)
    held = {row["mode"]: row for row in results["idempotency_held"]}
    assert set(held) == {"transaction", "lease", "lock"}
    assert all(row["datname"] == A and row["oldest_seconds"] >= 0 for row in held.values())
    assert (held["transaction"]["keys"], held["lock"]["keys"]) == (1, 1)
    assert held["lease"]["keys"] >= 2 and held["lease"]["lapsed_leases"] >= 1
    assert held["transaction"]["lapsed_leases"] == held["lock"]["lapsed_leases"] == 0
    assert results["idempotency_purge"] == [{"launchers": 1}]


def test_server_log_shows_no_crash(server):
    assert server.crashes() == []
