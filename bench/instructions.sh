#!/usr/bin/env bash
# Instructions per call, counted by callgrind around `postgres --single`:
# each workload runs at N and 2N calls, and (I(2N) - I(N)) / N is the cost
# of one call, start-up excluded. Unlike tps on a shared machine, the count
# repeats exactly, so it decides between two designs. Uses the extension as
# installed (scripts/bench installs it; or cargo pgrx install --release).
# Usage: bench/instructions.sh [N]   (default 1000; needs valgrind)
set -euo pipefail
N=${1:-1000}
PG_BIN=/usr/lib/postgresql/15/bin
WORK=$(mktemp -d /tmp/idempotency-instructions.XXXXXX)
trap '[ -n "${KEEP:-}" ] || rm -rf "$WORK"' EXIT
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }
chown postgres:postgres "$WORK"
runuser -u postgres -- "$PG_BIN/initdb" -D "$WORK/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >/dev/null
echo "fsync = off" >> "$WORK/data/postgresql.conf"
single() { runuser -u postgres -- "$PG_BIN/postgres" --single -D "$WORK/data" postgres >/dev/null; }

single <<'SQL'
CREATE EXTENSION idempotency;
CREATE TABLE t (id int PRIMARY KEY, v int, w text);
INSERT INTO t SELECT g, 0, 'x' FROM generate_series(0, 99) g;
SQL
# 1000 completed keys to replay, each finished in a transaction of its own.
for g in $(seq 1 1000); do
    echo "BEGIN; SELECT idem_begin('r$g'); SELECT idem_finish('r$g', '{\"n\": 1}'); COMMIT;"
done | single

# workload NAME CALLS: the SQL of CALLS calls (one statement a line).
workload() {
    case $1 in
        replay) echo "SELECT sum(length((idem_begin('r' || (1 + g % 1000))).status)) FROM generate_series(1, $2) g;" ;;
        job) for g in $(seq 1 "$2"); do
                 printf "BEGIN;\nSELECT idem_begin('j%s-%s');\nSELECT idem_finish('j%s-%s', '{\"ok\": true}');\nCOMMIT;\n" "$2" "$g" "$2" "$g"
             done ;;
        once) echo "SELECT count(*) FILTER (WHERE idem_once('o$2-' || g)) FROM generate_series(1, $2) g;" ;;
        upsert) echo "SELECT count(idem_upsert('t', jsonb_build_object('id', g % 100, 'v', g, 'w', 'x'))) FROM generate_series(1, $2) g;" ;;
    esac
}

count() { # NAME CALLS -> total instructions
    workload "$1" "$2" > "$WORK/$1.$2.sql"
    runuser -u postgres -- valgrind --tool=callgrind --callgrind-out-file="$WORK/$1.$2.out" \
        "$PG_BIN/postgres" --single -D "$WORK/data" postgres < "$WORK/$1.$2.sql" >/dev/null 2>"$WORK/valgrind.log"
    grep -m1 '^summary:' "$WORK/$1.$2.out" | awk '{print $2}'
}

printf '%-8s %12s\n' workload 'instr/call'
for w in replay job once upsert; do
    a=$(count "$w" "$N")
    b=$(count "$w" $((2 * N)))
    printf '%-8s %12d\n' "$w" $(((b - a) / N))
done
