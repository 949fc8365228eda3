"""The extension on a Citus cluster: keys distributed by scope and
co-located with the tenant table `orders` (distributed by `tenant`), the
key functions delegated to the node that holds the scope's shard.

Each test uses tenants and keys of its own; placements are looked up when
a test starts, since earlier tests move shards.
"""
import collections
import random
import threading
import time

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

import cluster as citus

reason = citus.citus_missing()
if reason:
    pytest.skip(reason, allow_module_level=True)

WORKERS = citus.WORKERS
NODES = tuple(citus.PORTS)
DELEGATED = ("idem_begin", "idem_finish", "idem_fail", "idem_checkpoint", "idem_once", "idem_get")


def begin(conn, key, scope, **kw):
    """idem_begin's row, as a dict."""
    named = "".join(f", {k} => %s" for k in kw)
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(f"SELECT * FROM idem_begin(%s, scope => %s{named})", [key, scope, *kw.values()]).fetchone()


def get(conn, key, scope):
    """idem_get's row, as a dict, or None."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM idem_get(%s, scope => %s)", [key, scope]).fetchone()


def finish(conn, key, scope, result, **kw):
    named = "".join(f", {k} => %s" for k in kw)
    conn.execute(f"SELECT idem_finish(%s, result => %s, scope => %s{named})", [key, Jsonb(result), scope, *kw.values()])


def order_result(tenant, order_id):
    return {"tenant": tenant, "order_id": order_id}


def other_worker(name):
    return next(w for w in WORKERS if w != name)


def shell_sizes(cluster, table):
    """{node: bytes} of the local heap of `table` on each node: the table
    Citus keeps beside the shards (on the coordinator, the distributed
    table itself), which must never hold a row."""
    sizes = {}
    for name in NODES:
        with cluster.connect(name) as c:
            sizes[name] = c.execute("SELECT pg_relation_size(%s)", [table]).fetchone()[0]
    return sizes


def rows_in_shard(cluster, table, tenant, column):
    """{node: rows of `tenant`} in the shard of `table` that holds it, read
    directly from the shard table on every node of the cluster that has
    one."""
    shardid = cluster.shard_of(table, tenant)
    found = {}
    for name in cluster.members():
        with cluster.connect(name) as c:
            shard = f"{table}_{shardid}"
            if c.execute("SELECT to_regclass(%s)", [shard]).fetchone()[0] is None:
                continue
            found[name] = c.execute(f"SELECT count(*) FROM {shard} WHERE {column} = %s", [tenant]).fetchone()[0]
    return found


def assert_keys_on_orders_node(cluster, tenant, count):
    """The `count` keys of `tenant` are in the key shard on the node of its
    orders' shard, on that node alone; returns the node."""
    node = cluster.node_of("orders", tenant)
    assert cluster.node_of("idempotency.keys", tenant) == node, tenant
    assert rows_in_shard(cluster, "idempotency.keys", tenant, "scope") == {node: count}, tenant
    return node


def assert_keys_beside_orders(cluster, expected):
    """For each tenant of `expected` ({tenant: number of jobs}): its keys'
    shard is on the node of its orders' shard, and that shard, on that node
    alone, holds its keys and its orders."""
    for tenant, count in expected.items():
        node = assert_keys_on_orders_node(cluster, tenant, count)
        assert cluster.shard_of("idempotency.keys", tenant) != cluster.shard_of("orders", tenant)
        assert rows_in_shard(cluster, "orders", tenant, "tenant") == {node: count}, tenant


class Deliveries:
    """A queue of deliveries shared by client threads; a delivery taken and
    put back (redelivered later) counts as in flight until then."""

    WAIT = object()

    def __init__(self, items):
        self.items = collections.deque(items)
        self.lock = threading.Lock()
        self.in_flight = 0

    def take(self):
        with self.lock:
            if self.items:
                self.in_flight += 1
                return self.items.popleft()
            return None if self.in_flight == 0 else self.WAIT

    def done(self, item, again):
        with self.lock:
            self.in_flight -= 1
            if again:
                self.items.append(item)


class Feed(Deliveries):
    """Deliveries added while the clients run: a client that finds none
    waits for more until the feed is closed."""

    def __init__(self):
        super().__init__([])
        self.closed = False

    def add(self, items):
        with self.lock:
            self.items.extend(items)

    def close(self):
        with self.lock:
            self.closed = True

    def take(self):
        with self.lock:
            if self.items:
                self.in_flight += 1
                return self.items.popleft()
            return None if self.closed and self.in_flight == 0 else self.WAIT


def run_clients(cluster, queue, handle, clients=6, seconds=60, on_error=None):
    """`clients` threads, each with its own connection to the coordinator,
    running handle(conn, item) for every item of `queue` until none is left;
    handle returns True to redeliver the item later. An exception ends the
    run unless on_error(exc) returns True (then the item is redelivered on a
    new connection). Returns the exceptions that ended threads."""
    deadline = time.monotonic() + seconds
    failures = []

    def client():
        conn = None
        try:
            while True:
                if time.monotonic() > deadline:
                    raise AssertionError(f"deliveries still pending after {seconds} s: {list(queue.items)[:5]}")
                if conn is None or conn.closed:
                    try:
                        conn = cluster.connect()
                    except psycopg.OperationalError as exc:
                        if on_error and on_error(exc):
                            time.sleep(0.1)
                            continue
                        raise
                item = queue.take()
                if item is None:
                    return
                if item is queue.WAIT:
                    time.sleep(0.005)
                    continue
                again = True
                try:
                    again = handle(conn, item)
                except Exception as exc:
                    if not (on_error and on_error(exc)):
                        raise
                    conn.close()
                    time.sleep(0.05)
                finally:
                    queue.done(item, again)
        except BaseException as exc:
            failures.append(exc)
        finally:
            if conn is not None:
                conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


class Jobs:
    """Jobs (an order each) for tenants, each delivered several times."""

    def __init__(self, prefix, tenants, count, rng):
        self.jobs = [(f"{prefix}:order:{i}", tenants[i % len(tenants)], i, 100 + i) for i in range(count)]
        self.rng = rng
        self.lock = threading.Lock()
        self.committed = collections.Counter()   # deliveries that started and committed, by key
        self.rolled_back = collections.Counter()  # deliveries that started and rolled back on purpose
        self.answers = collections.Counter()      # idem_begin answers, by status
        self.replays = []                          # (job, result) of every 'completed' answer

    def deliveries(self, low, high):
        items = [job for job in self.jobs for _ in range(self.rng.randint(low, high))]
        self.rng.shuffle(items)
        return items

    def deliver(self, conn, job, roll_back=False):
        """One delivery in one transaction: claim, insert the order, finish.
        Returns True when it must be delivered again (in progress
        elsewhere, or rolled back)."""
        key, tenant, order_id, amount = job
        outcome = None
        with conn.transaction():
            status, result = conn.execute(
                "SELECT status, result FROM idem_begin(%s, request => %s, scope => %s)",
                [key, Jsonb({"order_id": order_id, "amount": amount}), tenant]).fetchone()
            if status == "started":
                conn.execute("INSERT INTO orders VALUES (%s, %s, %s)", [tenant, order_id, amount])
                time.sleep(0.002)  # the work takes a moment: duplicates meet it in progress
                if roll_back:
                    outcome = "rolled back"
                    raise psycopg.Rollback
                finish(conn, key, tenant, order_result(tenant, order_id))
        with self.lock:
            self.answers[status] += 1
            if outcome == "rolled back":
                self.rolled_back[key] += 1
                return True
            if status == "started":
                self.committed[key] += 1
            elif status == "completed":
                self.replays.append((job, result))
        assert status in ("started", "completed", "in_progress"), (job, status)
        return status == "in_progress"

    def check(self, cluster, known_commits=True):
        """Every job has exactly one order and a completed key whose result
        names it, and every replay answered that result. With
        known_commits, every job was started by exactly one delivery that
        saw its COMMIT succeed (not so when a COMMIT can be cut off after
        it took effect: then at most one)."""
        tenants = sorted({job[1] for job in self.jobs})
        with cluster.connect() as c:
            rows = c.execute("SELECT tenant, order_id, amount FROM orders WHERE tenant = ANY(%s)",
                             [tenants]).fetchall()
            assert sorted(rows) == sorted((t, i, a) for _, t, i, a in self.jobs)
            for key, tenant, order_id, _ in self.jobs:
                row = get(c, key, tenant)
                assert row is not None, key
                assert (row["status"], row["result"], row["attempt"]) == \
                    ("completed", order_result(tenant, order_id), 1), key
        commits = {job[0]: self.committed[job[0]] for job in self.jobs}
        if known_commits:
            assert commits == {job[0]: 1 for job in self.jobs}
        else:
            assert max(commits.values()) == 1, commits
        for (key, tenant, order_id, _), result in self.replays:
            assert result == order_result(tenant, order_id), key


