'use strict';
// Real HTTP requests to the app, started as a server process on 127.0.0.1:
// concurrent duplicate deliveries, a request still in progress, a changed
// payload, a missing key, a failing handler, a binary response.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const { randomUUID } = require('node:crypto');
const net = require('node:net');
const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');
const { Client } = require('pg');

const KEYS = 20;
const COPIES = 8;
const STORED = ['content-type', 'location'];
let server;
let serverLog = '';
let base;
let db;

function freePort() {
  return new Promise((resolve, reject) => {
    const probe = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    }).on('error', reject);
  });
}

before(async () => {
  const port = await freePort();
  server = spawn(process.execPath, ['server.js'], {
    cwd: path.join(__dirname, '..'),
    env: { ...process.env, PORT: String(port), HOST: '127.0.0.1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  server.stdout.on('data', (d) => { serverLog += d; });
  server.stderr.on('data', (d) => { serverLog += d; });
  base = `http://127.0.0.1:${port}`;
  for (let i = 0; ; i++) {
    try {
      await fetch(`${base}/payments/0`);
      break;
    } catch {
      if (i >= 300 || server.exitCode !== null) throw new Error(`the server did not start:\n${serverLog}`);
      await sleep(100);
    }
  }
  db = new Client({ connectionString: process.env.DATABASE_URL });
  await db.connect();
});

after(async () => {
  await db?.end();
  server?.kill();
});

// One request; the body comes back as bytes.
async function send(method, url, { key, json, body, headers = {} } = {}) {
  const h = { ...headers };
  if (key !== undefined) h['Idempotency-Key'] = key;
  if (json !== undefined) {
    h['content-type'] = 'application/json';
    body = JSON.stringify(json);
  }
  const r = await fetch(base + url, { method, headers: h, body });
  return { status: r.status, headers: r.headers, body: Buffer.from(await r.arrayBuffer()) };
}

const sql = async (query, params) => (await db.query(query, params)).rows[0];
const paymentCount = async () => Number((await sql('SELECT count(*) FROM payments')).count);
const idOf = (response) => JSON.parse(response.body).id;
const isOriginal = (r, status) => r.status === status && !r.headers.has('idempotent-replayed');

function assertReplay(original, response) {
  assert.equal(response.headers.get('idempotent-replayed'), 'true');
  assert.equal(response.status, original.status);
  for (const name of STORED) assert.equal(response.headers.get(name), original.headers.get(name));
  assert.ok(response.body.equals(original.body), `${response.body} differs from ${original.body}`);
}

function assertProblem(response, status) {
  assert.equal(response.status, status);
  assert.match(response.headers.get('content-type'), /^application\/problem\+json/);
  assert.equal(JSON.parse(response.body).status, status);
}

test('concurrent duplicates run once and replay byte for byte', async () => {
  const keys = Array.from({ length: KEYS }, () => randomUUID());
  const amount = new Map(keys.map((key, i) => [key, 1.1 + i]));
  const deliveries = keys.flatMap((key) => Array(COPIES).fill(key)).sort(() => Math.random() - 0.5);
  const before = await paymentCount();
  const deliver = (list) => Promise.all(list.map(async (key) =>
    [key, await send('POST', '/payments', { key, json: { amount: amount.get(key), currency: 'EUR' } })]));

  const byKey = new Map(keys.map((key) => [key, []]));
  for (const [key, response] of await deliver(deliveries)) byKey.get(key).push(response);
  const outcomes = { original: 0, replayed: 0, 'in progress': 0 };
  const originals = new Map();
  for (const [key, responses] of byKey) {
    const firsts = responses.filter((r) => isOriginal(r, 201));
    assert.equal(firsts.length, 1, responses.map((r) => `${r.status} ${r.body}`).join('\n'));
    const original = firsts[0];
    originals.set(key, original);
    const id = idOf(original);
    assert.equal(original.headers.get('location'), `/payments/${id}`);
    assert.ok(original.body.toString().startsWith(`{"id": ${id},  "amount":`), String(original.body));
    for (const response of responses) {
      if (response === original) {
        outcomes.original++;
      } else if (response.status === 409) {
        assertProblem(response, 409);
        assert.ok(Number(response.headers.get('retry-after')) >= 1);
        outcomes['in progress']++;
      } else {
        assertReplay(original, response);
        outcomes.replayed++;
      }
    }
  }

  const ids = [...originals.values()].map(idOf);
  assert.equal(new Set(ids).size, KEYS);
  assert.equal(await paymentCount() - before, KEYS);
  assert.equal(Number((await sql('SELECT count(*) FROM payments WHERE id = ANY($1)', [ids])).count), KEYS);

  for (const [key, response] of await deliver(keys)) assertReplay(originals.get(key), response);
  console.log(`${KEYS * COPIES} deliveries of ${KEYS} keys:`, outcomes);
});

test('a repeat while the first runs gets 409 with Retry-After', async () => {
  const key = randomUUID();
  const payment = { amount: 3, currency: 'EUR' };
  const blocker = new Client({ connectionString: process.env.DATABASE_URL });
  await blocker.connect();
  try {
    await blocker.query('BEGIN');
    await blocker.query('LOCK TABLE payments IN SHARE MODE'); // holds every INSERT INTO payments
    const first = send('POST', '/payments', { key, json: payment });
    for (let i = 0; ; i++) { // until its INSERT waits for the test's lock
      const { waiting } = await sql('SELECT count(*)::int AS waiting FROM pg_stat_activity' +
        " WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO payments%'");
      if (waiting) break;
      assert.ok(i < 400, 'the first request never reached its INSERT');
      await sleep(50);
    }
    const repeat = await send('POST', '/payments', { key, json: payment });
    assertProblem(repeat, 409);
    assert.equal(repeat.headers.get('retry-after'), '1'); // transaction mode: no lease to tell the end of
    await blocker.query('ROLLBACK');
    const original = await first;
    assert.ok(isOriginal(original, 201));
    assertReplay(original, await send('POST', '/payments', { key, json: payment }));
  } finally {
    await blocker.end();
  }
});

test('a changed request is 422, its formatting is not a change', async () => {
  const key = randomUUID();
  const before = await paymentCount();
  const post = (body, keyHeader = key) => send('POST', '/payments',
    { key: keyHeader, body, headers: { 'content-type': 'application/json' } });

  const first = await post('{"amount": 5, "currency": "EUR"}');
  assert.equal(first.status, 201);
  assertReplay(first, await post('{ "currency" : "EUR",\n  "amount": 5.0 }'));
  assertReplay(first, await post('{"amount": 5, "currency": "EUR"}', `"${key}"`)); // sf-string form
  assertProblem(await post('{"amount": 6, "currency": "EUR"}'), 422);
  const id = idOf(first);
  assertProblem(await send('PATCH', `/payments/${id}`, { key, json: { refund: 1 } }), 422);
  assert.equal(await paymentCount() - before, 1);
  assert.equal((await sql('SELECT refunded FROM payments WHERE id = $1', [id])).refunded, '0.00');
});

test('a missing key is 400', async () => {
  const before = await paymentCount();
  const payment = { amount: 2, currency: 'EUR' };
  assertProblem(await send('POST', '/payments', { json: payment }), 400);
  assertProblem(await send('POST', '/payments', { key: '""', json: payment }), 400);
  assertProblem(await send('PATCH', '/payments/1', { json: { refund: 1 } }), 400);
  assertProblem(await send('POST', '/payments', { key: 'k'.repeat(1000), json: payment }), 400);
  assert.equal(await paymentCount(), before);
});

test('a failed handler is rolled back and runs again on retry', async () => {
  const key = randomUUID();
  const payment = { amount: 7, currency: 'USD' };
  const before = await paymentCount();
  const failed = await send('POST', '/payments', { key, json: payment, headers: { 'X-Fail': 'after-insert' } });
  assertProblem(failed, 500);
  assert.equal(await paymentCount(), before); // its insert was rolled back with the key
  const retried = await send('POST', '/payments', { key, json: payment });
  assert.ok(isOriginal(retried, 201));
  assertReplay(retried, await send('POST', '/payments', { key, json: payment }));
  assert.equal(await paymentCount() - before, 1);
});

test('a binary response replays byte for byte', async () => {
  const note = Buffer.from('\x00paid in cash \xff\xfe', 'latin1');
  const created = await send('POST', '/payments', { key: randomUUID(), json: { amount: 9, currency: 'EUR' } });
  const id = idOf(created);
  const key = randomUUID();
  const receipt = (body) => send('POST', `/payments/${id}/receipt`,
    { key, body, headers: { 'content-type': 'application/octet-stream' } });

  const responses = await Promise.all(Array.from({ length: COPIES }, () => receipt(note)));
  const firsts = responses.filter((r) => isOriginal(r, 201));
  assert.equal(firsts.length, 1);
  const original = firsts[0];
  assert.equal(original.headers.get('content-type'), 'application/pdf');
  assert.ok(original.body.subarray(0, 5).equals(Buffer.from('%PDF-')) && original.body.includes(0));
  assert.throws(() => new TextDecoder('utf-8', { fatal: true }).decode(original.body));
  for (const response of responses) {
    if (response !== original && response.status !== 409) assertReplay(original, response);
  }
  assertReplay(original, await receipt(note));
  assertProblem(await receipt(Buffer.concat([note, Buffer.from('!')])), 422);
  assert.equal((await sql('SELECT count(*)::int AS n FROM receipts WHERE payment_id = $1', [id])).n, 1);
});

test('concurrent duplicate PATCHes refund once', async () => {
  const id = idOf(await send('POST', '/payments', { key: randomUUID(), json: { amount: 10, currency: 'EUR' } }));
  for (const key of [randomUUID(), randomUUID()]) {
    const responses = await Promise.all(Array.from({ length: COPIES },
      () => send('PATCH', `/payments/${id}`, { key, json: { refund: 0.25 } })));
    assert.equal(responses.filter((r) => isOriginal(r, 200)).length, 1);
    assert.ok(responses.every((r) => r.status === 200 || r.status === 409));
  }
  assert.equal((await sql('SELECT refunded FROM payments WHERE id = $1', [id])).refunded, '0.50');
});

test('keys are per client', async () => {
  const key = randomUUID();
  const payment = { amount: 4, currency: 'EUR' };
  const as = (client) => send('POST', '/payments', { key, json: payment, headers: { 'X-Client-Id': client } });
  const a = await as('client-a');
  const b = await as('client-b');
  assertReplay(a, await as('client-a'));
  assert.ok(isOriginal(a, 201) && isOriginal(b, 201));
  assert.notEqual(idOf(a), idOf(b));
});
