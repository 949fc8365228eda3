"""A throwaway Citus cluster of three PostgreSQL servers: a coordinator and
two workers (and a spare fourth server that a test may add and remove),
each on a Unix socket of its own under /tmp/idempotency-citus,
talking to each other over those sockets (a socket directory serves as a
node's host name).

Run with IDEM_PG_BIN naming the server's binaries (the system PostgreSQL 15
by default); the tier is skipped where no Citus build is installed for that
server.
"""
import os
import shutil
import sys
from pathlib import Path

import psycopg

# The server helpers of the tiers that start servers of their own: the
# binaries (IDEM_PG_BIN), pg_config, the installed version, running as
# postgres, and the crash check of a server log.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))
from preloaded import (  # noqa: E402
    PG_BIN,
    as_postgres,
    crashes,
    installed_version,
    pg_config,
    retry_missing_files,
)

BASE = "/tmp/idempotency-citus"
# name -> port; the coordinator first.
PORTS = {"coord": 5477, "w1": 5478, "w2": 5479}
WORKERS = ("w1", "w2")
# A server that a test may add to the cluster (and remove again).
SPARE = {"w3": 5476}


def citus_missing():
    """Why this tier cannot run here, or None."""
    if not os.path.exists(os.path.join(PG_BIN, "pg_config")):
        return f"no PostgreSQL in {PG_BIN}"
    if not os.path.exists(os.path.join(pg_config("--pkglibdir"), "citus.so")):
        return f"no Citus build is installed for the PostgreSQL of {PG_BIN} (no citus.so in its pkglibdir)"
    if installed_version() is None:
        return f"the extension is not installed for the PostgreSQL of {PG_BIN}"
    return None


class Node:
    def __init__(self, name, port):
        self.name, self.port = name, port
        # The socket directory, which is also the node's host name in pg_dist_node.
        self.host = os.path.join(BASE, name)
        self.data = os.path.join(self.host, "data")
        self.log = os.path.join(self.host, "server.log")
        self.pg_ctl = os.path.join(PG_BIN, "pg_ctl")
        # Backends killed with SIGKILL on purpose (a restart with -m immediate
        # counts as one per backend it kills; see Cluster.restart).
        self.kills = 0

    def connect(self, **kw):
        kw.setdefault("autocommit", True)
        kw.setdefault("user", "postgres")
        return psycopg.connect(host=self.host, port=self.port, dbname="postgres", **kw)

    def start(self):
        as_postgres(self.pg_ctl, "-D", self.data, "-l", self.log, "-w", "-t", "60", "start")

    def stop(self, mode="fast"):
        as_postgres(self.pg_ctl, "-D", self.data, "-m", mode, "-w", "-t", "60", "stop", check=False)

    def crashes(self):
        return crashes(self.log, self.kills)


