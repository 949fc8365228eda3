#!/usr/bin/env bash
# Instructions per call, counted by callgrind around `postgres --single`:
# each workload runs at N and 2N calls, and (I(2N) - I(N)) / N is the cost
# of one call, start-up excluded. Unlike tps on a shared machine, the count
# repeats exactly, so it decides between two designs. Uses the extension as
# installed (scripts/bench installs it; or cargo pgrx install --release).
#
# Each workload is a prepared statement executed once a line, as pgbench's
# -M prepared runs it, against the objects of bench/setup.sql; the
# hand-written counterparts are counted the same way, so a pair's counts
# compare directly.
#
# With IDEM_PRELOAD=1 the library is in shared_preload_libraries, so every
# call also adds to the idem_stats() counters in shared memory (without it
# counting is skipped): the two runs give what counting costs.
#
# Usage: bench/instructions.sh [N] [WORKLOAD ...]   (N defaults to 1000;
# needs valgrind). Workloads: replay replay_hw job job_hw once upsert
# fingerprint fingerprint_hw replay_body replay_body_hw job_body
# job_body_hw (NAME_hw is NAME's hand-written counterpart); default all
# of them.
# Under valgrind the sha2 crate runs its portable code (valgrind hides the
# SHA extensions), so the fingerprint workloads overstate what ours costs
# on the machine.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
N=${1:-1000}
shift || true
WORKLOADS=("$@")
[ ${#WORKLOADS[@]} -gt 0 ] || WORKLOADS=(replay replay_hw job job_hw once upsert fingerprint fingerprint_hw
                                         replay_body replay_body_hw job_body job_body_hw)
PG_BIN=/usr/lib/postgresql/15/bin
WORK=$(mktemp -d /tmp/idempotency-instructions.XXXXXX)
trap '[ -n "${KEEP:-}" ] || rm -rf "$WORK"' EXIT
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }
chown postgres:postgres "$WORK"
runuser -u postgres -- "$PG_BIN/initdb" -D "$WORK/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >/dev/null
echo "fsync = off" >> "$WORK/data/postgresql.conf"
if [ -n "${IDEM_PRELOAD:-}" ]; then
    version=$(sed -n "s/^default_version = '\(.*\)'/\1/p" "$("$PG_BIN/pg_config" --sharedir)/extension/idempotency.control")
    echo "shared_preload_libraries = 'idempotency-$version'" >> "$WORK/data/postgresql.conf"
    echo "idempotency.purge_interval = 0" >> "$WORK/data/postgresql.conf"
fi
single() { runuser -u postgres -- "$PG_BIN/postgres" --single -D "$WORK/data" postgres >/dev/null; }

# bench/setup.sql holds multi-line statements, which single-user mode does
# not read: load it through a short-lived server on a socket of our own.
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$WORK/data" -w -s -l "$WORK/server.log" \
    -o "-c listen_addresses='' -c unix_socket_directories='$WORK'" start
PGOPTIONS="-c client_min_messages=warning" runuser -u postgres -- psql -q -X -v ON_ERROR_STOP=1 -h "$WORK" -d postgres >/dev/null <<SQL
\i $HERE/setup.sql
CREATE TABLE t (id int PRIMARY KEY, v int, w text);
INSERT INTO t SELECT g, 0, 'x' FROM generate_series(0, 99) g;
-- Completed keys to replay: without a request, and with the 2 kB body in
-- both stores, each with its own kind of fingerprint. Owned by the role
-- that replays them, as idem_begin records it.
INSERT INTO idempotency.keys (scope, key, status, attempt, created_at, finished_at, expires_at, result, fingerprint, owner)
SELECT '', 'r' || i, 'c', 1, now(), now(), now() + interval '1 year', '{"n": 1}'::jsonb, NULL::bytea, current_user
  FROM generate_series(1, 1000) i
UNION ALL
SELECT '', 'rb' || i, 'c', 1, now(), now(), now() + interval '1 year', '{"n": 1}',
       decode(idem_fingerprint(b.body::jsonb), 'hex'), current_user
  FROM generate_series(1, 1000) i, bench_bodies b WHERE b.id = 1;
-- The primary-key SELECT's table as large as idempotency.keys, so both
-- indexes have the same depth.
INSERT INTO replay_results SELECT 'r' || i, 'completed', '{"n": 1}' FROM generate_series(1, 1000) i;
INSERT INTO replay_results SELECT 'base:' || i, 'completed', '{"n": 1}' FROM generate_series(1, 100000) i;
INSERT INTO hw_keys (key, status, result, request_hash, finished_at)
SELECT 'rb' || i, 'completed', '{"n": 1}', encode(sha256(convert_to(b.body::jsonb::text, 'UTF8')), 'hex'), now()
  FROM generate_series(1, 1000) i, bench_bodies b WHERE b.id = 1;
