//! The handlers tested as what they are: pure functions from a transfer and the accounts it
//! touches to effects; and the after-requests step, a pure function of recorded responses.

use effects_core::http::HttpResponse;
use effects_core::store::{RecordedRequest, RequestOutcome};
use effects_core::testing::{assert_deterministic, assert_effects_eq, assert_replayable};
use effects_core::{Effects, Empty, Handler, Message, Request, assert_effects_snapshot};
use serde_json::json;
use transfers::{
    Account, Credit, Debit, FRAUD_CHECK_THRESHOLD, FraudCheck, FraudChecked, MoveMoney,
    SettleHandler, Transfer, TransferCompleted, TransferHandler, TransferInput, TransferRecord,
    TransferStatus, fraud_verdicts, settle, transfer,
};

fn account(id: &str, balance: i64) -> Account {
    Account {
        id: id.into(),
        balance,
    }
}

fn order(amount: i64) -> Transfer {
    Transfer {
        id: "t1".into(),
        from: "alice".into(),
        to: "bob".into(),
        amount,
    }
}

fn held(amount: i64) -> TransferRecord {
    TransferRecord::of(&order(amount), TransferStatus::Held, None)
}

fn verdict(approved: bool, reason: Option<&str>) -> FraudChecked {
    FraudChecked {
        transfer_id: "t1".into(),
        approved,
        reason: reason.map(str::to_owned),
    }
}

#[test]
fn moving_money_below_the_threshold() {
    assert_effects_snapshot!(transfer(
        &order(250),
        &account("alice", 1_000),
        &account("bob", 40)
    ));
}

#[test]
fn moving_money_sets_absolute_balances_expecting_the_ones_it_was_computed_from() {
    let expected = MoveMoney::builder()
        .debit(Debit {
            id: "alice".into(),
            balance: 750,
            was: 1_000,
        })
        .credit(Credit {
            id: "bob".into(),
            balance: 290,
            was: 40,
        })
        .transfer_record(TransferRecord::of(
            &order(250),
            TransferStatus::Completed,
            None,
        ))
        .transfer_completed(TransferCompleted {
            transfer_id: "t1".into(),
            from: "alice".into(),
            to: "bob".into(),
            amount: 250,
        })
        .build();
    let effects = transfer(&order(250), &account("alice", 1_000), &account("bob", 40));
    assert_eq!(effects.variant(), "MoveMoney");
    assert_effects_eq!(effects, expected);

    // The compare-and-set values are in the erased datoms the executor checks.
    let erased = Effects::from(transfer(
        &order(250),
        &account("alice", 1_000),
        &account("bob", 40),
    ));
    let expected_balances: Vec<_> = erased
        .datoms
        .iter()
        .filter_map(|d| d.expected.get("account/balance"))
        .collect();
    assert_eq!(expected_balances, [&json!(1_000), &json!(40)]);
}

#[test]
fn a_payer_can_spend_all_it_holds_and_no_more() {
    let exact = transfer(
        &order(1_000 - 1),
        &account("alice", 999),
        &account("bob", 0),
    );
    assert_eq!(exact.variant(), "MoveMoney");
    let over = transfer(&order(500), &account("alice", 499), &account("bob", 0));
    assert_eq!(over.variant(), "RefuseTransfer");
}

#[test]
fn refusing_an_overdraft() {
    assert_effects_snapshot!(transfer(
        &order(500),
        &account("alice", 499),
        &account("bob", 0)
    ));
}

#[test]
fn refusing_what_makes_no_sense() {
    let reason = |effects: Effects| effects.messages[0].payload["reason"].clone();
    let zero = transfer(&order(0), &account("alice", 100), &account("bob", 0));
    assert_eq!(zero.variant(), "RefuseTransfer");
    assert_eq!(
        reason(zero.into()),
        json!("the amount must be positive, not 0")
    );
    let to_self = Transfer {
        to: "alice".into(),
        ..order(10)
    };
    let effects = transfer(&to_self, &account("alice", 100), &account("alice", 100));
    assert_eq!(reason(effects.into()), json!("alice cannot pay itself"));
}

#[test]
fn holding_a_large_transfer_for_the_fraud_check() {
    assert_effects_snapshot!(transfer(
        &order(FRAUD_CHECK_THRESHOLD),
        &account("alice", 5_000),
        &account("bob", 40)
    ));
}

#[test]
fn the_threshold_is_where_the_fraud_check_starts() {
    let below = transfer(
        &order(FRAUD_CHECK_THRESHOLD - 1),
        &account("alice", 5_000),
        &account("bob", 0),
    );
    assert_eq!(below.variant(), "MoveMoney");
    let at = Effects::from(transfer(
        &order(FRAUD_CHECK_THRESHOLD),
        &account("alice", 5_000),
        &account("bob", 0),
    ));
    assert_eq!(at.requests.len(), 1);
    assert_eq!(at.requests[0].endpoint, FraudCheck::ENDPOINT);
    assert_eq!(at.requests[0].path, "/checks/t1");
    // The payee is not credited until the check approves.
    assert_eq!(at.datoms.len(), 2);
    assert!(at.datoms.iter().all(|d| d.entity.value != "bob"));
}

