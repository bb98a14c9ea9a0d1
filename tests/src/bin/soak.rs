//! The soak: many messages through worker processes that are killed with SIGKILL and
//! restarted all along, with 20 % of the messages really redelivered, and every figure counted
//! at the source at the end.
//!
//! ```text
//! cargo run --release -p effects-tests --bin effects-soak -- --messages 100000
//! ```
//!
//! Options (all optional): `--messages N` (100 000), `--workers N` (3 processes),
//! `--concurrency N` (8 deliveries at once per worker), `--kill-every-ms MS` (2 000: every
//! period one worker is killed and restarted; every other restart arms a fault point so the
//! next kill lands exactly on a boundary of the executor), `--requests-every N` (5: every 5th
//! input sends an HTTP request), `--fail-first-every N` (7: the first attempt of every 7th
//! request path gets a 503), `--lose-acks PCT` and `--stalls PCT` (10 and 10: the first
//! delivery of those messages loses its acknowledgement, or stalls until its redelivery was
//! acknowledged), `--inline` (the log in the store's file instead of a separate broker file),
//! `--mutant NAME` (a deliberately broken executor: the soak must then fail), `--seed N`,
//! `--dir PATH` (kept afterwards; default: a private temporary directory, removed when the
//! soak passes), `--timeout-s S` (3 600).
//!
//! It prints the figures and `RESULT lost=<n> doubled=<n> ...` and exits 0 only if nothing was
//! lost, nothing doubled and every check held. `effects-soak worker ...` is the worker process
//! it starts (see `effects_tests::harness::child`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use effects_core::executor::{FaultPoint, Mutant};
use effects_core::store::{SqliteOptions, SqliteStore, Synchronous};
use effects_tests::harness::book::{
    self, BOOKED, HANDLER_NAME, INPUTS, RECEIPTS, Requests, input_message_id, run_key, transfer_id,
};
use effects_tests::harness::child::{WorkerArgs, fault_name, mutant, worker_main};
use effects_tests::harness::figures::{self, CountingResponder, differences, lost_and_doubled};
use effects_tests::harness::process::ChildProcess;
use effects_tests::harness::redeliver::{Fate, Redeliveries};
use effects_tests::harness::tally::{
    ACK_LOST, Events, FETCH, HANDLER, PUBLISH, REDELIVERY, STALL, STALL_TIMEOUT, Tally,
};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Options {
    messages: u64,
    workers: usize,
    concurrency: usize,
    kill_every: Duration,
    requests_every: u64,
    fail_first_every: u64,
    lose_acks: u64,
    stalls: u64,
    inline: bool,
    mutant: Option<Mutant>,
    seed: u64,
    dir: Option<PathBuf>,
    timeout: Duration,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut o = Options {
            messages: 100_000,
            workers: 3,
            concurrency: 8,
            kill_every: Duration::from_millis(2_000),
            requests_every: 5,
            fail_first_every: 7,
            lose_acks: 10,
            stalls: 10,
            inline: false,
            mutant: None,
            seed: 1,
            dir: None,
            timeout: Duration::from_secs(3_600),
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "--inline" {
                o.inline = true;
                continue;
            }
            let value = it.next().ok_or_else(|| format!("`{flag}` needs a value"))?;
            let number = || -> Result<u64, String> {
                value
                    .parse::<u64>()
                    .map_err(|e| format!("`{flag} {value}`: {e}"))
            };
            match flag.as_str() {
                "--messages" => o.messages = number()?,
                "--workers" => o.workers = usize::try_from(number()?.max(1)).unwrap_or(1),
                "--concurrency" => {
                    o.concurrency = usize::try_from(number()?.max(1)).unwrap_or(1);
                }
                "--kill-every-ms" => o.kill_every = Duration::from_millis(number()?.max(100)),
                "--requests-every" => o.requests_every = number()?,
                "--fail-first-every" => o.fail_first_every = number()?,
                "--lose-acks" => o.lose_acks = number()?,
                "--stalls" => o.stalls = number()?,
                "--mutant" => {
                    o.mutant =
                        Some(mutant(value).ok_or_else(|| format!("unknown mutant `{value}`"))?);
                }
                "--seed" => o.seed = number()?,
                "--dir" => o.dir = Some(PathBuf::from(value)),
                "--timeout-s" => o.timeout = Duration::from_secs(number()?),
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        if o.lose_acks + o.stalls > 100 {
            return Err("--lose-acks and --stalls add up to more than 100 %".to_owned());
        }
        Ok(o)
    }
}

/// xorshift64*: kill timing and fault counts, reproducible with `--seed`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "worker") {
        return worker_main(&args[1..]);
    }
    let options = match Options::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start tokio: {e}");
            return ExitCode::from(2);
        }
    };
    let (dir, private) = match &options.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!(
                "effects-soak-{}-{}",
                std::process::id(),
                effects_core::store::now_millis()
            )),
            true,
        ),
    };
    if let Err(e) = std::fs::create_dir(&dir) {
        eprintln!("cannot create {}: {e} (give a new --dir)", dir.display());
        return ExitCode::from(2);
    }
    match soak(&runtime, &options, &dir) {
        Ok(true) => {
            if private {
                let _ = std::fs::remove_dir_all(&dir);
            }
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("files kept in {}", dir.display());
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("soak failed: {e}; files kept in {}", dir.display());
            ExitCode::from(1)
        }
    }
}

