"""Benchmarks of idempotency against the hand-written alternative and the
floor, driven by pgbench against a running cluster (PG* variables).

Each workload runs its variants side by side, several rounds interleaved,
and prints throughput, p50 and p99 latency per variant and the ratios the
project holds itself to. Usage: run.py --mode smoke|quick|full
"""
import argparse
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = os.path.join(HERE, "workloads")

MODES = {
    # seconds per run, rounds, clients, scale keys
    "smoke": dict(seconds=2, rounds=1, clients=2, scale_keys=10_000),
    "quick": dict(seconds=10, rounds=3, clients=4, scale_keys=1_000_000),
    "full": dict(seconds=15, rounds=10, clients=4, scale_keys=10_000_000),
}


def psql(sql):
    """Runs statements one by one (VACUUM cannot run in a transaction block);
    returns the output of the last one that prints."""
    p = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-f", "-"],
                       input=sql, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"psql failed: {p.stderr}\n{sql}")
    return p.stdout.strip()


def psql_file(path):
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", path], check=True,
                   capture_output=True, text=True)


def pgbench(script, seconds, clients):
    """Runs one pgbench measurement; returns (tps, p50 ms, p99 ms, transactions)."""
    logdir = tempfile.mkdtemp(prefix="idem-bench-")
    try:
        cmd = ["pgbench", "-n", "-M", "prepared", "-T", str(seconds), "-c", str(clients),
               "-j", str(min(clients, 2)), "-f", os.path.join(WORKLOADS, script),
               "-l", "--log-prefix", os.path.join(logdir, "tx")]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        tps = float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", out).group(1))
        failed = re.search(r"number of failed transactions: (\d+)", out)
        if failed and int(failed.group(1)):
            raise RuntimeError(f"{script}: {failed.group(1)} failed transactions\n{out}")
        latencies = []
        for path in glob.glob(os.path.join(logdir, "tx*")):
            with open(path) as f:
                for line in f:
                    latencies.append(int(line.split()[2]))
        latencies.sort()
        p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1000.0
        return tps, p(0.50), p(0.99), len(latencies)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


def compare(title, variants, mode, ratios, before_each=None):
    """Runs `variants` ({name: script}) interleaved for mode's rounds.
    `ratios` is a list of (label, numerator, denominator, target)."""
    cfg = MODES[mode]
    results = {name: [] for name in variants}
    for r in range(cfg["rounds"]):
        # Every other round runs the variants in reverse order, so that no
        # variant always runs first (or last) after the others.
        order = list(variants.items())
        if r % 2:
            order.reverse()
        for name, script in order:
            if before_each:
                before_each()
            results[name].append(pgbench(script, cfg["seconds"], cfg["clients"]))
    print(f"\n### {title}\n")
    print(f"{cfg['clients']} clients, {cfg['rounds']} rounds of {cfg['seconds']} s per variant, interleaved "
          f"(order reversed every other round); medians of the rounds\n")
    print("| variant | tps | p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: |")
    med = {}
    for name, runs in results.items():
        tps = statistics.median(x[0] for x in runs)
        p50 = statistics.median(x[1] for x in runs)
        p99 = statistics.median(x[2] for x in runs)
        med[name] = tps
        print(f"| {name} | {tps:,.0f} | {p50:.3f} | {p99:.3f} |")
    print()
    missed = []
    for label, num, den, target in ratios:
        # The ratio is taken within each round, where both variants ran
        # minutes apart at most, and the median of those is reported: the
        # machine's drift between rounds cancels out.
        per_round = [a[0] / b[0] for a, b in zip(results[num], results[den])]
        ratio = statistics.median(per_round)
        ok = ratio >= target
        if not ok:
            missed.append(label)
        rounds = ", ".join(f"{x:.2f}" for x in per_round)
        print(f"- {label}: **{ratio:.2f} x** (target {target:.2f} x) {'met' if ok else 'MISSED'}; "
              f"per round {rounds}; ratio of the median tps {med[num] / med[den]:.2f}")
    return missed


def reset_business():
    psql("TRUNCATE bench_business; DELETE FROM hw_keys WHERE key LIKE 'job:%' OR key LIKE 'jobb:%'; "
         "DELETE FROM idempotency.keys WHERE key LIKE 'job:%' OR key LIKE 'jobb:%'; "
         "VACUUM ANALYZE bench_business, hw_keys, idempotency.keys")


