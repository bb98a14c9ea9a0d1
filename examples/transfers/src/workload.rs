//! The job's workload: the accounts it seeds and the transfers it publishes, and what the
//! balances must be once every transfer has been handled.
//!
//! The workload is built so that its outcome does not depend on the order in which transfers
//! are handled: only `low`, which never receives anything, can overdraw, and every other payer
//! holds more than all it ever pays. So the balances a sequential model computes
//! ([`Workload::expected`]) are the exact balances any correct concurrent run must end with,
//! and a lost update shows as a difference.

use std::collections::BTreeMap;

use crate::{Account, FRAUD_CHECK_THRESHOLD, Transfer, fraud};

/// The account most transfers take money from.
pub const HOT: &str = "hot";

/// An account that can only overdraw: its one transfer is refused.
pub const LOW: &str = "low";

/// An account on the fraud-check service's watch list: transfers to it are reversed.
pub const MULE: &str = "mule";

/// An account that does not exist: the transfer to it is dead-lettered.
pub const GHOST: &str = "ghost";

/// How many ordinary accounts receive from `hot` (`a1` ..).
pub const PAYEES: usize = 8;

/// What each ordinary account holds at the start.
pub const PAYEE_SEED: i64 = 1_000;

/// A transfer as published: its message id and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// The broker message id.
    pub message_id: String,
    /// The transfer.
    pub transfer: Transfer,
}

/// Accounts and transfers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// The accounts, with their opening balances.
    pub accounts: Vec<Account>,
    /// The transfers, in the order they are published, one of them twice (an upstream re-send
    /// under a new message id: a duplicate).
    pub published: Vec<Published>,
}

/// What the workload must end with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expected {
    /// Balances by account id.
    pub balances: BTreeMap<String, i64>,
    /// Transfers that complete (at once or after the fraud check).
    pub completed: usize,
    /// Transfers refused.
    pub refused: usize,
    /// Transfers reversed by the fraud check.
    pub reversed: usize,
    /// Transfers dead-lettered (an unknown account).
    pub dead_lettered: usize,
    /// Transfers held for the fraud check: one request each.
    pub fraud_checks: usize,
    /// Distinct transfers (runs of `transfer`).
    pub transfers: usize,
}

/// A small deterministic generator (64-bit LCG), so a workload is the same on every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below.max(1)
    }
}

impl Workload {
    /// `n` transfers (at least 1) around a hot account, plus four that show the other paths:
    /// an overdraft, an unknown account, a payment to oneself, and a re-send of the first
    /// transfer under a new message id.
    ///
    /// Of the `n`: most take 100–899 from `hot` to `a1`..`a8` in turn; every 8th (from the 4th)
    /// moves 10–49 between two `a` accounts; every 32nd (from the 16th) takes 1 000–1 999 from
    /// `hot` (held, fraud-checked, approved); every 32nd (from the 32nd) takes 2 000 from `hot`
    /// to `mule` (held, fraud-checked, reversed).
    pub fn generate(n: usize) -> Workload {
        let n = n.max(1);
        let mut rng = Lcg(0x5EED);
        let payee = |i: usize| format!("a{}", i % PAYEES + 1);
        let mut transfers = Vec::with_capacity(n + 3);
        let mut hot_pays: i64 = 0;
        let mut peer_pays: BTreeMap<String, i64> = BTreeMap::new();
        for i in 0..n {
            let id = format!("t{:04}", i + 1);
            let (from, to, amount) = if i % 32 == 31 {
                (HOT.to_owned(), MULE.to_owned(), 2_000)
            } else if i % 16 == 15 {
                let amount = FRAUD_CHECK_THRESHOLD + rng.next(1_000) as i64;
                (HOT.to_owned(), payee(i), amount)
            } else if i % 8 == 3 {
                let (from, to) = (payee(i), payee(i + 1));
                let amount = 10 + rng.next(40) as i64;
                // Peers never pay more than they were seeded with: no order-dependent refusal.
                let paid = peer_pays.entry(from.clone()).or_default();
                if *paid + amount <= PAYEE_SEED {
                    *paid += amount;
                    (from, to, amount)
                } else {
                    (HOT.to_owned(), to, amount)
                }
            } else {
                (HOT.to_owned(), payee(i), 100 + rng.next(800) as i64)
            };
            if from == HOT {
                hot_pays += amount;
            }
            transfers.push(Transfer {
                id,
                from,
                to,
                amount,
            });
        }
        let extra = |id: &str, from: &str, to: &str, amount: i64| Transfer {
            id: id.to_owned(),
            from: from.to_owned(),
            to: to.to_owned(),
            amount,
        };
        transfers.push(extra("x-overdraft", LOW, "a1", 500));
        transfers.push(extra("x-ghost", HOT, GHOST, 100));
        transfers.push(extra("x-self", "a2", "a2", 10));

        let mut accounts = vec![Account {
            id: HOT.to_owned(),
            // Enough for everything it pays, whatever the order.
            balance: hot_pays + 10_000,
        }];
        accounts.extend((0..PAYEES).map(|i| Account {
            id: payee(i),
            balance: PAYEE_SEED,
        }));
        accounts.push(Account {
            id: LOW.to_owned(),
            balance: 50,
        });
        accounts.push(Account {
            id: MULE.to_owned(),
            balance: 0,
        });

        let mut published: Vec<Published> = transfers
            .into_iter()
            .enumerate()
            .map(|(i, transfer)| Published {
                message_id: format!("m{:04}", i + 1),
                transfer,
            })
            .collect();
        // The upstream sends the first transfer again, under a new message id.
        let resent = Published {
            message_id: "m-resend".to_owned(),
            transfer: published[0].transfer.clone(),
        };
        published.push(resent);
        Workload {
            accounts,
            published,
        }
    }

