//! Money transfers under concurrency.
//!
//! The domain is two pure handlers:
//!
//! - [`transfer`] moves money between two accounts it is given, already loaded: it refuses an
//!   overdraft (or a transfer that makes no sense), moves the money at once when the amount is
//!   below [`FRAUD_CHECK_THRESHOLD`], and otherwise debits the payer, holds the transfer and asks
//!   the fraud-check service about it — an HTTP request, sent by the executor after the commit.
//! - [`settle`] finishes a held transfer once the service has answered: it credits the payee,
//!   or gives the money back to the payer.
//!
//! Both compute *absolute* balances (`balance: 900`, not "minus 100") from the accounts they were
//! given. That is only right if nobody changed those accounts between the load and the commit;
//! with many transfers on one account at once somebody always does. The worker loads the
//! accounts through a [`Tracked`](effects_core::store::Tracked) store ([`load`]), the commit
//! refuses a run whose accounts changed since, and the worker calls the handler again on fresh
//! balances. The debit and credit datoms also carry the balance they replace
//! (`#[datom(expect = "balance")]`), so they hold on any path, even run by a caller that loaded
//! the accounts itself.
//!
//! [`fraud_verdicts`] is the after-requests step: it turns the service's recorded response into
//! a [`FraudChecked`] message, which the `settle` worker consumes. The rest of the crate is the
//! main job around the domain: the fraud-check service ([`fraud`]), the workload ([`workload`]),
//! the workers ([`service`]), the backends ([`backend`]) and the job that runs it all ([`job`]).

pub mod backend;
pub mod fraud;
pub mod job;
pub mod load;
#[cfg(all(feature = "postgres", feature = "nats"))]
pub mod servers;
pub mod service;
pub mod workload;

use effects_core::store::{RecordedRequest, RequestOutcome};
use effects_core::{Datom, Empty, Message, MessageEffect, Request, effect_handler, effects};
use serde::{Deserialize, Serialize};

/// Transfers of this amount or more are held and checked with the fraud-check service before
/// the payee is credited.
pub const FRAUD_CHECK_THRESHOLD: i64 = 1_000;

/// The name of the after-requests hook ([`fraud_verdicts`]) in the executor.
pub const FRAUD_VERDICTS: &str = "fraud-verdicts";

/// An account, as loaded from the store (`account/id`, `account/balance`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Its id.
    pub id: String,
    /// What it holds, in minor units (cents). Never negative.
    pub balance: i64,
}

/// A transfer someone asked for: the payload on the `transfers` topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transfer {
    /// The transfer's id, chosen by whoever asks for it: the business key of its run, so the
    /// same transfer sent twice (under two message ids) is applied once.
    pub id: String,
    /// The payer's account.
    pub from: String,
    /// The payee's account.
    pub to: String,
    /// How much, in minor units.
    pub amount: i64,
}

/// Where a transfer stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferStatus {
    /// Refused: nothing moved.
    Refused,
    /// The payer is debited; the fraud-check service has been asked; the payee waits.
    Held,
    /// The money moved.
    Completed,
    /// The fraud check rejected it: the payer got the money back.
    Reversed,
}

impl TransferStatus {
    /// The stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            TransferStatus::Refused => "refused",
            TransferStatus::Held => "held",
            TransferStatus::Completed => "completed",
            TransferStatus::Reversed => "reversed",
        }
    }
}

/// The payer's new balance: `account/balance` of `[account/id ..]`, valid only if the balance is
/// still `was` when the run commits.
#[derive(Clone, Debug, PartialEq, Eq, Datom)]
#[datom(entity = "account")]
pub struct Debit {
    /// The account.
    #[datom(id)]
    pub id: String,
    /// Its balance after the debit.
    pub balance: i64,
    /// Its balance before, as the handler saw it.
    #[datom(expect = "balance")]
    pub was: i64,
}

impl Debit {
    /// `account` less `amount`.
    pub fn of(account: &Account, amount: i64) -> Debit {
        Debit {
            id: account.id.clone(),
            balance: account.balance - amount,
            was: account.balance,
        }
    }
}

/// The payee's (or, on a reversal, the payer's) new balance, valid only if the balance is still
/// `was` when the run commits.
#[derive(Clone, Debug, PartialEq, Eq, Datom)]
#[datom(entity = "account")]
pub struct Credit {
    /// The account.
    #[datom(id)]
    pub id: String,
    /// Its balance after the credit.
    pub balance: i64,
    /// Its balance before, as the handler saw it.
    #[datom(expect = "balance")]
    pub was: i64,
}

impl Credit {
    /// `account` plus `amount`.
    pub fn of(account: &Account, amount: i64) -> Credit {
        Credit {
            id: account.id.clone(),
            balance: account.balance + amount,
            was: account.balance,
        }
    }
}

