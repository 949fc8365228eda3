'use strict';
// A flaky queue runs the worker: every job is delivered one to three times
// (duplicates side by side, so that they run at the same time), some
// deliveries fail after the charge and before COMMIT, some acknowledgments
// are lost and the job is delivered again. Then every job must have been
// charged exactly once.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');
const { Pool } = require('pg');
const { backoff, processJob } = require('../worker');

const WORKERS = 6;
// Keys outlive a run (for idempotency.ttl): each run uses keys and accounts of its own.
const RUN = `run-${Date.now().toString(36)}-${process.pid}`;
const ACCOUNTS = ['a', 'b', 'c', 'd'].map((a) => `${RUN}-${a}`);

const pool = new Pool({ connectionString: process.env.DATABASE_URL, max: WORKERS + 2 });
const randomInt = (n) => Math.floor(Math.random() * n);

before(async () => {
  await pool.query(fs.readFileSync(path.join(__dirname, '..', 'schema.sql'), 'utf8'));
  await pool.query('INSERT INTO accounts (id) SELECT unnest($1::text[])', [ACCOUNTS]);
});
after(() => pool.end());

async function paymentsOf(jobIds) {
  const { rows } = await pool.query(
    `SELECT job_id, count(*)::int AS n, min(id)::int AS payment_id,
            (SELECT result FROM idem_get('charge:' || job_id)) AS stored
       FROM payments WHERE job_id = ANY($1) GROUP BY job_id`, [jobIds]);
  return new Map(rows.map((r) => [r.job_id, r]));
}

test('a flaky queue with duplicates, failures and lost acks charges every job once', { timeout: 120_000 }, async () => {
  const jobs = Array.from({ length: 40 }, (_, i) => ({
    id: `${RUN}-job-${i}`, account: ACCOUNTS[i % ACCOUNTS.length], amount: 100 * (1 + randomInt(50)),
  }));
  const failBeforeCommit = new Set(jobs.filter((_, i) => i % 7 === 3).map((j) => j.id));
  const loseAck = new Set(jobs.filter((_, i) => i % 7 === 5).map((j) => j.id));
  const [toFail, toLose] = [failBeforeCommit.size, loseAck.size];

  // Each job one to three times, its copies side by side; jobs shuffled.
  const bursts = jobs.map((job) => Array.from({ length: 1 + randomInt(3) }, () => ({ job })));
  bursts.sort(() => Math.random() - 0.5);
  const queue = bursts.flat();

  const acks = [];
  const retries = {};
  let failures = 0;
  let inFlight = 0;

  const beforeCommit = async (job) => {
    await sleep(randomInt(20)); // the rest of the job's work
    if (failBeforeCommit.delete(job.id)) {
      failures++;
      throw new Error('injected failure after the charge, before COMMIT');
    }
  };

  async function worker() {
    for (let idle = 0; idle < 2000 && (queue.length || inFlight); ) {
      const message = queue.shift();
      if (!message) { idle++; await sleep(5); continue; }
      inFlight++;
      try {
        const answer = await processJob(pool, message.job, {
          beforeCommit, onRetry: (why) => { retries[why] = (retries[why] || 0) + 1; },
        });
        acks.push({ ...message, ...answer });
        if (answer.status === 'started' && loseAck.delete(message.job.id)) {
          queue.push({ job: message.job, afterLostAck: true }); // the ack never arrived
        }
      } catch (err) {
        if (!/injected/.test(err.message)) throw err;
        queue.push({ job: message.job }); // nack: delivered again
      } finally {
        inFlight--;
      }
    }
  }
  await Promise.all(Array.from({ length: WORKERS }, worker));

  const total = bursts.flat().length;
  const count = (status) => acks.filter((a) => a.status === status).length;
  console.log(`${jobs.length} jobs, ${total} deliveries, ${failures} failed before COMMIT and redelivered, ` +
    `${toLose} acks lost and redelivered: ${count('started')} started, ${count('completed')} replayed; ` +
    `retries: ${JSON.stringify(retries)}`);

  assert.equal(failures, toFail, 'every injected failure happened');
  assert.equal(loseAck.size, 0, 'every lost ack happened');
  assert.equal(queue.length, 0);
  assert.equal(acks.length, total + toLose, 'every delivery acknowledged, and every redelivery after a lost ack');

  const payments = await paymentsOf(jobs.map((j) => j.id));
  assert.equal(payments.size, jobs.length, 'a payment for every job');
  for (const job of jobs) {
    const p = payments.get(job.id);
    assert.equal(p.n, 1, `job ${job.id} charged once`);
    assert.deepEqual(p.stored, { payment_id: p.payment_id }, 'the stored result names the payment');
    const mine = acks.filter((a) => a.job === job);
    assert.equal(mine.filter((a) => a.status === 'started').length, 1, 'one delivery did the work');
    for (const a of mine) {
      assert.deepEqual(a.result, p.stored, 'every delivery ends with the same result');
      assert.equal(a.attempt, 1, 'a rolled-back try does not count as an attempt');
    }
  }
  for (const a of acks.filter((a) => a.afterLostAck)) assert.equal(a.status, 'completed', 'a redelivery replays');

  const { rows } = await pool.query('SELECT id, balance::int FROM accounts WHERE id = ANY($1) ORDER BY id', [ACCOUNTS]);
  const expected = ACCOUNTS.map((id) => ({
    id, balance: jobs.filter((j) => j.account === id).reduce((s, j) => s + j.amount, 0),
  }));
  assert.deepEqual(rows, expected, 'balances are the sums of the jobs, each counted once');
});

test('eight copies of one job at the same moment: one charge, one result', async () => {
  const job = { id: `${RUN}-burst`, account: ACCOUNTS[0], amount: 700 };
  const retries = {};
  const answers = await Promise.all(Array.from({ length: 8 }, () => processJob(pool, job, {
    beforeCommit: () => sleep(50),
    onRetry: (why) => { retries[why] = (retries[why] || 0) + 1; },
  })));
  console.log(`statuses: ${answers.map((a) => a.status).join(' ')}; retries: ${JSON.stringify(retries)}`);
  const p = (await paymentsOf([job.id])).get(job.id);
  assert.equal(p.n, 1);
  assert.equal(answers.filter((a) => a.status === 'started').length, 1);
  for (const a of answers) assert.deepEqual(a.result, { payment_id: p.payment_id });
});

test('the same key with another request is refused and charges nothing', async () => {
  const job = { id: `${RUN}-changed`, account: ACCOUNTS[1], amount: 300 };
  await processJob(pool, job);
  await assert.rejects(processJob(pool, { ...job, amount: 900 }), /another request/);
  assert.equal((await paymentsOf([job.id])).get(job.id).n, 1);
});

test('backoff grows exponentially, stays under its cap, and is jittered', () => {
  for (let attempt = 1; attempt < 20; attempt++) {
    const d = backoff(attempt, { baseMs: 10, capMs: 1000 });
    assert.ok(d >= 0 && d <= Math.min(1000, 10 * 2 ** attempt));
  }
  const samples = new Set(Array.from({ length: 20 }, () => backoff(5)));
  assert.ok(samples.size > 1);
});