class Cluster:
    def __init__(self, version):
        self.version = version
        self.nodes = {name: Node(name, port) for name, port in PORTS.items()}
        self.by_port = {port: name for name, port in PORTS.items()}

    # -- servers ---------------------------------------------------------

    def create(self, settings=""):
        """initdb the three nodes (stopping what a previous run left
        running, the spare server too), start them, and join the workers to
        the coordinator."""
        leftovers = [Node(name, port) for name, port in SPARE.items()]
        for node in [*self.nodes.values(), *leftovers]:
            if os.path.exists(os.path.join(node.data, "postmaster.pid")):
                node.stop("immediate")
            shutil.rmtree(node.host, ignore_errors=True)
        os.makedirs(BASE, exist_ok=True)
        shutil.chown(BASE, "postgres", "postgres")
        preload = "citus"
        if os.path.exists(os.path.join(pg_config("--pkglibdir"), f"idempotency-{self.version}.so")):
            preload += f",idempotency-{self.version}"
        self.preloaded = "idempotency" in preload
        self.settings = settings
        for node in self.nodes.values():
            self.init(node)
        for node in self.nodes.values():
            node.start()
        for node in self.nodes.values():
            with node.connect() as c:
                c.execute("CREATE EXTENSION citus")
        with self.connect() as c:
            c.execute("SELECT citus_set_coordinator_host(%s, %s)", [self.nodes["coord"].host, PORTS["coord"]])
            for name in WORKERS:
                c.execute("SELECT citus_add_node(%s, %s)", [self.nodes[name].host, PORTS[name]])

    def init(self, node):
        """initdb one node, configured as every node of the cluster."""
        preload = "citus" + (f",idempotency-{self.version}" if self.preloaded else "")
        os.makedirs(node.host)
        shutil.chown(node.host, "postgres", "postgres")
        as_postgres(os.path.join(PG_BIN, "initdb"), "-D", node.data, "-U", "postgres", "-A", "trust",
                    "-E", "UTF8", "--locale=C.UTF-8")
        with open(os.path.join(node.data, "postgresql.conf"), "a") as conf:
            conf.write(
                f"listen_addresses = ''\nport = {node.port}\nunix_socket_directories = '{node.host}'\n"
                f"shared_preload_libraries = '{preload}'\n"
                "fsync = off\n"
                # Shard moves copy by logical replication; a node that
                # receives one move after another starts each one's apply
                # worker without the default 5 s pause.
                "wal_level = logical\nmax_wal_senders = 20\nmax_replication_slots = 20\n"
                "wal_retrieve_retry_interval = '100ms'\n"
                "max_worker_processes = 32\n"
                "max_prepared_transactions = 100\nmax_connections = 200\n"
                # Nodes reach each other over Unix sockets, where SSL does not apply.
                "citus.node_conninfo = 'sslmode=disable'\n"
                # A node connects to itself too (a shard move does): by its socket.
                f"citus.local_hostname = '{node.host}'\n"
                "citus.shard_count = 8\n"
                # Expired keys stay until a test purges them.
                "idempotency.purge_interval = 0\n"
                "log_line_prefix = '%m [%p] %q%a '\n" + self.settings)

    def spare_server(self, name="w3"):
        """Start the spare server `name` (a fresh data directory, configured
        as the others, with no extension created), not yet part of the
        cluster. It stays in self.nodes from then on, so that it is stopped
        and its log checked for crashes with the others."""
        node = Node(name, SPARE[name])
        if os.path.exists(os.path.join(node.data, "postmaster.pid")):
            node.stop("immediate")
        shutil.rmtree(node.host, ignore_errors=True)
        self.init(node)
        self.nodes[name] = node
        self.by_port[node.port] = name
        node.start()
        return node

    def create_extension(self):
        """CREATE EXTENSION idempotency on the coordinator, which Citus
        propagates to the workers (made there too where it did not)."""
        def everywhere():
            with self.connect() as c:
                c.execute("CREATE EXTENSION IF NOT EXISTS idempotency SCHEMA public")
            for name in WORKERS:
                with self.connect(name) as c:
                    if not c.execute("SELECT FROM pg_extension WHERE extname = 'idempotency'").fetchall():
                        c.execute("CREATE EXTENSION idempotency SCHEMA public")

        retry_missing_files(everywhere)

    def stop(self):
        for node in self.nodes.values():
            node.stop()

    def crashes(self):
        """{node: crash lines} of every node whose log shows a crash."""
        found = {name: node.crashes() for name, node in self.nodes.items()}
        return {name: lines for name, lines in found.items() if lines}

    def restart(self, name, mode="fast"):
        """Restart one node. With mode 'immediate' the postmaster SIGKILLs
        its children (logged as 'terminated by signal 9' only for those that
        it had to wait for), which the crash check then counts as sent on
        purpose."""
        node = self.nodes[name]
        if mode == "immediate":
            node.kills += 1000
        as_postgres(node.pg_ctl, "-D", node.data, "-l", node.log, "-m", mode, "-w", "-t", "60", "restart")

    # -- connections -----------------------------------------------------

    def connect(self, name="coord", **kw):
        return self.nodes[name].connect(**kw)

    # -- placement -------------------------------------------------------

    def shard_of(self, table, value, conn=None):
        """The shard of `table` that holds distribution value `value`."""
        with (conn or self.connect()) as c:
            return c.execute("SELECT get_shard_id_for_distribution_column(%s, %s::text)",
                             [table, value]).fetchone()[0]

    def node_of(self, table, value):
        """The node ('w1', 'w2', 'coord', or 'w3' while the spare server is
        added) that holds the shard of `table` for distribution value
        `value` (a tenant, a scope)."""
        with self.connect() as c:
            rows = c.execute(
                "SELECT n.nodeport FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid)"
                " WHERE p.shardid = get_shard_id_for_distribution_column(%s, %s::text)",
                [table, value]).fetchall()
        assert len(rows) == 1, (table, value, rows)
        return self.by_port[rows[0][0]]

    def members(self):
        """The names of the nodes in pg_dist_node now, in nodeid order (the
        spare server only while it is added)."""
        with self.connect() as c:
            ports = c.execute("SELECT nodeport FROM pg_dist_node ORDER BY nodeid").fetchall()
        return [self.by_port[port] for port, in ports]

    def shard_node(self, shardid):
        with self.connect() as c:
            (port,), = c.execute(
                "SELECT n.nodeport FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid)"
                " WHERE p.shardid = %s", [shardid]).fetchall()
        return self.by_port[port]

    def tenants_on(self, name, count, prefix, table="orders"):
        """`count` tenant names starting with `prefix` whose shard of
        `table` is on node `name` now."""
        found = []
        with self.connect() as c:
            for i in range(10000):
                tenant = f"{prefix}{i}"
                (port,), = c.execute(
                    "SELECT n.nodeport FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid)"
                    " WHERE p.shardid = get_shard_id_for_distribution_column(%s, %s::text)",
                    [table, tenant]).fetchall()
                if self.by_port[port] == name:
                    found.append(tenant)
                    if len(found) == count:
                        return found
        raise AssertionError(f"no {count} tenants of {table} on {name}")

    def tenants_in_shard(self, shardid, count, prefix, table="orders"):
        """`count` tenant names starting with `prefix` whose rows of `table`
        hash to shard `shardid`."""
        found = []
        with self.connect() as c:
            for i in range(10000):
                tenant = f"{prefix}{i}"
                (shard,), = c.execute("SELECT get_shard_id_for_distribution_column(%s, %s::text)",
                                      [table, tenant]).fetchall()
                if shard == shardid:
                    found.append(tenant)
                    if len(found) == count:
                        return found
        raise AssertionError(f"no {count} tenants of {table} in shard {shardid}")

    def move(self, shardid, dest):
        """Move a shard (and the shards co-located with it) to node `dest`,
        by citus_move_shard_placement with the default transfer mode, and
        drop the source's copies."""
        src = self.nodes[self.shard_node(shardid)]
        dst = self.nodes[dest]
        assert src is not dst
        with self.connect() as c:
            c.execute("SELECT citus_move_shard_placement(%s, %s, %s, %s, %s)",
                      [shardid, src.host, src.port, dst.host, dst.port])
            c.execute("CALL citus_cleanup_orphaned_resources()")
        return src.name

    def on_all_nodes(self, sql):
        """{node: result text} of run_command_on_all_nodes(sql), each run
        required to succeed."""
        with self.connect() as c:
            rows = c.execute(
                "SELECT n.nodeport, r.success, r.result FROM run_command_on_all_nodes(%s) r"
                " JOIN pg_dist_node n USING (nodeid)", [sql]).fetchall()
        failed = [(self.by_port[port], result) for port, ok, result in rows if not ok]
        assert not failed, f"{sql} failed on {failed}"
        return {self.by_port[port]: result for port, _, result in rows}
