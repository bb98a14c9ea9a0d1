//! The order stage: owns which delivery may start. Deliveries with a partition key queue behind
//! the one before them of the same key (in the order the transport handed them out) and start
//! only when it is settled; deliveries without a key start at once.

use std::collections::{HashMap, VecDeque};

/// A delivery's number in the worker: fetch order.
pub(super) type JobId = u64;

/// One queue per partition key with deliveries in the worker; the head of each is the one in
/// work (or waiting for a retry).
#[derive(Debug, Default)]
pub(super) struct KeyQueues {
    queues: HashMap<String, VecDeque<JobId>>,
}

impl KeyQueues {
    /// Adds a delivery; whether it may start now (no key, or the first of its key).
    pub(super) fn push(&mut self, key: Option<&str>, job: JobId) -> bool {
        let Some(key) = key else {
            return true;
        };
        let queue = self.queues.entry(key.to_owned()).or_default();
        queue.push_back(job);
        queue.len() == 1
    }

    /// The delivery at the head of its key's queue is settled: the next one of its key, which
    /// may start now.
    pub(super) fn settled(&mut self, key: Option<&str>, job: JobId) -> Option<JobId> {
        let key = key?;
        let queue = self.queues.get_mut(key)?;
        if queue.front() == Some(&job) {
            queue.pop_front();
        } else {
            // Not the head (given back while waiting): take it out wherever it is.
            queue.retain(|j| *j != job);
        }
        let next = queue.front().copied();
        if queue.is_empty() {
            self.queues.remove(key);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::KeyQueues;

    #[test]
    fn one_key_one_at_a_time_in_order() {
        let mut q = KeyQueues::default();
        assert!(q.push(Some("a"), 1));
        assert!(!q.push(Some("a"), 2));
        assert!(q.push(Some("b"), 3));
        assert!(!q.push(Some("a"), 4));
        assert!(q.push(None, 5));
        assert_eq!(q.settled(Some("a"), 1), Some(2));
        assert_eq!(q.settled(Some("a"), 2), Some(4));
        assert_eq!(q.settled(Some("a"), 4), None);
        assert_eq!(q.settled(Some("b"), 3), None);
        assert_eq!(q.settled(None, 5), None);
        assert!(q.push(Some("a"), 6), "an emptied key starts afresh");
    }

    #[test]
    fn a_given_back_delivery_leaves_its_queue() {
        let mut q = KeyQueues::default();
        q.push(Some("a"), 1);
        q.push(Some("a"), 2);
        q.push(Some("a"), 3);
        assert_eq!(q.settled(Some("a"), 2), Some(1), "the head stays");
        assert_eq!(q.settled(Some("a"), 1), Some(3));
    }
}
