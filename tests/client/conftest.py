"""Client tests talk to a running cluster through psycopg, as applications do.

scripts/test starts a throwaway cluster and sets the PG* variables.
"""
import sys
from pathlib import Path

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "demo"))


@pytest.fixture
def conn():
    with psycopg.connect(autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS idempotency")
        yield c


@pytest.fixture
def fresh_keys(conn):
    conn.execute("DELETE FROM idempotency.keys")
    yield
    conn.execute("DELETE FROM idempotency.keys")
