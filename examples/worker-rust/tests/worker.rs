//! A flaky queue runs the worker: every job is delivered one to three times
//! (copies side by side, so that they run at the same time) to several
//! workers, each with its own connection; deliveries fail, workers crash,
//! acknowledgments are lost. Then every job must have been charged exactly
//! once. Needs DATABASE_URL: a database with the idempotency extension.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use worker_rust::*;

const WORKERS: usize = 6;
const LEASE: Duration = Duration::from_secs(30);
/// The lease of a worker that is going to crash: its key is free again soon.
const SHORT_LEASE: Duration = Duration::from_secs(1);

/// Keys outlive a run (for idempotency.ttl): each run uses keys of its own.
fn run_id() -> &'static str {
    static RUN: OnceLock<String> = OnceLock::new();
    RUN.get_or_init(|| {
        format!(
            "run-{}-{}",
            std::process::id(),
            rand::random_range(0..1_000_000u32)
        )
    })
}

async fn connect() -> Client {
    let url = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL: a database with the idempotency extension");
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// The tables (once, whichever test comes first), and this test's accounts.
async fn setup(accounts: &[String]) -> Client {
    let mut client = connect().await;
    let tx = client.transaction().await.unwrap();
    tx.execute("SELECT pg_advisory_xact_lock(4242)", &[])
        .await
        .unwrap();
    tx.batch_execute(include_str!("../schema.sql"))
        .await
        .unwrap();
    tx.execute(
        "INSERT INTO accounts (id) SELECT unnest($1::text[])",
        &[&accounts],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    client
}

fn make_jobs(name: &str, n: usize, accounts: &[String]) -> Vec<Job> {
    (0..n)
        .map(|i| Job {
            id: format!("{}-{name}-{i}", run_id()),
            account: accounts[i % accounts.len()].clone(),
            amount: 100 * rand::random_range(1..=50),
        })
        .collect()
}

fn accounts(name: &str) -> Vec<String> {
    ["a", "b", "c", "d"]
        .iter()
        .map(|a| format!("{}-{name}-{a}", run_id()))
        .collect()
}

struct Payment {
    count: i64,
    id: i64,
    charge_id: Option<String>,
    stored: Option<Value>,
    stored_attempt: Option<i32>,
}

async fn payments(db: &Client, jobs: &[Job]) -> HashMap<String, Payment> {
    let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    db.query(
        "SELECT job_id, count(*), min(id), min(charge_id), g.result, g.attempt
           FROM payments LEFT JOIN LATERAL idem_get('charge:' || job_id) g ON true
          WHERE job_id = ANY($1) GROUP BY job_id, g.result, g.attempt",
        &[&ids],
    )
    .await
    .unwrap()
    .into_iter()
    .map(|r| {
        let p = Payment {
            count: r.get(1),
            id: r.get(2),
            charge_id: r.get(3),
            stored: r.get(4),
            stored_attempt: r.get(5),
        };
        (r.get(0), p)
    })
    .collect()
}

async fn balances(db: &Client, accounts: &[String]) -> HashMap<String, i64> {
    let rows = db
        .query(
            "SELECT id, balance FROM accounts WHERE id = ANY($1)",
            &[&accounts],
        )
        .await
        .unwrap();
    rows.into_iter().map(|r| (r.get(0), r.get(1))).collect()
}

fn expected_balances(jobs: &[Job]) -> HashMap<String, i64> {
    let mut sums = HashMap::new();
    for job in jobs {
        *sums.entry(job.account.clone()).or_default() += job.amount;
    }
    sums
}

// ------------------------------------------------------------ the provider

/// A payment provider on 127.0.0.1 that counts the charges it makes per
/// Idempotency-Key (and does not deduplicate them: that is the worker's
/// job here). It can be told to answer 503 the first times for a key, to
/// decline a key (402), and to be slow.
#[derive(Default)]
struct ProviderState {
    charges: HashMap<String, Vec<(String, i64)>>,
    unavailable: HashMap<String, u32>,
    declined: HashSet<String>,
    max_delay_ms: u64,
    next_id: u64,
}

async fn start_provider() -> (Provider, Arc<Mutex<ProviderState>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state = Arc::new(Mutex::new(ProviderState::default()));
    let shared = state.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, shared.clone()));
        }
    });
    (Provider::new(url), state)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        l.split_once(':')
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    })
}

