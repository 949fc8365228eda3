"""The Idempotency-Key header (draft-ietf-httpapi-idempotency-key-header) on
the idempotency extension: one transaction per request, one SQL call to
begin and one to finish.

    api = APIRouter(route_class=IdempotentRoute)

    @api.post("/payments")
    async def create_payment(payment: NewPayment, tx: Transaction) -> Response:
        await tx.execute("INSERT INTO payments ...")   # in the key's transaction
        return Response(body, 201, media_type="application/json")

Every POST and PATCH route of such a router requires the header. The first
request with a key runs the handler in a transaction that also stores its
response; a retry gets that response again, byte for byte.
"""

import base64
import email.message
import json
import logging
import math
import re
from typing import Annotated

import psycopg
from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from psycopg.types.json import Jsonb
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

# The response headers stored with the status and body, and replayed.
STORED_HEADERS = ("content-type", "location")
DOCS = "https://example.com/docs/idempotency"


def problem(status: int, title: str, detail: str, headers: dict | None = None) -> Response:
    """An RFC 9457 problem+json response."""
    body = json.dumps({"type": DOCS, "title": title, "status": status, "detail": detail})
    return Response(body, status, headers, media_type="application/problem+json")


def client_id(request: Request) -> str:
    """The scope of the keys. The draft makes keys unique per client: take
    the id from your authentication. Here the X-Client-Id header stands in
    for it."""
    return request.headers.get("x-client-id", "anonymous")


def parse_key(value: str) -> str:
    """The header is a Structured Field String ("..."); a bare value is accepted too."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r'\\(["\\])', r"\1", value[1:-1])
    return value


def is_json(content_type: str | None) -> bool:
    message = email.message.Message()
    message["content-type"] = content_type or ""
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


async def request_fingerprint(request: Request) -> dict:
    """What makes two requests with one key the same request: the method,
    the path and query, and the body: its JSON value for a JSON body (white
    space and member order do not count), else its bytes. Raises ValueError
    for a JSON body that does not parse."""
    body = await request.body()
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if body and is_json(request.headers.get("content-type")):
        return {"method": request.method, "path": path, "json": json.loads(body, parse_constant=_no_constants)}
    return {"method": request.method, "path": path, "base64": base64.b64encode(body).decode()}


def transaction(request: Request) -> psycopg.AsyncConnection:
    """The connection whose transaction holds the request's key."""
    return request.state.idempotency_tx


Transaction = Annotated[psycopg.AsyncConnection, Depends(transaction)]


def replay(begun: dict) -> Response:
    response = Response(begun["response_body"], begun["response_status"])
    for name, value in (begun["response_headers"] or {}).items():
        for one in [value] if isinstance(value, str) else value:
            response.headers.append(name, one)
    response.headers["idempotent-replayed"] = "true"
    return response


def stored_headers(response: Response) -> dict:
    headers = {}
    for name in STORED_HEADERS:
        values = response.headers.getlist(name)
        if values:
            headers[name] = values[0] if len(values) == 1 else values
    return headers


class IdempotentRoute(APIRoute):
    """Runs the POST and PATCH routes of a router with route_class=IdempotentRoute
    once per Idempotency-Key and client (app.state.pool: a psycopg AsyncConnectionPool)."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        if not self.methods & {"POST", "PATCH"}:
            return handler

        async def idempotent_handler(request: Request) -> Response:
            header = request.headers.get("idempotency-key", "")
            key = parse_key(header)
            if not key:
                return problem(400, "Idempotency-Key is missing",
                               f"{request.method} {request.url.path} requires an Idempotency-Key header.")
            try:
                fingerprint = await request_fingerprint(request)
            except ValueError:
                return problem(400, "Malformed JSON", "The request body is not valid JSON.")
            scope = client_id(request)

            async with request.app.state.pool.connection() as conn:
                try:  # opens the transaction
                    cur = await conn.execute(
                        "SELECT * FROM idem_begin(%s, request => %s, scope => %s)", (key, Jsonb(fingerprint), scope))
                except psycopg.errors.InvalidParameterValue as e:  # 22023: e.g. a key too long
                    await conn.rollback()
                    return problem(400, "Invalid Idempotency-Key", e.diag.message_primary)
                begun = await cur.fetchone()

                if begun["status"] != "started":
                    await conn.rollback()
                    if begun["status"] in ("completed", "failed"):
                        return replay(begun)
                    if begun["status"] == "in_progress":
                        wait = begun["retry_after"]
                        retry_after = max(1, math.ceil(wait.total_seconds())) if wait else 1
                        return problem(409, "Request in progress",
                                       "A request with this Idempotency-Key is being processed; retry later.",
                                       {"retry-after": str(retry_after)})
                    return problem(422, "Idempotency-Key reused",  # mismatch
                                   "This Idempotency-Key was used with a different request.")

                # started: the handler's writes go into this transaction, which
                # stores the response with them. An exception rolls it all
                # back, the key included: a retry runs the handler again.
                request.state.idempotency_tx = conn
                try:
                    response = await handler(request)
                except (HTTPException, RequestValidationError):
                    await conn.rollback()
                    raise  # FastAPI answers these
                except Exception:
                    log.exception("%s %s failed", request.method, request.url.path)
                    await conn.rollback()
                    return problem(500, "Internal error", "The request failed and changed nothing; "
                                   "retry it with the same Idempotency-Key.")
                await conn.execute(
                    "SELECT idem_finish(%s, scope => %s, response_status => %s,"
                    " response_headers => %s, response_body => %s)",
                    (key, scope, response.status_code, Jsonb(stored_headers(response)), response.body))
                await conn.commit()
                return response

        return idempotent_handler
