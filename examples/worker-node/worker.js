'use strict';
// A job worker that charges each job exactly once, however often the queue
// delivers it: the idempotency key is claimed, the charge is written and the
// outcome is stored in one transaction (transaction mode).

const { setTimeout: sleep } = require('node:timers/promises');

// SQLSTATEs after which the whole transaction is simply run again:
// serialization failure, deadlock, lock wait cut short by lock_timeout.
const RETRY_SQLSTATES = new Set(['40001', '40P01', '55P03']);

// Exponential backoff with "full jitter": a random delay between 0 and
// base * 2^attempt milliseconds, capped.
function backoff(attempt, { baseMs = 10, capMs = 1000 } = {}) {
  return Math.random() * Math.min(capMs, baseMs * 2 ** attempt);
}

// One try: claim the job's key, charge, store the result, commit.
// Returns idem_begin's answer: started (we charged), completed (a duplicate:
// the stored result), in_progress (another worker holds the key right now)
// or mismatch (the key was used for a different request). beforeCommit:
// the rest of the job's work, if any, inside the transaction.
async function chargeOnce(client, job, { beforeCommit } = {}) {
  const key = `charge:${job.id}`;
  const request = { account: job.account, amount: job.amount };
  // REPEATABLE READ: two jobs updating one balance at the same time make
  // one of them fail with 40001; it is retried.
  await client.query('BEGIN ISOLATION LEVEL REPEATABLE READ');
  try {
    // JSON.stringify: node-postgres would send a JS array as a Postgres array.
    const { rows: [claim] } = await client.query(
      'SELECT status, result, attempt FROM idem_begin($1, $2::jsonb)',
      [key, JSON.stringify(request)]);
    if (claim.status !== 'started') {
      await client.query('COMMIT'); // nothing was written
      return claim;
    }
    const { rows: [payment] } = await client.query(
      'INSERT INTO payments (job_id, account, amount) VALUES ($1, $2, $3) RETURNING id',
      [job.id, job.account, job.amount]);
    await client.query('UPDATE accounts SET balance = balance + $2 WHERE id = $1',
      [job.account, job.amount]);
    const result = { payment_id: Number(payment.id) };
    if (beforeCommit) await beforeCommit(job);
    await client.query('SELECT idem_finish($1, $2::jsonb)', [key, JSON.stringify(result)]);
    await client.query('COMMIT');
    return { ...claim, result };
  } catch (err) {
    // The claim, the charge and the balance roll back together: the key is
    // free again and the next delivery starts afresh.
    await client.query('ROLLBACK').catch(() => {});
    throw err;
  }
}

// Runs a job to its end: in_progress and the SQLSTATEs above are retried
// with backoff; mismatch and any other error go to the caller, whose queue
// redelivers (or dead-letters) the job.
async function processJob(pool, job, { maxTries = 12, beforeCommit, onRetry } = {}) {
  for (let attempt = 1; ; attempt++) {
    const client = await pool.connect();
    let answer;
    try {
      answer = await chargeOnce(client, job, { beforeCommit });
      client.release();
    } catch (err) {
      const retry = RETRY_SQLSTATES.has(err.code);
      client.release(retry ? undefined : err); // drop a connection in an unknown state
      if (!retry) throw err;
      answer = { status: err.code };
    }
    if (answer.status === 'started' || answer.status === 'completed') return answer;
    if (answer.status === 'mismatch') throw new Error(`job ${job.id}: key used for another request`);
    if (attempt >= maxTries) throw new Error(`job ${job.id}: gave up after ${maxTries} tries (${answer.status})`);
    onRetry?.(answer.status);
    await sleep(backoff(attempt));
  }
}

module.exports = { backoff, chargeOnce, processJob, RETRY_SQLSTATES };