# -- idem_distribute ---------------------------------------------------------


def distribution(conn):
    """{table: (method, column, colocation id, shard ids)} of orders and the
    extension's tables in pg_dist_partition."""
    rows = conn.execute(
        "SELECT logicalrelid::text, partmethod, column_to_column_name(logicalrelid, partkey), colocationid,"
        "       (SELECT array_agg(shardid ORDER BY shardid) FROM pg_dist_shard s WHERE s.logicalrelid = p.logicalrelid)"
        "  FROM pg_dist_partition p"
        " WHERE logicalrelid IN ('orders'::regclass, 'idempotency.keys'::regclass, 'idempotency.once'::regclass)"
    ).fetchall()
    return {r[0]: r[1:] for r in rows}


def delegation(conn):
    """{function: (index of its argument scope, distribution argument index,
    colocation id, force_delegation)} of the delegated functions."""
    rows = conn.execute(
        "SELECT p.proname, array_position(p.proargnames, 'scope') - 1, d.distribution_argument_index,"
        "       d.colocationid, d.force_delegation"
        "  FROM pg_proc p LEFT JOIN pg_dist_object d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid"
        " WHERE p.proname = ANY(%s) AND p.pronamespace = 'public'::regnamespace", [list(DELEGATED)]).fetchall()
    return {r[0]: r[1:] for r in rows}


def test_idem_distribute_colocates_the_key_tables_with_the_tenant_table(cluster, orders):
    with cluster.connect() as c:
        dist = distribution(c)
        method, column, colocation, shards = dist["orders"]
        assert (method, column) == ("h", "tenant")
        for table in ("idempotency.keys", "idempotency.once"):
            assert table in dist, f"{table} is not distributed"
            assert dist[table][:3] == ("h", "scope", colocation), table
            assert len(dist[table][3]) == len(shards), table
        # Every function that acts on one key is delegated by its scope, to
        # the shards of orders, even inside a transaction block.
        functions = delegation(c)
        assert set(functions) == set(DELEGATED)
        for name, (scope_index, arg_index, colocationid, forced) in functions.items():
            assert (arg_index, colocationid, forced) == (scope_index, colocation, True), name
        # scope compares as the tenant column does (co-location needs it).
        collations = dict(c.execute(
            "SELECT attrelid::regclass::text, attcollation FROM pg_attribute"
            " WHERE (attrelid, attname) IN (('orders'::regclass, 'tenant'), ('idempotency.keys'::regclass, 'scope'),"
            "                               ('idempotency.once'::regclass, 'scope'))").fetchall())
        assert collations["idempotency.keys"] == collations["orders"]
        assert collations["idempotency.once"] == collations["orders"]
    # The workers' metadata says the same.
    for name in WORKERS:
        with cluster.connect(name) as c:
            assert distribution(c) == dist, name
            assert delegation(c) == functions, name


def test_idem_distribute_again_is_a_no_op(cluster, orders):
    tenant = cluster.tenants_on("w1", 1, "again-")[0]
    with cluster.connect() as c:
        with c.transaction():
            assert begin(c, "again:1", tenant)["status"] == "started"
            finish(c, "again:1", tenant, {"n": 1})
        before = distribution(c)
        functions = delegation(c)
        c.execute("SELECT idem_distribute('orders')")
        assert distribution(c) == before
        assert delegation(c) == functions
        row = begin(c, "again:1", tenant)
        assert (row["status"], row["result"]) == ("completed", {"n": 1})
    assert_keys_on_orders_node(cluster, tenant, 1)


def test_idem_distribute_refuses_tables_it_cannot_follow(cluster, orders):
    with cluster.connect() as c:
        before = distribution(c)
        functions = delegation(c)
        c.execute("CREATE TABLE idem_local_tenants (tenant text PRIMARY KEY)")
        c.execute("CREATE TABLE idem_reference_tenants (tenant text PRIMARY KEY)")
        c.execute("SELECT create_reference_table('idem_reference_tenants')")
        c.execute("CREATE TABLE idem_int_tenants (tenant int PRIMARY KEY)")
        c.execute("SELECT create_distributed_table('idem_int_tenants', 'tenant')")

        # Not distributed, or not hash-distributed: no shards to follow.
        for table in ("idem_local_tenants", "idem_reference_tenants"):
            with pytest.raises(psycopg.Error) as err:
                c.execute("SELECT idem_distribute(%s)", [table])
            assert table in str(err.value), (table, err.value.sqlstate, str(err.value))
        # Distributed by a column that is not text: a scope cannot be its value.
        with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
            c.execute("SELECT idem_distribute('idem_int_tenants')")
        assert "idem_int_tenants" in str(err.value)

        # A role that neither is a superuser nor owns the extension.
        c.execute("CREATE ROLE idem_tenant_app LOGIN")
        c.execute("GRANT ALL ON orders TO idem_tenant_app")
        with cluster.connect(user="idem_tenant_app") as app:
            with pytest.raises(psycopg.Error) as err:
                app.execute("SELECT idem_distribute('orders')")
            assert err.value.sqlstate == "42501", (err.value.sqlstate, str(err.value))

    # It runs on the coordinator only.
    for name in WORKERS:
        with cluster.connect(name) as w:
            with pytest.raises(psycopg.Error) as err:
                w.execute("SELECT idem_distribute('orders')")
            assert err.value.sqlstate is not None, err.value
    with cluster.connect() as c:
        # Nothing changed.
        assert distribution(c) == before
        assert delegation(c) == functions


# -- duplicate deliveries ------------------------------------------------------


def test_duplicate_deliveries_from_several_clients(cluster, orders):
    tenants = sorted(cluster.tenants_on("w1", 3, "dup-") + cluster.tenants_on("w2", 3, "dup-"))
    rng = random.Random(11)
    jobs = Jobs("dup", tenants, 48, rng)
    # The first delivery of every 7th job that starts rolls back after its
    # insert: nothing of it may remain, and a later delivery does the job.
    to_roll_back = {job[0] for job in jobs.jobs[3::7]}
    lock = threading.Lock()

    def handle(conn, job):
        with lock:
            roll_back = job[0] in to_roll_back
        again = jobs.deliver(conn, job, roll_back)
        if roll_back and jobs.rolled_back[job[0]]:
            with lock:
                to_roll_back.discard(job[0])
        return again

    failures = run_clients(cluster, Deliveries(jobs.deliveries(2, 4)), handle)
    assert not failures, failures
    assert not to_roll_back
    assert sum(jobs.rolled_back.values()) >= len(jobs.jobs[3::7])
    jobs.check(cluster)
    assert jobs.answers["completed"] > 0
    print("answers:", dict(jobs.answers), "rolled back:", sum(jobs.rolled_back.values()))

    # Every key lives in the shard beside its tenant's orders, on that
    # node only; none in any node's own copy of the tables.
    assert_keys_beside_orders(cluster, collections.Counter(job[1] for job in jobs.jobs))
    with cluster.connect() as c:
        assert c.execute("SELECT count(*) FROM idempotency.keys WHERE scope = ANY(%s)",
                         [tenants]).fetchone()[0] == len(jobs.jobs)
    assert shell_sizes(cluster, "idempotency.keys") == {name: 0 for name in NODES}


