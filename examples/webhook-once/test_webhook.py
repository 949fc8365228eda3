"""Runs the receiver on a free port of 127.0.0.1 and sends it every delivery
three times at once over HTTP, and some again later, as a sender retrying
would. Some handlings fail after the INSERT and before COMMIT (500: the sender
retries); some lose their response after COMMIT (the sender retries and hears
"duplicate"). Then it checks that every delivery had its effect once.
The database: DATABASE_URL."""
import json
import os
import pathlib
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psycopg
from psycopg_pool import ConnectionPool

import app

DELIVERIES, COPIES = 30, 3
RUN = f"{time.time_ns():x}"  # the ledger keeps delivery ids for good: name this run's apart
rng = random.Random(11)
events = {f"evt_{RUN}_{i}": {"type": rng.choice(["invoice.paid", "customer.created"]), "n": i}
          for i in range(DELIVERIES)}
fail_before_commit = set(rng.sample(sorted(events), 5))
lose_response = set(rng.sample(sorted(set(events) - fail_before_commit), 5))
failed_ids, responses_lost = set(fail_before_commit), set(lose_response)
lock = threading.Lock()


def take(faults: set, delivery_id: str) -> bool:
    with lock:
        if delivery_id in faults:
            faults.discard(delivery_id)
            return True
        return False


def before_commit(delivery_id):
    time.sleep(0.02)  # the transaction stays open a while: concurrent copies wait in idem_once
    if take(fail_before_commit, delivery_id):
        raise RuntimeError("simulated failure after the INSERT, before COMMIT")


class LosesResponses(app.Handler):
    def reply(self, status, body):
        if status == 200 and not body["duplicate"] and take(lose_response, body["delivery"]):
            self.close_connection = True  # committed, but the sender never hears back
            return
        super().reply(status, body)


def send(url: str, delivery_id: str, event: dict, barrier=None, max_tries=12) -> dict:
    """A webhook sender: retries on 5xx and on a lost connection, with capped, jittered backoff."""
    if barrier:
        barrier.wait(timeout=30)  # the copies of one delivery go out together
    data = json.dumps(event).encode()
    for attempt in range(max_tries):
        request = urllib.request.Request(url, data, {"webhook-id": delivery_id, "content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            if e.code < 500:
                raise
        except OSError:  # connection refused, reset or closed without a response
            pass
        time.sleep(random.uniform(0, min(1.0, 0.02 * 2**attempt)))
    raise TimeoutError(f"{delivery_id}: no 2xx after {max_tries} tries")


def main() -> int:
    dsn = os.environ["DATABASE_URL"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS events, counters")
        conn.execute(pathlib.Path(__file__).with_name("schema.sql").read_text())

    with ConnectionPool(dsn, kwargs={"autocommit": True}, max_size=10) as pool:
        server = app.Receiver(("127.0.0.1", 0), pool, LosesResponses, before_commit)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/webhooks"
        late = rng.sample(sorted(events), 10)
        with ThreadPoolExecutor(max_workers=12) as ex:
            sends = []
            for delivery_id, event in events.items():
                barrier = threading.Barrier(COPIES)
                sends += [(delivery_id, ex.submit(send, url, delivery_id, event, barrier)) for _ in range(COPIES)]
            sends += [(d, ex.submit(send, url, d, events[d])) for d in late]
            answers, errors = [], []
            for d, f in sends:
                try:
                    answers.append((d, f.result()))
                except Exception as e:
                    errors.append((d, repr(e)))
        server.shutdown()
        server.server_close()

    handled = Counter(d for d, a in answers if not a["duplicate"])
    print(f"{len(sends)} requests for {DELIVERIES} deliveries: {sum(handled.values())} handled, "
          f"{len(answers) - sum(handled.values())} answered as duplicates; {len(failed_ids)} handlings failed "
          f"before COMMIT and {len(responses_lost)} responses were lost after it, and the sender retried")

    passed = failed = 0

    def check(name, ok, detail=""):
        nonlocal passed, failed
        passed, failed = passed + bool(ok), failed + (not ok)
        print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else ': ' + str(detail)}")

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT delivery_id, payload FROM events").fetchall()
        counters = dict(conn.execute("SELECT name, n FROM counters").fetchall())
        with conn.transaction(force_rollback=True):
            recorded = all(not conn.execute("SELECT idem_once(%s, scope => 'webhooks')", (d,)).fetchone()[0]
                           for d in events)

    per_delivery = Counter(d for d, _ in rows)
    check("every request got a 2xx answer", not errors, errors[:3])
    check("every injected failure happened", not fail_before_commit and not lose_response)
    check("one event row per distinct delivery id", per_delivery == Counter(list(events)),
          {d: n for d, n in per_delivery.items() if n != 1})
    check("each stored payload is the one sent", all(events[d] == p for d, p in rows))
    check("counters count each delivery once",
          counters == Counter(e["type"] for e in events.values()), counters)
    check("one 'handled' answer per delivery (none where the response was lost)",
          handled == Counter(d for d in events if d not in responses_lost),
          {d: n for d, n in handled.items() if n != 1})
    check("the ledger has every delivery id", recorded)

    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
