//! The SQLite store's clock: the time every lease, retry, stall and pruning age of a SQLite
//! database is measured in, shared by the processes that open it.
//!
//! SQLite has no server whose clock everyone reads, and each process's wall clock can be wrong
//! or jump (an NTP step, a host resumed from suspend, a clock set by hand). So the database
//! keeps the newest time any process used (`sequences.clock`), and each process reads the time
//! as
//!
//! ```text
//! t = max(store's newest time, clamp(wall clock, anchor + elapsed, anchor + elapsed * 1.01))
//! ```
//!
//! where `anchor` is the last time this process read (or, on its first reading, the store's
//! newest time) and `elapsed` the real time since, from the monotonic clock. Every write
//! transaction raises the store's newest time to `t`. Hence:
//!
//! - **Never backwards.** No process uses a time earlier than one any process used before it:
//!   a process whose clock is behind leases rows until (store time + lease), not until an
//!   expiry that is already past for everyone else, and does not take a row another process
//!   holds.
//! - **Never faster than real time, plus 1 %.** However far a wall clock jumps forward, the
//!   store's time advances at most 1.01 s per real second: a process whose clock is days ahead
//!   cannot hold a lease for days, and cannot make a record look older than it is by more than
//!   1 % (so a retention of 7 days keeps a record at least 6.93 days of real time). A process
//!   that restarts starts from the store's time, not from its wall clock, so restarting cannot
//!   jump it either.
//! - **The cost.** While no process has the database open, the store's time stands still; it
//!   then catches up with a correct wall clock at 1 % (a minute of downtime in 100 minutes).
//!   Until then, times the store records (and the `effects` CLI shows) are behind the wall
//!   clock by at most the downtime, and retention is longer by as much: never shorter.
//!
//! Processes agree on the time within the time since each last read the store's newest time;
//! every write reads it, so processes that run a relay agree within about a relay interval.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use super::db::Ctx;
use crate::store::{Millis, StoreError};

/// How much faster than real time the clock may run to catch up with the wall clock: 1/100.
const CATCH_UP_DIVISOR: i64 = 100;

/// This process's view of one database's clock.
#[derive(Debug, Default)]
pub(crate) struct Clock {
    /// Added to the wall clock: tests only (a process whose clock is wrong).
    skew_ms: AtomicI64,
    anchor: Mutex<Option<Anchor>>,
}

#[derive(Clone, Copy, Debug)]
struct Anchor {
    /// A reading, in microseconds since the epoch.
    at_us: i64,
    /// When it was taken.
    instant: Instant,
}

impl Clock {
    /// Shifts this process's wall clock by `skew_ms` (tests only).
    pub(crate) fn skew(&self, skew_ms: i64) {
        self.skew_ms.store(skew_ms, Ordering::Relaxed);
    }

    fn wall_us(&self) -> i64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        wall.saturating_add(self.skew_ms.load(Ordering::Relaxed).saturating_mul(1000))
    }

    /// The time, given the store's newest time `store_ms` (see the module documentation).
    pub(crate) fn reading(&self, store_ms: Millis) -> Millis {
        self.reading_at(store_ms, self.wall_us(), Instant::now())
    }

    fn reading_at(&self, store_ms: Millis, wall_us: i64, now: Instant) -> Millis {
        let store_us = store_ms.saturating_mul(1000);
        let mut anchor = self
            .anchor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (t, projected) = match *anchor {
            None => (store_us, None),
            Some(a) => {
                let elapsed = i64::try_from(now.saturating_duration_since(a.instant).as_micros())
                    .unwrap_or(i64::MAX);
                let low = a.at_us.saturating_add(elapsed);
                let high = low.saturating_add(elapsed / CATCH_UP_DIVISOR);
                (wall_us.clamp(low, high).max(store_us), Some(low))
            }
        };
        // Re-anchor only off the projection, so that following the monotonic clock loses no
        // sub-millisecond remainders.
        if projected != Some(t) {
            *anchor = Some(Anchor {
                at_us: t,
                instant: now,
            });
        }
        t.div_euclid(1000)
    }

    /// The time inside a write transaction: reads the store's newest time and raises it to the
    /// reading.
    pub(crate) fn advance(&self, conn: &Connection) -> Result<Millis, StoreError> {
        const OP: &str = "reading the store's clock";
        let stored = stored(conn)?;
        let t = self.reading(stored);
        if t > stored {
            conn.prepare_cached(
                "UPDATE sequences SET value = ?1 WHERE name = 'clock' AND value < ?1",
            )
            .ctx(OP)?
            .execute(params![t])
            .ctx(OP)?;
        }
        Ok(t)
    }

    /// The time inside a read transaction: reads the store's newest time, writes nothing.
    pub(crate) fn observe(&self, conn: &Connection) -> Result<Millis, StoreError> {
        Ok(self.reading(stored(conn)?))
    }
}

