#!/usr/bin/env bash
# Installs the locked dependencies (once), then runs the tests against
# $DATABASE_URL (a database where the idempotency extension is created).
set -euo pipefail
cd "$(dirname "$0")"
: "${DATABASE_URL:?DATABASE_URL must name a database with the idempotency extension}"
if ! command -v npm >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
# npm ci installs exactly package-lock.json; skipped when node_modules was
# installed from this package-lock.json already.
if ! cmp -s package-lock.json node_modules/.installed-from-lock.json; then
    npm ci --no-audit --no-fund --loglevel=error
    cp package-lock.json node_modules/.installed-from-lock.json
fi
timeout 240 node --test --test-reporter=spec test/app.test.js
