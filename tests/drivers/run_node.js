// Runs the Node blocks of docs/drivers.md (node-postgres, Knex, Drizzle ORM,
// node-postgres through pgbouncer) and checks what they do.
//
// Usage: node run_node.js SECTION. Prints "RAN <block>", "PASS <check>" and
// "FAIL <check>: <why>" lines, as run_python.py does. The blocks run as
// scripts in this process's global scope (vm.runInThisContext), one after
// the other as the document shows them, with their line numbers in
// docs/drivers.md; `require` resolves from this folder's node_modules.
"use strict";
const fs = require("fs");
const path = require("path");
const vm = require("vm");
const { createRequire } = require("module");
const { Client } = require("pg");

const HERE = __dirname;
const DOC = process.env.DRIVERS_DOC || path.resolve(HERE, "..", "..", "docs", "drivers.md");
const SNIPPETS = path.join(HERE, "build", "snippets");
const ADMIN_URL = process.env.DATABASE_URL; // postgres: fixtures, locks, inspection
const APP_URL = process.env.APP_URL; // drivers_app: what the recipes run as
const RUN_ID = Number(process.env.RUN_ID);
const LIMIT = 10000;
// (order number, amount, deliveries), as in common.py
const ORDERS = [[1, 500, 3], [2, 1200, 1], [3, 15000, 2], [4, 700, 2], [5, 900, 3], [6, 300, 1]];
const orderBase = (driverNo) => RUN_ID * 10000 + driverNo * 100;

let failed = 0;
async function check(name, fn) {
  try {
    const detail = await fn();
    console.log(`PASS ${name}` + (typeof detail === "string" ? ` (${detail})` : ""));
  } catch (err) {
    failed += 1;
    const stack = String(err && err.stack || err).split("\n").slice(0, 8).join("\n    ");
    console.log(`FAIL ${name}: ${stack}`);
  }
}
function expect(cond, why) {
  if (!cond) throw new Error(why);
}
async function expectCode(code, promise, read = (e) => e.code) {
  try {
    await promise;
  } catch (err) {
    expect(read(err) === code, `expected SQLSTATE ${code}, got ${read(err)}: ${err.message}`);
    return err;
  }
  throw new Error(`expected SQLSTATE ${code}, got no error`);
}

const manifest = Object.fromEntries(
  JSON.parse(fs.readFileSync(path.join(SNIPPETS, "manifest.json"), "utf8")).map((b) => [b.name, b]));
globalThis.require = createRequire(path.join(HERE, "run_node.js"));
function runBlocks(...names) {
  for (const name of names) {
    if (!manifest[name]) throw new Error(`no block marked '<!-- test: ${name} -->' in docs/drivers.md`);
    const code = fs.readFileSync(path.join(SNIPPETS, `${name}.txt`), "utf8");
    console.log(`RAN ${name}`);
    vm.runInThisContext(code, { filename: DOC, lineOffset: manifest[name].line - 1 });
  }
}
const blockConst = (name) => vm.runInThisContext(name); // a top-level const of the blocks

async function admin(fn) {
  const client = new Client({ connectionString: ADMIN_URL });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}
