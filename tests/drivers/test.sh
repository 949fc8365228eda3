#!/usr/bin/env bash
# Runs every code block of docs/drivers.md and checks what it does.
#
# Given PGHOST, PGPORT, PGUSER, PGDATABASE, DATABASE_URL and PG_BIN (a
# database where the extension is created), it installs what is missing (a
# venv with requirements.txt; npm ci; javac and Debian's pgjdbc; pgbouncer),
# extracts the blocks (extract.py: every block must be marked), creates the
# document's table and the fixtures (setup.sql), starts pgbouncer in
# transaction mode on 127.0.0.1:$BOUNCER_PORT (default 5485) against
# PGHOST:PGPORT, runs the Python, Node and Java runners, checks that every
# block was run, and prints "N passed, M failed". Exits non-zero on any
# failure.
set -euo pipefail
cd "$(dirname "$0")"
HERE=$PWD
DOC=${DRIVERS_DOC:-$(cd ../.. && pwd)/docs/drivers.md}
BUILD=$HERE/build
BOUNCER_PORT=${BOUNCER_PORT:-5485}
PGBOUNCER=${PGBOUNCER:-/usr/sbin/pgbouncer}
JDBC_JAR=/usr/share/java/postgresql.jar
: "${PGHOST:?}" "${PGPORT:?}" "${PGDATABASE:?}" "${DATABASE_URL:?}" "${PG_BIN:?}"
export PGUSER=${PGUSER:-postgres}

