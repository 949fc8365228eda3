# Shared by the scripts in this folder: set-up of a fresh Debian 12 machine,
# building and installing the extension, and throwaway clusters.
# Source it; it defines functions and sets nothing but these variables.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PG_BIN=/usr/lib/postgresql/15/bin
PGXS_TEST=/usr/lib/postgresql/15/lib/pgxs/src/test
VENV="$ROOT/.venv"

say() { printf '\n== %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# The pgrx version Cargo.toml pins, so cargo-pgrx always matches the crate.
pgrx_version() {
    sed -n 's/^pgrx = "=\([0-9.]*\)"/\1/p' "$ROOT/Cargo.toml"
}

# rust-toolchain.toml pins the Rust release, and rustup may have no way to
# download it (RUSTUP_AUTO_INSTALL=0, only package registries reachable).
# When rustup lacks a toolchain of that name but its stable toolchain is that
# very release, this names it so, by a symlink in rustup's toolchains folder
# (as `rustup toolchain link` would, but that refuses release-like names:
# "invalid custom toolchain name '1.95.0'"). Otherwise it changes nothing,
# and rustup installs the pinned release itself or says it cannot.
link_toolchain() {
    command -v rustup >/dev/null 2>&1 || return 0
    local want; want=$(sed -n 's/^channel = "\(.*\)"$/\1/p' "$ROOT/rust-toolchain.toml")
    [ -n "$want" ] || return 0
    if rustup toolchain list | awk -v w="$want-" 'index($1, w) == 1 { found = 1 } END { exit !found }'; then
        return 0
    fi
    case $(rustc +stable --version 2>/dev/null) in
        "rustc $want "*) ;;
        *) return 0 ;;
    esac
    local host; host=$(rustc +stable -vV | sed -n 's/^host: //p')
    say "naming the installed stable Rust $want as toolchain $want-$host"
    ln -s "$(rustc +stable --print sysroot)" "$(rustup show home)/toolchains/$want-$host"
}

# Everything a fresh machine lacks: the pinned Rust toolchain's name, Debian
# packages, cargo-pgrx, pgrx's configuration for the system PostgreSQL 15,
# and a Python venv for the client tests and the demo. Each step is skipped
# when already done.
setup() {
    link_toolchain
    local pkgs="postgresql-15 postgresql-server-dev-15 postgresql-contrib libclang-dev clang sudo pkg-config python3-venv"
    local missing=""
    for p in $pkgs; do
        dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        say "installing Debian packages:$missing"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    fi
    # Debian's postgresql package starts a cluster on port 5432; ours use
    # their own ports and never touch it.

    local want; want=$(pgrx_version)
    if ! cargo pgrx --version 2>/dev/null | grep -q " $want\$"; then
        say "installing cargo-pgrx $want"
        cargo install cargo-pgrx --version "$want" --locked
    fi
    if ! grep -qs '^pg15' "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
        say "configuring pgrx for the system PostgreSQL 15"
        cargo pgrx init --pg15 "$PG_CONFIG"
    fi
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import psycopg, pytest, rfc8785' 2>/dev/null; then
        say "creating the Python environment for the demo and client tests"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q -r "$ROOT/tests/client/requirements.txt"
    fi
}

# Builds the extension in release mode and installs it into the system
# PostgreSQL 15.
install_extension() {
    say "building and installing the extension"
    (cd "$ROOT" && cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null)
}

# previous_release: the version this one upgrades from, named by the newest
# update script sql/idempotency--PREVIOUS--CURRENT.sql.
previous_release() {
    local current
    current=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -1)
    (cd "$ROOT/sql" && ls idempotency--*--"$current".sql 2>/dev/null) |
        sed -n 's/^idempotency--\(.*\)--.*\.sql$/\1/p' | sort -V | tail -1
}

# install_release VERSION: builds the release tagged vVERSION from this
# repository's history (fetching the tag from origin when a clone lacks it)
# and installs it beside the current version: its library has a file name of
# its own, and its install script is idempotency--VERSION.sql. The control
# file then names VERSION as the default version, so install_extension must
# run after it.
install_release() {
    local version=$1 tag=v$1
    local src=$ROOT/target/releases/$version
    say "building and installing release $version (tag $tag)"
    if ! git -C "$ROOT" rev-parse -q --verify "$tag^{commit}" >/dev/null; then
        git -C "$ROOT" fetch -q origin "refs/tags/$tag:refs/tags/$tag"
    fi
    rm -rf "$src"
    mkdir -p "$src"
    git -C "$ROOT" archive "$tag" | tar -x -C "$src"
    (cd "$src" && CARGO_TARGET_DIR=$ROOT/target/releases/target \
        cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null)
}