PLACE_ORDER = """
CREATE FUNCTION place_order(tenant text, id bigint, amount int) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    claim record;
BEGIN
    SELECT * INTO claim FROM idem_begin('order:' || id, jsonb_build_object('amount', amount), scope => tenant);
    IF claim.status <> 'started' THEN
        RETURN jsonb_build_object('status', claim.status, 'result', claim.result);
    END IF;
    INSERT INTO orders VALUES (tenant, id, amount);
    PERFORM idem_finish('order:' || id, jsonb_build_object('order', id), scope => tenant);
    RETURN jsonb_build_object('status', 'started');
END
$$;
"""


def test_a_job_as_one_delegated_function(cluster, orders):
    """docs/citus.md's fastest shape: the whole job in a function distributed
    with the tenant table. Delegated to the tenant's worker, outside a
    transaction block and (with force_delegation) inside one, it claims,
    writes and finishes there: one order, a completed key beside it, and a
    duplicate answered from the stored result; a call that rolls back
    leaves nothing."""
    tenants = [cluster.tenants_on("w1", 1, "fn-")[0], cluster.tenants_on("w2", 1, "fn-")[0]]
    with cluster.connect() as c:
        c.execute(PLACE_ORDER)
        c.execute("SELECT create_distributed_function('place_order(text, bigint, int)', 'tenant', "
                  "colocate_with => 'orders', force_delegation => true)")
        for i, tenant in enumerate(tenants):
            first = c.execute("SELECT place_order(%s, %s, 500)", [tenant, 900 + i]).fetchone()[0]
            assert first == {"status": "started"}, first
            c.execute("BEGIN")
            again = c.execute("SELECT place_order(%s, %s, 500)", [tenant, 900 + i]).fetchone()[0]
            c.execute("COMMIT")
            assert again == {"status": "completed", "result": {"order": 900 + i}}, again
            c.execute("BEGIN")
            assert c.execute("SELECT place_order(%s, %s, 7)", [tenant, 950 + i]).fetchone()[0] == {"status": "started"}
            c.execute("ROLLBACK")
            assert c.execute("SELECT count(*) FROM idem_get('order:' || %s, scope => %s)",
                             [950 + i, tenant]).fetchone()[0] == 0
            assert c.execute("SELECT count(*) FROM orders WHERE tenant = %s", [tenant]).fetchone()[0] == 1
    assert_keys_beside_orders(cluster, collections.Counter(tenants))


def test_an_application_role_without_rights_on_the_key_tables(cluster, orders):
    """An application role with rights on its own table only (none on the
    schema idempotency or its shards) claims, finishes and replays keys on
    the workers, as on one server: the delegated calls take Citus's shard
    lock and run their statements as the tables' owner. Another role sees
    none of its keys."""
    tenant = cluster.tenants_on("w2", 1, "app-")[0]
    with cluster.connect() as c:
        c.execute("CREATE ROLE idem_citus_app LOGIN")
        c.execute("CREATE ROLE idem_citus_other LOGIN")
        c.execute("GRANT SELECT, INSERT ON orders TO idem_citus_app")
    try:
        with cluster.connect(user="idem_citus_app") as app:
            app.execute("BEGIN")
            assert app.execute("SELECT status FROM idem_begin('charge:9', '{\"a\": 1}', scope => %s)",
                               [tenant]).fetchone()[0] == "started"
            app.execute("INSERT INTO orders VALUES (%s, 9, 100)", [tenant])
            app.execute("SELECT idem_finish('charge:9', '{\"order\": 9}', scope => %s)", [tenant])
            app.execute("COMMIT")
            row = app.execute("SELECT status, result FROM idem_begin('charge:9', '{\"a\": 1}', scope => %s)",
                              [tenant]).fetchone()
            assert row == ("completed", {"order": 9}), row
            assert app.execute("SELECT idem_once('evt:9', scope => %s)", [tenant]).fetchone()[0] is True
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("SELECT count(*) FROM idempotency.keys")
        with cluster.connect(user="idem_citus_other") as other:
            assert other.execute("SELECT count(*) FROM idem_get('charge:9', scope => %s)",
                                 [tenant]).fetchone()[0] == 0
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                other.execute("SELECT status FROM idem_begin('charge:9', '{\"a\": 1}', scope => %s)", [tenant])
    finally:
        with cluster.connect() as c:
            c.execute("DELETE FROM idempotency.keys WHERE scope = %s", [tenant])
            c.execute("DELETE FROM idempotency.once WHERE scope = %s", [tenant])
            c.execute("DELETE FROM orders WHERE tenant = %s", [tenant])
            c.execute("REVOKE ALL ON orders FROM idem_citus_app")
            c.execute("DROP ROLE idem_citus_app")
            c.execute("DROP ROLE idem_citus_other")


def test_a_waiting_delivery_wakes_when_the_holder_commits(cluster, orders):
    """A duplicate that waits (wait => ...) waits on the worker for the
    holder's transaction, and wakes at its COMMIT with its result."""
    tenant = cluster.tenants_on("w1", 1, "wait-")[0]
    answers = []

    def duplicate():
        with cluster.connect() as c:
            t0 = time.monotonic()
            with c.transaction():
                row = begin(c, "wait:order:1", tenant, wait="10 seconds")
            answers.append(((row["status"], row["result"]), time.monotonic() - t0))

    with cluster.connect() as holder:
        with holder.transaction():
            assert begin(holder, "wait:order:1", tenant)["status"] == "started"
            holder.execute("INSERT INTO orders VALUES (%s, 1, 1)", [tenant])
            t = threading.Thread(target=duplicate)
            t.start()
            time.sleep(0.5)
            finish(holder, "wait:order:1", tenant, order_result(tenant, 1))
        t.join()
    (answer, elapsed), = answers
    assert answer == ("completed", order_result(tenant, 1))
    assert 0.4 < elapsed < 5  # woke at the COMMIT, not at the wait's end
    with cluster.connect() as c:
        assert c.execute("SELECT count(*) FROM orders WHERE tenant = %s", [tenant]).fetchone() == (1,)