def load_replay_keys(n):
    psql(f"""DELETE FROM idempotency.keys WHERE key LIKE 'replay:%';
             INSERT INTO idempotency.keys (scope, key, status, attempt, created_at, finished_at, expires_at, result)
             SELECT '', 'replay:' || i, 'c', 1, now(), now(), now() + interval '1 year', '{{"charge_id": 991}}'
               FROM generate_series(1, {n}) i;
             TRUNCATE replay_results;
             INSERT INTO replay_results SELECT 'replay:' || i, 'completed', '{{"charge_id": 991}}'
               FROM generate_series(1, {n}) i;
             VACUUM ANALYZE idempotency.keys, replay_results""")


def load_replay_body_keys(n):
    """Completed keys whose request was the 2 kB body, in both stores, each
    with its own kind of fingerprint."""
    psql(f"""DELETE FROM idempotency.keys WHERE key LIKE 'replayb:%';
             INSERT INTO idempotency.keys (scope, key, status, attempt, created_at, finished_at, expires_at,
                                           result, fingerprint)
             SELECT '', 'replayb:' || i, 'c', 1, now(), now(), now() + interval '1 year',
                    '{{"charge_id": 991}}', f.fp
               FROM generate_series(1, {n}) i,
                    (SELECT decode(idem_fingerprint(body::jsonb), 'hex') AS fp FROM bench_bodies WHERE id = 1) f;
             DELETE FROM hw_keys WHERE key LIKE 'replayb:%';
             INSERT INTO hw_keys (key, status, result, request_hash, finished_at)
             SELECT 'replayb:' || i, 'completed', '{{"charge_id": 991}}', h.h, now()
               FROM generate_series(1, {n}) i,
                    (SELECT encode(sha256(convert_to(body::jsonb::text, 'UTF8')), 'hex') AS h
                       FROM bench_bodies WHERE id = 1) h;
             VACUUM ANALYZE idempotency.keys, hw_keys""")


def sizes_per_million(n):
    rel = psql("SELECT pg_relation_size('idempotency.keys'), pg_relation_size('idempotency.keys_pkey'), "
               "pg_total_relation_size('idempotency.keys')")
    heap, index, total = (int(x) for x in rel.split("|"))
    per = 1_000_000 / max(n, 1) / 1024 / 1024
    return heap * per, index * per, total * per


def section_1(mode, cfg):
    """A job in transaction mode."""
    missed = []
    missed += compare(
        "1. A job in transaction mode",
        {"floor (SELECT 1)": "job_floor.sql", "idempotency": "job_ours.sql", "hand-written": "job_handwritten.sql"},
        mode,
        [("idempotency / floor", "idempotency", "floor (SELECT 1)", 0.85),
         ("idempotency / hand-written", "idempotency", "hand-written", 1.2)],
        before_each=reset_business,
    )
    return missed


def section_2(mode, cfg):
    """Replay of a completed key."""
    missed = []
    load_replay_keys(100_000)
    missed += compare(
        "2. Replay of a completed key",
        {"primary-key SELECT": "replay_select.sql", "idempotency": "replay_ours.sql"},
        mode,
        [("idempotency / primary-key SELECT", "idempotency", "primary-key SELECT", 0.9)],
    )
    return missed


def section_3(mode, cfg):
    """idem_once."""
    missed = []
    missed += compare(
        "3. idem_once against INSERT ... ON CONFLICT DO NOTHING RETURNING",
        {"hand-written": "once_handwritten.sql", "idempotency": "once_ours.sql"},
        mode,
        [("idem_once / hand-written", "idempotency", "hand-written", 0.95)],
        before_each=lambda: psql("TRUNCATE hw_once; TRUNCATE idempotency.once; VACUUM ANALYZE hw_once, idempotency.once"),
    )
    return missed


def section_4(mode, cfg):
    """idem_upsert."""
    missed = []
    missed += compare(
        "4. idem_upsert against a prepared INSERT ... ON CONFLICT DO UPDATE (same table, 100 000 rows)",
        {"hand-written": "upsert_handwritten.sql", "idempotency": "upsert_ours.sql"},
        mode,
        [("idem_upsert / hand-written", "idempotency", "hand-written", 0.9)],
        before_each=lambda: psql("VACUUM ANALYZE bench_accounts"),
    )
    return missed