#[test]
fn settling_an_approved_transfer() {
    assert_effects_snapshot!(settle(
        &verdict(true, None),
        &held(2_000),
        &account("alice", 3_000),
        &account("bob", 40)
    ));
}

#[test]
fn reversing_a_rejected_transfer() {
    assert_effects_snapshot!(settle(
        &verdict(false, Some("payee bob is on the watch list")),
        &held(2_000),
        &account("alice", 3_000),
        &account("bob", 40)
    ));
}

#[test]
fn a_transfer_settled_already_is_left_alone() {
    let done = held(2_000).with_status(TransferStatus::Completed, None);
    let effects = settle(
        &verdict(true, None),
        &done,
        &account("alice", 3_000),
        &account("bob", 2_040),
    );
    assert_effects_eq!(effects, Empty);
}

fn recorded(outcome: RequestOutcome) -> RecordedRequest {
    let check = FraudCheck {
        transfer_id: "t1".into(),
        from: "alice".into(),
        to: "bob".into(),
        amount: 2_000,
    };
    RecordedRequest {
        id: "transfer:t1#0".into(),
        seq: 0,
        request: check.to_request(),
        outcome,
    }
}

fn response(status: u16, body: serde_json::Value) -> HttpResponse {
    HttpResponse {
        status,
        headers: Default::default(),
        body,
        attempts: 1,
    }
}

#[test]
fn the_fraud_checks_answer_becomes_a_message_for_settle() {
    let approved = fraud_verdicts(&[recorded(RequestOutcome::Response {
        response: response(200, json!({"approved": true})),
    })]);
    assert_eq!(approved, [verdict(true, None).into_message()]);
    assert_eq!(approved[0].topic, FraudChecked::TOPIC);
    assert_eq!(approved[0].key.as_deref(), Some("t1"));

    let rejected = fraud_verdicts(&[recorded(RequestOutcome::Response {
        response: response(
            200,
            json!({"approved": false, "reason": "on the watch list"}),
        ),
    })]);
    assert_eq!(
        rejected,
        [verdict(false, Some("on the watch list")).into_message()]
    );
}

#[test]
fn a_fraud_check_that_did_not_approve_rejects() {
    let cases = [
        (
            RequestOutcome::Rejected {
                response: response(422, json!({"error": "bad"})),
            },
            "the fraud check refused the request with status 422",
        ),
        (
            RequestOutcome::Failed {
                reason: "gave up after 5 attempts".into(),
            },
            "the fraud check failed: gave up after 5 attempts",
        ),
        (
            RequestOutcome::Response {
                response: response(200, json!("OK")),
            },
            "the fraud check answered something else: invalid type: string \"OK\", expected struct Verdict",
        ),
    ];
    for (outcome, reason) in cases {
        assert_eq!(
            fraud_verdicts(&[recorded(outcome)]),
            [verdict(false, Some(reason)).into_message()]
        );
    }
}

#[test]
fn other_requests_give_no_verdict() {
    let mut other = recorded(RequestOutcome::Response {
        response: response(200, json!({"approved": true})),
    });
    other.request.endpoint = "notifications".into();
    assert_eq!(fraud_verdicts(&[other]), []);
    assert_eq!(fraud_verdicts(&[]), []);
}

#[test]
fn runs_are_keyed_by_the_transfer_not_the_message() {
    let d = TransferHandler::DESCRIPTOR;
    assert_eq!(
        (d.name, d.topic, d.key, d.input),
        (
            "transfer",
            Some("transfers"),
            Some("transfer.id"),
            "TransferInput"
        )
    );
    let input = TransferInput {
        transfer: order(10),
        payer: account("alice", 100),
        payee: account("bob", 0),
    };
    assert_eq!(TransferHandler.key(&input).as_deref(), Some("t1"));
    let d = SettleHandler::DESCRIPTOR;
    assert_eq!(
        (d.name, d.topic, d.key),
        ("settle", Some("fraud-checked"), Some("check.transfer_id"))
    );
    let schemas: Vec<&str> = TransferHandler::DESCRIPTOR
        .schemas
        .iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(schemas, ["RefuseTransfer", "MoveMoney", "HoldForCheck"]);
}

#[test]
fn handlers_are_deterministic_and_replayable() {
    assert_deterministic(|| transfer(&order(250), &account("alice", 1_000), &account("bob", 0)));
    assert_replayable(
        &TransferHandler,
        br#"{"transfer": {"id": "t1", "from": "alice", "to": "bob", "amount": 2000},
             "payer": {"id": "alice", "balance": 5000},
             "payee": {"id": "bob", "balance": 0}}"#,
    );
    assert_replayable(
        &SettleHandler,
        br#"{"check": {"transfer_id": "t1", "approved": false, "reason": "no"},
             "transfer": {"id": "t1", "from": "alice", "to": "bob", "amount": 2000, "status": "held"},
             "payer": {"id": "alice", "balance": 3000},
             "payee": {"id": "bob", "balance": 0}}"#,
    );
}