def test_a_call_not_delegated_is_refused_off_its_shards_node(cluster, orders):
    """A call Citus does not delegate (a form it does not push down) runs
    where it was sent: it is refused unless that node holds the scope's
    shard, and writes nowhere else."""
    on_w1 = cluster.tenants_on("w1", 1, "local-")[0]
    on_w2 = cluster.tenants_on("w2", 1, "local-")[0]
    # Forms Citus does not push down: a WHERE clause, two target columns.
    claim = "SELECT status, token FROM idem_begin(%s, scope => %s, lease => '1 minute') WHERE status IS NOT NULL"
    once = "SELECT idem_once(%s, scope => %s), 1"
    for node, tenant in (("coord", on_w1), ("coord", on_w2), ("w1", on_w2), ("w2", on_w1)):
        with cluster.connect(node) as c:
            for sql, key in ((claim, "nd:lease"), (once, "nd:once")):
                with pytest.raises(psycopg.Error) as err:
                    c.execute(sql, [key, tenant])
                # An error of the server, not a lost connection.
                assert err.value.sqlstate is not None, (node, tenant, err.value)
            # The connection goes on.
            assert c.execute("SELECT 1").fetchone() == (1,)
    with cluster.connect() as c:
        for tenant in (on_w1, on_w2):
            assert get(c, "nd:lease", tenant) is None
            assert c.execute("SELECT idem_once('nd:once', scope => %s)", [tenant]).fetchone() == (True,)
    assert shell_sizes(cluster, "idempotency.keys") == {name: 0 for name in NODES}
    assert shell_sizes(cluster, "idempotency.once") == {name: 0 for name in NODES}

    # On the node that holds the shard, the same call works, on the shard.
    with cluster.connect("w1") as c:
        status, token = c.execute(claim, ["nd:lease", on_w1]).fetchone()
        assert status == "started"
        assert c.execute(once, ["nd:once", on_w1]).fetchone() == (False, 1)
    # Writing or reading that key from a node without its shard, in a form
    # not delegated: refused, and the key is untouched.
    for node in ("coord", "w2"):
        with cluster.connect(node) as c:
            for sql in ("SELECT idem_finish(%s, result => '1', scope => %s, token => %s), 1",
                        "SELECT idem_checkpoint(%s, 'x', scope => %s, token => %s), 1",
                        "SELECT idem_fail(%s, scope => %s, token => %s), 1"):
                with pytest.raises(psycopg.Error) as err:
                    c.execute(sql, ["nd:lease", on_w1, token])
                assert err.value.sqlstate is not None, (node, sql, err.value)
            # A read gives no wrong answer ("no such key") either.
            with pytest.raises(psycopg.Error) as err:
                c.execute("SELECT status FROM idem_get(%s, scope => %s) WHERE status IS NOT NULL",
                          ["nd:lease", on_w1])
            assert err.value.sqlstate is not None, (node, err.value)
    with cluster.connect() as c:
        row = get(c, "nd:lease", on_w1)
        assert row is not None and (row["status"], row["recovery_point"]) == ("in_progress", None)
        finish(c, "nd:lease", on_w1, {"done": True}, token=token)
        row = begin(c, "nd:lease", on_w1)
        assert (row["status"], row["result"]) == ("completed", {"done": True})
    assert_keys_on_orders_node(cluster, on_w1, 1)
    assert shell_sizes(cluster, "idempotency.keys") == {name: 0 for name in NODES}


# -- shard moves ----------------------------------------------------------------


def test_replay_after_a_shard_move(cluster, orders):
    tenant = cluster.tenants_on("w2", 1, "move-")[0]
    src = cluster.node_of("orders", tenant)
    dst = other_worker(src)
    jobs = [(f"move:order:{i}", tenant, i, 10 * i) for i in range(6)]
    old = cluster.connect()  # a connection opened before the move, used after it
    with cluster.connect() as c:
        for key, _, order_id, amount in jobs:
            with c.transaction():
                row = begin(c, key, tenant, request=Jsonb({"order_id": order_id, "amount": amount}))
                assert row["status"] == "started"
                c.execute("INSERT INTO orders VALUES (%s, %s, %s)", [tenant, order_id, amount])
                finish(c, key, tenant, order_result(tenant, order_id))
        # A job that failed for good before the move.
        with c.transaction():
            assert begin(c, "move:refund", tenant)["status"] == "started"
            c.execute("SELECT idem_fail('move:refund', error => '{\"declined\": true}', scope => %s,"
                      " retryable => false)", [tenant])
    assert_keys_on_orders_node(cluster, tenant, len(jobs) + 1)

    shardid = cluster.shard_of("orders", tenant)
    assert cluster.move(shardid, dst) == src
    # The key shard moved with the orders shard.
    assert cluster.node_of("orders", tenant) == dst
    assert cluster.node_of("idempotency.keys", tenant) == dst
    assert_keys_on_orders_node(cluster, tenant, len(jobs) + 1)

    # Redelivered, on the old connection and a new one: every job replays.
    with cluster.connect() as new:
        for conn in (old, new):
            for key, _, order_id, amount in jobs:
                with conn.transaction():
                    row = begin(conn, key, tenant, request=Jsonb({"order_id": order_id, "amount": amount}))
                    assert (row["status"], row["result"], row["attempt"]) == \
                        ("completed", order_result(tenant, order_id), 1), key
                    # The delivery did not start, so it inserts nothing.
            row = begin(conn, "move:refund", tenant)
            assert (row["status"], row["result"]) == ("failed", {"declined": True})
        rows = new.execute("SELECT order_id FROM orders WHERE tenant = %s ORDER BY 1", [tenant]).fetchall()
        assert rows == [(i,) for _, _, i, _ in jobs]
        # A new job of the tenant after the move is claimed on the new node.
        with new.transaction():
            assert begin(new, "move:order:99", tenant)["status"] == "started"
            new.execute("INSERT INTO orders VALUES (%s, 99, 1)", [tenant])
            finish(new, "move:order:99", tenant, order_result(tenant, 99))
    old.close()
    assert_keys_on_orders_node(cluster, tenant, len(jobs) + 2)
    assert rows_in_shard(cluster, "orders", tenant, "tenant") == {dst: len(jobs) + 1}
    assert shell_sizes(cluster, "idempotency.keys") == {name: 0 for name in NODES}


def test_lease_takeover_and_fencing_across_shard_moves(cluster, orders):
    tenant = cluster.tenants_on("w2", 1, "lease-")[0]
    a, b = cluster.connect(), cluster.connect()
    try:
        # A claims with a 1-second lease (the claim commits by itself).
        first = begin(a, "lease:1", tenant, lease="1 second")
        claimed = time.monotonic()
        assert (first["status"], first["attempt"]) == ("started", 1)
        assert first["token"] is not None
        # B, before the lease ends: in progress, and for how long.
        row = begin(b, "lease:1", tenant, lease="1 minute")
        assert row["status"] == "in_progress"
        assert row["retry_after"] is not None
        # After it ends, B takes over with a larger token.
        time.sleep(max(0.0, claimed + 1.2 - time.monotonic()))
        second = begin(b, "lease:1", tenant, lease="1 minute")
        assert (second["status"], second["attempt"]) == ("started", 2)
        assert second["token"] > first["token"]
        # A comes back: its token is stale.
        with pytest.raises(psycopg.errors.SerializationFailure):
            finish(a, "lease:1", tenant, {"by": "A"}, token=first["token"])
        finish(b, "lease:1", tenant, {"by": "B"}, token=second["token"])
        row = get(a, "lease:1", tenant)
        assert (row["status"], row["result"], row["attempt"]) == ("completed", {"by": "B"}, 2)
        tokens = [first["token"], second["token"]]

        # A key held by a lease while its shard moves, from the node with
        # the higher group id to the lower and back: each takeover on the
        # new node gets a token larger than every earlier token of the key.
        for step in range(2):
            held = begin(a, "lease:2", tenant, lease="2.5 seconds")
            assert (held["status"], held["attempt"]) == ("started", 2 * step + 1)
            assert held["token"] > max(tokens)
            tokens.append(held["token"])
            # A did part of the work (the checkpoint renews the lease).
            a.execute("SELECT idem_checkpoint('lease:2', %s, scope => %s, token => %s)",
                      [f"charged:{step}", tenant, held["token"]])
            claimed = time.monotonic()
            src = cluster.node_of("orders", tenant)
            cluster.move(cluster.shard_of("orders", tenant), other_worker(src))
            assert cluster.node_of("idempotency.keys", tenant) == other_worker(src)
            # The claim moved with the shard: held until its lease ends.
            if time.monotonic() < claimed + 2.2:
                row = begin(b, "lease:2", tenant, lease="1 minute")
                assert (row["status"], row["attempt"]) == ("in_progress", 2 * step + 1), step
            time.sleep(max(0.0, claimed + 2.7 - time.monotonic()))
            taken = begin(b, "lease:2", tenant, lease="1 minute")
            assert (taken["status"], taken["attempt"]) == ("started", 2 * step + 2), step
            assert taken["recovery_point"] == f"charged:{step}"
            assert taken["token"] > max(tokens), (step, taken["token"], tokens)
            tokens.append(taken["token"])
            # A comes back on the new node: fenced.
            with pytest.raises(psycopg.errors.SerializationFailure):
                a.execute("SELECT idem_checkpoint('lease:2', 'late', scope => %s, token => %s)",
                          [tenant, held["token"]])
            with pytest.raises(psycopg.errors.SerializationFailure):
                finish(a, "lease:2", tenant, {"by": "A"}, token=held["token"])
            if step == 0:
                # Released for a retry: the next claim is attempt 3.
                b.execute("SELECT idem_fail('lease:2', error => '{\"retry\": true}', scope => %s, token => %s)",
                          [tenant, taken["token"]])
            else:
                finish(b, "lease:2", tenant, {"by": "B"}, token=taken["token"])
        row = get(a, "lease:2", tenant)
        assert (row["status"], row["result"], row["attempt"], row["recovery_point"]) == \
            ("completed", {"by": "B"}, 4, "charged:1")
    finally:
        a.close()
        b.close()
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), tokens


