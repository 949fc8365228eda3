#!/usr/bin/env bash
# Installs the dependencies into .venv (once, again when requirements.txt
# changes), then runs test_worker.py against the database given by the
# PG* variables and DATABASE_URL. Its last line: "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")"
if ! python3 -c 'import ensurepip' 2>/dev/null; then  # Debian ships venv's pip apart
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi
if ! cmp -s requirements.txt .venv/requirements.txt; then
    rm -rf .venv
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
    cp requirements.txt .venv/requirements.txt
fi
timeout 240 .venv/bin/python -u test_worker.py
