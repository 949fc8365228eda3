#!/usr/bin/env bash
# Runs the worker's tests against $DATABASE_URL (a database with the
# idempotency extension created). Installs Node.js (when missing) and the
# locked dependencies (when not installed from package-lock.json yet).
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v npm >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
# npm ci installs exactly package-lock.json; skipped when node_modules is
# newer than the lock file (installed from it already).
if [ ! node_modules/.package-lock.json -nt package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
fi

timeout 300 node --test --test-reporter=spec test/