say() { echo "== $*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }
apt_updated=
apt_install() {
    say "installing $*"
    [ -n "$apt_updated" ] || { as_root apt-get update -qq; apt_updated=1; }
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- dependencies, each installed when missing
python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
command -v npm >/dev/null || apt_install nodejs npm
command -v javac >/dev/null || apt_install default-jdk-headless
[ -f "$JDBC_JAR" ] || apt_install libpostgresql-jdbc-java
[ -x "$PGBOUNCER" ] || apt_install pgbouncer

if ! cmp -s requirements.txt .venv/requirements.installed; then
    say "Python packages"
    rm -rf .venv
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
    cp requirements.txt .venv/requirements.installed
fi
if ! cmp -s package-lock.json node_modules/.package-lock.installed; then
    say "Node packages"
    npm ci --no-audit --no-fund --loglevel=error
    cp package-lock.json node_modules/.package-lock.installed
fi

# --- the blocks
mkdir -p "$BUILD"
fatal() {  # a failure that stops the run
    echo "FAIL $*"
    echo "0 passed, 1 failed"
    exit 1
}
.venv/bin/python extract.py "$DOC" "$BUILD/snippets" || fatal "extract: $DOC has a code block that would not be run (above)"
for name in schema pgbouncer-ini; do
    [ -f "$BUILD/snippets/$name.txt" ] || fatal "block $name: no block marked '<!-- test: $name -->'"
done
# The pgbouncer block is the [pgbouncer] section, which the harness continues.
[ "$(grep -c '^\[' "$BUILD/snippets/pgbouncer-ini.txt")" = 1 ] \
    && grep -q '^\[pgbouncer\]' "$BUILD/snippets/pgbouncer-ini.txt" \
    || fatal "block pgbouncer-ini: must be the [pgbouncer] section alone"

psql_db() {
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d "$PGDATABASE" "$@"
}
RUN_ID=$(date +%s)
say "the document's schema and the fixtures (run $RUN_ID)"
LOG=$BUILD/log
: >"$LOG"
PGOPTIONS='-c client_min_messages=warning' psql_db -o /dev/null -c 'DROP TABLE IF EXISTS payments, drivers_fixture'
psql_db -o /dev/null -f "$BUILD/snippets/schema.txt" || fatal "block schema: psql failed (above)"
echo "RAN schema" >>"$LOG"
psql_db -o /dev/null -v run_id="$RUN_ID" -f setup.sql || fatal "setup.sql: psql failed (above)"

# --- pgbouncer, as a user other than root, with its own folder
BOUNCER_DIR=$(mktemp -d /tmp/drivers-pgbouncer.XXXXXX)
stop_pgbouncer() {
    if [ -f "$BOUNCER_DIR/pgbouncer.pid" ]; then
        kill "$(cat "$BOUNCER_DIR/pgbouncer.pid")" 2>/dev/null || true
        for _ in $(seq 50); do [ -f "$BOUNCER_DIR/pgbouncer.pid" ] || break; sleep 0.1; done
    fi
    rm -rf "$BOUNCER_DIR"
}
trap stop_pgbouncer EXIT
bouncer_user=$(id -un)
if [ "$(id -u)" = 0 ]; then
    bouncer_user=postgres
    id postgres >/dev/null 2>&1 || bouncer_user=nobody
fi
{
    echo "[databases]"
    echo "$PGDATABASE = host=$PGHOST port=$PGPORT dbname=$PGDATABASE"
    echo "${PGDATABASE}_pool1 = host=$PGHOST port=$PGPORT dbname=$PGDATABASE pool_size=1"
    echo "${PGDATABASE}_pool2 = host=$PGHOST port=$PGPORT dbname=$PGDATABASE pool_size=2"
    echo
    # The document's block: the [pgbouncer] section, continued below.
    cat "$BUILD/snippets/pgbouncer-ini.txt"
    cat <<INI
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $BOUNCER_DIR/userlist.txt
pidfile = $BOUNCER_DIR/pgbouncer.pid
logfile = $BOUNCER_DIR/pgbouncer.log
default_pool_size = 20
max_client_conn = 200
admin_users = $PGUSER
INI
} >"$BOUNCER_DIR/pgbouncer.ini"
printf '"drivers_app" ""\n"%s" ""\n' "$PGUSER" >"$BOUNCER_DIR/userlist.txt"
chown -R "$bouncer_user" "$BOUNCER_DIR"
say "pgbouncer $("$PGBOUNCER" --version | head -1 | awk '{print $2}') on 127.0.0.1:$BOUNCER_PORT, pool_mode=transaction, as $bouncer_user"
if [ "$(id -un)" = "$bouncer_user" ]; then
    "$PGBOUNCER" -d "$BOUNCER_DIR/pgbouncer.ini"
else
    runuser -u "$bouncer_user" -- "$PGBOUNCER" -d "$BOUNCER_DIR/pgbouncer.ini"
fi
for i in $(seq 100); do
    # Ours (its pid file), and answering.
    [ -f "$BOUNCER_DIR/pgbouncer.pid" ] && kill -0 "$(cat "$BOUNCER_DIR/pgbouncer.pid")" 2>/dev/null \
        && "$PG_BIN/psql" -X -q -h 127.0.0.1 -p "$BOUNCER_PORT" -U drivers_app -d "$PGDATABASE" -c 'SELECT 1' \
            >/dev/null 2>&1 && break
    if [ "$i" = 100 ]; then
        cat "$BOUNCER_DIR/pgbouncer.log" 2>/dev/null || true
        fatal "pgbouncer: did not start on 127.0.0.1:$BOUNCER_PORT (log above)"
    fi
    sleep 0.1
done

# --- the runners
app_url=postgresql://drivers_app@$PGHOST:$PGPORT/$PGDATABASE
bouncer=postgresql://drivers_app@127.0.0.1:$BOUNCER_PORT
export RUN_ID APP_URL=$app_url JDBC_JAR DRIVERS_DOC=$DOC
export BOUNCER_URL=$bouncer/$PGDATABASE BOUNCER_POOL1_URL=$bouncer/${PGDATABASE}_pool1 \
    BOUNCER_POOL2_URL=$bouncer/${PGDATABASE}_pool2
# runner LABEL COMMAND...: runs a runner (bounded), shows and logs its
# output; a runner that fails without saying which check failed is a failure.
runner() {
    local label=$1 rc=0; shift
    say "$label"
    timeout 240 "$@" >"$BUILD/out" 2>&1 || rc=$?
    cat "$BUILD/out"
    cat "$BUILD/out" >>"$LOG"
    if [ $rc != 0 ] && ! grep -q '^FAIL ' "$BUILD/out"; then
        echo "FAIL $label: exited with $rc" | tee -a "$LOG"
    fi
}
for section in psycopg asyncpg sqlalchemy django pgbouncer pgbouncer-asyncpg pgbouncer-django autocommit; do
    runner "python: $section" .venv/bin/python run_python.py "$section"
done
for section in pg knex drizzle pgbouncer-pg; do
    runner "node: $section" node run_node.js "$section"
done
say "java: compiling the java blocks with $(javac -version 2>&1) against $JDBC_JAR"
rm -rf "$BUILD/java" "$BUILD/classes"
if .venv/bin/python make_java.py "$BUILD/snippets" "$BUILD/java" \
        && javac -Xlint:all -Werror -d "$BUILD/classes" -cp "$JDBC_JAR" "$BUILD/java/Recipes.java" DriverTest.java; then
    for section in jdbc pgbouncer-jdbc; do
        runner "java: $section" java -cp "$BUILD/classes:$JDBC_JAR" DriverTest "$section"
    done
else
    echo "FAIL java: the java blocks do not compile" | tee -a "$LOG"
fi

# --- every block was run
for name in $(.venv/bin/python -c 'import json,sys; [print(b["name"]) for b in json.load(open(sys.argv[1]))]' \
        "$BUILD/snippets/manifest.json"); do
    grep -qx "RAN $name" "$LOG" || echo "FAIL block $name: no runner ran it" | tee -a "$LOG"
done

passed=$(grep -c '^PASS ' "$LOG" || true)
failed=$(grep -c '^FAIL ' "$LOG" || true)
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