const uniqueKey = (prefix) => `drivers:${prefix}:${process.hrtime.bigint()}${Math.random()}`;
const keyRow = (key) => admin(async (c) => (await c.query("SELECT status, result FROM idem_get($1)", [key])).rows[0]);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Every order delivered 1 to 3 times at the same time; see
// deliveries_scenario in run_python.py.
async function deliveriesScenario(driverNo, attempt) {
  const base = orderBase(driverNo);
  const orders = new Map(ORDERS.map(([i, amount, copies]) => [base + i, { amount, copies }]));
  const charged = [...orders].filter(([, o]) => o.amount <= LIMIT).map(([id]) => id);
  const deliveries = [...orders].flatMap(([id, o]) => Array(o.copies).fill(id));
  deliveries.reverse();
  const answers = [];
  const holder = new Client({ connectionString: ADMIN_URL });
  await holder.connect();
  await holder.query("BEGIN");
  await holder.query("LOCK TABLE payments IN SHARE ROW EXCLUSIVE MODE");
  const running = deliveries.map((id) => attempt(id, orders.get(id).amount)
    .catch((err) => ["exception", null, String(err)])
    .then((got) => answers.push([id, ...got])));
  const deadline = Date.now() + 60000; // bounded: the checks below fail if they did not get there
  while (Date.now() < deadline) {
    const waiting = Number((await holder.query(
      "SELECT count(*) FROM pg_locks WHERE relation = 'payments'::regclass AND NOT granted")).rows[0].count);
    if (waiting === charged.length && answers.length === deliveries.length - charged.length) break;
    await sleep(20);
  }
  await holder.query("COMMIT");
  await holder.end();
  await Promise.all(running);
  const firstWave = [...answers];
  const odd = firstWave.filter((a) => a[1] !== "ack" && a[1] !== "retry");
  expect(odd.length === 0, `unexpected answers: ${JSON.stringify(odd)}`);
  for (const id of charged) {
    const statuses = firstWave.filter((a) => a[0] === id).map((a) => a[2]);
    expect(statuses.filter((s) => s === "started").length === 1
      && statuses.filter((s) => s === "in_progress").length === statuses.length - 1,
      `order ${id}: first wave answered ${statuses}, expected one started and the duplicates in_progress`);
  }
  let pending = firstWave.filter((a) => a[1] === "retry").map((a) => a[0]);
  for (let round = 0; round < 50 && pending.length; round++) {
    const again = [];
    for (const id of pending) {
      const got = await attempt(id, orders.get(id).amount);
      answers.push([id, ...got]);
      if (got[0] !== "ack") again.push(id);
    }
    pending = again;
    await sleep(20);
  }
  expect(pending.length === 0, `never acknowledged: ${pending}`);
  const rows = await admin(async (c) => (await c.query(
    "SELECT order_id, amount, id FROM payments WHERE order_id BETWEEN $1 AND $2 ORDER BY order_id",
    [base, base + 99])).rows.map((r) => [Number(r.order_id), r.amount, Number(r.id)]));
  expect(JSON.stringify(rows.map((r) => r[0]).sort()) === JSON.stringify([...charged].sort()),
    `payments of orders ${rows.map((r) => r[0])}, expected one for each of ${charged}`);
  const payment = new Map(rows.map((r) => [r[0], r[2]]));
  for (const [id, amount] of rows) {
    expect(amount === orders.get(id).amount, `order ${id}: payment of ${amount}`);
  }
  for (const [id, outcome, status, result] of answers) {
    if (status === "started" || status === "completed") {
      expect(JSON.stringify(result) === JSON.stringify({ payment_id: payment.get(id) }),
        `order ${id}: ${status} with ${JSON.stringify(result)}, expected payment ${payment.get(id)}`);
    } else if (status === "failed") {
      expect(orders.get(id).amount > LIMIT
        && JSON.stringify(result) === JSON.stringify({ error: "amount_over_limit", limit: LIMIT }),
      `order ${id}: failed with ${JSON.stringify(result)}`);
    } else {
      expect(status === "in_progress" && outcome === "retry", `order ${id}: ${outcome} ${status}`);
    }
  }
  for (const [id, o] of orders) {
    const statuses = answers.filter((a) => a[0] === id).map((a) => a[2]);
    const count = (s) => statuses.filter((x) => x === s).length;
    expect(o.amount <= LIMIT ? count("started") === 1 : count("failed") === o.copies, `order ${id}: ${statuses}`);
  }
  const got = await attempt(charged[0], orders.get(charged[0]).amount + 1);
  expect(got[0] === "reject" && got[1] === "mismatch", `another amount: ${got}`);
  const statuses = answers.map((a) => a[2]);
  return `${answers.length} deliveries of ${orders.size} orders: `
    + ["started", "completed", "failed", "in_progress"].map((s) => `${statuses.filter((x) => x === s).length} ${s}`)
      .join(", ");
}

// attempt(orderId, amount) -> [outcome, status, result] through the
// recipe's deliver(); inTx(sql with $1, params) runs one statement in the
// driver's transaction and returns what deliver() answered.
async function commonChecks(label, driverNo, attempt, inTx) {
  await check(`${label}: concurrent duplicate deliveries charge each order once`,
    () => deliveriesScenario(driverNo, attempt));
  await check(`${label}: 42501 (the key belongs to another role) -> reject`, async () => {
    const id = orderBase(driverNo) + 90; // claimed by drivers_other (setup.sql)
    const got = await attempt(id, 100);
    expect(got[0] === "reject" && got[1] === null, `${got}`);
    const n = await admin(async (c) => (await c.query("SELECT count(*) FROM payments WHERE order_id = $1", [id])).rows[0].count);
    expect(n === "0", "a payment was made");
  });
  await check(`${label}: 40001 (a token no longer current) -> retry`, async () => {
    const got = await inTx("SELECT idem_finish(key, NULL, '', token) FROM drivers_fixture WHERE name = 'stale'", []);
    expect(got === "retry", `${got}`);
  });
  await check(`${label}: 55000 (begun, neither finished nor failed) -> dead-letter`, async () => {
    const key = uniqueKey(`${label}-unfinished`);
    const got = await inTx("SELECT status FROM idem_begin($1)", [key]);
    expect(got === "dead-letter", `${got}`);
    expect((await keyRow(key)) === undefined, "the key was stored");
  });
}