def section_5(mode, cfg):
    """Scale: the job against a table holding many keys."""
    missed = []
    # 5. Scale: workload 1 against a table already holding many keys.
    reset_business()
    empty = [pgbench("job_ours.sql", cfg["seconds"], cfg["clients"])[0]]
    n = cfg["scale_keys"]
    psql(f"""INSERT INTO idempotency.keys (scope, key, status, attempt, created_at, finished_at, expires_at, result)
             SELECT '', 'old:' || i, 'c', 1, now(), now(), now() + interval '1 year', '{{"charge_id": 991}}'
               FROM generate_series(1, {n}) i;
             VACUUM ANALYZE idempotency.keys""")
    heap, index, total = sizes_per_million(n + 100_000)
    full = []
    for _ in range(cfg["rounds"]):
        psql("TRUNCATE bench_business")
        full.append(pgbench("job_ours.sql", cfg["seconds"], cfg["clients"])[0])
        psql("DELETE FROM idempotency.keys WHERE key LIKE 'job:%'")
        psql("TRUNCATE bench_business")
        empty.append(pgbench("job_ours.sql", cfg["seconds"], cfg["clients"])[0])
        psql("DELETE FROM idempotency.keys WHERE key LIKE 'job:%'")
    ratio = statistics.median(full) / statistics.median(empty)
    print(f"\n### 5. Scale: {n:,} keys stored\n")
    print(f"| table | tps |\n| --- | ---: |\n| nearly empty | {statistics.median(empty):,.0f} |\n"
          f"| {n:,} keys | {statistics.median(full):,.0f} |\n")
    print(f"- with keys / empty: **{ratio:.2f} x** (target 0.80 x) {'met' if ratio >= 0.8 else 'MISSED'}")
    print(f"- per million keys: heap {heap:.0f} MiB, primary key index {index:.0f} MiB, total {total:.0f} MiB")
    if ratio < 0.8:
        missed.append("scale")
    psql("DELETE FROM idempotency.keys WHERE key LIKE 'old:%'")
    return missed


def section_6(mode, cfg):
    """Contention: 32 clients on 100 hot keys (a new set every 100 ms)."""
    missed = []
    # 6. Contention: 32 clients on 100 hot keys (a new set every 100 ms).
    psql("TRUNCATE bench_business; DELETE FROM idempotency.keys WHERE key LIKE 'hot:%'")
    tps, p50, p99, count = pgbench("contention_ours.sql", cfg["seconds"], 32)
    dup = psql("SELECT count(*) FROM (SELECT job_key FROM bench_business WHERE job_key LIKE 'hot:%' "
               "GROUP BY job_key HAVING count(*) > 1) d")
    started = psql("SELECT count(*) FROM bench_business WHERE job_key LIKE 'hot:%'")
    keys = psql("SELECT count(*) FROM idempotency.keys WHERE key LIKE 'hot:%' AND status = 'c'")
    print(f"\n### 6. Contention: 32 clients, 100 hot keys\n")
    print(f"| tps | p50 ms | p99 ms | jobs | keys started | keys started twice |\n| ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {tps:,.0f} | {p50:.3f} | {p99:.3f} | {count:,} | {started} | {dup} |")
    if dup != "0" or started != keys:
        print("CHECK FAILED: a hot key was started twice, or a start has no completed key")
        sys.exit(1)
    return missed


def section_7(mode, cfg):
    """Fingerprint of a 2 kB request (bench/setup.sql), parsed into jsonb on
    every call on both sides, as a client's request is."""
    return compare(
        "7. Fingerprint of a 2 kB request",
        {"sha256 of the jsonb text": "fingerprint_sha256.sql", "idem_fingerprint": "fingerprint_ours.sql"},
        mode,
        [("idem_fingerprint / sha256(convert_to(doc::text, 'UTF8'))", "idem_fingerprint",
          "sha256 of the jsonb text", 0.8)],
    )


def section_8(mode, cfg):
    """Replay with a 2 kB request."""
    load_replay_body_keys(100_000)
    return compare(
        "8. Replay with a 2 kB request",
        {"hand-written": "replay_body_handwritten.sql", "idempotency": "replay_body_ours.sql"},
        mode,
        [("replay with request: idempotency / hand-written", "idempotency", "hand-written", 1.0)],
    )


