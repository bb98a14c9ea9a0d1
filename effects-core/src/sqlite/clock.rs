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
//! where `anchor` is the last time this process read and `elapsed` the real time since, from
//! the monotonic clock. Every write transaction raises the store's newest time to `t`. A process
//! reading for the first time has no anchor: it starts from the store's newest time, or, on a
//! machine whose monotonic clock since boot it can read (Linux), from a reference the processes
//! record about once a second (the store's time at some reading of that clock, during this
//! boot) projected to now — but never past its own wall clock. Hence:
//!
//! - **Never backwards.** No process uses a time earlier than one any process used before it:
//!   a process whose clock is behind leases rows until (store time + lease), not until an
//!   expiry that is already past for everyone else, and does not take a row another process
//!   holds.
//! - **Never faster than real time, plus 1 %.** However far a wall clock jumps forward, the
//!   store's time advances at most 1.01 s per real second: a process whose clock is days ahead
//!   cannot hold a lease for days, and cannot make a record look older than it is by more than
//!   1 % (a retention of 7 days keeps a record at least 6.93 days of real time). A process
//!   that (re)starts moves the time only as far as the machine's monotonic clock and its own
//!   wall clock both say, so restarting cannot jump it either.
//! - **The cost.** Across a reboot, or where the monotonic clock since boot cannot be read, the
//!   time the store was closed is not counted: the store's time is then behind a correct wall
//!   clock by that much and catches up at 1 % (a minute in 100 minutes). Until then, times the
//!   store records (and the `effects` CLI shows) are behind by at most the downtime, and
//!   retention is longer by as much: never shorter.
//!
//! Processes agree on the time within the time since each last read the store's newest time;
//! every write reads it, so processes that run a relay agree within about a relay interval.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::db::Ctx;
use crate::store::{Millis, StoreError};

/// How much faster than real time the clock may run to catch up with the wall clock: 1/100.
const CATCH_UP_DIVISOR: i64 = 100;

/// How often a process records the reference for processes that start later.
const REFERENCE_EVERY: Duration = Duration::from_secs(1);

/// The store's time at a reading of the machine's monotonic clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reference {
    at: Millis,
    uptime_ms: i64,
    boot: i64,
}

/// The machine's monotonic clock: its boot, and milliseconds since.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Machine {
    boot: i64,
    uptime_ms: i64,
}

/// This process's view of one database's clock.
#[derive(Debug, Default)]
pub(crate) struct Clock {
    /// Added to the wall clock: tests only (a process whose clock is wrong).
    skew_ms: AtomicI64,
    anchor: Mutex<Option<Anchor>>,
    /// When this process last recorded the reference.
    referenced: Mutex<Option<Instant>>,
}

#[derive(Clone, Copy, Debug)]
struct Anchor {
    /// A reading, in microseconds since the epoch.
    at_us: i64,
    /// When it was taken.
    instant: Instant,
}

impl Anchor {
    /// The reading before the store's time is taken into account, and the projection (the
    /// anchor moved by the real time since), in microseconds.
    fn candidate(self, wall_us: i64, now: Instant) -> (i64, i64) {
        let elapsed = i64::try_from(now.saturating_duration_since(self.instant).as_micros())
            .unwrap_or(i64::MAX);
        let low = self.at_us.saturating_add(elapsed);
        let high = low.saturating_add(elapsed / CATCH_UP_DIVISOR);
        (wall_us.clamp(low, high), low)
    }
}

/// Takes the reading `t_us` as the new anchor, unless it is the projection: following the
/// monotonic clock then loses no sub-millisecond remainders.
fn settle(anchor: &mut Option<Anchor>, t_us: i64, projected: Option<i64>, now: Instant) {
    if projected != Some(t_us) {
        *anchor = Some(Anchor {
            at_us: t_us,
            instant: now,
        });
    }
}

/// This boot's id, hashed (Linux; `None` elsewhere).
fn boot() -> Option<i64> {
    static BOOT: OnceLock<Option<i64>> = OnceLock::new();
    *BOOT.get_or_init(|| {
        let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let digest = Sha256::digest(id.trim().as_bytes());
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&digest[..8]);
        Some(i64::from_be_bytes(bytes) | 1)
    })
}