def test_a_move_waits_for_the_transactions_using_the_shard(cluster, orders):
    """A key claimed, and an idem_once record made, by a transaction still
    open on the shard's worker hold Citus's shard metadata lock there: the
    move of the shard group waits for that transaction, so what it commits
    is in what moves (neither lost with the old copy nor claimable again).
    The move blocks writes before it copies (block_writes): a move by
    logical replication would also wait for the open transaction, for its
    replication slot, however the key were locked."""
    tenant = cluster.tenants_on("w1", 1, "wait-move-")[0]
    shardid = cluster.shard_of("orders", tenant)
    src = cluster.node_of("orders", tenant)
    dst = other_worker(src)
    done = threading.Event()
    failures = []

    def move():
        try:
            s, d = cluster.nodes[src], cluster.nodes[dst]
            with cluster.connect() as c:
                c.execute("SELECT citus_move_shard_placement(%s, %s, %s, %s, %s, shard_transfer_mode => 'block_writes')",
                          [shardid, s.host, s.port, d.host, d.port])
                c.execute("CALL citus_cleanup_orphaned_resources()")
        except BaseException as exc:
            failures.append(exc)
        finally:
            done.set()

    with cluster.connect() as holder:
        holder.execute("BEGIN")
        assert holder.execute("SELECT status FROM idem_begin('charge:1', '{\"a\": 1}', scope => %s)",
                              [tenant]).fetchone()[0] == "started"
        assert holder.execute("SELECT idem_once('evt:1', scope => %s)", [tenant]).fetchone()[0] is True
        # Routed through the coordinator, where the move will hold the
        # shard's lock: before the move (after it, the two would wait for
        # each other across nodes, a deadlock Citus breaks by canceling one).
        holder.execute("INSERT INTO orders VALUES (%s, 1, 100)", [tenant])
        mover = threading.Thread(target=move)
        mover.start()
        # The move waits for the holder before it copies anything.
        assert not done.wait(4), "the move did not wait for the open transaction"
        holder.execute("SELECT idem_finish('charge:1', '{\"order\": 1}', scope => %s)", [tenant])
        holder.execute("COMMIT")
    mover.join(60)
    assert done.is_set() and not failures, failures
    assert cluster.node_of("idempotency.keys", tenant) == dst
    with cluster.connect() as c:
        row = c.execute("SELECT status, result FROM idem_begin('charge:1', '{\"a\": 1}', scope => %s)",
                        [tenant]).fetchone()
        assert row == ("completed", {"order": 1}), row
        assert c.execute("SELECT idem_once('evt:1', scope => %s)", [tenant]).fetchone()[0] is False
        assert c.execute("SELECT count(*) FROM orders WHERE tenant = %s", [tenant]).fetchone()[0] == 1


