//! Counting at the source: every handler call, publish attempt, fetch and lost acknowledgement
//! is recorded as an event `(kind, id)` where it happens, never inferred from a table that
//! deduplicates by itself.
//!
//! A [`Tally`] counts in memory and, for a child process, also appends one line per event to a
//! file of its own (`kind<TAB>id`), written with one `write` call before the counted action
//! goes on: SIGKILL cannot lose an event that happened before it (the page cache keeps the
//! write), so [`Events::read_dir`] sums what every process, killed or not, did.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A handler was called with this input id.
pub const HANDLER: &str = "handler";
/// A message with this id was handed to the transport's `publish`.
pub const PUBLISH: &str = "publish";
/// A delivery of this message id was fetched.
pub const FETCH: &str = "fetch";
/// A delivery of this message id was fetched that the broker counts as a redelivery (its
/// delivery count above 1): counted even when the process that fetched the earlier delivery
/// was killed before it could record it.
pub const REDELIVERY: &str = "redelivery";
/// The first acknowledgement of this message id was dropped on purpose (a lost ack).
pub const ACK_LOST: &str = "ack-lost";
/// The first delivery of this message id stalled past its visibility timeout.
pub const STALL: &str = "stall";
/// A stall gave up waiting for the redelivery to be acknowledged (bounded wait).
pub const STALL_TIMEOUT: &str = "stall-timeout";

/// Counts of events by kind and id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Events {
    by_kind: BTreeMap<String, BTreeMap<String, usize>>,
}

impl Events {
    fn add(&mut self, kind: &str, id: &str, n: usize) {
        *self
            .by_kind
            .entry(kind.to_owned())
            .or_default()
            .entry(id.to_owned())
            .or_default() += n;
    }

    /// How many times each id had an event of this kind.
    pub fn counts(&self, kind: &str) -> BTreeMap<String, usize> {
        self.by_kind.get(kind).cloned().unwrap_or_default()
    }

    /// How many times `id` had an event of this kind.
    pub fn count(&self, kind: &str, id: &str) -> usize {
        self.by_kind
            .get(kind)
            .and_then(|m| m.get(id))
            .copied()
            .unwrap_or(0)
    }

    /// Events of this kind, all ids together.
    pub fn total(&self, kind: &str) -> usize {
        self.by_kind.get(kind).map_or(0, |m| m.values().sum())
    }

    /// The events every `*.events` file in `dir` recorded, summed. A last line without its
    /// newline (a write cut short) is ignored.
    pub fn read_dir(dir: &Path) -> io::Result<Events> {
        let mut events = Events::default();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "events"))
            .collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path)?;
            let complete = match text.rfind('\n') {
                Some(end) => &text[..end],
                None => "",
            };
            for line in complete.lines() {
                if let Some((kind, id)) = line.split_once('\t') {
                    events.add(kind, id, 1);
                }
            }
        }
        Ok(events)
    }
}

struct Inner {
    events: Mutex<Events>,
    file: Option<Mutex<File>>,
}

/// Records events in memory and, optionally, in a file. Cheap to clone (shared).
#[derive(Clone)]
pub struct Tally {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tally")
            .field("file", &self.inner.file.is_some())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Default for Tally {
    fn default() -> Self {
        Tally::in_memory()
    }
}

impl Tally {
    /// A tally kept in memory only (tests in one process).
    pub fn in_memory() -> Tally {
        Tally {
            inner: Arc::new(Inner {
                events: Mutex::new(Events::default()),
                file: None,
            }),
        }
    }

    /// A tally that also appends every event to `<dir>/<pid>-<n>.events` (child processes).
    pub fn in_dir(dir: &Path) -> io::Result<Tally> {
        std::fs::create_dir_all(dir)?;
        let mut n = 0u32;
        // Bounded: a process creates few tallies; 1 000 names are plenty.
        let file = loop {
            let path = dir.join(format!("{}-{n}.events", std::process::id()));
            match OpenOptions::new().append(true).create_new(true).open(&path) {
                Ok(f) => break f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1_000 => n += 1,
                Err(e) => return Err(e),
            }
        };
        Ok(Tally {
            inner: Arc::new(Inner {
                events: Mutex::new(Events::default()),
                file: Some(Mutex::new(file)),
            }),
        })
    }

    /// Records one event. A tally that cannot write its file ends the process (exit code 70):
    /// a figure that silently missed events would be worse than no figure.
    pub fn record(&self, kind: &str, id: &str) {
        if let Some(file) = &self.inner.file {
            let line = format!("{kind}\t{id}\n");
            if let Err(e) = lock(file).write_all(line.as_bytes()) {
                eprintln!("cannot record the event `{kind} {id}`: {e}");
                std::process::exit(70);
            }
        }
        lock(&self.inner.events).add(kind, id, 1);
    }

    /// What this tally recorded (in this process).
    pub fn events(&self) -> Events {
        lock(&self.inner.events).clone()
    }
}
