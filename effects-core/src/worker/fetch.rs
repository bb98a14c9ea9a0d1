//! The fetch stage: owns asking the transport for more deliveries — as many as the worker has
//! room for — and backing off while fetches fail.

use std::time::Instant;

use crate::executor::Backoff;
use crate::transport::FetchRequest;
use crate::worker::WorkerConfig;

/// What the next fetch asks for, and when it may be made.
#[derive(Debug)]
pub(super) struct Fetcher {
    consumer: String,
    topic: String,
    failures: u32,
    not_before: Option<Instant>,
}

impl Fetcher {
    pub(super) fn new(consumer: String, topic: String) -> Fetcher {
        Fetcher {
            consumer,
            topic,
            failures: 0,
            not_before: None,
        }
    }

    /// The request for up to `room` deliveries.
    pub(super) fn request(&self, config: &WorkerConfig, room: usize) -> FetchRequest {
        FetchRequest {
            consumer: self.consumer.clone(),
            topic: self.topic.clone(),
            max: room,
            visibility: config.visibility,
            wait: config.fetch_wait,
        }
    }

    /// When the next fetch may start, if a failure put it off.
    pub(super) fn not_before(&self) -> Option<Instant> {
        self.not_before.filter(|t| *t > Instant::now())
    }

    pub(super) fn succeeded(&mut self) {
        self.failures = 0;
        self.not_before = None;
    }

    /// A fetch failed: the next waits for the retry backoff.
    pub(super) fn failed(&mut self, retry: &Backoff) -> std::time::Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = retry.delay(self.failures);
        self.not_before = Some(Instant::now() + delay);
        delay
    }
}
