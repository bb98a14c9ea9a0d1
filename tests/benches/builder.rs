//! The typed builder and `Into<Effects>` against the same `Effects` built by hand.
//!
//! Run with `cargo bench -p effects-tests --bench builder`. Both variants run interleaved in one
//! process, round after round, so machine noise hits both alike; the figure reported is the
//! median of the per-round ratios (typed / hand-written time, lower is better, 1.00 = same).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use cards::{
    BlockAll, BlockCard, BlockedCard, Card, CardStatus, CardsBlockedNotify, Customer, StatusChanged,
};
use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect};
use serde_json::json;

fn cards(n: usize) -> Vec<Card> {
    (0..n)
        .map(|i| Card {
            id: format!("card-{i}"),
            customer_id: "customer-1".into(),
            status: CardStatus::Active,
        })
        .collect()
}

fn typed_one(card: &Card) -> Effects {
    let blocked = card.block();
    BlockCard::builder()
        .blocked_card(BlockedCard::from(&blocked))
        .status_changed(StatusChanged::from(blocked))
        .build()
        .into()
}

fn hand_one(card: &Card) -> Effects {
    let blocked = card.block();
    Effects {
        datoms: vec![DatomEffect {
            entity: LookupRef::new("card/id", json!(blocked.id)),
            op: effects_core::Op::Assert,
            attributes: BTreeMap::from([("card/status".to_owned(), json!(blocked.status))]),
            expected: BTreeMap::new(),
        }],
        requests: Vec::new(),
        messages: vec![MessageEffect {
            topic: "card-status-changed".to_owned(),
            key: Some(blocked.id.clone()),
            headers: BTreeMap::new(),
            payload: json!({
                "card_id": blocked.id,
                "customer_id": blocked.customer_id,
                "status": blocked.status,
            }),
        }],
    }
}

fn typed_all(customer: &Customer, cards: &[Card]) -> Effects {
    let mut all = BlockAll::builder()
        .cards_blocked_notify(CardsBlockedNotify::from(customer))
        .build();
    for card in cards {
        let blocked = card.block();
        all = all.merge(
            BlockCard::builder()
                .blocked_card(BlockedCard::from(&blocked))
                .status_changed(StatusChanged::from(blocked))
                .build(),
        );
    }
    all.into()
}

fn hand_all(customer: &Customer, cards: &[Card]) -> Effects {
    let mut all = Effects::new();
    for card in cards {
        all.append(hand_one(card));
    }
    all.messages.push(MessageEffect {
        topic: "cards-blocked-notify".to_owned(),
        key: Some(customer.id.clone()),
        headers: BTreeMap::new(),
        payload: json!({ "customer_id": customer.id, "name": customer.name }),
    });
    all
}

/// Median of per-round ratios `a / b`, with the per-call times of each.
fn compare(
    rounds: usize,
    iters: usize,
    mut a: impl FnMut(),
    mut b: impl FnMut(),
) -> (f64, Duration, Duration) {
    let mut ratios = Vec::with_capacity(rounds);
    let (mut ta_all, mut tb_all) = (Duration::ZERO, Duration::ZERO);
    for round in 0..rounds {
        // Alternate which runs first so neither always gets the warm cache.
        let (ta, tb) = if round % 2 == 0 {
            let ta = time(iters, &mut a);
            (ta, time(iters, &mut b))
        } else {
            let tb = time(iters, &mut b);
            (time(iters, &mut a), tb)
        };
        ratios.push(ta.as_secs_f64() / tb.as_secs_f64());
        ta_all += ta;
        tb_all += tb;
    }
    ratios.sort_by(f64::total_cmp);
    let per = |t: Duration| t / u32::try_from(rounds * iters).unwrap_or(u32::MAX);
    (ratios[rounds / 2], per(ta_all), per(tb_all))
}