/// One request per connection: `POST /charges` with a JSON body.
async fn serve(mut stream: TcpStream, state: Arc<Mutex<ProviderState>>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head, body) = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let length: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + length {
            break (head, buf[end + 4..end + 4 + length].to_vec());
        }
    };
    let key = header(&head, "idempotency-key")
        .unwrap_or_default()
        .to_owned();
    let amount = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|b| b["amount"].as_i64())
        .unwrap_or(0);
    let (status, reply, delay) = {
        let mut s = state.lock().unwrap();
        let delay = Duration::from_millis(rand::random_range(0..=s.max_delay_ms));
        if s.declined.contains(&key) {
            (
                "402 Payment Required",
                json!({ "error": "card_declined" }),
                delay,
            )
        } else if let Some(n) = s.unavailable.get_mut(&key).filter(|n| **n > 0) {
            *n -= 1;
            (
                "503 Service Unavailable",
                json!({ "error": "try again" }),
                delay,
            )
        } else {
            s.next_id += 1;
            let id = format!("ch_{}", s.next_id);
            s.charges.entry(key).or_default().push((id.clone(), amount));
            ("200 OK", json!({ "id": id }), delay)
        }
    };
    tokio::time::sleep(delay).await;
    let reply = reply.to_string();
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
        reply.len()
    );
    stream.write_all(response.as_bytes()).await
}

// ------------------------------------------------------------ the queue

#[derive(Debug)]
struct Injected(&'static str);
impl std::fmt::Display for Injected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "injected: {}", self.0)
    }
}
impl std::error::Error for Injected {}

#[derive(Clone, Copy)]
enum Crash {
    /// the worker claimed the key and died
    AfterClaim,
    /// the worker charged, checkpointed, and died
    AfterCheckpoint,
}

#[derive(Clone)]
enum Mode {
    Transaction,
    Lease(Arc<Provider>),
}

#[derive(Default)]
struct Faults {
    /// transaction mode: an error after the business write, before COMMIT
    fail_before_commit: HashSet<String>,
    /// lease mode: the worker dies holding the key (with SHORT_LEASE)
    crash: HashMap<String, Crash>,
    /// the job is done but its acknowledgment is lost: delivered again
    lose_ack: HashSet<String>,
}

struct Delivery {
    job: Job,
    after_lost_ack: bool,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Delivery>,
    in_flight: usize,
    /// removed when they happen
    faults: Faults,
    acks: Vec<(Delivery, Done)>,
    injected: usize,
    errors: Vec<String>,
}

/// Delivers every job one to three times, copies side by side, to WORKERS
/// workers; a failed delivery is delivered again later.
async fn run_queue(jobs: &[Job], mode: Mode, faults: Faults) -> Queue {
    let mut bursts: Vec<Vec<Delivery>> = jobs
        .iter()
        .map(|job| {
            (0..rand::random_range(1..=3))
                .map(|_| Delivery {
                    job: job.clone(),
                    after_lost_ack: false,
                })
                .collect()
        })
        .collect();
    for i in (1..bursts.len()).rev() {
        bursts.swap(i, rand::random_range(0..=i));
    }
    let queue = Queue {
        waiting: bursts.into_iter().flatten().collect(),
        faults,
        ..Queue::default()
    };
    let shared = Arc::new(Shared {
        queue: Mutex::new(queue),
        gate: tokio::sync::Mutex::new(()),
    });
    let mut workers = JoinSet::new();
    for _ in 0..WORKERS {
        workers.spawn(worker(shared.clone(), mode.clone()));
    }
    let drained = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(joined) = workers.join_next().await {
            joined.expect("a worker panicked");
        }
    });
    if drained.await.is_err() {
        panic!(
            "the queue did not drain in 2 minutes; errors: {:?}",
            shared.queue.lock().unwrap().errors
        );
    }
    Arc::into_inner(shared).unwrap().queue.into_inner().unwrap()
}

struct Shared {
    queue: Mutex<Queue>,
    /// Deliveries of a job with a fault pass one at a time, so that the
    /// first of them to claim the key is the one that fails.
    gate: tokio::sync::Mutex<()>,
}

