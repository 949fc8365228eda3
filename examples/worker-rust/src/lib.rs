//! A payment job worker that charges each job exactly once, however often
//! the queue delivers it, with the idempotency extension:
//!
//! - transaction mode ([`charge`]): the key's claim, the business write and
//!   the stored result commit together; a failure rolls all three back.
//! - lease mode ([`charge_with_lease`]): the charge happens at an outside
//!   payment provider, which no ROLLBACK undoes. The claim commits first and
//!   holds the key for a lease; a checkpoint records the charge; the payment
//!   row and the result commit together, fenced by the lease's token.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, GenericClient, IsolationLevel, Transaction};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Tries per delivery before it is handed back to the queue.
const MAX_TRIES: u32 = 20;

#[derive(Clone, Debug)]
pub struct Job {
    pub id: String,
    pub account: String,
    pub amount: i64,
}

impl Job {
    pub fn key(&self) -> String {
        format!("charge:{}", self.id)
    }
    /// What the key stands for: the same key with another request is a `mismatch`.
    pub fn request(&self) -> Value {
        json!({ "account": self.account, "amount": self.amount })
    }
}

/// `idem_begin`'s answer.
#[derive(Clone, Debug)]
pub struct Claim {
    pub status: String,
    pub result: Option<Value>,
    /// NULL for `mismatch`
    pub attempt: Option<i32>,
    pub recovery_point: Option<String>,
    pub token: Option<i64>,
    pub retry_after: Option<Duration>,
}

/// How a delivery ended.
#[derive(Clone, Debug)]
pub struct Done {
    /// `started`: this delivery did the work; `completed`: it got the
    /// stored result; `failed`: a permanent failure (this one's or stored).
    pub status: String,
    pub result: Value,
    pub attempt: i32,
    /// Why it had to try again before that: "in_progress", "40001", "provider".
    pub retried: Vec<String>,
}

/// Exponential backoff with "full jitter": a random delay between 0 and
/// 10 ms * 2^attempt, capped at one second.
pub fn backoff(attempt: u32) -> Duration {
    let ceiling_ms = (10.0 * 2f64.powi(attempt.min(20) as i32)).min(1000.0);
    Duration::from_secs_f64(rand::random_range(0.0..=ceiling_ms) / 1000.0)
}

pub fn sqlstate(err: &Error) -> Option<&SqlState> {
    err.downcast_ref::<tokio_postgres::Error>()?.code()
}

/// `idem_begin`, in transaction mode (`lease: None`) or lease mode.
pub async fn begin(
    db: &impl GenericClient,
    key: &str,
    request: &Value,
    lease: Option<Duration>,
) -> Result<Claim, Error> {
    let row = db
        .query_one(
            "SELECT status, result, attempt, recovery_point, token,
                    extract(epoch FROM retry_after)::float8 AS retry_after
               FROM idem_begin($1, $2, lease => make_interval(secs => $3))",
            &[&key, request, &lease.map(|l| l.as_secs_f64())],
        )
        .await?;
    Ok(Claim {
        status: row.get("status"),
        result: row.get("result"),
        attempt: row.get("attempt"),
        recovery_point: row.get("recovery_point"),
        token: row.get("token"),
        retry_after: row
            .get::<_, Option<f64>>("retry_after")
            .map(Duration::from_secs_f64),
    })
}

/// The business write: the payment row and the account's balance.
pub async fn write_payment(
    tx: &Transaction<'_>,
    job: &Job,
    charge_id: Option<&str>,
) -> Result<Value, Error> {
    let row = tx
        .query_one(
            "INSERT INTO payments (job_id, account, amount, charge_id) VALUES ($1, $2, $3, $4) RETURNING id",
            &[&job.id, &job.account, &job.amount, &charge_id],
        )
        .await?;
    tx.execute(
        "UPDATE accounts SET balance = balance + $2 WHERE id = $1",
        &[&job.account, &job.amount],
    )
    .await?;
    let payment_id: i64 = row.get(0);
    Ok(match charge_id {
        Some(charge_id) => json!({ "payment_id": payment_id, "charge_id": charge_id }),
        None => json!({ "payment_id": payment_id }),
    })
}

// ---------------------------------------------------------------- transaction mode

/// Transaction mode, one try: claim the key, charge, store the result and
/// commit, all in one transaction. A claim that is not `started` is
/// returned as it is.
pub async fn charge_once(client: &mut Client, job: &Job) -> Result<Claim, Error> {
    let key = job.key();
    // REPEATABLE READ: two jobs updating one balance at the same time make
    // one of them fail with 40001; it is retried.
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .start()
        .await?;
    let claim = begin(&tx, &key, &job.request(), None).await?;
    if claim.status != "started" {
        tx.commit().await?; // nothing was written
        return Ok(claim);
    }
    // On an error `tx` is dropped: ROLLBACK releases the key together with
    // the payment, and the next delivery starts afresh.
    let result = write_payment(&tx, job, None).await?;
    tx.execute("SELECT idem_finish($1, $2)", &[&key, &result])
        .await?;
    tx.commit().await?;
    Ok(Claim {
        result: Some(result),
        ..claim
    })
}