    /// What the seeded accounts hold together.
    pub fn total(&self) -> i64 {
        self.accounts.iter().map(|a| a.balance).sum()
    }

    /// The outcome, computed by handling each distinct transfer in turn with the same rules as
    /// the handlers and the fraud-check service.
    pub fn expected(&self) -> Expected {
        let mut balances: BTreeMap<String, i64> = self
            .accounts
            .iter()
            .map(|a| (a.id.clone(), a.balance))
            .collect();
        let mut expected = Expected::default();
        let mut seen = std::collections::BTreeSet::new();
        for Published { transfer: t, .. } in &self.published {
            if !seen.insert(t.id.clone()) {
                continue;
            }
            let (Some(&payer), Some(_)) = (balances.get(&t.from), balances.get(&t.to)) else {
                expected.dead_lettered += 1;
                continue;
            };
            expected.transfers += 1;
            if t.amount <= 0 || t.from == t.to || payer < t.amount {
                expected.refused += 1;
                continue;
            }
            if t.amount >= FRAUD_CHECK_THRESHOLD {
                expected.fraud_checks += 1;
                if !fraud::approves(&t.to) {
                    expected.reversed += 1;
                    continue;
                }
            }
            expected.completed += 1;
            *balances.entry(t.from.clone()).or_default() -= t.amount;
            *balances.entry(t.to.clone()).or_default() += t.amount;
        }
        expected.balances = balances;
        expected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outcome_does_not_depend_on_the_order() {
        let workload = Workload::generate(200);
        let mut reversed = workload.clone();
        reversed.published.reverse();
        // Reversed, the re-send comes first: the same transfer, handled once either way.
        assert_eq!(workload.expected(), reversed.expected());
        let mut interleaved = workload.clone();
        let (even, odd): (Vec<_>, Vec<_>) = interleaved
            .published
            .drain(..)
            .enumerate()
            .partition(|(i, _)| i % 2 == 0);
        interleaved.published = odd.into_iter().chain(even).map(|(_, p)| p).collect();
        assert_eq!(workload.expected(), interleaved.expected());
    }

    #[test]
    fn money_is_conserved_and_every_path_is_taken() {
        let workload = Workload::generate(64);
        let expected = workload.expected();
        assert_eq!(expected.balances.values().sum::<i64>(), workload.total());
        assert_eq!(expected.transfers, 64 + 2);
        assert_eq!(
            (
                expected.refused,
                expected.reversed,
                expected.dead_lettered,
                expected.fraud_checks
            ),
            (2, 2, 1, 4)
        );
        assert_eq!(expected.completed, 64 - 2);
        assert!(expected.balances.values().all(|b| *b >= 0));
        assert_eq!(expected.balances[MULE], 0);
        assert_eq!(expected.balances[LOW], 50);
    }
}
