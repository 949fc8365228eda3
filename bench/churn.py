"""Churn: keys written, expired and purged cycle after cycle, and what that
does to the size of idempotency.keys and to the job's throughput. Runs
against a running cluster (PG* variables), like bench/run.py, and empties
idempotency.keys first: run it on a throwaway cluster.

Size (the default): keys are written in generations of --keys / --cycles
through the job's path (bench/workloads/churn_job.sql under pgbench:
idem_begin and idem_finish with a ttl of --ttl seconds, a transaction a
key; with --lease, churn_lease.sql: a lease's claim, then its finish), one
generation every --ttl / (--generations + 1/2) seconds. After the first
--generations (the warm-up), each cycle writes a generation; the oldest
expires once it is written, and is purged: --purge worker waits for the
background worker (it runs every --purge-interval), --purge manual calls
idem_purge(--batch-size) in a loop, --purge-delay ms apart, as the worker
does; autovacuum has the rest of the cycle. The table thus always holds
--generations of live keys among the space that purged ones leave, as a
live system's does, and a purge deletes 1 / (--generations + 1) of its
rows. Prints the table's size (heap, indexes
and TOAST) after each cycle and the ratio of the last cycle's to the
first's, and exits 1 when the ratio passes --max-ratio or an expired key was
left.

Throughput (--throughput): the job workload (job_ours.sql, its keys living
--job-ttl seconds) for --seconds alone, with the purge deleting its keys as
they expire, and with the purge working through a backlog of --backlog
expired keys, in --rounds interleaved rounds; prints the job's tps, its
ratio to the job alone, and the purge's keys per second.

Autovacuum is what gives a purged table's space back: the runner turns it
on, with autovacuum_naptime = --naptime, through ALTER SYSTEM (the bench
profile of scripts/lib.sh starts clusters with it off), and sets the
table's storage parameters given by --storage; both are put back at exit.
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

import psycopg

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = os.path.join(HERE, "workloads")


def connect():
    return psycopg.connect(autocommit=True)


def one(conn, sql, params=None):
    return conn.execute(sql, params).fetchone()


def mib(n):
    return n / 1024 / 1024


def duration(seconds):
    """A whole number of seconds as SHOW prints a time setting: the largest
    unit that divides it."""
    if seconds == 0:
        return "0"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class Settings:
    """Server settings changed through ALTER SYSTEM, and the key table's
    storage parameters, each put back as it was by restore()."""

    def __init__(self, conn):
        self.conn = conn
        self.system = {}  # name -> its line in postgresql.auto.conf before (None: none)
        self.reloptions = None

    def set(self, name, value):
        """ALTER SYSTEM SET name = value (as SHOW prints it), and waits until
        the reload has reached this session."""
        if name not in self.system:
            row = one(self.conn, "SELECT setting FROM pg_file_settings WHERE name = %s AND "
                      "sourcefile LIKE '%%/postgresql.auto.conf' ORDER BY seqno DESC LIMIT 1", (name,))
            self.system[name] = row[0] if row else None
        self.conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        self.conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while one(self.conn, "SELECT current_setting(%s)", (name,))[0] != value:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} is not {value!r} 10 s after pg_reload_conf()")
            time.sleep(0.05)

    def storage(self, options):
        """ALTER TABLE idempotency.keys SET (options)."""
        if self.reloptions is None:
            self.reloptions = self.table_options()
        self.conn.execute(f"ALTER TABLE idempotency.keys SET ({options})")

    def table_options(self):
        return one(self.conn, "SELECT coalesce(reloptions, '{}') FROM pg_class "
                   "WHERE oid = 'idempotency.keys'::regclass")[0]

    def restore(self):
        for name, value in self.system.items():
            if value is None:
                self.conn.execute(f"ALTER SYSTEM RESET {name}")
            else:
                self.conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        if self.system:
            self.conn.execute("SELECT pg_reload_conf()")
        if self.reloptions is not None:
            names = [o.split("=", 1)[0] for o in self.table_options()]
            if names:
                self.conn.execute(f"ALTER TABLE idempotency.keys RESET ({', '.join(names)})")
            if self.reloptions:
                self.conn.execute(f"ALTER TABLE idempotency.keys SET ({', '.join(self.reloptions)})")


def pgbench(script, clients, *, transactions=None, seconds=None, defines=(), env=None):
    """Runs pgbench once; returns (tps, transactions processed). A failed
    transaction fails the run."""
    cmd = ["pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)),
           "-f", os.path.join(WORKLOADS, script)]
    cmd += ["-t", str(transactions)] if transactions else ["-T", str(seconds)]
    for d in defines:
        cmd += ["-D", d]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"pgbench {script} failed:\n{p.stdout}{p.stderr}")
    out = p.stdout
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if failed and int(failed.group(1)):
        raise RuntimeError(f"{script}: {failed.group(1)} failed transactions\n{out}")
    tps = float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", out).group(1))
    done = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    return tps, done


def sizes(conn):
    """(heap, indexes, total with TOAST) of idempotency.keys, in bytes."""
    return one(conn, "SELECT pg_relation_size('idempotency.keys'), pg_indexes_size('idempotency.keys'), "
                     "pg_total_relation_size('idempotency.keys')")


def table_stats(conn):
    """Autovacuum's vacuums and analyzes of idempotency.keys, its updates
    and HOT updates so far, as the statistics say now."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return one(conn, "SELECT autovacuum_count, autoanalyze_count, n_tup_upd, n_tup_hot_upd "
                     "FROM pg_stat_user_tables WHERE relid = 'idempotency.keys'::regclass")