/// The machine's monotonic clock now (time since boot, suspend included), if it can be read.
fn machine() -> Option<Machine> {
    let boot = boot()?;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let seconds: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    if !seconds.is_finite() || seconds < 0.0 {
        return None;
    }
    // Whole milliseconds of a non-negative, finite number of seconds since boot.
    #[allow(clippy::cast_possible_truncation)]
    let uptime_ms = (seconds * 1000.0) as i64;
    Some(Machine { boot, uptime_ms })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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

    fn anchored(&self) -> bool {
        lock(&self.anchor).is_some()
    }

    /// The time, given the store's newest time and, for a first reading, the reference.
    fn reading(&self, store_ms: Millis, reference: Option<Reference>) -> Millis {
        let machine = if reference.is_some() { machine() } else { None };
        self.reading_at(store_ms, reference, machine, self.wall_us(), Instant::now())
    }

    fn reading_at(
        &self,
        store_ms: Millis,
        reference: Option<Reference>,
        machine: Option<Machine>,
        wall_us: i64,
        now: Instant,
    ) -> Millis {
        let store_us = store_ms.saturating_mul(1000);
        let mut anchor = lock(&self.anchor);
        let (t, projected) = match *anchor {
            None => {
                // The reference projected with the machine's monotonic clock, if both belong to
                // this boot; never past this process's wall clock.
                let projected = reference.zip(machine).and_then(|(r, m)| {
                    (r.boot == m.boot && r.at > 0 && m.uptime_ms >= r.uptime_ms).then(|| {
                        r.at.saturating_add(m.uptime_ms - r.uptime_ms)
                            .saturating_mul(1000)
                    })
                });
                let t = projected.map_or(store_us, |p| p.min(wall_us).max(store_us));
                (t, None)
            }
            Some(a) => {
                let (candidate, low) = a.candidate(wall_us, now);
                (candidate.max(store_us), Some(low))
            }
        };
        settle(&mut anchor, t, projected, now);
        t.div_euclid(1000)
    }

    /// The time inside a write transaction: reads the store's newest time and raises it to the
    /// reading; about once a second, records the reference. (Reading, then updating only when
    /// the time moved, costs fewer instructions than one `UPDATE .. RETURNING`.)
    pub(crate) fn advance(&self, conn: &Connection) -> Result<Millis, StoreError> {
        const OP: &str = "reading the store's clock";
        let stored = stored(conn, "clock")?;
        let reference = if self.anchored() {
            None
        } else {
            stored_reference(conn)?
        };
        let t = self.reading(stored, reference);
        if t > stored {
            conn.prepare_cached(
                "UPDATE sequences SET value = ?1 WHERE name = 'clock' AND value < ?1",
            )
            .ctx(OP)?
            .execute(params![t])
            .ctx(OP)?;
        }
        let due = lock(&self.referenced).is_none_or(|at| at.elapsed() >= REFERENCE_EVERY);
        if due {
            if let Some(m) = machine() {
                conn.prepare_cached(
                    "UPDATE sequences SET value = CASE name WHEN 'clock_ref' THEN ?1 \
                     WHEN 'clock_ref_uptime' THEN ?2 ELSE ?3 END \
                     WHERE name IN ('clock_ref', 'clock_ref_uptime', 'clock_ref_boot')",
                )
                .ctx(OP)?
                .execute(params![t, m.uptime_ms, m.boot])
                .ctx(OP)?;
            }
            *lock(&self.referenced) = Some(Instant::now());
        }
        Ok(t)
    }

    /// The time inside a read transaction: reads the store's newest time, writes nothing.
    pub(crate) fn observe(&self, conn: &Connection) -> Result<Millis, StoreError> {
        let stored = stored(conn, "clock")?;
        let reference = if self.anchored() {
            None
        } else {
            stored_reference(conn)?
        };
        Ok(self.reading(stored, reference))
    }
}