def section_9(mode, cfg):
    """A job with a 2 kB request."""
    return compare(
        "9. A job with a 2 kB request",
        {"hand-written": "job_body_handwritten.sql", "idempotency": "job_body_ours.sql"},
        mode,
        [("job with request: idempotency / hand-written", "idempotency", "hand-written", 1.3)],
        before_each=reset_business,
    )


def restart(preload):
    """Restarts the server with the library in shared_preload_libraries (so
    that every call counts in idem_stats(); the purge worker stays off) or
    without it (counting is skipped)."""
    version = psql("SELECT default_version FROM pg_available_extensions WHERE name = 'idempotency'")
    libraries = f"idempotency-{version}" if preload else ""
    # LOAD defines the extension's settings in this session, so that
    # ALTER SYSTEM knows them.
    # (SET to '' would name one library with an empty name: RESET.)
    psql(f"LOAD 'idempotency-{version}';\n"
         + (f"ALTER SYSTEM SET shared_preload_libraries = '{libraries}';\n" if preload
            else "ALTER SYSTEM RESET shared_preload_libraries;\n")
         + "ALTER SYSTEM SET idempotency.purge_interval = 0")
    subprocess.run(["runuser", "-u", "postgres", "--", os.path.join(os.environ["IDEM_PG_BIN"], "pg_ctl"),
                    "-D", os.environ["IDEM_BENCH_DATA"], "-l", os.environ["IDEM_BENCH_LOG"], "-w", "restart"],
                   check=True, capture_output=True)
    assert psql("SHOW shared_preload_libraries").strip('"') == libraries


def section_10(mode, cfg):
    """What counting costs: job and replay with the library preloaded
    (counting) and without (not counting), on the same server restarted."""
    if "IDEM_BENCH_DATA" not in os.environ:
        print("\n### 10. Counting in idem_stats()\n\nskipped: needs scripts/bench (it restarts the server)")
        return []
    load_replay_keys(100_000)
    workloads = {"job": "job_ours.sql", "replay": "replay_ours.sql"}
    results = {(w, p): [] for w in workloads for p in (False, True)}
    for r in range(cfg["rounds"]):
        order = [False, True] if r % 2 == 0 else [True, False]
        for preload in order:
            restart(preload)
            # A restarted server starts with cold caches: warm them first.
            for script in workloads.values():
                pgbench(script, 2, cfg["clients"])
            for name, script in workloads.items():
                if name == "job":
                    reset_business()
                results[(name, preload)].append(pgbench(script, cfg["seconds"], cfg["clients"]))
    restart(False)
    print("\n### 10. Counting in idem_stats()\n")
    print(f"{cfg['clients']} clients, {cfg['rounds']} rounds of {cfg['seconds']} s per variant; the server is "
          "restarted with or without the library preloaded before each variant (order reversed every other "
          "round); medians of the rounds\n")
    print("| workload | not preloaded tps | preloaded (counting) tps | counting / not, per round |")
    print("| --- | ---: | ---: | --- |")
    for name in workloads:
        off, on = results[(name, False)], results[(name, True)]
        per_round = [b[0] / a[0] for a, b in zip(off, on)]
        print(f"| {name} | {statistics.median(x[0] for x in off):,.0f} | "
              f"{statistics.median(x[0] for x in on):,.0f} | median {statistics.median(per_round):.2f} "
              f"({', '.join(f'{x:.2f}' for x in per_round)}) |")
    return []


SECTIONS = [section_1, section_2, section_3, section_4, section_5, section_6, section_7, section_8, section_9,
            section_10]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=MODES, default="quick")
    ap.add_argument("--only", default="", help="comma-separated section numbers (default: all)")
    args = ap.parse_args()
    only = {int(x) for x in args.only.split(",") if x}
    mode = args.mode
    cfg = MODES[mode]
    psql_file(os.path.join(HERE, "setup.sql"))
    print(f"# idempotency benchmarks ({mode} mode)\n")
    print(psql("SELECT 'PostgreSQL ' || current_setting('server_version') || ', synchronous_commit=' || "
               "current_setting('synchronous_commit') || ', shared_buffers=' || current_setting('shared_buffers')"))
    missed = []

    for number, section in enumerate(SECTIONS, 1):
        if not only or number in only:
            missed += section(mode, cfg)
    print()
    print("missed: " + ", ".join(missed) if missed else "every ratio met")


if __name__ == "__main__":
    main()