async fn worker(shared: Arc<Shared>, mode: Mode) {
    let queue = &shared.queue;
    let mut client = connect().await;
    for _ in 0..10_000 {
        let next = {
            let mut q = queue.lock().unwrap();
            let next = q.waiting.pop_front();
            match next {
                Some(_) => q.in_flight += 1,
                None if q.in_flight == 0 => return,
                None => {}
            }
            next
        };
        let Some(delivery) = next else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let outcome = match inject_fault(&mut client, &mode, &shared, &delivery.job).await {
            Ok(()) => match &mode {
                Mode::Transaction => charge(&mut client, &delivery.job).await,
                Mode::Lease(provider) => {
                    charge_with_lease(&mut client, provider, &delivery.job, LEASE).await
                }
            },
            Err(e) => Err(e),
        };
        let mut q = queue.lock().unwrap();
        q.in_flight -= 1;
        match outcome {
            Ok(done) => {
                if done.status == "started" && q.faults.lose_ack.remove(&delivery.job.id) {
                    q.waiting.push_back(Delivery {
                        job: delivery.job.clone(),
                        after_lost_ack: true,
                    });
                }
                q.acks.push((delivery, done));
            }
            Err(e) => {
                if e.is::<Injected>() {
                    q.injected += 1;
                } else {
                    q.errors.push(format!("{}: {e:?}", delivery.job.id));
                }
                q.waiting.push_back(Delivery {
                    after_lost_ack: false,
                    ..delivery
                }); // nack: delivered again
            }
        }
    }
    panic!("the queue did not drain");
}

/// When the job has a fault still to happen and this delivery claims the
/// key, the fault happens: an error after the charge, before COMMIT
/// (transaction mode), or a crash of the worker holding the key (lease
/// mode). Returns Ok when there is nothing to inject.
async fn inject_fault(
    client: &mut Client,
    mode: &Mode,
    shared: &Shared,
    job: &Job,
) -> Result<(), Error> {
    let armed = |q: &Queue| {
        q.faults.fail_before_commit.contains(&job.id) || q.faults.crash.contains_key(&job.id)
    };
    if !armed(&shared.queue.lock().unwrap()) {
        return Ok(());
    }
    let _gate = shared.gate.lock().await;
    if !armed(&shared.queue.lock().unwrap()) {
        return Ok(()); // it happened in another delivery
    }
    let fired = |q: &mut Queue| {
        q.faults.fail_before_commit.remove(&job.id);
        q.faults.crash.remove(&job.id)
    };
    match mode {
        Mode::Transaction => {
            // What `charge_once` does, with an error before COMMIT.
            let tx = client.transaction().await?;
            let claim = begin(&tx, &job.key(), &job.request(), None).await?;
            assert_eq!(claim.status, "started", "the first to claim");
            write_payment(&tx, job, None).await?;
            fired(&mut shared.queue.lock().unwrap());
            Err(Injected("an error after the charge, before COMMIT").into()) // tx dropped: ROLLBACK
        }
        Mode::Lease(provider) => {
            // A worker that will die: claims with a short lease, never finishes.
            let claim = begin(&*client, &job.key(), &job.request(), Some(SHORT_LEASE)).await?;
            assert_eq!(claim.status, "started", "the first to claim");
            let crash = fired(&mut shared.queue.lock().unwrap());
            if let Some(Crash::AfterCheckpoint) = crash {
                let charge_id = provider.charge(&job.key(), job).await?;
                let point = format!("charged:{charge_id}");
                client
                    .execute(
                        "SELECT idem_checkpoint($1, $2, token => $3)",
                        &[&job.key(), &point, &claim.token],
                    )
                    .await?;
            }
            Err(Injected("the worker crashed").into())
        }
    }
}

/// What every queue run must show, in either mode.
async fn check_exactly_once(db: &Client, jobs: &[Job], q: &Queue) -> HashMap<String, Payment> {
    assert!(q.errors.is_empty(), "unexpected errors: {:?}", q.errors);
    let payments = payments(db, jobs).await;
    assert_eq!(payments.len(), jobs.len(), "a payment for every job");
    for job in jobs {
        let p = &payments[&job.id];
        assert_eq!(p.count, 1, "job {} charged once", job.id);
        assert_eq!(
            p.stored.as_ref().unwrap()["payment_id"],
            json!(p.id),
            "the stored result names the payment"
        );
        let acks: Vec<_> = q.acks.iter().filter(|(d, _)| d.job.id == job.id).collect();
        assert_eq!(
            acks.iter()
                .filter(|(_, done)| done.status == "started")
                .count(),
            1,
            "one delivery did the work"
        );
        for (delivery, done) in acks {
            assert_eq!(
                Some(&done.result),
                p.stored.as_ref(),
                "every delivery ends with the same result"
            );
            assert_ne!(done.status, "failed");
            if delivery.after_lost_ack {
                assert_eq!(
                    done.status, "completed",
                    "a redelivery after a lost ack replays"
                );
            }
        }
    }
    let accounts: Vec<String> = expected_balances(jobs).into_keys().collect();
    assert_eq!(
        balances(db, &accounts).await,
        expected_balances(jobs),
        "balances: each job counted once"
    );
    payments
}