VACUUM ANALYZE;
SQL
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$WORK/data" -w -s stop

BODY="(SELECT body::jsonb FROM bench_bodies WHERE id = 1)"
# prepare NAME: the PREPARE of a workload; its EXECUTE takes (run, call).
prepare() {
    case $1 in
        replay) echo "PREPARE w(int, int) AS SELECT status, result FROM idem_begin('r' || (1 + \$2 % 1000));" ;;
        replay_hw) echo "PREPARE w(int, int) AS SELECT status, result FROM replay_results WHERE key = 'r' || (1 + \$2 % 1000);" ;;
        once) echo "PREPARE w(int, int) AS SELECT idem_once('o' || \$1 || '-' || \$2);" ;;
        upsert) echo "PREPARE w(int, int) AS SELECT idem_upsert('t', jsonb_build_object('id', \$2 % 100, 'v', \$2, 'w', 'x'));" ;;
        fingerprint) echo "PREPARE w(int, int) AS SELECT idem_fingerprint(body::jsonb) FROM bench_bodies WHERE id = 1;" ;;
        fingerprint_hw) echo "PREPARE w(int, int) AS SELECT encode(sha256(convert_to(body::jsonb::text, 'UTF8')), 'hex') FROM bench_bodies WHERE id = 1;" ;;
        replay_body) echo "PREPARE w(int, int) AS SELECT status, result FROM idem_begin('rb' || (1 + \$2 % 1000), $BODY);" ;;
        replay_body_hw) echo "PREPARE w(int, int) AS SELECT CASE WHEN k.request_hash = encode(sha256(convert_to(b.body::jsonb::text, 'UTF8')), 'hex') THEN k.status ELSE 'mismatch' END AS status, k.result FROM hw_keys k, bench_bodies b WHERE k.key = 'rb' || (1 + \$2 % 1000) AND b.id = 1;" ;;
        job|job_hw|job_body|job_body_hw)
            local begin="SELECT status FROM idem_begin(\$1, $BODY)" finish="SELECT idem_finish(\$1, '{\"charge_id\": 991}')"
            [ "$1" = job ] && begin="SELECT status FROM idem_begin(\$1)"
            [ "$1" = job_hw ] && begin="SELECT status FROM hw_begin(\$1)" \
                && finish="SELECT hw_finish(\$1, '{\"charge_id\": 991}')"
            [ "$1" = job_body_hw ] && begin="SELECT status FROM hw_begin_request(\$1, $BODY)" \
                && finish="SELECT hw_finish(\$1, '{\"charge_id\": 991}')"
            echo "PREPARE b(text) AS $begin;"
            echo "PREPARE i(text) AS INSERT INTO bench_business (job_key, amount) VALUES (\$1, 500);"
            echo "PREPARE f(text) AS $finish;" ;;
    esac
}

# workload NAME CALLS: the SQL of CALLS calls (one statement a line).
workload() {
    prepare "$1"
    case $1 in
        job|job_hw|job_body|job_body_hw)
            for g in $(seq 1 "$2"); do
                printf "BEGIN;\nEXECUTE b('%s-%s-%s');\nEXECUTE i('%s-%s-%s');\nEXECUTE f('%s-%s-%s');\nCOMMIT;\n" \
                    "$1" "$2" "$g" "$1" "$2" "$g" "$1" "$2" "$g"
            done ;;
        *) for g in $(seq 1 "$2"); do echo "EXECUTE w($2, $g);"; done ;;
    esac
}

count() { # NAME CALLS -> total instructions
    workload "$1" "$2" > "$WORK/$1.$2.sql"
    runuser -u postgres -- valgrind --tool=callgrind --callgrind-out-file="$WORK/$1.$2.out" \
        "$PG_BIN/postgres" --single -D "$WORK/data" postgres < "$WORK/$1.$2.sql" >/dev/null 2>"$WORK/valgrind.log"
    grep -m1 '^summary:' "$WORK/$1.$2.out" | awk '{print $2}'
}

printf '%-16s %12s\n' workload 'instr/call'
for w in "${WORKLOADS[@]}"; do
    a=$(count "$w" "$N")
    b=$(count "$w" $((2 * N)))
    printf '%-16s %12d\n' "$w" $(((b - a) / N))
done