function recorder(deliver, call) {
  return async (id, amount) => {
    let got = null;
    const outcome = await deliver(async () => (got = await call(id, amount)));
    return [outcome, ...(got || [null, null])];
  };
}

async function responseFixture(url) {
  const done = uniqueKey("response");
  const leased = uniqueKey("leased");
  const c = new Client({ connectionString: url });
  await c.connect();
  await c.query("BEGIN");
  await c.query("SELECT status FROM idem_begin($1)", [done]);
  await c.query(`SELECT idem_finish($1, '{"ok": true}', response_status => 201,
    response_headers => '{"content-type": "application/json"}', response_body => '\\x7b7d')`, [done]);
  await c.query("COMMIT");
  await c.query("SELECT status FROM idem_begin($1, lease => '1 hour')", [leased]);
  await c.end();
  return [done, leased];
}
const TYPES_SQL = `SELECT status, result, token, response_status, response_headers, response_body, retry_after
  FROM idem_begin($1) UNION ALL
  SELECT status, result, token, response_status, response_headers, response_body, retry_after FROM idem_begin($2)`;
function checkTypes([done, leased], token, intervalAsText = false) {
  expect(done.status === "completed" && done.response_status === 201, JSON.stringify(done));
  expect(JSON.stringify(done.result) === '{"ok":true}', `result ${JSON.stringify(done.result)}`);
  expect(JSON.stringify(done.response_headers) === '{"content-type":"application/json"}', "headers");
  expect(Buffer.isBuffer(done.response_body) && done.response_body.toString() === "{}", "body");
  expect(leased.status === "in_progress" && (intervalAsText
    ? /^00:[0-9]{2}:[0-9]{2}(\.[0-9]+)?$/.test(leased.retry_after)
    : leased.retry_after.constructor.name === "PostgresInterval" && leased.retry_after.minutes >= 0),
  `retry_after ${JSON.stringify(leased.retry_after)}`);
  expect(typeof token === "string" && /^[0-9]+$/.test(token), `token ${token}`);
}