/// A transfer as recorded in the store (`transfer/id`, `transfer/from`, ...), written by each
/// step and loaded by [`settle`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Datom)]
#[datom(entity = "transfer")]
pub struct TransferRecord {
    /// The transfer.
    #[datom(id)]
    pub id: String,
    /// The payer.
    pub from: String,
    /// The payee.
    pub to: String,
    /// The amount.
    pub amount: i64,
    /// Where it stands.
    pub status: TransferStatus,
    /// Why it was refused or reversed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl TransferRecord {
    /// `transfer` with this status.
    pub fn of(transfer: &Transfer, status: TransferStatus, reason: Option<String>) -> Self {
        TransferRecord {
            id: transfer.id.clone(),
            from: transfer.from.clone(),
            to: transfer.to.clone(),
            amount: transfer.amount,
            status,
            reason,
        }
    }

    /// The same transfer with another status.
    #[must_use]
    pub fn with_status(&self, status: TransferStatus, reason: Option<String>) -> Self {
        TransferRecord {
            status,
            reason,
            ..self.clone()
        }
    }
}

/// Published when the money of a transfer reached the payee; keyed by transfer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[message(topic = "transfer-completed")]
pub struct TransferCompleted {
    /// The transfer.
    #[message(key)]
    pub transfer_id: String,
    /// The payer.
    pub from: String,
    /// The payee.
    pub to: String,
    /// The amount.
    pub amount: i64,
}

/// Published when a transfer is refused; nothing moved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[message(topic = "transfer-refused")]
pub struct TransferRefused {
    /// The transfer.
    #[message(key)]
    pub transfer_id: String,
    /// The payer.
    pub from: String,
    /// Why.
    pub reason: String,
}

/// Published when a held transfer is reversed: the payer has the money back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[message(topic = "transfer-reversed")]
pub struct TransferReversed {
    /// The transfer.
    #[message(key)]
    pub transfer_id: String,
    /// The payer, refunded.
    pub from: String,
    /// The amount refunded.
    pub amount: i64,
    /// Why.
    pub reason: String,
}

/// The fraud-check service's verdict on a held transfer, published by the after-requests step
/// ([`fraud_verdicts`]) and consumed by [`settle`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[message(topic = "fraud-checked")]
#[serde(deny_unknown_fields)]
pub struct FraudChecked {
    /// The transfer.
    #[message(key)]
    pub transfer_id: String,
    /// Whether the money may reach the payee.
    pub approved: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Asks the fraud-check service about a held transfer: `POST {fraud-check}/checks/{transfer_id}`
/// with the transfer as body, sent with `Idempotency-Key: key#n`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Request)]
#[request(
    method = "POST",
    endpoint = "fraud-check",
    path = "/checks/{transfer_id}"
)]
pub struct FraudCheck {
    /// The transfer.
    pub transfer_id: String,
    /// The payer.
    pub from: String,
    /// The payee.
    pub to: String,
    /// The amount.
    pub amount: i64,
}

/// What the fraud-check service answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Whether the transfer may go through.
    pub approved: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

effects! {
    /// A transfer refused: recorded, announced, nothing moved.
    #[derive(Clone, Debug, PartialEq)]
    pub RefuseTransfer {
        datoms:   [one TransferRecord],
        messages: [one TransferRefused],
    }

    /// Money moved at once: the payer debited, the payee credited, both to absolute balances.
    #[derive(Clone, Debug, PartialEq)]
    pub MoveMoney {
        datoms:   [one Debit, one Credit, one TransferRecord],
        messages: [one TransferCompleted],
    }

    /// A large transfer: the payer debited, the transfer held, the fraud-check service asked.
    #[derive(Clone, Debug, PartialEq)]
    pub HoldForCheck {
        datoms:   [one Debit, one TransferRecord],
        requests: [one FraudCheck],
    }

    /// A held transfer approved: the payee credited.
    #[derive(Clone, Debug, PartialEq)]
    pub ReleaseHeld {
        datoms:   [one Credit, one TransferRecord],
        messages: [one TransferCompleted],
    }

    /// A held transfer rejected: the payer credited back.
    #[derive(Clone, Debug, PartialEq)]
    pub ReverseHeld {
        datoms:   [one Credit, one TransferRecord],
        messages: [one TransferReversed],
    }
}

/// Why `transfer` refuses a transfer, if it does.
fn refusal(transfer: &Transfer, payer: &Account) -> Option<String> {
    if transfer.amount <= 0 {
        Some(format!(
            "the amount must be positive, not {}",
            transfer.amount
        ))
    } else if transfer.from == transfer.to {
        Some(format!("{} cannot pay itself", transfer.from))
    } else if payer.balance < transfer.amount {
        Some(format!(
            "insufficient funds: {} holds {} and would pay {}",
            payer.id, payer.balance, transfer.amount
        ))
    } else {
        None
    }
}