fn summary(jobs: &[Job], q: &Queue) -> String {
    let mut retried: HashMap<&str, usize> = HashMap::new();
    for why in q.acks.iter().flat_map(|(_, done)| &done.retried) {
        *retried.entry(why.as_str()).or_default() += 1;
    }
    let count = |s: &str| q.acks.iter().filter(|(_, d)| d.status == s).count();
    format!(
        "{} jobs, {} deliveries acknowledged: {} started, {} replayed; {} injected failures redelivered; retries {retried:?}",
        jobs.len(),
        q.acks.len(),
        count("started"),
        count("completed"),
        q.injected
    )
}

// ------------------------------------------------------------ the tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_charges_every_job_once() {
    let accounts = accounts("tx");
    let db = setup(&accounts).await;
    let jobs = make_jobs("tx", 40, &accounts);
    let faults = Faults {
        fail_before_commit: jobs.iter().step_by(7).map(|j| j.id.clone()).collect(),
        lose_ack: jobs
            .iter()
            .skip(3)
            .step_by(7)
            .map(|j| j.id.clone())
            .collect(),
        ..Faults::default()
    };
    let (to_fail, to_lose) = (faults.fail_before_commit.len(), faults.lose_ack.len());

    let q = run_queue(&jobs, Mode::Transaction, faults).await;
    println!("{}", summary(&jobs, &q));

    assert_eq!(q.injected, to_fail, "every injected failure happened");
    assert!(q.faults.fail_before_commit.is_empty() && q.faults.lose_ack.is_empty());
    assert_eq!(
        q.acks.iter().filter(|(d, _)| d.after_lost_ack).count(),
        to_lose
    );
    check_exactly_once(&db, &jobs, &q).await;
    for (_, done) in &q.acks {
        assert_eq!(done.attempt, 1, "a rolled-back try is not an attempt");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_mode_charges_the_provider_once_per_job() {
    let accounts = accounts("lease");
    let db = setup(&accounts).await;
    let jobs = make_jobs("lease", 24, &accounts);
    let (provider, state) = start_provider().await;
    let pick = |from: usize| jobs.iter().skip(from).step_by(6).map(|j| j.id.clone());
    let unavailable: HashSet<String> = pick(1).collect();
    let crashed: HashSet<String> = pick(2).chain(pick(3)).collect();
    {
        let mut s = state.lock().unwrap();
        s.max_delay_ms = 40;
        s.unavailable = unavailable
            .iter()
            .map(|id| (format!("charge:{id}"), 1))
            .collect();
    }
    let faults = Faults {
        crash: pick(2)
            .map(|id| (id, Crash::AfterClaim))
            .chain(pick(3).map(|id| (id, Crash::AfterCheckpoint)))
            .collect(),
        lose_ack: pick(4).collect(),
        ..Faults::default()
    };

    let q = run_queue(&jobs, Mode::Lease(Arc::new(provider)), faults).await;
    println!("{}", summary(&jobs, &q));

    assert_eq!(q.injected, crashed.len(), "every crash happened");
    assert!(q.faults.crash.is_empty() && q.faults.lose_ack.is_empty());
    let payments = check_exactly_once(&db, &jobs, &q).await;
    let s = state.lock().unwrap();
    assert_eq!(
        s.charges.len(),
        jobs.len(),
        "the provider charged every job"
    );
    for job in &jobs {
        let charges = &s.charges[&job.key()];
        assert_eq!(charges.len(), 1, "the provider charged job {} once", job.id);
        assert_eq!(charges[0].1, job.amount);
        let p = &payments[&job.id];
        assert_eq!(
            p.charge_id.as_deref(),
            Some(charges[0].0.as_str()),
            "the payment row names the provider's charge"
        );
        assert_eq!(p.stored.as_ref().unwrap()["charge_id"], json!(charges[0].0));
        // A crashed holder's lease ended and a redelivery took over; a 503
        // released the key: each is one attempt more.
        let attempts = 1 + crashed.contains(&job.id) as i32 + unavailable.contains(&job.id) as i32;
        assert_eq!(p.stored_attempt, Some(attempts), "job {}", job.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_lease_ended_is_fenced_off() {
    let accounts = accounts("fence");
    let db = setup(&accounts).await;
    let job = make_jobs("fence", 1, &accounts).remove(0);
    let (provider, state) = start_provider().await;

    // Worker A claims, charges, checkpoints, and then stalls past its lease.
    let mut a = connect().await;
    let claim = begin(&a, &job.key(), &job.request(), Some(SHORT_LEASE))
        .await
        .unwrap();
    assert_eq!((claim.status.as_str(), claim.attempt), ("started", Some(1)));
    let charge_id = provider.charge(&job.key(), &job).await.unwrap();
    a.execute(
        "SELECT idem_checkpoint($1, $2, token => $3)",
        &[&job.key(), &format!("charged:{charge_id}"), &claim.token],
    )
    .await
    .unwrap();

    // A redelivery waits for the lease to end, takes the key over and
    // resumes after the charge.
    let mut b = connect().await;
    let done = charge_with_lease(&mut b, &provider, &job, LEASE)
        .await
        .unwrap();
    assert_eq!((done.status.as_str(), done.attempt), ("started", 2));
    assert_eq!(
        done.result["charge_id"],
        json!(charge_id),
        "resumed from the checkpoint, not charged again"
    );

    // A wakes up: its token is no longer current, it is refused and writes nothing.
    let err = finish_phase(&mut a, &job, claim.token, &charge_id)
        .await
        .unwrap_err();
    assert_eq!(
        sqlstate(&err),
        Some(&SqlState::T_R_SERIALIZATION_FAILURE),
        "{err:?}"
    );
    let again = charge_with_lease(&mut a, &provider, &job, LEASE)
        .await
        .unwrap();
    assert_eq!(
        (again.status.as_str(), &again.result),
        ("completed", &done.result)
    );

    let p = &payments(&db, std::slice::from_ref(&job)).await[&job.id];
    assert_eq!(p.count, 1);
    assert_eq!(state.lock().unwrap().charges[&job.key()].len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_charge_fails_for_good() {
    let accounts = accounts("declined");
    let db = setup(&accounts).await;
    let job = make_jobs("declined", 1, &accounts).remove(0);
    let (provider, state) = start_provider().await;
    state.lock().unwrap().declined.insert(job.key());
    let provider = Arc::new(provider);

    let mut tasks = JoinSet::new();
    for _ in 0..4 {
        let (provider, job) = (provider.clone(), job.clone());
        tasks.spawn(async move {
            charge_with_lease(&mut connect().await, &provider, &job, LEASE)
                .await
                .unwrap()
        });
    }
    let outcomes: Vec<Done> = tasks.join_all().await;
    let first = &outcomes[0];
    assert!(
        first.result["error"].as_str().unwrap().contains("402"),
        "{:?}",
        first.result
    );
    for done in &outcomes {
        assert_eq!(
            (done.status.as_str(), &done.result),
            ("failed", &first.result)
        );
    }
    assert!(
        payments(&db, std::slice::from_ref(&job)).await.is_empty(),
        "no payment"
    );
    assert!(state.lock().unwrap().charges.is_empty());
}

#[tokio::test]
async fn the_same_key_with_another_request_is_refused() {
    let accounts = accounts("mismatch");
    let mut db = setup(&accounts).await;
    let job = make_jobs("mismatch", 1, &accounts).remove(0);
    assert_eq!(charge(&mut db, &job).await.unwrap().status, "started");
    let changed = Job {
        amount: job.amount + 100,
        ..job.clone()
    };
    let err = charge(&mut db, &changed).await.unwrap_err();
    assert!(err.to_string().contains("mismatch"), "{err}");
    assert_eq!(
        payments(&db, &[job])
            .await
            .into_values()
            .map(|p| p.count)
            .sum::<i64>(),
        1
    );
}

#[test]
fn backoff_is_capped_and_jittered() {
    for attempt in 0..40 {
        assert!(backoff(attempt) <= Duration::from_millis(1000.min(10 << attempt.min(20))));
    }
    let samples: HashSet<Duration> = (0..20).map(|_| backoff(6)).collect();
    assert!(samples.len() > 1);
}
