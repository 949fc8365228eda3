"""A webhook receiver that handles each delivery once, however often it is sent.

POST /webhooks with a `webhook-id` header (the sender's delivery id, the same
on every retry) and a JSON event. The event is recorded and counted in the
same transaction as `idem_once(delivery id)`: a duplicate, even one that
arrives while the first copy is still being handled, does nothing.

    DATABASE_URL=postgresql://... python app.py [port]
"""
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool


def process(pool: ConnectionPool, delivery_id: str, event: dict, before_commit=None) -> bool:
    """Handle one delivery. False: a duplicate, nothing was done."""
    with pool.connection() as conn, conn.transaction():
        # True for the first copy only. A copy that arrives while the first is
        # still in its transaction waits here, then gets False (it committed)
        # or True (it rolled back: then this copy does the work).
        (first,) = conn.execute("SELECT idem_once(%s, scope => 'webhooks')", (delivery_id,)).fetchone()
        if not first:
            return False
        conn.execute(
            "INSERT INTO events (delivery_id, type, payload) VALUES (%s, %s, %s)",
            (delivery_id, event["type"], Jsonb(event)),
        )
        conn.execute(
            "INSERT INTO counters (name, n) VALUES (%s, 1) ON CONFLICT (name) DO UPDATE SET n = counters.n + 1",
            (event["type"],),
        )
        if before_commit:
            before_commit(delivery_id)  # an exception here rolls back the event and the record
    return True


class Handler(BaseHTTPRequestHandler):
    server: "Receiver"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        delivery_id = self.headers.get("webhook-id")
        if self.path != "/webhooks" or not delivery_id:
            return self.reply(400, {"error": "POST /webhooks with a webhook-id header"})
        try:
            event = json.loads(body)
            event["type"]
        except (ValueError, TypeError, KeyError):
            return self.reply(400, {"error": "the body must be a JSON object with a type"})
        try:
            first = process(self.server.pool, delivery_id, event, self.server.before_commit)
        except Exception as e:
            self.log_error("delivery %s failed: %r", delivery_id, e)
            return self.reply(500, {"error": "not handled, send it again"})  # nothing was recorded
        # 200 for a duplicate too: the sender must stop sending it.
        self.reply(200, {"delivery": delivery_id, "duplicate": not first})

    def reply(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_request(self, code="-", size="-"):
        pass  # errors only, no line per request


class Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, pool: ConnectionPool, handler=Handler, before_commit=None):
        super().__init__(address, handler)
        self.pool = pool
        self.before_commit = before_commit


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    with ConnectionPool(os.environ.get("DATABASE_URL", ""), kwargs={"autocommit": True}) as pool:
        print(f"listening on http://127.0.0.1:{port}/webhooks")
        Receiver(("127.0.0.1", port), pool).serve_forever()
