#!/usr/bin/env bash
# Installs the pinned dependencies into .venv (once), then runs the tests
# against $DATABASE_URL (a database where the idempotency extension is created).
set -euo pipefail
cd "$(dirname "$0")"
: "${DATABASE_URL:?DATABASE_URL must name a database with the idempotency extension}"
if ! python3 -c 'import ensurepip' 2>/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
if ! cmp -s requirements.txt .venv/requirements.txt; then
    rm -rf .venv
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
    cp requirements.txt .venv/requirements.txt
fi
timeout 240 .venv/bin/python -m pytest -p no:cacheprovider -rA -q test_app.py
