//! Waiting for pipelined statements, and which of their errors to report.
//!
//! Statements sent together run one after the other on the server. The first that fails aborts
//! the transaction, and every statement after it fails as well, with `25P02` ("current
//! transaction is aborted, commands ignored until end of transaction block"). The client
//! receives the answers in order, but futures joined together are polled in their own order
//! once several answers are in: stopping at the first error polled (`try_join!`) would at times
//! report a later statement's `25P02` in place of the error that caused it, hiding the cause
//! from the user and a serialization failure from the retry. Every future is waited for here
//! instead (an aborted transaction answers at once) and the cause is kept.

use std::future::Future;

use futures_util::FutureExt;
use futures_util::future::{JoinAll, Map, join_all};
use tokio_postgres::error::SqlState;

use super::db::sql_state;
use crate::store::StoreError;

/// An error from a statement of a transaction that may have been aborted by an earlier one.
pub(crate) trait StatementError {
    /// Whether this statement failed only because an earlier statement aborted its
    /// transaction.
    fn aborted_earlier(&self) -> bool;
}

impl StatementError for tokio_postgres::Error {
    fn aborted_earlier(&self) -> bool {
        self.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION)
    }
}

impl StatementError for StoreError {
    fn aborted_earlier(&self) -> bool {
        sql_state(self) == Some(&SqlState::IN_FAILED_SQL_TRANSACTION)
    }
}

/// The error to report of two from one transaction: the first, unless it only says that the
/// transaction was aborted and the second says why.
fn cause<E: StatementError>(kept: Option<E>, next: E) -> E {
    match kept {
        Some(kept) if kept.aborted_earlier() && !next.aborted_earlier() => next,
        Some(kept) => kept,
        None => next,
    }
}

/// The results of statements sent together, all in or with the error that caused the others.
pub(crate) trait Settle {
    /// What every statement returned.
    type Output;
    /// The statements' error type.
    type Error;
    /// All the values, or the error that aborted the transaction.
    fn settle(self) -> Result<Self::Output, Self::Error>;
}

impl<T, E: StatementError> Settle for Vec<Result<T, E>> {
    type Output = Vec<T>;
    type Error = E;

    fn settle(self) -> Result<Vec<T>, E> {
        let mut values = Vec::with_capacity(self.len());
        let mut failed = None;
        for result in self {
            match result {
                Ok(value) => values.push(value),
                Err(e) => failed = Some(cause(failed, e)),
            }
        }
        failed.map_or(Ok(values), Err)
    }
}

macro_rules! settle_tuple {
    ($($value:ident: $t:ident),+) => {
        impl<$($t,)+ E: StatementError> Settle for ($(Result<$t, E>,)+) {
            type Output = ($($t,)+);
            type Error = E;

            fn settle(self) -> Result<Self::Output, E> {
                let ($($value,)+) = self;
                let mut failed = None;
                $(
                    let $value = match $value {
                        Ok(value) => Some(value),
                        Err(e) => {
                            failed = Some(cause(failed, e));
                            None
                        }
                    };
                )+
                match (failed, $($value,)+) {
                    (None, $(Some($value),)+) => Ok(($($value,)+)),
                    (Some(e), ..) => Err(e),
                    (None, ..) => unreachable!("a statement without a value failed"),
                }
            }
        }
    };
}

settle_tuple!(a: A, b: B);
settle_tuple!(a: A, b: B, c: C);
settle_tuple!(a: A, b: B, c: C, d: D);

/// Waits for every one of `futures`, statements sent together (in the order they are polled,
/// which is the order given), and returns their values or the error that caused the others.
///
/// (The future's type is named, as `try_join_all`'s is: an `async fn` or an `impl Future`
/// would carry the iterator's type, and with it closures whose lifetimes defeat the `Send`
/// check of the transaction's future.)
pub(crate) fn all<I, T, E>(futures: I) -> All<I::Item, T, E>
where
    I: IntoIterator,
    I::Item: Future<Output = Result<T, E>>,
    E: StatementError,
{
    join_all(futures).map(Settle::settle)
}

/// The future [`all`] returns.
pub(crate) type All<F, T, E> = Map<JoinAll<F>, fn(Vec<Result<T, E>>) -> Result<Vec<T>, E>>;

/// Waits for each of the futures given, statements sent together (polled in the order given),
/// and returns their values as a tuple, or the error that caused the others: `try_join!` that
/// reports the cause.
macro_rules! join {
    ($($future:expr),+ $(,)?) => {
        $crate::postgres::pipeline::Settle::settle(tokio::join!($($future),+))
    };
}
pub(crate) use join;

#[cfg(test)]
mod tests {
    use super::{Settle, StatementError};

    /// A stand-in error: whether it only reports an aborted transaction, and a name.
    #[derive(Debug, PartialEq)]
    struct Failed(bool, &'static str);

    impl StatementError for Failed {
        fn aborted_earlier(&self) -> bool {
            self.0
        }
    }

    const CAUSE: Failed = Failed(false, "cause");
    const ABORTED: Failed = Failed(true, "aborted");

    #[test]
    fn the_cause_is_reported_whatever_the_order_the_errors_are_seen_in() {
        let seen: Vec<Result<(), Failed>> = vec![Ok(()), Err(ABORTED), Err(CAUSE), Err(ABORTED)];
        // What stopping at the first error would have reported.
        assert_eq!(seen.iter().find_map(|r| r.as_ref().err()), Some(&ABORTED));
        assert_eq!(seen.settle(), Err(CAUSE));

        let (a, b, c) = (
            Err::<u8, _>(ABORTED),
            Ok::<&str, _>("x"),
            Err::<(), _>(CAUSE),
        );
        assert_eq!((a, b, c).settle(), Err(CAUSE));
        assert_eq!(
            (Err::<u8, _>(CAUSE), Err::<(), _>(ABORTED)).settle(),
            Err(CAUSE)
        );
    }

    #[test]
    fn the_first_error_is_kept_when_none_or_all_only_report_the_abort() {
        let two = vec![Err::<(), _>(Failed(false, "1")), Err(Failed(false, "2"))];
        assert_eq!(two.settle(), Err(Failed(false, "1")));
        let aborted = vec![Err::<(), _>(Failed(true, "1")), Err(Failed(true, "2"))];
        assert_eq!(aborted.settle(), Err(Failed(true, "1")));
    }

    #[test]
    fn values_come_back_in_order_when_nothing_failed() {
        let all: Vec<Result<u8, Failed>> = vec![Ok(1), Ok(2), Ok(3)];
        assert_eq!(all.settle(), Ok(vec![1, 2, 3]));
        assert_eq!(
            (
                Ok::<u8, Failed>(1),
                Ok::<&str, _>("2"),
                Ok::<(), _>(()),
                Ok::<char, _>('4')
            )
                .settle(),
            Ok((1, "2", (), '4'))
        );
        assert_eq!(Vec::<Result<u8, Failed>>::new().settle(), Ok(vec![]));
    }
}