def keys_purged(conn):
    """Keys purged so far in the whole cluster (idem_stats, release 0.4.0):
    the runner's database should be the only one with keys."""
    return one(conn, "SELECT keys_purged FROM idem_stats()")[0]


class ManualPurge(threading.Thread):
    """The worker's purge from a client, on a connection of its own: a run
    calls idem_purge(batch), delay ms apart, until a call deletes fewer than
    a batch. once=True: one run; otherwise a run every interval seconds
    until stop()."""

    def __init__(self, batch, delay_ms, once, interval=1.0):
        super().__init__(daemon=True)
        self.batch, self.delay, self.once, self.interval = batch, delay_ms / 1000, once, interval
        self.stopping = threading.Event()
        self.deleted = 0
        self.first = self.last = None  # when the first deleting call started, and the last one ended
        self.error = None

    def run(self):
        try:
            with connect() as c:
                while not self.stopping.is_set():
                    while not self.stopping.is_set():
                        start = time.monotonic()
                        n = one(c, "SELECT idem_purge(%s)", (self.batch,))[0]
                        if n:
                            if self.first is None:
                                self.first = start
                            self.last = time.monotonic()
                            self.deleted += n
                        if n < self.batch:
                            break
                        self.stopping.wait(self.delay)
                    if self.once:
                        return
                    self.stopping.wait(self.interval)
        except Exception as e:  # reported by the caller
            self.error = e

    def stop(self):
        self.stopping.set()
        self.join()
        if self.error:
            raise self.error


def check_worker(conn):
    """The worker mode needs release 0.4.0 preloaded: idem_stats() errors
    (55000) otherwise."""
    version = one(conn, "SELECT extversion FROM pg_extension WHERE extname = 'idempotency'")[0]
    try:
        keys_purged(conn)
    except psycopg.Error as e:
        sys.exit(f"--purge worker needs the extension (installed: {version}) preloaded "
                 f"(shared_preload_libraries): {e.diag.message_primary}")


