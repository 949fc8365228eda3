"""Citus: a job's transaction with the keys beside the tenant's rows
(idem_distribute) against the keys on the coordinator. Starts its own
cluster, a coordinator and two workers on ports 5473 to 5475 (the Citus
tier's cluster code, tests/citus/cluster.py, with fsync on and
synchronous_commit off as in the bench profile), in two databases:

- `distributed`: orders distributed by tenant, then idem_distribute('orders'):
  each job's calls are delegated to the worker of its tenant, a one-node
  transaction;
- `coordinator`: the same orders, the extension left as installed: each
  job claims its key on the coordinator and writes its order on a worker,
  a two-node transaction that Citus commits with two-phase commit.

Workloads (pgbench, simple protocol so that Citus sees the scope as a
constant; 64 tenants, 4 clients): `job`, a new key claimed, an order
written and the result stored in one transaction of three statements;
`replay`, idem_begin of a finished key, alone; `job_function`, the job as
one call of a function distributed by tenant (`place_order`, delegated
to the tenant's worker, where it calls the three in turn), against `job`
in the coordinator database. Each runs --rounds rounds of --seconds in
each database, the two back to back, in reverse order every other round;
prints each round's tps and the median of the rounds' ratios distributed
/ coordinator.

All three servers share the machine's cores with pgbench, so the figures
compare the work and the round trips a job costs the whole cluster, not
the throughput of more machines.

Needs a Citus build installed (CONTRIBUTING.md, Citus) and the extension.
Usage: bench/citus.py [--rounds N] [--seconds S]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "citus"))
import cluster as citus  # noqa: E402

citus.BASE = "/tmp/idempotency-citus-bench"
citus.PORTS = {"coord": 5473, "w1": 5474, "w2": 5475}
TENANTS = 64
SETTINGS = "fsync = on\nsynchronous_commit = off\nshared_buffers = 512MB\nmax_wal_size = 8GB\n"

JOB = """\\set id random(1, 9000000000000000000)
\\set t random(1, {tenants})
BEGIN;
SELECT status FROM idem_begin('job:' || :id, '{{"amount": 1}}', scope => 't' || :t);
INSERT INTO orders VALUES ('t' || :t, :id, 1) ON CONFLICT DO NOTHING;
SELECT idem_finish('job:' || :id, '{{"ok": true}}', scope => 't' || :t);
COMMIT;
"""
JOB_FUNCTION = """\\set id random(1, 9000000000000000000)
\\set t random(1, {tenants})
SELECT place_order('t' || :t, :id);
"""
# The job as a function of the tenant, delegated to its worker: one round
# trip from the coordinator, one transaction on the worker.
PLACE_ORDER = """
CREATE FUNCTION place_order(tenant text, id bigint) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    s text;
BEGIN
    SELECT status INTO s FROM idem_begin('job:' || id, '{"amount": 1}', scope => tenant);
    IF s = 'started' THEN
        INSERT INTO orders VALUES (tenant, id, 1) ON CONFLICT DO NOTHING;
        PERFORM idem_finish('job:' || id, '{"ok": true}', scope => tenant);
    END IF;
    RETURN s;
END
$$;
SELECT create_distributed_function('place_order(text, bigint)', 'tenant', colocate_with => 'orders');
"""
REPLAY = """\\set k random(1, 100)
\\set t random(1, {tenants})
SELECT status FROM idem_begin('done:' || :k, '{{"amount": 1}}', scope => 't' || :t);
"""


def connect(c, dbname, node="coord"):
    n = c.nodes[node]
    return psycopg.connect(host=n.host, port=n.port, dbname=dbname, user="postgres", autocommit=True)


def prepare(c, dbname, distribute):
    for name in c.nodes:
        with connect(c, "postgres", name) as conn:
            conn.execute(f"CREATE DATABASE {dbname}")
        with connect(c, dbname, name) as conn:
            conn.execute("CREATE EXTENSION citus")
    with connect(c, dbname) as conn:
        conn.execute("SELECT citus_set_coordinator_host(%s, %s)", [c.nodes["coord"].host, citus.PORTS["coord"]])
        for name in citus.WORKERS:
            conn.execute("SELECT citus_add_node(%s, %s)", [c.nodes[name].host, citus.PORTS[name]])
        conn.execute("CREATE EXTENSION idempotency")
        conn.execute("CREATE TABLE orders (tenant text, order_id bigint, amount int, PRIMARY KEY (tenant, order_id))")
        conn.execute("SELECT create_distributed_table('orders', 'tenant')")
        if distribute:
            conn.execute("SELECT idem_distribute('orders')")
            conn.execute(PLACE_ORDER)
        # The finished keys that `replay` asks for again.
        for t in range(1, TENANTS + 1):
            for k in range(1, 101):
                conn.execute("BEGIN")
                conn.execute("SELECT idem_begin(%s, '{\"amount\": 1}', scope => %s)", [f"done:{k}", f"t{t}"])
                conn.execute("SELECT idem_finish(%s, '{\"ok\": true}', scope => %s)", [f"done:{k}", f"t{t}"])
                conn.execute("COMMIT")


def pgbench(c, dbname, script, seconds):
    node = c.nodes["coord"]
    out = subprocess.run(
        ["runuser", "-u", "postgres", "--", os.path.join(citus.PG_BIN, "pgbench"), "-n", "-M", "simple",
         "-c", "4", "-j", "2", "-T", str(seconds), "-f", script, "-h", node.host, "-p", str(node.port), dbname],
        check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("tps = "):
            return float(line.split()[2])
    raise RuntimeError(f"no tps in pgbench output:\n{out}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=15)
    args = ap.parse_args()
    reason = citus.citus_missing()
    if reason:
        sys.exit(f"bench/citus.py: {reason}")
    c = citus.Cluster(citus.installed_version())
    scripts = tempfile.mkdtemp(prefix="idem-citus-bench-")
    os.chmod(scripts, 0o755)
    files = {}
    for name, text in (("job", JOB), ("replay", REPLAY), ("job_function", JOB_FUNCTION)):
        files[name] = os.path.join(scripts, f"{name}.sql")
        with open(files[name], "w") as f:
            f.write(text.format(tenants=TENANTS))
    try:
        c.create(SETTINGS)
        prepare(c, "distributed", True)
        prepare(c, "coordinator", False)
        # (workload in the distributed database, its counterpart in the coordinator one)
        for workload, counterpart in (("job", "job"), ("replay", "replay"), ("job_function", "job")):
            ratios = []
            for r in range(args.rounds):
                order = ["distributed", "coordinator"] if r % 2 == 0 else ["coordinator", "distributed"]
                script = {"distributed": files[workload], "coordinator": files[counterpart]}
                tps = {db: pgbench(c, db, script[db], args.seconds) for db in order}
                ratios.append(tps["distributed"] / tps["coordinator"])
                print(f"{workload:7s} round {r + 1}: distributed {tps['distributed']:8.0f} tps, "
                      f"coordinator {tps['coordinator']:8.0f} tps, ratio {ratios[-1]:.2f}", flush=True)
            print(f"{workload:7s} median ratio distributed / coordinator: {statistics.median(ratios):.2f}", flush=True)
    finally:
        c.stop()
    found = c.crashes()
    if found:
        sys.exit(f"server logs show crashes: {found}")


if __name__ == "__main__":
    main()