/// One worker slot: its process, and whether it was started with a fault point armed.
struct Slot {
    process: ChildProcess,
    armed: Option<FaultPoint>,
}

const FAULTS: [FaultPoint; 4] = [
    FaultPoint::BeforeCommit,
    FaultPoint::AfterCommit,
    FaultPoint::AfterHttpBeforeRecord,
    FaultPoint::AfterPublishBeforeMark,
];

fn soak(runtime: &tokio::runtime::Runtime, o: &Options, dir: &Path) -> Result<bool, BoxError> {
    let db = dir.join("store.db");
    let broker = (!o.inline).then(|| dir.join("broker.db"));
    let log_db = broker.clone().unwrap_or_else(|| db.clone());
    let events_dir = dir.join("events");
    let options = SqliteOptions {
        synchronous: Synchronous::Normal,
        ..SqliteOptions::default()
    };
    let responder = CountingResponder {
        fail_first_every: o.fail_first_every,
        ..CountingResponder::default()
    };
    let server = runtime.block_on(async {
        let server = MockServer::builder()
            .disable_request_recording()
            .start()
            .await;
        Mock::given(method("POST"))
            .respond_with(responder.clone())
            .mount(&server)
            .await;
        server
    });

    // Seed the inputs where the workers consume them.
    let started = Instant::now();
    runtime.block_on(async {
        let store = SqliteStore::open_with(&db, &options)?;
        let log = match &broker {
            Some(b) => SqliteStore::open_with(b, &options)?.log(),
            None => store.log(),
        };
        book::seed(&log, 0..o.messages, false).await?;
        Ok::<(), BoxError>(())
    })?;
    let seeding = started.elapsed();
    println!(
        "seeded {} inputs in {:.1} s into {}",
        o.messages,
        seeding.as_secs_f64(),
        dir.display()
    );

    let exe = std::env::current_exe()?;
    let worker_args = |fault: Option<(FaultPoint, u64)>| -> Vec<String> {
        let mut w = WorkerArgs::new(db.clone());
        w.broker = broker.clone();
        w.http = Some(server.uri());
        w.requests = Requests::Every(o.requests_every);
        w.events = Some(events_dir.clone());
        w.mutant = o.mutant;
        w.lose_acks = o.lose_acks;
        w.stalls = o.stalls;
        w.concurrency = o.concurrency;
        w.synchronous = Synchronous::Normal;
        w.visibility = Duration::from_secs(1);
        w.lease = Duration::from_secs(2);
        w.until_drained = false;
        w.timeout = o.timeout + Duration::from_secs(60);
        if let Some((point, after)) = fault {
            w.fault = Some(point);
            w.fault_after = after;
        }
        let mut args = vec!["worker".to_owned()];
        args.extend(w.to_args());
        args
    };
    let start = |slot: usize, fault: Option<(FaultPoint, u64)>| -> Result<Slot, BoxError> {
        let mut process =
            ChildProcess::spawn(&format!("worker {slot}"), &exe, &worker_args(fault))?;
        process.wait_for("READY", Duration::from_secs(60))?;
        Ok(Slot {
            process,
            armed: fault.map(|(p, _)| p),
        })
    };

    let started = Instant::now();
    let mut slots: Vec<Slot> = (0..o.workers)
        .map(|i| start(i, None))
        .collect::<Result<_, _>>()?;
    let mut rng = Rng(o.seed.max(1));
    let (mut kills, mut kills_at_faults, mut not_running, mut cycle) = (0u64, 0u64, 0u64, 0u64);
    let mut faults_hit: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut next_kill = Instant::now() + o.kill_every;
    let mut next_progress = Instant::now() + Duration::from_secs(10);
    let deadline = Instant::now() + o.timeout;
    // Bounded by the deadline: every round sleeps 50 ms.
    let drained = loop {
        std::thread::sleep(Duration::from_millis(50));
        // An armed worker that reached its fault point is killed there and restarted.
        for i in 0..slots.len() {
            let at_fault = slots[i].armed.is_some()
                && slots[i]
                    .process
                    .seen()
                    .iter()
                    .any(|l| l.starts_with("FAULT"));
            if at_fault {
                let slot = slots.swap_remove(i);
                if let Some(p) = slot.armed {
                    *faults_hit.entry(fault_name(p)).or_default() += 1;
                }
                if !slot.process.kill_9()? {
                    not_running += 1;
                }
                kills += 1;
                kills_at_faults += 1;
                slots.push(start(i, None)?);
                let last = slots.len() - 1;
                slots.swap(i, last);
            }
        }
        for slot in &mut slots {
            if !slot.process.is_running() {
                return Err(format!(
                    "a worker exited by itself; it said {:?}",
                    slot.process.seen()
                )
                .into());
            }
        }
        let unacked = figures::unacknowledged(&log_db, HANDLER_NAME, INPUTS)?;
        let (pending, _) = figures::outbox_left(&db)?;
        let open_runs = figures::sql_i64(
            &db,
            "SELECT COUNT(*) FROM effect_runs WHERE status <> 'done'",
        )?;
        if unacked == 0 && pending == 0 && open_runs == 0 {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        if Instant::now() > next_progress {
            next_progress = Instant::now() + Duration::from_secs(10);
            println!(
                "  {:>6.0} s: inputs left {unacked}, outbox pending {pending}, kills {kills}",
                started.elapsed().as_secs_f64()
            );
        }
        if Instant::now() >= next_kill {
            let jitter = rng.below(u64::try_from(o.kill_every.as_millis() / 2).unwrap_or(0));
            next_kill = Instant::now() + o.kill_every + Duration::from_millis(jitter);
            let i = usize::try_from(cycle % o.workers as u64).unwrap_or(0);
            let fault = (cycle % 2 == 1).then(|| {
                let point = FAULTS[usize::try_from((cycle / 2) % 4).unwrap_or(0)];
                (point, 1 + rng.below(20))
            });
            cycle += 1;
            let slot = slots.swap_remove(i);
            if !slot.process.kill_9()? {
                not_running += 1;
            }
            kills += 1;
            slots.push(start(i, fault)?);
            let last = slots.len() - 1;
            slots.swap(i, last);
        }
    };
    // Stop every worker gracefully (stdin closed), bounded.
    for slot in slots {
        if let Err(e) = slot.process.stop(Duration::from_secs(30)) {
            eprintln!("{e}");
        }
    }
    let elapsed = started.elapsed();

    // Figures, counted at the source.
    let n = o.messages;
    let events = Events::read_dir(&events_dir)?;
    let ids: Vec<String> = (0..n).map(transfer_id).collect();
    let keys: Vec<String> = (0..n).map(run_key).collect();
    let with_request: Vec<u64> = (0..n)
        .filter(|i| Requests::Every(o.requests_every).for_input(*i))
        .collect();
    let request_ids: Vec<String> = with_request.iter().map(|i| transfer_id(*i)).collect();
    let paths: Vec<String> = with_request
        .iter()
        .map(|i| format!("/notify/{}", transfer_id(*i)))
        .collect();

    let txs = figures::transactions_per_key(&db)?;
    let (tx_lost, tx_doubled) = lost_and_doubled(keys.iter().map(String::as_str), &txs);
    let count_sets = |m: BTreeMap<String, std::collections::BTreeSet<String>>| {
        m.into_iter()
            .map(|(k, v)| (k, v.len()))
            .collect::<BTreeMap<String, usize>>()
    };
    let booked = count_sets(figures::message_ids_by_transfer(&log_db, BOOKED)?);
    let (booked_lost, booked_doubled) = lost_and_doubled(ids.iter().map(String::as_str), &booked);
    let receipts = count_sets(figures::message_ids_by_transfer(&log_db, RECEIPTS)?);
    let (receipts_lost, receipts_doubled) =
        lost_and_doubled(request_ids.iter().map(String::as_str), &receipts);
    let http = responder
        .attempts
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let attempts = http.attempts();
    let (http_lost, _) = lost_and_doubled(paths.iter().map(String::as_str), &attempts);
    let keys_per_path = http.keys();
    let http_doubled = keys_per_path.values().filter(|k| **k > 1).count();
    let wrong_key = with_request
        .iter()
        .filter(|i| {
            http.by_path
                .get(&format!("/notify/{}", transfer_id(**i)))
                .is_some_and(|a| !a.keys.iter().all(|k| *k == format!("{}#0", run_key(**i))))
        })
        .count();
    let unexpected_receipts = differences(
        "receipts",
        request_ids.iter().map(String::as_str),
        &receipts,
        |_| 1,
    )
    .into_iter()
    .filter(|d| d.ends_with("expected 0"))
    .count();
    let unacked = figures::unacknowledged(&log_db, HANDLER_NAME, INPUTS)?;
    let (pending, dead_rows) = figures::outbox_left(&db)?;
    let dead_inputs = figures::sql_i64(&log_db, "SELECT COUNT(*) FROM log_dead_letters")?;

    let fetches = events.counts(FETCH);
    let redeliveries = events.counts(REDELIVERY);
    let was_redelivered =
        |id: &str| fetches.get(id).is_some_and(|c| *c > 1) || redeliveries.contains_key(id);
    let redelivered = (0..n)
        .map(input_message_id)
        .filter(|id| was_redelivered(id))
        .count();
    let plan = Redeliveries::new(
        o.lose_acks,
        o.stalls,
        0,
        Duration::ZERO,
        PathBuf::new(),
        Tally::in_memory(),
    );
    let planned: Vec<String> = (0..n)
        .map(input_message_id)
        .filter(|id| plan.fate(id) != Fate::Normal)
        .collect();
    let planned_not_redelivered = planned.iter().filter(|id| !was_redelivered(id)).count();
    let stall_timeouts = events.total(STALL_TIMEOUT);
    let handler_calls = events.counts(HANDLER);
    let uncalled = ids
        .iter()
        .filter(|id| !handler_calls.contains_key(*id))
        .count();
    let published = events.counts(PUBLISH);
    let republished: usize = published.values().map(|c| c.saturating_sub(1)).sum();

    let lost = tx_lost
        + booked_lost
        + receipts_lost
        + http_lost
        + usize::try_from(unacked + pending + dead_rows + dead_inputs).unwrap_or(usize::MAX);
    let doubled = tx_doubled + booked_doubled + receipts_doubled + http_doubled;
    let pct = |x: usize| 100.0 * x as f64 / n.max(1) as f64;

    println!(
        "SOAK messages={n} workers={} concurrency={} transport={} elapsed={:.1}s ({:.0} messages/s) seeding={:.1}s",
        o.workers,
        o.concurrency,
        if o.inline { "inline" } else { "separate-file" },
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64().max(0.001),
        seeding.as_secs_f64()
    );
    println!(
        "  kills: {kills} SIGKILLs ({kills_at_faults} at fault points {faults_hit:?}), restarts {kills}, killed after exiting by itself {not_running}"
    );
    println!(
        "  inputs: deliveries {} ({redelivered} inputs redelivered = {:.1} %: {} first acks lost, {} stalls past the visibility timeout, {stall_timeouts} stalls gave up; planned {} = {:.1} %, {planned_not_redelivered} of them not redelivered), unacknowledged {unacked}, dead-lettered {dead_inputs}",
        events.total(FETCH),
        pct(redelivered),
        events.total(ACK_LOST),
        events.total(STALL),
        planned.len(),
        pct(planned.len()),
    );
    println!(
        "  handler calls: {} for {n} inputs ({uncalled} never called)",
        events.total(HANDLER)
    );
    println!(
        "  runs (transactions per key): {} transactions for {n} keys: lost {tx_lost}, doubled {tx_doubled}",
        txs.values().sum::<usize>()
    );
    println!(
        "  {BOOKED} (distinct message ids per transfer): lost {booked_lost}, doubled {booked_doubled}; publish attempts {} for {} ids ({republished} published again after a kill, deduplicated by id)",
        events.total(PUBLISH),
        published.len()
    );
    println!(
        "  {RECEIPTS} (after-requests, per transfer with a request): lost {receipts_lost}, doubled {receipts_doubled}, where none was due {unexpected_receipts}"
    );
    println!(
        "  http: {} paths expected, {} attempts received, lost {http_lost}, more than one idempotency key {http_doubled}, a key other than key#0 {wrong_key}",
        paths.len(),
        http.total()
    );
    println!("  outbox: pending {pending}, dead-lettered {dead_rows}");
    let ok = drained
        && lost == 0
        && doubled == 0
        && wrong_key == 0
        && unexpected_receipts == 0
        && uncalled == 0
        && not_running == 0
        && planned_not_redelivered <= stall_timeouts;
    println!(
        "RESULT lost={lost} doubled={doubled} drained={drained} ok={ok} elapsed_s={:.1} kills={kills} redelivered_pct={:.1}",
        elapsed.as_secs_f64(),
        pct(redelivered)
    );
    Ok(ok)
}