def test_shard_moves_under_load(cluster, orders):
    """Clients deliver the jobs of tenants of one shard group, each job two
    or three times, while the group moves to the other worker (and back):
    transactions under way finish on the old node and move with the shard;
    a call routed to the old node after the switch fails with 40001 and is
    retried on the new one. A job's transaction holds the shard's metadata
    lock on the worker (taken by its delegated call) and then waits for it
    on the coordinator (its INSERT, routed there), while the move holds it
    on the coordinator and waits on the worker: Citus's distributed
    deadlock detector cancels one of the two, the job's transaction (40P01,
    delivered again) or the move (run again, as the rebalancer would).
    Every job is done once, its key beside its order."""
    first = cluster.tenants_on("w1", 1, "race-")[0]
    shardid = cluster.shard_of("orders", first)
    tenants = cluster.tenants_in_shard(shardid, 4, "race-")
    src = cluster.node_of("orders", first)
    dst = other_worker(src)
    rng = random.Random(23)
    jobs = Jobs("race", tenants, 5000, rng)
    feed = Feed()
    lock = threading.Lock()
    ended = []                                 # time of every delivery that ended without an error
    serialization = collections.Counter()      # 40001s, by message
    deadlocks = collections.Counter()          # 40P01s of the clients, by message
    canceled_moves = []                        # moves canceled by a distributed deadlock
    reconnects = collections.Counter()         # connection-class errors, by message
    moves = []                                 # (from, to, start, end) of each move
    commits_at = []                            # jobs committed when each move had ended
    failures, mover_failures = [], []
    moved = threading.Event()

    def committed():
        with jobs.lock:
            return sum(jobs.committed.values())

    def handle(conn, job):
        again = jobs.deliver(conn, job)
        with lock:
            ended.append(time.monotonic())
        return again

    def on_error(exc):
        # 40001: the call reached the node the shard just left; a lost
        # connection (class 08, or none from the server): delivered again.
        # Any other error fails the test.
        sqlstate = getattr(exc, "sqlstate", None)
        message = f"{type(exc).__name__} {sqlstate}: {str(exc).splitlines()[0] if str(exc) else ''}"
        with lock:
            if sqlstate == "40001":
                serialization[message] += 1
                return True
            if sqlstate == "40P01":
                deadlocks[message] += 1
                return True
            if isinstance(exc, psycopg.OperationalError) and (sqlstate is None or sqlstate.startswith("08")):
                reconnects[message] += 1
                return True
        return False

    def mover():
        try:
            deadline = time.monotonic() + 30
            while committed() < 30:
                assert time.monotonic() < deadline, "no jobs done before the move"
                time.sleep(0.01)
            for target in (dst, src):
                start = time.monotonic()
                for attempt in range(10):
                    try:
                        came_from = cluster.move(shardid, target)
                        break
                    except psycopg.errors.DeadlockDetected as exc:
                        canceled_moves.append(str(exc).splitlines()[0])
                        assert attempt < 9, canceled_moves
                moves.append((came_from, target, start, time.monotonic()))
                commits_at.append(committed())
                if moves[-1][3] - start > 5:
                    break  # too slow to move it back within the tier's time
        except BaseException as exc:
            mover_failures.append(exc)
        finally:
            moved.set()

    clients = threading.Thread(
        target=lambda: failures.extend(run_clients(cluster, feed, handle, seconds=90, on_error=on_error)))
    moving = threading.Thread(target=mover)
    clients.start()
    moving.start()
    fed, fed_when_moved = 0, None
    try:
        # Two new jobs every 20 ms, each delivered two or three times,
        # shuffled, until 40 jobs more were fed after the last move.
        deadline = time.monotonic() + 60
        while fed_when_moved is None or fed - fed_when_moved < 40:
            assert time.monotonic() < deadline and fed + 2 <= len(jobs.jobs), (fed, moves)
            if moved.is_set() and fed_when_moved is None:
                fed_when_moved = fed
            items = [job for job in jobs.jobs[fed:fed + 2] for _ in range(rng.randint(2, 3))]
            rng.shuffle(items)
            feed.add(items)
            fed += 2
            time.sleep(0.02)
    finally:
        feed.close()
        moving.join()
        clients.join()
    jobs.jobs = jobs.jobs[:fed]
    print(f"jobs: {fed}, deliveries: {len(ended)}, answers: {dict(jobs.answers)}, moves:",
          [(a, b, round(end - start, 2)) for a, b, start, end in moves])
    print(f"40001 retried: {sum(serialization.values())} {dict(serialization)}")
    print(f"connection errors retried: {sum(reconnects.values())} {dict(reconnects)}")
    print(f"40P01 retried: {sum(deadlocks.values())} {dict(deadlocks)}; moves canceled and run again: "
          f"{len(canceled_moves)}")
    assert not mover_failures, mover_failures
    assert not failures, failures
    assert moves and moves[0][:2] == (src, dst), moves

    # The deliveries overlapped the moves: some ended while the shard was
    # moving, and jobs were started and committed after the last move.
    first_start, first_end = moves[0][2], moves[0][3]
    during = sum(1 for t in ended if first_start < t < first_end)
    after = sum(1 for t in ended if t > moves[-1][3])
    commits_after = committed() - commits_at[-1]
    print(f"deliveries ended during the first move: {during}, after the last move: {after}"
          f" (jobs committed after it: {commits_after})")
    assert during > 0 and after > 0 and commits_after > 0, (during, after, commits_after)
    assert jobs.answers["completed"] > 0

    # The shard group is where the last move put it, keys with orders.
    last = moves[-1][1]
    for tenant in tenants:
        assert cluster.node_of("orders", tenant) == last, tenant
        assert cluster.node_of("idempotency.keys", tenant) == last, tenant
    # Exactly one order per job, every key completed naming its order,
    # every replay answered that; a COMMIT whose connection was cut may
    # have taken effect unseen, so then at most one commit seen per job.
    jobs.check(cluster, known_commits=not reconnects)
    assert_keys_beside_orders(cluster, collections.Counter(job[1] for job in jobs.jobs))
    assert shell_sizes(cluster, "idempotency.keys") == {name: 0 for name in NODES}
    # Nothing is held, on any node.
    assert cluster.on_all_nodes("SELECT count(*) FROM idem_held") == {name: "0" for name in NODES}
    # Every job, delivered once more, replays.
    with cluster.connect() as c:
        for key, tenant, order_id, amount in jobs.jobs:
            with c.transaction():
                row = begin(c, key, tenant, request=Jsonb({"order_id": order_id, "amount": amount}))
                assert (row["status"], row["result"]) == ("completed", order_result(tenant, order_id)), key


# -- a worker restarted under load --------------------------------------------------