fn time(iters: usize, f: &mut impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    start.elapsed()
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent; keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let (rounds, iters) = if quick { (3, 10) } else { (41, 2_000) };
    let one = cards(1).remove(0);
    let customer = Customer {
        id: "customer-1".into(),
        name: "Ana".into(),
    };
    let ten = cards(10);
    // `--only typed-one|hand-one|typed-all|hand-all`: run one variant 10,000 times alone, for an
    // instruction-count profiler (`valgrind --tool=callgrind`), which is immune to machine load.
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--only") {
        let variant = args.get(i + 1).map_or("", String::as_str);
        // `baseline`: everything but the loop, to subtract from the others.
        let rounds = if variant == "baseline" { 0 } else { 10_000 };
        let start = Instant::now();
        for _ in 0..rounds {
            match variant {
                "typed-one" => drop(black_box(typed_one(black_box(&one)))),
                "hand-one" => drop(black_box(hand_one(black_box(&one)))),
                "typed-all" => drop(black_box(typed_all(black_box(&customer), black_box(&ten)))),
                "hand-all" => drop(black_box(hand_all(black_box(&customer), black_box(&ten)))),
                other => panic!("unknown variant {other:?}"),
            }
        }
        println!("{}", start.elapsed().as_nanos());
        return;
    }
    assert_eq!(
        typed_one(&one),
        hand_one(&one),
        "both variants build the same effects"
    );
    assert_eq!(
        typed_all(&customer, &ten).canonical_json(),
        {
            // The typed schema keeps slot order: every StatusChanged, then the notification.
            hand_all(&customer, &ten).canonical_json()
        },
        "both variants build the same effects"
    );

    println!(
        "in one process, interleaved: builder vs hand-written Effects ({rounds} rounds x {iters} calls, median ratio; target <= 1.05)"
    );
    let (r, ta, tb) = compare(
        rounds,
        iters,
        || {
            black_box(typed_one(black_box(&one)));
        },
        || {
            black_box(hand_one(black_box(&one)));
        },
    );
    println!("  block one card       typed {ta:>10.2?}  hand {tb:>10.2?}  ratio {r:.3}");
    let (r, ta, tb) = compare(
        rounds,
        iters / 10,
        || {
            black_box(typed_all(black_box(&customer), black_box(&ten)));
        },
        || {
            black_box(hand_all(black_box(&customer), black_box(&ten)));
        },
    );
    println!("  block all (10 cards) typed {ta:>10.2?}  hand {tb:>10.2?}  ratio {r:.3}");

    if !quick {
        println!(
            "each variant in a fresh process, 10,000 calls per run (median of {PROCESS_ROUNDS} alternating runs):"
        );
        for (name, typed, hand) in [
            ("block one card      ", "typed-one", "hand-one"),
            ("block all (10 cards)", "typed-all", "hand-all"),
        ] {
            let (r, ta, tb) = compare_processes(typed, hand);
            println!("  {name} typed {ta:>10.2?}  hand {tb:>10.2?}  ratio {r:.3}");
        }
    }
}

const PROCESS_ROUNDS: usize = 15;

/// Runs this binary with `--only <variant>` alternately for both variants and returns the
/// median ratio of the loop times with the per-call medians.
fn compare_processes(a: &str, b: &str) -> (f64, Duration, Duration) {
    let exe = std::env::current_exe().expect("the bench binary knows its path");
    let run = |variant: &str| -> Duration {
        let out = std::process::Command::new(&exe)
            .args(["--only", variant])
            .output()
            .expect("the bench binary runs");
        let nanos: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a variant run prints its loop time in nanoseconds");
        Duration::from_nanos(nanos) / 10_000
    };
    let (mut ratios, mut ta, mut tb) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..PROCESS_ROUNDS {
        let (x, y) = if round % 2 == 0 {
            let x = run(a);
            (x, run(b))
        } else {
            let y = run(b);
            (run(a), y)
        };
        ratios.push(x.as_secs_f64() / y.as_secs_f64());
        ta.push(x);
        tb.push(y);
    }
    ratios.sort_by(f64::total_cmp);
    ta.sort();
    tb.sort();
    let mid = PROCESS_ROUNDS / 2;
    (ratios[mid], ta[mid], tb[mid])
}
