//! The commands, written against `Store + Inspect` so that they work on every store.

use std::time::Duration;

use effects_core::LookupRef;
use effects_core::store::{
    DeadLetterEntry, DeadLetterId, DeadLetterKind, Inspect, Millis, OutboxEntry, OutboxKind,
    PruneOlderThan, RequestOutcome, RetryOutcome, RetryRequest, RunQuery, RunState, Store,
    StoreError, Tx,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::cli::{
    Cli, Command, DeadLettersCommand, HistoryArgs, InputsCommand, KindArg, OutboxCommand,
    PruneArgs, RetryArgs, RunsCommand, StatusArg,
};
use crate::open::{OpenError, StoreUrl};
use crate::table::{cut, or_dash, table};
use crate::time;
use crate::view::{
    BlockedInputView, DatomView, DeadLetterView, HistoryView, OutboxView, PruneView, RetryView,
    RunDetailView, RunView, payload_value,
};

/// What a command printed, and whether it did all it was asked.
#[derive(Debug)]
pub(crate) struct Output {
    /// For stdout.
    pub(crate) text: String,
    /// `false`: exit with a failure status (some retries were refused).
    pub(crate) ok: bool,
}

impl Output {
    fn ok(text: String) -> Output {
        Output { text, ok: true }
    }
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// The store could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// What was asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An argument is not valid.
    #[error("{0}")]
    Usage(String),
}

/// Opens the store named on the command line and runs the command on it.
pub(crate) async fn execute(cli: Cli) -> Result<Output, CliError> {
    let url = cli.store.as_deref().ok_or(OpenError::Missing)?;
    match StoreUrl::parse(url)? {
        StoreUrl::Sqlite(path) => {
            let store = StoreUrl::open_sqlite(&path)?;
            run(&store, cli.command, cli.json).await
        }
        StoreUrl::Postgres(url) => {
            let store = StoreUrl::open_postgres(&url, &cli.schema).await?;
            run(&store, cli.command, cli.json).await
        }
    }
}

fn json<T: Serialize>(value: &T) -> String {
    // The views hold strings, numbers and JSON values only: they always serialize.
    let mut text =
        serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

async fn run<S: Store + Inspect>(
    store: &S,
    command: Command,
    as_json: bool,
) -> Result<Output, CliError> {
    match command {
        Command::Runs(RunsCommand::Show { key }) => runs_show(store, &key, as_json).await,
        Command::Runs(RunsCommand::List {
            status,
            since,
            limit,
        }) => runs_list(store, status, since.as_deref(), limit, as_json).await,
        Command::Outbox(OutboxCommand::Pending { limit }) => {
            outbox_pending(store, limit, as_json).await
        }
        Command::DeadLetters(DeadLettersCommand::List { limit }) => {
            dead_letters_list(store, limit, as_json).await
        }
        Command::DeadLetters(DeadLettersCommand::Retry(args)) => retry(store, args, as_json).await,
        Command::Inputs(InputsCommand::Blocked { limit }) => {
            inputs_blocked(store, limit, as_json).await
        }
        Command::History(args) => history(store, args, as_json).await,
        Command::Prune(args) => prune(store, args, as_json).await,
    }
}

// ---------------------------------------------------------------------------------------------
// runs

async fn runs_list<S: Inspect>(
    store: &S,
    status: Option<StatusArg>,
    since: Option<&str>,
    limit: usize,
    as_json: bool,
) -> Result<Output, CliError> {
    let since = match since {
        None => None,
        Some(text) => Some(time::parse_since(text, store.clock().await?).map_err(CliError::Usage)?),
    };
    let state = status.map(|s| match s {
        StatusArg::Pending => RunState::Pending,
        StatusArg::DeadLettered => RunState::DeadLettered,
        StatusArg::Done => RunState::Done,
    });
    let runs = store
        .runs(RunQuery {
            state,
            since,
            limit,
        })
        .await?;
    if as_json {
        let views: Vec<RunView> = runs.iter().map(RunView::summary).collect();
        return Ok(Output::ok(json(&views)));
    }
    let rows = runs.iter().map(|s| {
        vec![
            s.run.key.clone(),
            s.run.tx.to_string(),
            s.run.status.as_str().to_owned(),
            time::format(s.run.created_at),
            s.dispatched.to_string(),
            s.pending.to_string(),
            s.dead_lettered.to_string(),
        ]
    });
    Ok(Output::ok(table(
        &[
            "key",
            "tx",
            "status",
            "applied at",
            "dispatched",
            "pending",
            "dead-lettered",
        ],
        rows,
    )))
}

async fn runs_show<S: Inspect>(store: &S, key: &str, as_json: bool) -> Result<Output, CliError> {
    let Some(detail) = store.run_detail(key).await? else {
        return Err(CliError::NotFound(format!(
            "no run with key `{key}` (never applied, or pruned): `effects runs list` shows the keys"
        )));
    };
    let (requests, messages): (Vec<&OutboxEntry>, Vec<&OutboxEntry>) = detail
        .outbox
        .iter()
        .partition(|e| e.row.kind == OutboxKind::Request);
    if as_json {
        let view = RunDetailView {
            run: RunView::of(&detail.run),
            datoms: detail.datoms.iter().map(DatomView::of).collect(),
            requests: requests.iter().map(|e| OutboxView::of(e)).collect(),
            messages: messages.iter().map(|e| OutboxView::of(e)).collect(),
        };
        return Ok(Output::ok(json(&view)));
    }
    let run = &detail.run;
    let mut out = format!("Run {}\n", run.key);
    out += &crate::table::fields([
        ["status", run.status.as_str()].map(str::to_owned),
        ["tx".to_owned(), run.tx.to_string()],
        ["applied at".to_owned(), time::format(run.created_at)],
        ["last progress".to_owned(), time::format(run.updated_at)],
        [
            "completed at".to_owned(),
            or_dash(run.completed_at.map(time::format)),
        ],
        ["effects sha256".to_owned(), run.effects_sha256.clone()],
        [
            "after-requests".to_owned(),
            or_dash(run.after_requests.clone()),
        ],
    ]);
    out += &format!("\nDatoms written in tx {}\n", run.tx);
    out += &table(
        &["entity", "attribute", "op", "value"],
        detail.datoms.iter().map(|d| {
            vec![
                d.entity.to_string(),
                d.attribute.clone(),
                crate::view::op_name(d.op).to_owned(),
                cut(&d.value.to_string(), 60),
            ]
        }),
    );
    out += "\nRequests (Idempotency-Key is the id)\n";
    out += &table(
        &[
            "id",
            "request",
            "attempts",
            "outcome",
            "response",
            "recorded at",
        ],
        requests.iter().map(|e| request_row(e)),
    );
    out += "\nMessages (the broker message id is the id)\n";
    out += &table(
        &["id", "topic", "key", "payload", "attempts", "dispatched"],
        messages.iter().map(|e| {
            vec![
                e.row.id.clone(),
                e.row.destination.clone(),
                or_dash(e.row.partition_key.clone()),
                cut(&e.row.payload, 60),
                e.row.attempts.to_string(),
                dispatch_state(e),
            ]
        }),
    );
    let retries: Vec<_> = detail.outbox.iter().flat_map(|e| &e.retries).collect();
    if !retries.is_empty() {
        out += "\nRetries by operators\n";
        out += &table(
            &["id", "at", "operator", "why", "was dead-lettered for"],
            retries.iter().map(|r| {
                vec![
                    r.target.clone(),
                    time::format(r.retried_at),
                    r.operator.clone(),
                    r.reason.clone(),
                    r.dead_letter_reason.clone(),
                ]
            }),
        );
    }
    Ok(Output::ok(out))
}

fn request_row(e: &OutboxEntry) -> Vec<String> {
    let request = match e.row.request() {
        Ok(r) => format!("{} {} {}", r.method, r.endpoint, r.path),
        Err(_) => format!("? {}", e.row.destination),
    };
    let (outcome, response) = match &e.recorded {
        Some(recorded) => match &recorded.outcome {
            RequestOutcome::Response { response } => (
                "answered".to_owned(),
                format!(
                    "{} {}",
                    response.status,
                    cut(&response.body.to_string(), 40)
                ),
            ),
            RequestOutcome::Rejected { response } => (
                "rejected: dead-lettered".to_owned(),
                format!(
                    "{} {}",
                    response.status,
                    cut(&response.body.to_string(), 40)
                ),
            ),
            RequestOutcome::Failed { reason } => {
                ("failed: dead-lettered".to_owned(), cut(reason, 50))
            }
        },
        None => (dispatch_state(e), "-".to_owned()),
    };
    vec![
        e.row.id.clone(),
        request,
        e.row.attempts.to_string(),
        outcome,
        response,
        or_dash(e.recorded.as_ref().map(|r| time::format(r.recorded_at))),
    ]
}

fn dispatch_state(e: &OutboxEntry) -> String {
    if let Some(at) = e.row.dispatched_at {
        return time::format(at);
    }
    if let Some(reason) = &e.row.dead_lettered {
        return format!("dead-lettered: {}", cut(reason, 50));
    }
    match &e.row.last_error {
        Some(error) => format!("pending (last failure: {})", cut(error, 40)),
        None => "pending".to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// outbox

fn waiting_reason(e: &OutboxEntry, now: Millis) -> String {
    let row = &e.row;
    if !e.ready {
        return "waits for its run's requests".to_owned();
    }
    if let (Some(lease), Some(until)) = (&row.lease, row.lease_until) {
        if until > now {
            return format!(
                "being sent by {} (lease for {} more)",
                lease.owner,
                time::format_age(until - now)
            );
        }
    }
    let failure = row
        .last_error
        .as_deref()
        .map(|e| format!("; last failure: {}", cut(e, 50)))
        .unwrap_or_default();
    if row.next_attempt_at > now {
        return format!(
            "retry in {}{failure}",
            time::format_age(row.next_attempt_at - now)
        );
    }
    format!("due now{failure}")
}

async fn outbox_pending<S: Inspect>(
    store: &S,
    limit: usize,
    as_json: bool,
) -> Result<Output, CliError> {
    let rows = store.pending(limit).await?;
    if as_json {
        let views: Vec<OutboxView> = rows.iter().map(OutboxView::of).collect();
        return Ok(Output::ok(json(&views)));
    }
    let now = store.clock().await?;
    Ok(Output::ok(table(
        &[
            "id",
            "kind",
            "destination",
            "age",
            "attempts",
            "why it waits",
        ],
        rows.iter().map(|e| {
            vec![
                e.row.id.clone(),
                e.row.kind.as_str().to_owned(),
                e.row.destination.clone(),
                time::format_age(now - e.created_at),
                e.row.attempts.to_string(),
                waiting_reason(e, now),
            ]
        }),
    )))
}

// ---------------------------------------------------------------------------------------------
// dead letters

async fn dead_letters_list<S: Inspect>(
    store: &S,
    limit: usize,
    as_json: bool,
) -> Result<Output, CliError> {
    let letters = store.dead_letters(limit).await?;
    if as_json {
        let views: Vec<DeadLetterView> = letters.iter().map(DeadLetterView::of).collect();
        return Ok(Output::ok(json(&views)));
    }
    Ok(Output::ok(table(
        &["id", "kind", "of", "to", "attempts", "reason", "payload"],
        letters.iter().map(|d| {
            let (of, to, attempts, payload) = match d {
                DeadLetterEntry::Outbox(e) => (
                    format!("run {}", e.row.run_key),
                    e.row.destination.clone(),
                    e.row.attempts,
                    e.row.payload.clone(),
                ),
                DeadLetterEntry::Input(i) => (
                    format!("consumer {}", i.consumer),
                    i.topic.clone(),
                    i.deliveries,
                    payload_value(&i.payload).to_string(),
                ),
            };
            vec![
                d.id().to_string(),
                d.kind().as_str().to_owned(),
                of,
                to,
                attempts.to_string(),
                cut(d.reason(), 70),
                cut(&payload, 40),
            ]
        }),
    )))
}

fn operator(args: &RetryArgs) -> Result<String, CliError> {
    args.operator
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .filter(|o| !o.trim().is_empty())
        .ok_or_else(|| {
            CliError::Usage(
                "who is retrying? pass `--operator NAME` (or set EFFECTS_OPERATOR): it is recorded"
                    .to_owned(),
            )
        })
}

async fn retry<S: Inspect>(store: &S, args: RetryArgs, as_json: bool) -> Result<Output, CliError> {
    if args.reason.trim().is_empty() {
        return Err(CliError::Usage(
            "say why with `--reason`: it is recorded with the retry".to_owned(),
        ));
    }
    let request = RetryRequest {
        operator: operator(&args)?,
        reason: args.reason.clone(),
    };
    let ids: Vec<DeadLetterId> = if args.all {
        let kind = args.kind.map(|k| match k {
            KindArg::Request => DeadLetterKind::Request,
            KindArg::Message => DeadLetterKind::Message,
            KindArg::Input => DeadLetterKind::Input,
        });
        store
            .dead_letters(usize::MAX)
            .await?
            .iter()
            .filter(|d| kind.is_none_or(|k| d.kind() == k))
            .map(DeadLetterEntry::id)
            .collect()
    } else {
        args.ids
            .iter()
            .map(|id| id.parse::<DeadLetterId>().map_err(CliError::Usage))
            .collect::<Result<_, _>>()?
    };
    let progress = ProgressBar::new(ids.len() as u64);
    progress.set_style(
        ProgressStyle::with_template("retrying {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if !args.all {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut results = Vec::with_capacity(ids.len());
    for id in &ids {
        progress.set_message(id.to_string());
        let view = match store.retry_dead_letter(id, &request).await {
            Ok(RetryOutcome::Retried(record)) => RetryView {
                id: id.to_string(),
                outcome: "retried",
                reason: None,
                record: Some(record),
            },
            Ok(RetryOutcome::NotFound) => RetryView {
                id: id.to_string(),
                outcome: "not_found",
                reason: Some("no dead letter has this id".to_owned()),
                record: None,
            },
            Ok(RetryOutcome::NotDeadLettered) => RetryView {
                id: id.to_string(),
                outcome: "not_dead_lettered",
                reason: Some("it is not dead-lettered (any more): nothing to retry".to_owned()),
                record: None,
            },
            Ok(RetryOutcome::Refused { reason }) => RetryView {
                id: id.to_string(),
                outcome: "refused",
                reason: Some(reason),
                record: None,
            },
            Err(e) => RetryView {
                id: id.to_string(),
                outcome: "error",
                reason: Some(e.to_string()),
                record: None,
            },
        };
        results.push(view);
        progress.inc(1);
    }
    progress.finish_and_clear();
    let ok = results.iter().all(|r| r.outcome == "retried");
    let text = if as_json {
        json(&results)
    } else {
        table(
            &["id", "outcome", "detail"],
            results.iter().map(|r| {
                let detail = match (&r.record, &r.reason) {
                    (Some(record), _) => match record.kind {
                        DeadLetterKind::Input => {
                            format!("delivered again to its consumer (retry {})", record.id)
                        }
                        _ => format!("pending again for the relay (retry {})", record.id),
                    },
                    (None, Some(reason)) => reason.clone(),
                    (None, None) => String::new(),
                };
                vec![r.id.clone(), r.outcome.replace('_', " "), detail]
            }),
        )
    };
    Ok(Output { text, ok })
}

// ---------------------------------------------------------------------------------------------
// inputs

async fn inputs_blocked<S: Inspect>(
    store: &S,
    limit: usize,
    as_json: bool,
) -> Result<Output, CliError> {
    // The clock first: ages are never negative for reports written after it was read.
    let now = store.clock().await?;
    let blocked = store.blocked_inputs(limit).await?;
    if as_json {
        let views: Vec<BlockedInputView> = blocked
            .iter()
            .map(|b| BlockedInputView::of(b, now))
            .collect();
        return Ok(Output::ok(json(&views)));
    }
    Ok(Output::ok(table(
        &[
            "consumer",
            "topic",
            "key",
            "message",
            "failing since",
            "for",
            "attempts",
            "reason",
            "process",
            "reported",
        ],
        blocked.iter().map(|b| {
            vec![
                b.consumer.clone(),
                b.topic.clone(),
                or_dash(b.partition_key.clone()),
                b.message_id.clone(),
                time::format(b.since),
                time::format_age(now - b.since),
                b.attempts.to_string(),
                // The why is what an operator came for: longer than other lists cut.
                cut(&b.reason, 160),
                b.owner.clone(),
                format!("{} ago", time::format_age(now - b.reported_at)),
            ]
        }),
    )))
}

// ---------------------------------------------------------------------------------------------
// history

/// `card/id=c1` as a lookup ref.
fn parse_entity(text: &str) -> Result<LookupRef, CliError> {
    let (attribute, value) = text.split_once('=').ok_or_else(|| {
        CliError::Usage(format!(
            "`{text}` is not a lookup ref: write `ATTRIBUTE=VALUE`, as in `card/id=c1`"
        ))
    })?;
    if !attribute.contains('/') || attribute.starts_with('/') || attribute.ends_with('/') {
        return Err(CliError::Usage(format!(
            "`{attribute}` is not a namespaced identity attribute: write it as `card/id`"
        )));
    }
    let value =
        serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
    Ok(LookupRef::new(attribute, value))
}

async fn history<S: Inspect>(
    store: &S,
    args: HistoryArgs,
    as_json: bool,
) -> Result<Output, CliError> {
    let lookup = parse_entity(&args.entity)?;
    let Some(history) = store.entity_history(&lookup, args.as_of.map(Tx)).await? else {
        return Err(CliError::NotFound(format!(
            "the store never held entity {lookup}"
        )));
    };
    if as_json {
        return Ok(Output::ok(json(&HistoryView::of(
            lookup.to_string(),
            args.as_of,
            &history,
        ))));
    }
    let when = args
        .as_of
        .map_or_else(|| "now".to_owned(), |tx| format!("as of tx {tx}"));
    let mut out = match &history.entity {
        Some(entity) => format!(
            "Entity {lookup} {when} (last changed in tx {})\n",
            entity.tx
        ),
        None => format!("Entity {lookup} did not exist yet {when}\n"),
    };
    if let Some(entity) = &history.entity {
        out += &table(
            &["attribute", "value"],
            entity
                .attributes
                .iter()
                .map(|(name, value)| vec![name.clone(), value.to_string()]),
        );
    }
    out += "\nHistory\n";
    out += &table(
        &["tx", "run", "attribute", "op", "value"],
        history.datoms.iter().map(|d| {
            vec![
                d.tx.to_string(),
                d.run_key.clone(),
                d.attribute.clone(),
                crate::view::op_name(d.op).to_owned(),
                cut(&d.value.to_string(), 60),
            ]
        }),
    );
    Ok(Output::ok(out))
}

// ---------------------------------------------------------------------------------------------
// prune

async fn prune<S: Store + Inspect>(
    store: &S,
    args: PruneArgs,
    as_json: bool,
) -> Result<Output, CliError> {
    let age = |text: &str| -> Result<Duration, CliError> {
        time::parse_age(text).map_err(CliError::Usage)
    };
    let older_than = PruneOlderThan {
        outbox_dispatched: Some(age(&args.dispatched_older_than)?),
        runs_completed: Some(age(&args.runs_older_than)?),
        log_published: Some(age(&args.log_older_than)?),
    };
    let report = if args.dry_run {
        store.prune_preview(older_than).await?
    } else {
        let spinner = ProgressBar::new_spinner();
        spinner.set_message("pruning");
        spinner.enable_steady_tick(Duration::from_millis(120));
        let report = store.prune(older_than).await;
        spinner.finish_and_clear();
        report?
    };
    let view = PruneView {
        dry_run: args.dry_run,
        outbox_rows: report.outbox_rows,
        runs: report.runs,
        log_messages: report.log_messages,
    };
    if as_json {
        return Ok(Output::ok(json(&view)));
    }
    let title = if args.dry_run {
        "Would remove (dry run: nothing was removed)"
    } else {
        "Removed"
    };
    Ok(Output::ok(format!(
        "{title}\n{}",
        table(
            &["what", "older than", "count"],
            [
                vec![
                    "dispatched outbox rows of finished runs".to_owned(),
                    args.dispatched_older_than.clone(),
                    view.outbox_rows.to_string(),
                ],
                vec![
                    "finished runs with no rows left".to_owned(),
                    args.runs_older_than.clone(),
                    view.runs.to_string(),
                ],
                vec![
                    "log messages every consumer acknowledged".to_owned(),
                    args.log_older_than.clone(),
                    view.log_messages.to_string(),
                ],
            ],
        )
    )))
}

#[cfg(test)]
mod tests {
    use super::parse_entity;

    #[test]
    fn entities() {
        let card = parse_entity("card/id=c1").unwrap();
        assert_eq!(card.to_string(), "[card/id \"c1\"]");
        let number = parse_entity("account/number=42").unwrap();
        assert_eq!(number.value, serde_json::json!(42));
        let string = parse_entity("account/number=\"42\"").unwrap();
        assert_eq!(string.value, serde_json::json!("42"));
        assert!(parse_entity("card").is_err());
        assert!(parse_entity("id=c1").is_err());
    }
}