def test_a_worker_restarted_mid_load(cluster, orders):
    tenants = sorted(cluster.tenants_on("w1", 3, "restart-") + cluster.tenants_on("w2", 3, "restart-"))
    on_w1 = set(cluster.tenants_on("w1", 3, "restart-"))
    rng = random.Random(5)
    jobs = Jobs("restart", tenants, 60, rng)
    errors = []
    restarting = threading.Event()
    restarted = threading.Event()
    after_restart = collections.Counter()

    def handle(conn, job):
        if sum(jobs.committed.values()) >= len(jobs.jobs) // 4:
            restarting.set()
        time.sleep(0.05)  # deliveries keep coming while the worker restarts
        again = jobs.deliver(conn, job)
        if restarted.is_set():
            after_restart[job[1] in on_w1] += 1
        return again

    def on_error(exc):
        # While and after the worker restarts, a delivery may fail because a
        # connection was cut (the coordinator's to the worker: 08xxx; the
        # client's own: no SQLSTATE) or the worker is shutting down or
        # starting (57xxx): it is delivered again. Any other error fails
        # the test.
        errors.append(exc)
        sqlstate = getattr(exc, "sqlstate", None)
        return (restarting.is_set() and isinstance(exc, psycopg.OperationalError)
                and (sqlstate is None or sqlstate[:2] in ("08", "57")))

    def restarter():
        if restarting.wait(60):
            cluster.restart("w1", "fast")
            restarted.set()

    t = threading.Thread(target=restarter)
    t.start()
    failures = run_clients(cluster, Deliveries(jobs.deliveries(2, 3)), handle, on_error=on_error, seconds=90)
    restarting.set()
    t.join()
    assert not failures, failures
    assert restarted.is_set()
    # The load went on after the restart, on the restarted worker too.
    assert after_restart[True] > 0, after_restart
    jobs.check(cluster, known_commits=False)
    assert_keys_beside_orders(cluster, collections.Counter(job[1] for job in jobs.jobs))
    # Nothing is left held, on any node: no key of these tenants, no
    # backend holding a key by its lock.
    held = cluster.on_all_nodes("SELECT count(*) FROM idem_held WHERE mode = 'lock' OR scope LIKE 'restart-%'")
    assert held == {name: "0" for name in NODES}, held
    # And every job, delivered once more, replays.
    with cluster.connect() as c:
        for key, tenant, order_id, amount in jobs.jobs:
            with c.transaction():
                row = begin(c, key, tenant, request=Jsonb({"order_id": order_id, "amount": amount}))
                assert (row["status"], row["result"]) == ("completed", order_result(tenant, order_id)), key
    print(f"{len(errors)} deliveries failed during the restart and were delivered again:",
          sorted({f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}" for e in errors}))


# -- functions that are not routed by one scope ------------------------------------


def test_idem_once_with_and_without_scope(cluster, orders):
    tenant = cluster.tenants_on("w2", 1, "once-")[0]
    with cluster.connect() as c:
        once = lambda key, *scope: c.execute(  # noqa: E731
            "SELECT idem_once(%s" + (", scope => %s)" if scope else ")"), [key, *scope]).fetchone()[0]
        # Without a scope: scope '', one shard, wherever it is.
        assert once("once:evt-1") is True
        assert once("once:evt-1") is False
        assert [once(f"once:evt-1:{i}") for i in range(3)] == [True, True, True]
        # With a scope: the tenant's shard.
        assert once("once:evt-1", tenant) is True
        assert once("once:evt-1", tenant) is False
        # A record that rolls back never happened.
        with c.transaction():
            assert once("once:evt-2", tenant) is True
            c.execute("INSERT INTO orders VALUES (%s, 1, 1)", [tenant])
            raise psycopg.Rollback
    with cluster.connect() as c:
        assert c.execute("SELECT idem_once('once:evt-2', scope => %s)", [tenant]).fetchone() == (True,)
        assert c.execute("SELECT idem_once('once:evt-2', scope => %s)", [tenant]).fetchone() == (False,)
        assert c.execute("SELECT count(*) FROM orders WHERE tenant = %s", [tenant]).fetchone() == (0,)
    # Each record is in the ledger's shard of its scope, beside the orders.
    assert cluster.node_of("idempotency.once", tenant) == cluster.node_of("orders", tenant)
    assert rows_in_shard(cluster, "idempotency.once", tenant, "scope") == {cluster.node_of("orders", tenant): 2}
    assert rows_in_shard(cluster, "idempotency.once", "", "scope") == {cluster.node_of("idempotency.once", ""): 4}
    assert shell_sizes(cluster, "idempotency.once") == {name: 0 for name in NODES}


def make_keys(cluster, tenant, prefix, count, ttl=None):
    with cluster.connect() as c:
        for i in range(count):
            key = f"{prefix}:{i}"
            with c.transaction():
                assert begin(c, key, tenant)["status"] == "started"
                if ttl:
                    finish(c, key, tenant, {"i": i}, ttl=ttl)
                else:
                    finish(c, key, tenant, {"i": i})


def test_idem_purge_per_node(cluster, orders):
    w1 = cluster.tenants_on("w1", 2, "purge-")
    w2 = cluster.tenants_on("w2", 2, "purge-")
    # Keys other tests left expired are purged first.
    cluster.on_all_nodes("SELECT idem_purge(NULL)")

    def expire(prefix):
        expected = {"coord": 0, "w1": 0, "w2": 0}
        for tenant, count in zip(w1 + w2, (3, 2, 1, 1)):
            make_keys(cluster, tenant, f"{prefix}:gone", count, ttl="1 millisecond")
            expected[cluster.node_of("idempotency.keys", tenant)] += count
        return expected

    for tenant in w1 + w2:
        make_keys(cluster, tenant, "purge:kept", 2)

    # Each node purges the expired keys of the shards it holds, and only those.
    expected = expire("purge:1")
    assert expected == {"coord": 0, "w1": 5, "w2": 2}
    time.sleep(0.05)
    purged = {}
    for name in NODES:
        with cluster.connect(name) as c:
            purged[name] = c.execute("SELECT idem_purge()").fetchone()[0]
    assert purged == expected

    # The whole cluster at once, from the coordinator.
    expected = expire("purge:2")
    time.sleep(0.05)
    purged = {name: int(n) for name, n in cluster.on_all_nodes("SELECT idem_purge()").items()}
    assert purged == expected
    assert sum(purged.values()) == 7

    # The keys that had not expired are all there, and nothing else.
    with cluster.connect() as c:
        for tenant in w1 + w2:
            assert c.execute("SELECT count(*) FROM idempotency.keys WHERE scope = %s", [tenant]).fetchone() == (2,)
            for i in range(2):
                assert get(c, f"purge:kept:{i}", tenant)["status"] == "completed"
            assert get(c, "purge:1:gone:0", tenant) is None
    assert shell_sizes(cluster, "idempotency.keys") == {name: 0 for name in NODES}


def test_idem_held_per_node(cluster, orders):
    on_w1 = cluster.tenants_on("w1", 1, "held-")[0]
    on_w2 = cluster.tenants_on("w2", 1, "held-")[0]
    with cluster.connect() as c, cluster.connect() as holder:
        tokens = {}
        for tenant in (on_w1, on_w2):
            tokens[tenant] = begin(c, f"held:lease:{tenant}", tenant, lease="1 minute")["token"]
        # A transaction on the coordinator holding a new key of on_w1 by its
        # lock: the worker that holds the shard runs the claim.
        holder.execute("BEGIN")
        assert begin(holder, "held:tx", on_w1)["status"] == "started"
        try:
            leases = cluster.on_all_nodes(
                "SELECT coalesce(string_agg(scope || '/' || key, ',' ORDER BY key), '') FROM idem_held"
                " WHERE mode = 'lease' AND key LIKE 'held:%'")
            assert leases == {"coord": "", "w1": f"{on_w1}/held:lease:{on_w1}", "w2": f"{on_w2}/held:lease:{on_w2}"}
            locks = cluster.on_all_nodes("SELECT coalesce(sum(keys), 0) FROM idem_held WHERE mode = 'lock'")
            assert locks == {"coord": "0", "w1": "1", "w2": "0"}
            # The function behind the view, per node too.
            keys = cluster.on_all_nodes("SELECT count(*) FROM idem_held_keys() WHERE key LIKE 'held:%'")
            assert keys == {"coord": "0", "w1": "1", "w2": "1"}
            finish(holder, "held:tx", on_w1, {"done": True})
            holder.execute("COMMIT")
        except BaseException:
            holder.execute("ROLLBACK")
            raise
        for tenant, token in tokens.items():
            finish(c, f"held:lease:{tenant}", tenant, {"done": True}, token=token)
    assert cluster.on_all_nodes("SELECT count(*) FROM idem_held WHERE key LIKE 'held:%' OR mode = 'lock'") == \
        {name: "0" for name in NODES}


def test_idem_stats_per_node(cluster, orders):
    on_w1 = cluster.tenants_on("w1", 1, "stats-")[0]
    on_w2 = cluster.tenants_on("w2", 1, "stats-")[0]
    if not cluster.preloaded:
        with cluster.connect() as c:
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
                c.execute("SELECT * FROM idem_stats()")
        return
    for name in NODES:
        with cluster.connect(name) as c:
            c.execute("SELECT idem_stats_reset()")
    make_keys(cluster, on_w1, "stats", 3)
    make_keys(cluster, on_w2, "stats", 2)
    with cluster.connect() as c:
        for i in range(2):
            assert begin(c, f"stats:{i}", on_w1)["status"] == "completed"
    counts = {}
    for name in NODES:
        with cluster.connect(name) as c:
            counts[name] = c.execute(
                "SELECT begin_started, begin_completed, finishes FROM idem_stats()").fetchone()
    assert counts == {"coord": (0, 0, 0), "w1": (3, 2, 3), "w2": (2, 0, 2)}


# -- adding a node (last: it adds a fourth server, then removes it) -------------


def one_tenant_per_shard(cluster, prefix):
    """{shard of orders: the first tenant named `prefix`<i> in it}, for
    every shard of orders."""
    with cluster.connect() as c:
        rows = c.execute(
            "SELECT DISTINCT ON (shard) shard, tenant FROM"
            " (SELECT get_shard_id_for_distribution_column('orders', %s || i) AS shard, %s || i AS tenant, i"
            "    FROM generate_series(0, 9999) i) t ORDER BY shard, i", [prefix, prefix]).fetchall()
        (shards,), = c.execute("SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = 'orders'::regclass").fetchall()
    assert len(rows) == shards
    return dict(rows)


def node_metadata(cluster):
    """{node: its pg_dist_node rows} on every node of the cluster."""
    found = {}
    for name in cluster.members():
        with cluster.connect(name) as c:
            found[name] = c.execute("SELECT * FROM pg_dist_node ORDER BY nodeid").fetchall()
    return found


def placements_on(cluster, table, name):
    """How many shards of `table` have their placement on node `name`."""
    with cluster.connect() as c:
        return c.execute(
            "SELECT count(*) FROM pg_dist_placement p JOIN pg_dist_shard s USING (shardid)"
            " JOIN pg_dist_node n USING (groupid) WHERE s.logicalrelid = %s::regclass AND n.nodeport = %s",
            [table, cluster.nodes[name].port]).fetchone()[0]


def test_adding_a_node(cluster, orders):
    """docs/citus.md, "Adding a node": idem_distribute gave scope the tenant
    column's collation (the database default, not "C"), and Citus refuses a
    node on which the extension is created as a fresh install makes it. Set
    up as documented, the node is added; a rebalance moves tenants to it,
    keys with orders, and their keys answer there as before. Then the node
    is drained and removed again."""
    alter = [f'ALTER TABLE idempotency.{t} ALTER COLUMN scope TYPE text COLLATE pg_catalog."default";'
             for t in ("keys", "once")]
    # idem_distribute said so, naming the statements.
    assert [(severity, message) for severity, message, _ in cluster.distribute_notices] == \
        [("NOTICE", 'the scope columns now have the collation pg_catalog."default", on every node')]
    hint = cluster.distribute_notices[0][2]
    for statement in ("CREATE EXTENSION idempotency;", *alter):
        assert statement in hint, hint

    # A job done for a tenant of every shard group before the node comes.
    tenants = sorted(one_tenant_per_shard(cluster, "grow-").values())
    jobs = Jobs("grow", tenants, 2 * len(tenants), random.Random(29))
    with cluster.connect() as c:
        for job in jobs.jobs:
            assert jobs.deliver(c, job) is False, job
    members = cluster.members()
    assert members == list(NODES)
    before = node_metadata(cluster)

    w3 = cluster.spare_server("w3")
    added = False
    try:
        with w3.connect() as c:
            c.execute("CREATE EXTENSION citus")  # as on every node
        # Not set up: refused, and the cluster is as it was.
        warnings = []
        with cluster.connect() as c:
            c.add_notice_handler(lambda d: warnings.append((d.severity_nonlocalized, d.message_primary)))
            with pytest.raises(psycopg.Error) as err:
                c.execute("SELECT citus_add_node(%s, %s)", [w3.host, w3.port])
        assert ("WARNING", "cannot colocate tables keys and orders") in warnings, (str(err.value), warnings)
        assert node_metadata(cluster) == before
        with w3.connect() as c:
            # Nothing of the attempt stayed on the new node: the documented
            # statements apply as they are.
            assert sorted(n for n, in c.execute("SELECT extname FROM pg_extension").fetchall()) == \
                ["citus", "plpgsql"]
            assert c.execute("SELECT count(*) FROM pg_dist_node").fetchone() == (0,)

        # Set up as documented (citus is there already), then added.
        with w3.connect() as c:
            c.execute("CREATE EXTENSION IF NOT EXISTS citus")
            c.execute("CREATE EXTENSION idempotency")
            for statement in alter:
                c.execute(statement)
        with cluster.connect() as c:
            c.execute("SELECT citus_add_node(%s, %s)", [w3.host, w3.port])
            added = True
            assert cluster.members() == members + ["w3"]
            assert c.execute("SELECT isactive, hasmetadata, metadatasynced FROM pg_dist_node WHERE nodeport = %s",
                             [w3.port]).fetchone() == (True, True, True)
            # Rebalanced.
            (job,), = c.execute("SELECT citus_rebalance_start()").fetchall()
            c.execute("SELECT citus_rebalance_wait()")
            assert c.execute("SELECT state FROM pg_dist_background_job WHERE job_id = %s",
                             [job]).fetchone() == ("finished",)
            # The copies the moves left behind, dropped now rather than later.
            c.execute("CALL citus_cleanup_orphaned_resources()")
        assert placements_on(cluster, "idempotency.keys", "w3") > 0
        assert placements_on(cluster, "idempotency.keys", "w3") == placements_on(cluster, "orders", "w3")
        moved = [t for t in tenants if cluster.node_of("orders", t) == "w3"]
        assert moved, "no tenant moved to the new node"
        # Every tenant's keys are beside its orders, on the new node too.
        assert_keys_beside_orders(cluster, collections.Counter(job[1] for job in jobs.jobs))

        # The jobs done before, redelivered: replayed, from the new node for
        # the tenants it holds now.
        with cluster.connect() as c:
            for key, tenant, order_id, amount in jobs.jobs:
                with c.transaction():
                    row = begin(c, key, tenant, request=Jsonb({"order_id": order_id, "amount": amount}))
                    assert (row["status"], row["result"], row["attempt"]) == \
                        ("completed", order_result(tenant, order_id), 1), key
        # New jobs of a moved tenant are claimed on the new node: while one
        # is in progress, the new node holds its key by its lock.
        tenant = moved[0]
        new_jobs = [(f"grow:new:{i}", tenant, 100 + i, i) for i in range(3)]
        with cluster.connect() as c:
            for n, (key, _, order_id, amount) in enumerate(new_jobs):
                with c.transaction():
                    row = begin(c, key, tenant, request=Jsonb({"order_id": order_id, "amount": amount}))
                    assert (row["status"], row["attempt"]) == ("started", 1), key
                    c.execute("INSERT INTO orders VALUES (%s, %s, %s)", [tenant, order_id, amount])
                    if n == 0:
                        locks = cluster.on_all_nodes("SELECT coalesce(sum(keys), 0) FROM idem_held WHERE mode = 'lock'")
                        assert locks == {name: "1" if name == "w3" else "0" for name in members + ["w3"]}, locks
                    finish(c, key, tenant, order_result(tenant, order_id))
            # A lease, with a token of the new node's.
            held = begin(c, "grow:lease", tenant, lease="1 minute")
            assert (held["status"], held["attempt"]) == ("started", 1)
            assert held["token"] is not None
            assert cluster.on_all_nodes("SELECT count(*) FROM idem_held WHERE key = 'grow:lease'") == \
                {name: "1" if name == "w3" else "0" for name in members + ["w3"]}
            finish(c, "grow:lease", tenant, {"by": "lease"}, token=held["token"])
            for key, _, order_id, _ in new_jobs:
                row = begin(c, key, tenant)
                assert (row["status"], row["result"]) == ("completed", order_result(tenant, order_id)), key
            row = begin(c, "grow:lease", tenant)
            assert (row["status"], row["result"]) == ("completed", {"by": "lease"})
        assert cluster.node_of("idempotency.keys", tenant) == "w3"
        assert rows_in_shard(cluster, "idempotency.keys", tenant, "scope") == {"w3": 2 + len(new_jobs) + 1}
        assert rows_in_shard(cluster, "orders", tenant, "tenant") == {"w3": 2 + len(new_jobs)}
        assert cluster.crashes() == {}

        # Drained and removed: the three-node cluster again, every key
        # still answering, beside its orders.
        with cluster.connect() as c:
            c.execute("SELECT citus_drain_node(%s, %s)", [w3.host, w3.port])
            c.execute("CALL citus_cleanup_orphaned_resources()")
            c.execute("SELECT citus_remove_node(%s, %s)", [w3.host, w3.port])
            added = False
        assert cluster.members() == members
        expected = collections.Counter(job[1] for job in jobs.jobs)
        assert_keys_on_orders_node(cluster, tenant, 2 + len(new_jobs) + 1)
        expected.pop(tenant)
        assert_keys_beside_orders(cluster, expected)
        with cluster.connect() as c:
            for key, tenant_, order_id, _ in jobs.jobs + new_jobs:
                row = get(c, key, tenant_)
                assert (row["status"], row["result"]) == ("completed", order_result(tenant_, order_id)), key
        assert cluster.on_all_nodes("SELECT count(*) FROM idem_held") == {name: "0" for name in NODES}
    finally:
        if added:
            # The test failed with the node in the cluster: take it out for
            # what runs after (the test's own failure is what it reports).
            try:
                with cluster.connect() as c:
                    c.execute("SELECT citus_drain_node(%s, %s)", [w3.host, w3.port])
                    c.execute("CALL citus_cleanup_orphaned_resources()")
                    c.execute("SELECT citus_remove_node(%s, %s)", [w3.host, w3.port])
            except psycopg.Error:
                pass
        w3.stop()
    assert w3.crashes() == []
