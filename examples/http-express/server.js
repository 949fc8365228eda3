'use strict';
// A payments API whose POST and PATCH routes honour the Idempotency-Key header.
// Run: DATABASE_URL=postgresql://... node server.js   (PORT: 3000, HOST: 127.0.0.1)
const fs = require('node:fs');
const path = require('node:path');
const express = require('express');
const { Pool } = require('pg');
const { idempotency, problem } = require('./idempotency-key');

const pool = new Pool({ connectionString: process.env.DATABASE_URL, max: 10 });
pool.on('error', (err) => console.error('idle connection failed:', err.message));
const { idempotent, rollback } = idempotency(pool);
const app = express();

const notFound = (res, id) => problem(res, 404, 'No such payment', `There is no payment ${id}.`);
const isId = (id) => /^[0-9]{1,18}$/.test(id);

app.post('/payments', idempotent, async (req, res) => {
  const { amount, currency } = req.body ?? {};
  if (typeof amount !== 'number' || !(amount > 0) || !/^[A-Z]{3}$/.test(currency)) {
    return problem(res, 400, 'Invalid payment', 'amount must be a positive number, currency three capital letters.');
  }
  const { rows: [p] } = await req.db.query(
    'INSERT INTO payments (amount, currency) VALUES ($1, $2) RETURNING *', [amount, currency]);
  if (req.get('x-fail') === 'after-insert') throw new Error('failed after the insert'); // fault injection, for the tests
  // Bytes as this API has always written them; a replay returns these very bytes.
  res.status(201).location(`/payments/${p.id}`).type('application/json')
    .send(`{"id": ${p.id},  "amount":${p.amount}, "currency":"${p.currency}"}`);
});

app.patch('/payments/:id', idempotent, async (req, res) => {
  const { refund } = req.body ?? {};
  if (typeof refund !== 'number' || !(refund > 0)) {
    return problem(res, 400, 'Invalid refund', 'refund must be a positive number.');
  }
  if (!isId(req.params.id)) return notFound(res, req.params.id);
  const { rows: [p] } = await req.db.query(
    'UPDATE payments SET refunded = refunded + $1 WHERE id = $2 RETURNING *', [refund, req.params.id]);
  if (!p) return notFound(res, req.params.id);
  res.type('application/json').send(`{"id": ${p.id},  "amount":${p.amount}, "refunded":${p.refunded}}`);
});

// Any body (a note, as bytes); answers a small PDF, binary bytes.
app.post('/payments/:id/receipt', idempotent, async (req, res) => {
  if (!Buffer.isBuffer(req.body)) {
    return problem(res, 415, 'Unsupported media type', 'Send the note as bytes, not JSON.');
  }
  if (!isId(req.params.id)) return notFound(res, req.params.id);
  const { rows: [r] } = await req.db.query(
    'INSERT INTO receipts (payment_id, note) SELECT id, $1 FROM payments WHERE id = $2 RETURNING id',
    [req.body, req.params.id]);
  if (!r) return notFound(res, req.params.id);
  const pdf = Buffer.concat([
    Buffer.from('%PDF-1.4\n%\xe2\xe3\xcf\xd3\n', 'latin1'),
    Buffer.from(`1 0 obj << /Type /Receipt /Number ${r.id} /Payment ${req.params.id} >> endobj\n`),
    Buffer.from('2 0 obj << /Length 4 >> stream\n\x00\xff\xfe\x80\nendstream endobj\n%%EOF\n', 'latin1'),
  ]);
  res.status(201).type('application/pdf').send(pdf);
});

app.get('/payments/:id', async (req, res) => {
  if (!isId(req.params.id)) return notFound(res, req.params.id);
  const { rows: [p] } = await pool.query('SELECT * FROM payments WHERE id = $1', [req.params.id]);
  if (!p) return notFound(res, req.params.id);
  res.json(p);
});

app.use(rollback);
app.use((err, req, res, next) => {
  if (res.headersSent) return next(err);
  if (err.status >= 400 && err.status < 500) return problem(res, err.status, 'Bad request', err.message);
  console.error(err);
  problem(res, 500, 'Internal error', 'The request failed and changed nothing; retry it with the same Idempotency-Key.');
});

async function main() {
  await pool.query(fs.readFileSync(path.join(__dirname, 'schema.sql'), 'utf8'));
  const port = Number(process.env.PORT ?? 3000);
  const host = process.env.HOST ?? '127.0.0.1';
  app.listen(port, host, (err) => {
    if (err) throw err;
    console.log(`listening on http://${host}:${port}`);
  });
}

if (require.main === module) main();
module.exports = app;