fn stored(conn: &Connection) -> Result<Millis, StoreError> {
    const OP: &str = "reading the store's clock";
    let value: Option<i64> = conn
        .prepare_cached("SELECT value FROM sequences WHERE name = 'clock'")
        .ctx(OP)?
        .query_row([], |r| r.get(0))
        .optional()
        .ctx(OP)?;
    value.ok_or_else(|| StoreError::Corrupt {
        what: "sequences".to_owned(),
        reason: "the store's clock (`clock`) is missing".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::Clock;

    const DAY_MS: i64 = 24 * 3600 * 1000;

    #[test]
    fn a_first_reading_is_the_stores_time_whatever_the_wall_clock() {
        let t0 = 1_700_000_000_000;
        for wall_ms in [t0 - DAY_MS, t0, t0 + 8 * DAY_MS] {
            let clock = Clock::default();
            assert_eq!(clock.reading_at(t0, wall_ms * 1000, Instant::now()), t0);
        }
    }

    #[test]
    fn a_wall_clock_far_ahead_moves_the_time_at_most_one_percent_faster_than_real_time() {
        let clock = Clock::default();
        let start = Instant::now();
        let t0 = 1_700_000_000_000;
        clock.reading_at(t0, t0 * 1000, start);
        let ahead_us = (t0 + 8 * DAY_MS) * 1000;
        let mut t = t0;
        for s in 1..=1000u64 {
            t = clock.reading_at(t, ahead_us, start + Duration::from_secs(s));
        }
        // 1000 s of real time: at most 1010 s on the clock.
        assert!(t <= t0 + 1_010_000 && t >= t0 + 1_000_000, "{}", t - t0);
    }

    #[test]
    fn a_wall_clock_behind_never_takes_the_time_back_and_real_time_still_moves_it() {
        let clock = Clock::default();
        let start = Instant::now();
        let t0 = 1_700_000_000_000;
        clock.reading_at(t0, t0 * 1000, start);
        let behind_us = (t0 - 3_600_000) * 1000;
        let t = clock.reading_at(t0, behind_us, start + Duration::from_secs(5));
        assert_eq!(t, t0 + 5_000);
        // Another process wrote a later time: it is never gone back on.
        let t = clock.reading_at(t0 + 60_000, behind_us, start + Duration::from_secs(6));
        assert_eq!(t, t0 + 60_000);
    }

    #[test]
    fn a_correct_wall_clock_is_followed() {
        let clock = Clock::default();
        let start = Instant::now();
        let t0 = 1_700_000_000_000;
        clock.reading_at(t0, t0 * 1000, start);
        for ms in [1u64, 7, 500, 10_000] {
            let wall = (t0 + i64::try_from(ms).unwrap()) * 1000;
            let t = clock.reading_at(t0, wall, start + Duration::from_millis(ms));
            assert_eq!(t, t0 + i64::try_from(ms).unwrap());
        }
    }
}