/// Transaction mode, to the end: retries `in_progress`, 40001, deadlocks
/// and lock timeouts with backoff. Other errors (and `mismatch`) go to the
/// caller, whose queue delivers the job again later.
pub async fn charge(client: &mut Client, job: &Job) -> Result<Done, Error> {
    const RETRY: [SqlState; 3] = [
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::LOCK_NOT_AVAILABLE,
    ];
    let mut retried = Vec::new();
    for attempt in 1..=MAX_TRIES {
        match charge_once(client, job).await {
            Ok(claim) if claim.status == "in_progress" => retried.push(claim.status),
            Ok(claim) => return done(&job.key(), claim, retried),
            Err(e) => match sqlstate(&e) {
                Some(code) if RETRY.contains(code) => retried.push(code.code().to_owned()),
                _ => return Err(e),
            },
        }
        tokio::time::sleep(backoff(attempt)).await;
    }
    Err(format!("{}: gave up after {MAX_TRIES} tries", job.key()).into())
}

fn done(key: &str, claim: Claim, retried: Vec<String>) -> Result<Done, Error> {
    match claim.status.as_str() {
        "started" | "completed" | "failed" => Ok(Done {
            status: claim.status,
            result: claim.result.unwrap_or_default(),
            attempt: claim.attempt.unwrap_or_default(),
            retried,
        }),
        other => Err(format!("{key}: {other}").into()), // mismatch: another request under this key
    }
}

// ---------------------------------------------------------------- lease mode

/// The outside payment provider's client.
pub struct Provider {
    http: reqwest::Client,
    url: String,
}

impl Provider {
    pub fn new(url: impl Into<String>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("an HTTP client");
        Provider {
            http,
            url: url.into(),
        }
    }

    /// Charges the job and returns the provider's charge id. Our key goes
    /// along as the provider's Idempotency-Key.
    pub async fn charge(&self, key: &str, job: &Job) -> Result<String, reqwest::Error> {
        #[derive(serde::Deserialize)]
        struct Charge {
            id: String,
        }
        let charge: Charge = self
            .http
            .post(format!("{}/charges", self.url))
            .header("Idempotency-Key", key)
            .json(&json!({ "account": job.account, "amount": job.amount }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(charge.id)
    }
}

/// Lease mode, one try. The claim commits at once (autocommit), so it
/// survives a crash of this worker: once the lease ends, the next delivery
/// takes the key over and resumes from the last checkpoint.
pub async fn charge_with_lease_once(
    client: &mut Client,
    provider: &Provider,
    job: &Job,
    lease: Duration,
) -> Result<Claim, Error> {
    let key = job.key();
    let claim = begin(&*client, &key, &job.request(), Some(lease)).await?;
    if claim.status != "started" {
        return Ok(claim);
    }
    // Phase 1: the charge, unless a holder before us got that far.
    let charge_id = match claim
        .recovery_point
        .as_deref()
        .and_then(|p| p.strip_prefix("charged:"))
    {
        Some(charge_id) => charge_id.to_owned(),
        None => match provider.charge(&key, job).await {
            Ok(charge_id) => {
                // Renews the lease too. 40001: the lease ended and another worker took the key over.
                let point = format!("charged:{charge_id}");
                client
                    .execute(
                        "SELECT idem_checkpoint($1, $2, token => $3)",
                        &[&key, &point, &claim.token],
                    )
                    .await?;
                charge_id
            }
            Err(e) => {
                // A 4xx (a declined card) is final: every later delivery
                // gets `failed` with this error. Anything else releases
                // the key at once for the next try.
                let permanent = e.status().is_some_and(|s| s.is_client_error());
                let error = json!({ "error": e.to_string() });
                client
                    .execute(
                        "SELECT idem_fail($1, $2, retryable => $3, token => $4)",
                        &[&key, &error, &!permanent, &claim.token],
                    )
                    .await?;
                if permanent {
                    return Ok(Claim {
                        status: "failed".into(),
                        result: Some(error),
                        ..claim
                    });
                }
                return Err(e.into());
            }
        },
    };
    // Phase 2: the payment row and the result.
    let result = finish_phase(client, job, claim.token, &charge_id).await?;
    Ok(Claim {
        result: Some(result),
        ..claim
    })
}

/// Lease mode, phase 2: the payment row and the result commit together.
/// With a token that is no longer current, `idem_finish` fails with 40001
/// and the row rolls back with it.
pub async fn finish_phase(
    client: &mut Client,
    job: &Job,
    token: Option<i64>,
    charge_id: &str,
) -> Result<Value, Error> {
    let tx = client.transaction().await?;
    let result = write_payment(&tx, job, Some(charge_id)).await?;
    tx.execute(
        "SELECT idem_finish($1, $2, token => $3)",
        &[&job.key(), &result, &token],
    )
    .await?;
    tx.commit().await?;
    Ok(result)
}

/// Lease mode, to the end: retries `in_progress` (polling with backoff, never
/// longer than the holder's lease has left) and a provider error that
/// released the key. 40001 means this worker was fenced off: it stops
/// (returns the error) and leaves the job to the key's new holder.
pub async fn charge_with_lease(
    client: &mut Client,
    provider: &Provider,
    job: &Job,
    lease: Duration,
) -> Result<Done, Error> {
    let key = job.key();
    let mut retried = Vec::new();
    for attempt in 1..=MAX_TRIES {
        let mut pause = backoff(attempt);
        match charge_with_lease_once(client, provider, job, lease).await {
            Ok(claim) if claim.status == "in_progress" => {
                pause = pause.min(claim.retry_after.unwrap_or(pause));
                retried.push(claim.status);
            }
            Ok(claim) => return done(&key, claim, retried),
            Err(e) if e.is::<reqwest::Error>() => retried.push("provider".into()),
            Err(e) => return Err(e),
        }
        tokio::time::sleep(pause).await;
    }
    Err(format!("{key}: gave up after {MAX_TRIES} tries").into())
}
