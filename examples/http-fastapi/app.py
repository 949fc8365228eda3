"""A payments API whose POST and PATCH routes honour the Idempotency-Key header.

Run: DATABASE_URL=postgresql://... uvicorn app:app
"""

import os
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request, Response
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from idempotency_key import IdempotentRoute, Transaction, problem


@asynccontextmanager
async def lifespan(app: FastAPI):
    async with AsyncConnectionPool(os.environ["DATABASE_URL"], min_size=2, max_size=10,
                                   kwargs={"row_factory": dict_row}, open=False) as pool:
        async with pool.connection() as conn:
            await conn.execute(Path(__file__).with_name("schema.sql").read_text())
        app.state.pool = pool
        yield


app = FastAPI(lifespan=lifespan)
api = APIRouter(route_class=IdempotentRoute)


class NewPayment(BaseModel):
    amount: Decimal = Field(gt=0, max_digits=12, decimal_places=2)
    currency: str = Field(pattern=r"^[A-Z]{3}$")


class Refund(BaseModel):
    refund: Decimal = Field(gt=0, max_digits=12, decimal_places=2)


@api.post("/payments")
async def create_payment(payment: NewPayment, request: Request, tx: Transaction) -> Response:
    cur = await tx.execute("INSERT INTO payments (amount, currency) VALUES (%s, %s) RETURNING *",
                           (payment.amount, payment.currency))
    row = await cur.fetchone()
    if request.headers.get("x-fail") == "after-insert":  # fault injection, for the tests
        raise RuntimeError("failed after the insert")
    # Bytes as this API has always written them; a replay returns these very bytes.
    body = f'{{"id": {row["id"]},  "amount":{row["amount"]}, "currency":"{row["currency"]}"}}'
    return Response(body, 201, {"location": f"/payments/{row['id']}"}, media_type="application/json")


@api.patch("/payments/{payment_id}")
async def refund_payment(payment_id: int, refund: Refund, tx: Transaction) -> Response:
    cur = await tx.execute("UPDATE payments SET refunded = refunded + %s WHERE id = %s RETURNING *",
                           (refund.refund, payment_id))
    row = await cur.fetchone()
    if row is None:
        return problem(404, "No such payment", f"There is no payment {payment_id}.")
    body = f'{{"id": {row["id"]},  "amount":{row["amount"]}, "refunded":{row["refunded"]}}}'
    return Response(body, 200, media_type="application/json")


@api.post("/payments/{payment_id}/receipt")
async def create_receipt(payment_id: int, request: Request, tx: Transaction) -> Response:
    """Any body (a note, as bytes); answers a small PDF, binary bytes."""
    cur = await tx.execute(
        "INSERT INTO receipts (payment_id, note) SELECT id, %s FROM payments WHERE id = %s RETURNING id",
        (await request.body(), payment_id))
    row = await cur.fetchone()
    if row is None:
        return problem(404, "No such payment", f"There is no payment {payment_id}.")
    pdf = (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"
           + f"1 0 obj << /Type /Receipt /Number {row['id']} /Payment {payment_id} >> endobj\n".encode()
           + b"2 0 obj << /Length 4 >> stream\n\x00\xff\xfe\x80\nendstream endobj\n%%EOF\n")
    return Response(pdf, 201, media_type="application/pdf")


app.include_router(api)


@app.get("/payments/{payment_id}")
async def get_payment(payment_id: int, request: Request):
    async with request.app.state.pool.connection() as conn:
        cur = await conn.execute("SELECT * FROM payments WHERE id = %s", (payment_id,))
        row = await cur.fetchone()
    if row is None:
        return problem(404, "No such payment", f"There is no payment {payment_id}.")
    return {"id": row["id"], "amount": str(row["amount"]), "currency": row["currency"],
            "refunded": str(row["refunded"])}