/// Moves `transfer.amount` from `payer` to `payee`, refusing an overdraft; a transfer of
/// [`FRAUD_CHECK_THRESHOLD`] or more is held and checked first (the payer is debited now, the
/// payee credited by [`settle`]). Runs are keyed by the transfer's id.
#[effect_handler(topic = "transfers", key = transfer.id)]
pub fn transfer(
    transfer: &Transfer,
    payer: &Account,
    payee: &Account,
) -> effects![RefuseTransfer | MoveMoney | HoldForCheck] {
    if let Some(reason) = refusal(transfer, payer) {
        return RefuseTransfer::builder()
            .transfer_refused(TransferRefused {
                transfer_id: transfer.id.clone(),
                from: transfer.from.clone(),
                reason: reason.clone(),
            })
            .transfer_record(TransferRecord::of(
                transfer,
                TransferStatus::Refused,
                Some(reason),
            ))
            .build()
            .into();
    }
    if transfer.amount >= FRAUD_CHECK_THRESHOLD {
        return HoldForCheck::builder()
            .debit(Debit::of(payer, transfer.amount))
            .transfer_record(TransferRecord::of(transfer, TransferStatus::Held, None))
            .fraud_check(FraudCheck {
                transfer_id: transfer.id.clone(),
                from: transfer.from.clone(),
                to: transfer.to.clone(),
                amount: transfer.amount,
            })
            .build()
            .into();
    }
    MoveMoney::builder()
        .debit(Debit::of(payer, transfer.amount))
        .credit(Credit::of(payee, transfer.amount))
        .transfer_record(TransferRecord::of(
            transfer,
            TransferStatus::Completed,
            None,
        ))
        .transfer_completed(TransferCompleted {
            transfer_id: transfer.id.clone(),
            from: transfer.from.clone(),
            to: transfer.to.clone(),
            amount: transfer.amount,
        })
        .build()
        .into()
}

/// Finishes a held transfer on the fraud-check service's verdict: credits the payee, or credits
/// the payer back. A transfer that is not held (settled already) gives nothing. Runs are keyed by
/// the transfer's id.
#[effect_handler(topic = "fraud-checked", key = check.transfer_id)]
pub fn settle(
    check: &FraudChecked,
    transfer: &TransferRecord,
    payer: &Account,
    payee: &Account,
) -> effects![ReleaseHeld | ReverseHeld | Empty] {
    if transfer.status != TransferStatus::Held {
        return Empty.into();
    }
    if check.approved {
        return ReleaseHeld::builder()
            .credit(Credit::of(payee, transfer.amount))
            .transfer_record(transfer.with_status(TransferStatus::Completed, None))
            .transfer_completed(TransferCompleted {
                transfer_id: transfer.id.clone(),
                from: transfer.from.clone(),
                to: transfer.to.clone(),
                amount: transfer.amount,
            })
            .build()
            .into();
    }
    let reason = check
        .reason
        .clone()
        .unwrap_or_else(|| "rejected by the fraud check".to_owned());
    ReverseHeld::builder()
        .credit(Credit::of(payer, transfer.amount))
        .transfer_record(transfer.with_status(TransferStatus::Reversed, Some(reason.clone())))
        .transfer_reversed(TransferReversed {
            transfer_id: transfer.id.clone(),
            from: transfer.from.clone(),
            amount: transfer.amount,
            reason,
        })
        .build()
        .into()
}

/// The after-requests step of `transfer` runs (registered as [`FRAUD_VERDICTS`]): one
/// [`FraudChecked`] message per fraud check, from its recorded outcome. A check that did not
/// end in a readable approval — a refusal, a failure, an answer that is not a [`Verdict`] —
/// rejects the transfer, so held money always comes back to someone. Pure: after a crash it is
/// called again with the same recorded requests and gives the same messages.
pub fn fraud_verdicts(recorded: &[RecordedRequest]) -> Vec<MessageEffect> {
    recorded
        .iter()
        .filter(|r| r.request.endpoint == <FraudCheck as Request>::ENDPOINT)
        .filter_map(|r| {
            // The body is the `FraudCheck` the handler built; nothing else is sent there.
            let check: FraudCheck = serde_json::from_value(r.request.body.clone()?).ok()?;
            let verdict = match &r.outcome {
                RequestOutcome::Response { response } => {
                    serde_json::from_value::<Verdict>(response.body.clone()).unwrap_or_else(|e| {
                        Verdict {
                            approved: false,
                            reason: Some(format!("the fraud check answered something else: {e}")),
                        }
                    })
                }
                RequestOutcome::Rejected { response } => Verdict {
                    approved: false,
                    reason: Some(format!(
                        "the fraud check refused the request with status {}",
                        response.status
                    )),
                },
                RequestOutcome::Failed { reason } => Verdict {
                    approved: false,
                    reason: Some(format!("the fraud check failed: {reason}")),
                },
            };
            Some(
                FraudChecked {
                    transfer_id: check.transfer_id,
                    approved: verdict.approved,
                    reason: verdict.reason,
                }
                .into_message(),
            )
        })
        .collect()
}
