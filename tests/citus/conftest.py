"""The Citus tier: the extension on a throwaway three-node Citus cluster
(cluster.py), its key tables distributed by scope and co-located with a
tenant table by idem_distribute().

Run as root (the servers run as postgres), with IDEM_PG_BIN naming the
server's binaries:

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/citus
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cluster as citus  # noqa: E402


@pytest.fixture(scope="session")
def cluster():
    """A coordinator (port 5477) and two workers (5478, 5479), with citus
    and the extension's library preloaded and the extension created on
    every node. Stopped at the end, with the spare server (5476) if a test
    started it; the tier fails if a server log shows a backend that crashed
    or a PANIC, the spare server's included."""
    reason = citus.citus_missing()
    if reason:
        pytest.skip(reason)
    c = citus.Cluster(citus.installed_version())
    try:
        c.create()
        c.create_extension()
        yield c
    finally:
        c.stop()
    found = c.crashes()
    if found:
        pytest.fail("server logs show crashes: " + "; ".join(
            f"{name} ({c.nodes[name].log}): " + " | ".join(lines) for name, lines in found.items()))


@pytest.fixture(scope="session")
def orders(cluster):
    """The tenant table `orders`, hash-distributed by `tenant`, and the
    extension's key tables distributed with it by idem_distribute(), whose
    notices are kept in cluster.distribute_notices as (severity, message,
    hint)."""
    notices = []
    with cluster.connect() as c:
        c.execute("CREATE TABLE orders (tenant text, order_id int, amount int, PRIMARY KEY (tenant, order_id))")
        c.execute("SELECT create_distributed_table('orders', 'tenant')")
        c.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.message_primary, d.message_hint)))
        c.execute("SELECT idem_distribute('orders')")
    cluster.distribute_notices = notices
    return "orders"