const SECTIONS = {
  async pg() {
    process.env.DATABASE_URL = APP_URL;
    runBlocks("pg-charge", "pg-deliver");
    const pool = blockConst("pool");
    await commonChecks("node-postgres", 5, recorder(deliver, (id, amount) => charge(pool, id, amount)),
      (text, values) => deliver(() => inTransaction(pool, (c) => c.query(text, values))));
    await check("node-postgres: a bare array or string is no jsonb; JSON.stringify is", async () => {
      await expectCode("22P02", pool.query("SELECT $1::jsonb", [["a", "b"]]));
      await expectCode("22P02", pool.query("SELECT $1::jsonb", ["tok_1"]));
      const { rows: [r] } = await pool.query("SELECT $1::jsonb AS a, $2::jsonb AS s, $3::jsonb AS o",
        [JSON.stringify(["a", "b"]), JSON.stringify("tok_1"), { x: 1 }]);
      expect(JSON.stringify(r) === '{"a":["a","b"],"s":"tok_1","o":{"x":1}}', JSON.stringify(r));
    });
    await check("node-postgres: pool.query() is autocommit: a claim fails with 55000", async () => {
      await expectCode("55000", pool.query("SELECT status FROM idem_begin($1)", [uniqueKey("pg-auto")]));
    });
    await check("node-postgres: the other columns' types", async () => {
      const [done, leased] = await responseFixture(APP_URL);
      const { rows } = await pool.query(TYPES_SQL, [done, leased]);
      const { rows: [t] } = await pool.query("SELECT token FROM idem_begin($1, lease => '1 hour')", [uniqueKey("t")]);
      checkTypes(rows, t.token);
    });
    await pool.end();
  },

  async knex() {
    process.env.DATABASE_URL = APP_URL;
    runBlocks("knex-charge", "knex-deliver");
    const knex = blockConst("knex");
    await commonChecks("knex", 6, recorder(deliver, charge),
      (text, values) => deliver(() => knex.transaction((trx) => trx.raw(text.replace("$1", "?"), values))));
    await check("knex: knex.raw outside a transaction is autocommit: 55000; the message starts with the SQL", async () => {
      const err = await expectCode("55000", knex.raw("SELECT status FROM idem_begin(?)", [uniqueKey("knex-auto")]));
      expect(err.message.startsWith("SELECT status FROM idem_begin($1) - idempotency key"), err.message);
    });
    await check("knex: the other columns' types", async () => {
      const [done, leased] = await responseFixture(APP_URL);
      const { rows } = await knex.raw(TYPES_SQL.replace("$1", "?").replace("$2", "?"), [done, leased]);
      const { rows: [t] } = await knex.raw("SELECT token FROM idem_begin(?, lease => '1 hour')", [uniqueKey("t")]);
      checkTypes(rows, t.token);
    });
    await knex.destroy();
  },

  async drizzle() {
    process.env.DATABASE_URL = APP_URL;
    runBlocks("drizzle-charge", "drizzle-deliver");
    const db = blockConst("db");
    const { sql, DrizzleQueryError } = require("drizzle-orm");
    const version = JSON.parse(fs.readFileSync(path.join(HERE, "node_modules", "drizzle-orm", "package.json"), "utf8")).version;
    const inTx = (text, values) => deliver(() => db.transaction((tx) => tx.execute(
      values.length ? sql`SELECT status FROM idem_begin(${values[0]})` : sql.raw(text))));
    await commonChecks("drizzle", 7, recorder(deliver, charge), inTx);
    await check(`drizzle: drizzle-orm ${version} wraps errors (COMMIT's too) in DrizzleQueryError, SQLSTATE at err.cause.code`, async () => {
      expect(version === "0.45.4", `installed ${version}`);
      const read = (e) => e instanceof DrizzleQueryError ? e.cause.code : `not a DrizzleQueryError: ${e.code}`;
      await expectCode("55000", db.transaction((tx) => tx.execute(sql`SELECT status FROM idem_begin(${uniqueKey("dz-commit")})`)), read);
      await expectCode("40001", db.transaction((tx) => tx.execute(
        sql`SELECT idem_finish(key, NULL, '', token) FROM drivers_fixture WHERE name = 'stale'`)), read);
    });
    await check("drizzle: db.execute outside db.transaction is autocommit: 55000", async () => {
      await expectCode("55000", db.execute(sql`SELECT status FROM idem_begin(${uniqueKey("dz-auto")})`), (e) => e.cause.code);
    });
    await check("drizzle: the other columns' types (interval as text)", async () => {
      const [done, leased] = await responseFixture(APP_URL);
      const { rows } = await db.execute(sql`SELECT status, result, token, response_status, response_headers,
        response_body, retry_after FROM idem_begin(${done}) UNION ALL SELECT status, result, token, response_status,
        response_headers, response_body, retry_after FROM idem_begin(${leased})`);
      const { rows: [t] } = await db.execute(sql`SELECT token FROM idem_begin(${uniqueKey("t")}, lease => '1 hour')`);
      checkTypes(rows, t.token, true);
    });
    await db.$client.end();
  },

  async "pgbouncer-pg"() {
    process.env.DATABASE_URL = process.env.BOUNCER_URL;
    runBlocks("pg-charge", "pg-deliver");
    const { Pool } = require("pg");
    const pool = blockConst("pool");
    await commonChecks("pgbouncer/node-postgres", 11, recorder(deliver, (id, amount) => charge(pool, id, amount)),
      (text, values) => deliver(() => inTransaction(pool, (c) => c.query(text, values))));
    await check("pgbouncer: node-postgres works unchanged through one server connection; a named query does not", async () => {
      const base = orderBase(17);
      const a = new Pool({ connectionString: process.env.BOUNCER_POOL1_URL, max: 1 });
      const b = new Pool({ connectionString: process.env.BOUNCER_POOL1_URL, max: 1 });
      try {
        for (let i = 1; i <= 30; i++) {
          const outcome = await deliver(() => charge(i % 2 ? a : b, base + i, 100));
          expect(outcome === "ack", `order ${base + i}: ${outcome}`);
        }
        const named = { name: "drivers-get", text: "SELECT status FROM idem_get($1)", values: ["drivers:none"] };
        await a.query(named);
        const err = await expectCode("42P05", b.query(named));
        expect(err.message.includes('"drivers-get" already exists'), err.message);
      } finally {
        await a.end();
        await b.end();
      }
    });
    await pool.end();
  },
};

(async () => {
  const section = process.argv[2];
  if (!SECTIONS[section]) throw new Error(`no section ${section}: ${Object.keys(SECTIONS)}`);
  try {
    await SECTIONS[section]();
  } catch (err) {
    failed += 1;
    console.log(`FAIL ${section}: the section stopped: ${String(err && err.stack || err).split("\n").slice(0, 8).join("\n    ")}`);
  }
  process.exit(failed ? 1 : 0);
})();
