"""A server of a test module's own, with the installed library in
shared_preload_libraries (the purge worker and the counters of idem_stats()
exist only then): what the purge worker's test modules share.

Run by the client tier with IDEM_PG_BIN naming the server's binaries.
"""
import os
import re
import shutil
import subprocess
import time

import psycopg
import pytest

PG_BIN = os.environ.get("IDEM_PG_BIN", "/usr/lib/postgresql/15/bin")
# What a server log must never show: a child of the postmaster that
# crashed, or a PANIC. A SIGKILL sent on purpose is counted apart.
CRASH = re.compile(r"terminated by signal|terminated by exception|PANIC")
KILLED = re.compile(r"terminated by signal 9: Killed")


def pg_config(option):
    return subprocess.run([os.path.join(PG_BIN, "pg_config"), option], check=True, capture_output=True,
                          text=True).stdout.strip()


def installed_version():
    """The version CREATE EXTENSION installs (the control file's), or None."""
    if not os.path.exists(os.path.join(PG_BIN, "pg_config")):
        return None
    control = os.path.join(pg_config("--sharedir"), "extension", "idempotency.control")
    if not os.path.exists(control):
        return None
    with open(control) as f:
        found = re.search(r"^default_version\s*=\s*'([^']+)'", f.read(), re.M)
    return found and found.group(1)


def as_postgres(*cmd, check=True):
    # As scripts/lib.sh starts its clusters: with RUST_BACKTRACE set, as a
    # server started by hand from a shell that has it.
    env = {k: v for k, v in os.environ.items() if k != "RUST_LIB_BACKTRACE"}
    env["RUST_BACKTRACE"] = "1"
    return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=check, capture_output=True, env=env)


def crashes(log, kills=0):
    """The crash lines of a server log, less up to `kills` SIGKILLs sent on
    purpose (more than that are crashes too)."""
    with open(log, encoding="utf-8", errors="replace") as f:
        found = [line.rstrip() for line in f if CRASH.search(line)]
    killed = [line for line in found if KILLED.search(line)]
    others = [line for line in found if not KILLED.search(line)]
    return others + (killed if len(killed) > kills else [])


class Server:
    def __init__(self, version, data, log, socket, port):
        self.version = version
        self.data, self.log, self.socket, self.port = data, log, socket, port
        self.pg_ctl = os.path.join(PG_BIN, "pg_ctl")
        # Processes killed with SIGKILL on purpose.
        self.kills = 0

    def connect(self, dbname="postgres", user="postgres"):
        return psycopg.connect(host=self.socket, port=self.port, user=user, dbname=dbname, autocommit=True)

    def start(self):
        as_postgres(self.pg_ctl, "-D", self.data, "-l", self.log, "-w", "start")

    def restart(self):
        # -l again: the restarted server appends to the same log.
        as_postgres(self.pg_ctl, "-D", self.data, "-l", self.log, "-m", "fast", "-w", "restart")

    def stop(self, mode="fast"):
        subprocess.run(["runuser", "-u", "postgres", "--", self.pg_ctl, "-D", self.data, "-m", mode, "-w", "stop"],
                       capture_output=True)

    def crashes(self):
        return crashes(self.log, self.kills)

    def log_mark(self):
        """Where the server log ends now, for log_since."""
        return os.path.getsize(self.log)

    def log_since(self, mark):
        with open(self.log, encoding="utf-8", errors="replace") as f:
            f.seek(mark)
            return f.read().splitlines()


def start(directory, port, settings, leftovers=()):
    """A fresh cluster in `directory` (its data in data/, its log
    server.log, its socket the directory itself) on `port`, with the
    library preloaded and `settings` (postgresql.conf lines) added, started.
    Servers a previous run left in data/ or in the `leftovers` data
    directories are stopped first. Skips the test module where the
    installed extension has no purge worker (before 0.4.0)."""
    version = installed_version()
    if version is None:
        pytest.skip("the extension is not installed for this server")
    if tuple(int(p) for p in re.findall(r"\d+", version)[:3]) < (0, 4, 0):
        pytest.skip(f"the installed extension ({version}) has no purge worker")
    if not os.path.exists(os.path.join(pg_config("--pkglibdir"), f"idempotency-{version}.so")):
        pytest.skip(f"the library idempotency-{version} is not installed for this server")
    data = os.path.join(directory, "data")
    srv = Server(version, data, os.path.join(directory, "server.log"), directory, port)
    for old in (*leftovers, data):
        if os.path.exists(os.path.join(old, "postmaster.pid")):
            subprocess.run(["runuser", "-u", "postgres", "--", srv.pg_ctl, "-D", old, "-m", "immediate", "stop"],
                           capture_output=True)
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    shutil.chown(directory, "postgres", "postgres")
    as_postgres(os.path.join(PG_BIN, "initdb"), "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                "--locale=C.UTF-8")
    with open(os.path.join(data, "postgresql.conf"), "a") as conf:
        conf.write(f"listen_addresses = ''\nport = {port}\nunix_socket_directories = '{directory}'\nfsync = off\n"
                   f"shared_preload_libraries = 'idempotency-{version}'\n" + settings)
    srv.start()
    return srv


def retry_missing_files(step):
    """Runs step(), which creates or loads the extension. Its files may be
    reinstalled while this runs (a build being installed for another test
    tier): a missing file is retried."""
    for attempt in range(10):
        try:
            return step()
        except psycopg.OperationalError:
            if attempt == 9:
                raise
            time.sleep(1)


def create_extension(conn):
    """CREATE EXTENSION in public."""
    retry_missing_files(lambda: conn.execute("CREATE EXTENSION idempotency SCHEMA public"))
