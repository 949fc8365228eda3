'use strict';
// The Idempotency-Key header (draft-ietf-httpapi-idempotency-key-header) on
// the idempotency extension: one transaction per request, one SQL call to
// begin and one to finish.
//
//   const { idempotent, rollback } = idempotency(pool);
//   app.post('/payments', idempotent, async (req, res) => {
//     await req.db.query('INSERT INTO payments ...');   // in the key's transaction
//     res.status(201).type('application/json').send(body);
//   });
//   app.use(rollback);   // after the routes: rolls back a handler that threw
//
// A route with `idempotent` requires the header. The first request with a
// key runs the handler in a transaction that also stores its response; a
// retry gets that response again, byte for byte.

const express = require('express');

// The response headers stored with the status and body, and replayed.
const STORED_HEADERS = ['content-type', 'location'];
const DOCS = 'https://example.com/docs/idempotency';
const HELD = Symbol('idempotency key held');

// An RFC 9457 problem+json response.
function problem(res, status, title, detail, headers = {}) {
  res.status(status).set(headers).type('application/problem+json')
    .send(JSON.stringify({ type: DOCS, title, status, detail }));
}

// The scope of the keys. The draft makes keys unique per client: take the id
// from your authentication. Here the X-Client-Id header stands in for it.
const clientId = (req) => req.get('x-client-id') ?? 'anonymous';

// The header is a Structured Field String ("..."); a bare value is accepted too.
function parseKey(value) {
  if (value.length >= 2 && value.startsWith('"') && value.endsWith('"')) {
    return value.slice(1, -1).replace(/\\(["\\])/g, '$1');
  }
  return value;
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

// What makes two requests with one key the same request: the method, the
// path and query, and the body: its JSON value for a JSON body (white space
// and member order do not count), else its bytes. Throws for a JSON body
// that does not parse.
function fingerprint(req, body) {
  const request = { method: req.method, path: req.originalUrl };
  if (req.is(['application/json', '+json'])) request.json = JSON.parse(utf8.decode(body));
  else request.base64 = body.toString('base64');
  return request;
}

function replay(res, begun) {
  res.status(begun.response_status);
  for (const [name, value] of Object.entries(begun.response_headers ?? {})) res.setHeader(name, value);
  res.setHeader('Idempotent-Replayed', 'true');
  res.end(begun.response_body ?? '');
}

// Ends the transaction and returns the connection to the pool (drops a broken one).
async function rollbackAndRelease(db) {
  try {
    await db.query('ROLLBACK');
    db.release();
  } catch (err) {
    db.release(err);
  }
}

function storedHeaders(res) {
  const headers = {};
  for (const name of STORED_HEADERS) {
    const value = res.getHeader(name);
    if (value !== undefined) headers[name] = Array.isArray(value) ? value.map(String) : String(value);
  }
  return headers;
}

// Keeps what the handler writes until its transaction has stored it:
// settle(body) then runs, and the response is sent when it succeeds.
function holdResponse(res, settle) {
  const { write, end } = res;
  const chunks = [];
  res.write = (chunk, encoding) => {
    chunks.push(Buffer.from(chunk, typeof encoding === 'string' ? encoding : undefined));
    return true;
  };
  res.end = (chunk, encoding) => {
    if (chunk != null && typeof chunk !== 'function') res.write(chunk, encoding);
    release();
    const body = Buffer.concat(chunks);
    settle(body).then(() => res.end(body), (err) => {
      console.error(err);
      for (const name of res.getHeaderNames()) res.removeHeader(name);
      problem(res, 500, 'Internal error', 'The response could not be stored; retry with the same Idempotency-Key.');
    });
    return res;
  };
  const release = () => Object.assign(res, { write, end });
  return release;
}

function idempotency(pool, { scopeOf = clientId } = {}) {
  async function begin(req, res, next) {
    const key = parseKey(req.get('idempotency-key') ?? '');
    if (!key) {
      return problem(res, 400, 'Idempotency-Key is missing',
        `${req.method} ${req.path} requires an Idempotency-Key header.`);
    }
    const body = req.body ?? Buffer.alloc(0);
    let request;
    try {
      request = fingerprint(req, body);
    } catch {
      return problem(res, 400, 'Malformed JSON', 'The request body is not valid JSON.');
    }
    req.body = 'json' in request ? request.json : body; // as express.json() or express.raw() would
    const scope = scopeOf(req);

    const db = await pool.connect();
    let begun;
    try {
      await db.query('BEGIN');
      ({ rows: [begun] } = await db.query(
        'SELECT *, ceil(extract(epoch FROM retry_after))::int AS retry_after_seconds' +
        ' FROM idem_begin($1, request => $2, scope => $3)', [key, JSON.stringify(request), scope]));
    } catch (err) {
      await rollbackAndRelease(db);
      if (err.code === '22023') return problem(res, 400, 'Invalid Idempotency-Key', err.message); // e.g. too long
      throw err;
    }

    if (begun.status !== 'started') {
      await rollbackAndRelease(db);
      if (begun.status === 'completed' || begun.status === 'failed') return replay(res, begun);
      if (begun.status === 'in_progress') {
        return problem(res, 409, 'Request in progress',
          'A request with this Idempotency-Key is being processed; retry later.',
          { 'Retry-After': String(Math.max(1, begun.retry_after_seconds ?? 1)) });
      }
      return problem(res, 422, 'Idempotency-Key reused', // mismatch
        'This Idempotency-Key was used with a different request.');
    }

    // started: the handler's writes go into this transaction (req.db), which
    // stores the response with them before it is sent.
    req.db = db;
    const release = holdResponse(res, async (responseBody) => {
      req[HELD] = undefined;
      try {
        await db.query(
          'SELECT idem_finish($1, scope => $2, response_status => $3,' +
          ' response_headers => $4, response_body => $5)',
          [key, scope, res.statusCode, JSON.stringify(storedHeaders(res)), responseBody]);
        await db.query('COMMIT');
        db.release();
      } catch (err) {
        db.release(err); // closing the connection ends its transaction
        throw err;
      }
    });
    req[HELD] = { db, release };
    next();
  }

  // Error middleware: a handler that threw is rolled back, the key included,
  // so that a retry runs it again.
  async function rollback(err, req, res, next) {
    const held = req[HELD];
    if (held) {
      req[HELD] = undefined;
      held.release();
      await rollbackAndRelease(held.db);
    }
    next(err);
  }

  const readBody = express.raw({ type: () => true, limit: '1mb' });
  return { idempotent: [readBody, begin], rollback };
}

module.exports = { idempotency, problem };