# start_cluster DIR PORT [bench]: a throwaway cluster owned by the postgres
# user, listening only on a socket in DIR. Test clusters skip fsync; the
# bench profile keeps it and sizes memory and WAL like a small server, with
# synchronous_commit off so that the figures measure CPU work rather than the
# disk's flush latency, which every variant pays alike, and autovacuum off:
# the runner vacuums and analyzes between runs, and a worker waking in the
# middle of one variant's run would charge it to that variant. Prints
# nothing on success.
start_cluster() {
    local dir=$1 port=$2 profile=${3:-test}
    stop_cluster "$dir"
    rm -rf "$dir"
    mkdir -p "$dir"
    chown postgres:postgres "$dir"
    runuser -u postgres -- "$PG_BIN/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log"
    cat >>"$dir/data/postgresql.conf" <<CONF
listen_addresses = ''
port = $port
unix_socket_directories = '$dir'
max_prepared_transactions = 10
CONF
    if [ "$profile" = bench ]; then
        cat >>"$dir/data/postgresql.conf" <<CONF
shared_buffers = 2GB
synchronous_commit = off
max_wal_size = 16GB
checkpoint_timeout = 30min
autovacuum = off
CONF
    else
        echo "fsync = off" >>"$dir/data/postgresql.conf"
    fi
    # RUST_BACKTRACE is set, as on a server started by hand from a shell
    # that has it: errors must still reach clients without a Rust
    # backtrace in their DETAIL (every expected output shows that).
    env -u RUST_LIB_BACKTRACE RUST_BACKTRACE=1 \
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
}

# start_standby PRIMARY_DIR DIR PORT: a hot standby of the cluster in
# PRIMARY_DIR (started by start_cluster), streaming from it, listening only
# on a socket in DIR. Its server log is DIR/server.log.
start_standby() {
    local primary=$1 dir=$2 port=$3
    local primary_port
    primary_port=$(sed -n 's/^port = //p' "$primary/data/postgresql.conf" | tail -1)
    stop_cluster "$dir"
    rm -rf "$dir"
    mkdir -p "$dir"
    chown postgres:postgres "$dir"
    runuser -u postgres -- "$PG_BIN/pg_basebackup" -h "$primary" -p "$primary_port" -U postgres \
        -D "$dir/data" -R -X stream >"$dir/basebackup.log" 2>&1
    cat >>"$dir/data/postgresql.conf" <<CONF
port = $port
unix_socket_directories = '$dir'
hot_standby = on
CONF
    env -u RUST_LIB_BACKTRACE RUST_BACKTRACE=1 \
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
}

stop_cluster() {
    local dir=$1
    if [ -f "$dir/data/postmaster.pid" ]; then
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
}

# check_server_log DIR: fails when the server log of the cluster in DIR
# (start_cluster writes it to DIR/server.log) shows a crash: a backend or
# other child terminated by a signal (SIGSEGV, SIGABRT, SIGKILL...) or by an
# exception, or a PANIC. Each such line is printed with the 20 lines before
# it and the one after (the query that process was running). Tests can pass
# while a backend crashed (the postmaster restarts and the next connection
# succeeds), so the tiers call this after their cluster has stopped.
# stop_cluster's immediate shutdown logs no such line: the postmaster does
# not report its children's exits once it is shutting down. Backends ended
# by pg_terminate_backend exit; they are not killed by a signal.
#
# check_server_log DIR KILLS: the same, except that up to KILLS backends
# "terminated by signal 9: Killed" are the SIGKILLs a test sent on purpose
# (more than it sent is a failure, and so is any other signal).
check_server_log() {
    local log=$1/server.log allowed=${2:-0}
    local crash='\(PID [0-9]+\) was terminated by (signal|exception)|PANIC:  '
    local killed='\(PID [0-9]+\) was terminated by signal 9: Killed'
    if [ ! -f "$log" ]; then
        echo "check_server_log: no server log at $log" >&2
        return 2
    fi
    local kills
    kills=$(grep -cE "$killed" "$log" || true)
    if [ "$kills" -gt "$allowed" ]; then
        say "$kills backends were killed, $allowed on purpose: $log"
        grep -nE -B20 -A1 "$killed" "$log" | tail -100
        return 1
    fi
    if grep -vE "$killed" "$log" | grep -qE "$crash"; then
        say "the server crashed: $log"
        grep -nE -B20 -A1 "$crash" "$log" | grep -vE "$killed" | head -200
        return 1
    fi
}