fn stored(conn: &Connection, name: &str) -> Result<Millis, StoreError> {
    const OP: &str = "reading the store's clock";
    let value: Option<i64> = conn
        .prepare_cached("SELECT value FROM sequences WHERE name = ?1")
        .ctx(OP)?
        .query_row([name], |r| r.get(0))
        .optional()
        .ctx(OP)?;
    value.ok_or_else(|| StoreError::Corrupt {
        what: "sequences".to_owned(),
        reason: format!("the store's clock (`{name}`) is missing"),
    })
}

fn stored_reference(conn: &Connection) -> Result<Option<Reference>, StoreError> {
    let reference = Reference {
        at: stored(conn, "clock_ref")?,
        uptime_ms: stored(conn, "clock_ref_uptime")?,
        boot: stored(conn, "clock_ref_boot")?,
    };
    Ok((reference.boot != 0).then_some(reference))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{Clock, Machine, Reference};

    const DAY_MS: i64 = 24 * 3600 * 1000;
    const T0: i64 = 1_700_000_000_000;

    fn first(clock: &Clock, wall_ms: i64, start: Instant) -> i64 {
        clock.reading_at(T0, None, None, wall_ms * 1000, start)
    }

    #[test]
    fn a_first_reading_without_a_reference_is_the_stores_time_whatever_the_wall_clock() {
        for wall_ms in [T0 - DAY_MS, T0, T0 + 8 * DAY_MS] {
            assert_eq!(first(&Clock::default(), wall_ms, Instant::now()), T0);
        }
    }

    #[test]
    fn a_first_reading_projects_the_reference_with_the_machines_clock_never_past_the_wall() {
        let reference = Some(Reference {
            at: T0,
            uptime_ms: 1_000,
            boot: 7,
        });
        let machine = Some(Machine {
            boot: 7,
            uptime_ms: 6_000,
        });
        let read = |wall_ms: i64, machine: Option<Machine>| {
            Clock::default().reading_at(T0, reference, machine, wall_ms * 1000, Instant::now())
        };
        // 5 s passed on the machine since the reference.
        assert_eq!(read(T0 + 8 * DAY_MS, machine), T0 + 5_000);
        assert_eq!(read(T0 + 2_000, machine), T0 + 2_000);
        assert_eq!(read(T0 - DAY_MS, machine), T0);
        // Another boot: the machine's clock says nothing about the reference.
        let rebooted = Some(Machine {
            boot: 8,
            uptime_ms: 6_000,
        });
        assert_eq!(read(T0 + 8 * DAY_MS, rebooted), T0);
    }

    #[test]
    fn a_wall_clock_far_ahead_moves_the_time_at_most_one_percent_faster_than_real_time() {
        let clock = Clock::default();
        let start = Instant::now();
        first(&clock, T0, start);
        let ahead_us = (T0 + 8 * DAY_MS) * 1000;
        let mut t = T0;
        for s in 1..=1000u64 {
            t = clock.reading_at(t, None, None, ahead_us, start + Duration::from_secs(s));
        }
        // 1000 s of real time: at most 1010 s on the clock.
        assert!((T0 + 1_000_000..=T0 + 1_010_000).contains(&t), "{}", t - T0);
    }

    #[test]
    fn a_wall_clock_behind_never_takes_the_time_back_and_real_time_still_moves_it() {
        let clock = Clock::default();
        let start = Instant::now();
        first(&clock, T0, start);
        let behind_us = (T0 - 3_600_000) * 1000;
        let t = clock.reading_at(T0, None, None, behind_us, start + Duration::from_secs(5));
        assert_eq!(t, T0 + 5_000);
        // Another process wrote a later time: it is never gone back on.
        let t = clock.reading_at(
            T0 + 60_000,
            None,
            None,
            behind_us,
            start + Duration::from_secs(6),
        );
        assert_eq!(t, T0 + 60_000);
    }

    #[test]
    fn a_correct_wall_clock_is_followed() {
        let clock = Clock::default();
        let start = Instant::now();
        first(&clock, T0, start);
        for ms in [1i64, 7, 500, 10_000] {
            let later = start + Duration::from_millis(u64::try_from(ms).unwrap());
            let t = clock.reading_at(T0, None, None, (T0 + ms) * 1000, later);
            assert_eq!(t, T0 + ms);
        }
    }
}