def size_run(args, conn, settings):
    """Generations of keys, one written per cycle, each living --ttl: after
    the first --generations (the warm-up), each cycle writes a generation
    and purges the one that has just expired, so that the table always
    holds live keys among the space purged ones leave, as a live system's
    does."""
    per_gen = args.keys // args.cycles
    if per_gen * args.cycles != args.keys or per_gen % args.clients:
        sys.exit("--keys must be a multiple of --cycles x --clients")
    workload = "churn_lease.sql" if args.lease else "churn_job.sql"
    # A generation is written every period; the oldest expires half a
    # period after the newest was started: once it is written, so that a
    # cycle's steps come one after the other, and autovacuum has the rest
    # of the cycle to take back the purged rows.
    period = args.ttl / (args.generations + 0.5)
    ttl_ms = int(args.ttl * 1000)
    conn.execute("TRUNCATE idempotency.keys")
    if args.purge == "worker":
        settings.set("idempotency.purge_interval", duration(args.purge_interval))
        purged_base = keys_purged(conn)
    print(f"# Churn: {args.keys:,} keys written and purged in {args.cycles} cycles, purge: {args.purge}\n")
    print(describe(conn, args))
    print(f"A generation of {per_gen:,} keys every {period:.1f} s, each key living {args.ttl:g} s: "
          f"{args.generations} generation(s) written first, then a cycle writes one and purges the one "
          f"that expired. Sizes: table + indexes + TOAST. The worker purges keys as they expire; "
          f"'purged within' is the time from the last key's expiry to the purge's end, or the time "
          f"idem_purge took in the manual mode.\n")
    print("| cycle | write tps | purged | purged within s | purge keys/s | size after writes MiB | "
          "heap MiB | indexes MiB | size after purge MiB | autovacuums | HOT updates |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    ends = []  # when each generation's writes ended: its keys have all expired ttl later
    start = time.monotonic()
    stats_before = table_stats(conn)
    for gen in range(args.cycles + args.generations):
        time.sleep(max(0.0, start + gen * period - time.monotonic()))
        began = time.monotonic()
        tps, written = pgbench(workload, args.clients, transactions=per_gen // args.clients,
                               defines=[f"gen={gen}", f"ttl_ms={ttl_ms}"])
        ends.append(time.monotonic())
        if ends[-1] - began > period * 0.4:
            print(f"warning: generation {gen} took {ends[-1] - began:.1f} s to write, most of half a cycle "
                  f"({period:g} s): raise --ttl", file=sys.stderr)
        if gen < args.generations:
            continue
        cycle = gen - args.generations + 1
        heap_w, indexes_w, total_w = sizes(conn)
        # The generation written a ttl before has expired once the ttl has
        # passed since its last key was written.
        expired = ends[gen - args.generations] + args.ttl + 0.02
        time.sleep(max(0.0, expired - time.monotonic()))
        if args.purge == "manual":
            purge = ManualPurge(args.batch_size, args.purge_delay, once=True)
            purge.start()
            purge.join()
            if purge.error:
                raise purge.error
            purged = purge.deleted
            purge_seconds = purge.last - purge.first if purge.first else 0.0
        else:
            # keys_purged counts a batch once committed: when it has grown
            # by a generation, no expired key is left.
            deadline = time.monotonic() + args.timeout
            while (purged := keys_purged(conn) - purged_base - (cycle - 1) * per_gen) < per_gen:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            purge_seconds = time.monotonic() - expired
        heap, indexes, total = sizes(conn)
        expired_left, stored = one(conn, "SELECT count(*) FILTER (WHERE expires_at < clock_timestamp()), "
                                         "count(*) FROM idempotency.keys")
        stats = table_stats(conn)
        autovacuums = stats[0] - stats_before[0]
        updates = stats[2] - stats_before[2]
        hot = (stats[3] - stats_before[3]) / updates if updates else None
        stats_before = stats
        row = dict(cycle=cycle, written=written, write_tps=tps, purged=purged, purge_seconds=purge_seconds,
                   expired_left=expired_left, stored=stored, heap_after_writes=heap_w,
                   indexes_after_writes=indexes_w, total_after_writes=total_w, heap=heap, indexes=indexes,
                   total=total, autovacuums=autovacuums, hot=hot)
        rows.append(row)
        rate = f"{purged / purge_seconds:,.0f}" if args.purge == "manual" and purge_seconds else "-"
        hot_cell = "-" if hot is None else f"{hot:.0%}"
        print(f"| {cycle} | {tps:,.0f} | {purged:,} | {purge_seconds:.2f} | {rate} | {mib(total_w):.1f} | "
              f"{mib(heap):.1f} | {mib(indexes):.1f} | {mib(total):.1f} | {autovacuums} | {hot_cell} |", flush=True)
        if stored != args.generations * per_gen:
            sys.exit(f"{stored:,} keys stored after cycle {cycle}'s purge, not {args.generations * per_gen:,}: "
                     f"keys expired before their cycle (raise --ttl) or were not purged")
    first, last = rows[0], rows[-1]
    ratio = last["total"] / first["total"]
    peak = max(r["total_after_writes"] for r in rows) / first["total_after_writes"]
    unpurged = sum(r["expired_left"] for r in rows) + sum(per_gen - r["purged"] for r in rows)
    ok = ratio <= args.max_ratio and unpurged == 0
    print()
    print(f"- after the last cycle / after the first: **{ratio:.2f} x** (at most {args.max_ratio:.2f} x) "
          f"{'met' if ratio <= args.max_ratio else 'MISSED'}; heap {mib(first['heap']):.1f} -> "
          f"{mib(last['heap']):.1f} MiB, indexes {mib(first['indexes']):.1f} -> {mib(last['indexes']):.1f} MiB; "
          f"the largest size after a cycle's writes / the first's: {peak:.2f} x")
    print(f"- purged {sum(r['purged'] for r in rows):,} of the {args.keys:,} keys that expired; "
          f"expired keys left after a purge: {sum(r['expired_left'] for r in rows)}")
    result = dict(mode="size", purge=args.purge, keys=args.keys, cycles=args.cycles, ttl=args.ttl,
                  generations=args.generations, storage=settings.table_options(), naptime=args.naptime,
                  rows=rows, ratio=ratio, peak_ratio=peak, unpurged=unpurged, max_ratio=args.max_ratio, ok=ok)
    return result, ok


def describe(conn, args):
    row = one(conn, "SELECT current_setting('server_version'), current_setting('shared_buffers'), "
                    "current_setting('autovacuum_naptime'), current_setting('autovacuum_vacuum_cost_delay'), "
                    "current_setting('autovacuum_vacuum_cost_limit'), "
                    "(SELECT extversion FROM pg_extension WHERE extname = 'idempotency'), "
                    "(SELECT coalesce(array_to_string(reloptions, ', '), '') FROM pg_class "
                    "  WHERE oid = 'idempotency.keys'::regclass)")
    text = (f"PostgreSQL {row[0]}, shared_buffers={row[1]}, extension {row[5]}; autovacuum on, "
            f"naptime {row[2]}, cost_delay {row[3]}, cost_limit {row[4]}; idempotency.keys: {row[6]}; "
            f"{args.clients} clients")
    if args.purge == "worker":
        batch = one(conn, "SELECT current_setting('idempotency.purge_batch_size'), "
                          "current_setting('idempotency.purge_delay')")
        text += f"; worker every {duration(args.purge_interval)}, batches of {batch[0]}, {batch[1]} apart"
    else:
        text += f"; idem_purge({args.batch_size}) {args.purge_delay} ms apart"
    return text + "\n"


def throughput_run(args, conn, settings):
    """The job's throughput alone, with its keys expiring and purged as
    they expire, and with a backlog of expired keys purged beside it."""
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", os.path.join(HERE, "setup.sql")],
                   check=True, capture_output=True, text=True)
    if args.purge == "worker":
        settings.set("idempotency.purge_interval", "0")
    # The job's keys live --job-ttl seconds: idempotency.ttl for pgbench's
    # sessions, so that job_ours.sql runs unchanged.
    job_env = dict(os.environ, PGOPTIONS=f"{os.environ.get('PGOPTIONS', '')} -c idempotency.ttl={args.job_ttl}s")

    def reset(backlog):
        """Every variant starts from the benchmark's 100 000 live keys
        (bench/setup.sql), plus `backlog` expired ones, vacuumed and
        analyzed. The backlog goes in by INSERT, as finished jobs' keys
        (the job's path would take minutes for millions)."""
        conn.execute("TRUNCATE bench_business")
        conn.execute("DELETE FROM idempotency.keys WHERE key LIKE 'job:%' OR key LIKE 'churn:%'")
        if backlog:
            conn.execute("""INSERT INTO idempotency.keys (scope, key, status, attempt, created_at, finished_at,
                                                          expires_at, result, owner)
                            SELECT '', 'churn:' || i, 'c', 1, now(), now(), now() - interval '1 second',
                                   '{"charge_id": 991}', current_user
                              FROM generate_series(1, %s) i""", (backlog,))
        conn.execute("VACUUM ANALYZE idempotency.keys, bench_business")

    def job(expiring):
        return pgbench("job_ours.sql", args.clients, seconds=args.seconds, env=job_env if expiring else None)[0]

    def alone():
        reset(0)
        return job(True), None

    def with_purge(backlog):
        """The job beside the purge: of its own keys as they expire, or of
        a backlog (the job's keys then live a day, the default, so that
        the purge's time is the backlog's)."""
        reset(backlog)
        start = time.monotonic()
        if args.purge == "manual":
            purge = ManualPurge(args.batch_size, args.purge_delay, once=False, interval=args.purge_interval)
            purge.start()
            tps = job(not backlog)
            end = time.monotonic()
            purge.stop()
            deleted = purge.deleted
            busy = (purge.last - purge.first) if purge.first else 0.0
        else:
            samples = []
            stop = threading.Event()

            def sample():
                with connect() as c:
                    while not stop.is_set():
                        samples.append((time.monotonic(), keys_purged(c)))
                        stop.wait(0.1)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            settings.set("idempotency.purge_interval", duration(args.purge_interval))
            tps = job(not backlog)
            end = time.monotonic()
            settings.set("idempotency.purge_interval", "0")
            stop.set()
            sampler.join()
            first, final = samples[0][1], samples[-1][1]
            deleted = final - first
            # Busy from the last sample before the first deletion to the
            # first sample that shows the last one.
            began = max(t for t, v in samples if v == first)
            ended = min(t for t, v in samples if v == final)
            busy = ended - began if deleted else 0.0
        left = one(conn, "SELECT count(*) FROM idempotency.keys WHERE key LIKE 'churn:%'")[0]
        return tps, dict(deleted=deleted, busy=busy, run=end - start, backlog_left=left,
                         finished_early=bool(backlog) and left == 0 and busy < end - start - 1)

    variants = {"job alone": alone,
                "job + purge of its expiring keys": lambda: with_purge(0),
                f"job + purge of {args.backlog:,} expired keys": lambda: with_purge(args.backlog)}
    print(f"# Churn: the job's throughput with the purge ({args.purge}) beside it\n")
    print(describe(conn, args))
    print(f"{args.rounds} rounds of {args.seconds} s per variant, interleaved (order reversed every other "
          f"round); the job's keys live {args.job_ttl} s (idempotency.ttl), beside the backlog a day; every "
          f"variant starts from 100 000 live keys\n")
    tps = {name: [] for name in variants}
    purges = {name: [] for name in variants}
    for r in range(args.rounds):
        order = list(variants.items())
        if r % 2:
            order.reverse()
        for name, run in order:
            t, p = run()
            tps[name].append(t)
            if p:
                p["rate"] = p["deleted"] / p["busy"] if p["busy"] else 0.0
                purges[name].append(p)
    print("| variant | job tps (median) | / job alone (median of rounds) | per round | keys purged "
          "(median) | purge busy s | purge keys/s |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    result = dict(mode="throughput", purge=args.purge, seconds=args.seconds, rounds=args.rounds,
                  backlog=args.backlog, job_ttl=args.job_ttl, variants={})
    base = tps["job alone"]
    for name in variants:
        ratios = [a / b for a, b in zip(tps[name], base)]
        ps = purges[name]
        row = dict(tps=tps[name], ratios=ratios, ratio=statistics.median(ratios), purges=ps)
        cells = ["", "", ""]
        if ps:
            row["rate"] = statistics.median(p["rate"] for p in ps)
            cells = [f"{statistics.median(p['deleted'] for p in ps):,.0f}",
                     f"{statistics.median(p['busy'] for p in ps):.1f}", f"{row['rate']:,.0f}"]
        result["variants"][name] = row
        print(f"| {name} | {statistics.median(tps[name]):,.0f} | {row['ratio']:.2f} | "
              f"{', '.join(f'{x:.2f}' for x in ratios)} | {' | '.join(cells)} |")
    print()
    for name, row in result["variants"].items():
        if name != "job alone":
            print(f"- {name} / job alone: **{row['ratio']:.3f} x** (target {args.min_tps_ratio:.2f} x) "
                  f"{'met' if row['ratio'] >= args.min_tps_ratio else 'MISSED'}")
    backlog = purges[f"job + purge of {args.backlog:,} expired keys"]
    print(f"- purge throughput beside the job, on the backlog: **{result['variants'][f'job + purge of {args.backlog:,} expired keys']['rate']:,.0f} keys/s** "
          f"(deleted / the time from its first deletion to its last)")
    if any(p["finished_early"] for p in backlog):
        print(f"- the backlog was gone more than a second before the end of the run in "
              f"{sum(p['finished_early'] for p in backlog)} of {len(backlog)} rounds (purge busy "
              f"{statistics.median(p['busy'] for p in backlog):.1f} s, median, of {args.seconds} s): the job "
              f"ran the rest alone (raise --backlog)")
    return result, True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000, help="keys written in all (default 1 000 000)")
    ap.add_argument("--cycles", type=int, default=10, help="write-expire-purge cycles (default 10)")
    ap.add_argument("--purge", choices=["worker", "manual"], default="worker",
                    help="worker: the background worker purges (0.4.0, preloaded); manual: idem_purge in a loop")
    ap.add_argument("--ttl", type=float, default=90,
                    help="the keys' ttl in seconds (default 90); a cycle lasts ttl / (generations + 1/2)")
    ap.add_argument("--generations", type=int, default=1,
                    help="generations of keys alive at once (default 1): a purge deletes 1 / (generations + 1) "
                         "of the rows")
    ap.add_argument("--lease", action="store_true",
                    help="write keys in lease mode (claim committed, then finished): an update a key")
    ap.add_argument("--clients", type=int, default=4, help="pgbench clients (default 4)")
    ap.add_argument("--max-ratio", type=float, default=1.5,
                    help="largest size of the last cycle / the first accepted (default 1.5)")
    ap.add_argument("--batch-size", type=int, default=10000, help="manual: idem_purge's batch (default 10000)")
    ap.add_argument("--purge-delay", type=float, default=10,
                    help="manual: ms between idem_purge calls (default 10, the worker's purge_delay)")
    ap.add_argument("--purge-interval", type=int, default=1,
                    help="worker: idempotency.purge_interval in seconds while purging (default 1)")
    ap.add_argument("--naptime", type=int, default=5, help="autovacuum_naptime in seconds (default 5)")
    ap.add_argument("--storage", default="",
                    help="storage parameters of idempotency.keys for the run, e.g. "
                         "'fillfactor=90, autovacuum_vacuum_scale_factor=0.01'")
    ap.add_argument("--timeout", type=float, default=600, help="worker: seconds to wait for a purge (default 600)")
    ap.add_argument("--throughput", action="store_true", help="measure throughput instead of size")
    ap.add_argument("--seconds", type=int, default=15, help="throughput: seconds per run (default 15)")
    ap.add_argument("--rounds", type=int, default=3, help="throughput: rounds (default 3)")
    ap.add_argument("--job-ttl", type=int, default=1,
                    help="throughput: seconds the job's keys live (idempotency.ttl; default 1)")
    ap.add_argument("--backlog", type=int, default=1_000_000,
                    help="throughput: expired keys waiting for the purge (default 1 000 000)")
    ap.add_argument("--min-tps-ratio", type=float, default=0.9,
                    help="throughput: target of job + purge / job alone (default 0.9)")
    ap.add_argument("--json", help="also write the figures to this file as JSON")
    args = ap.parse_args()
    # Stopped by a signal, the run still puts the settings back.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with connect() as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS idempotency")
        if args.purge == "worker":
            check_worker(conn)
        settings = Settings(conn)
        try:
            settings.set("autovacuum", "on")
            settings.set("autovacuum_naptime", duration(args.naptime))
            if args.storage:
                settings.storage(args.storage)
            if args.throughput:
                result, ok = throughput_run(args, conn, settings)
            else:
                result, ok = size_run(args, conn, settings)
        finally:
            settings.restore()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
