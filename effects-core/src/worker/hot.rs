//! Hot entities: owns the line of deliveries whose runs were refused because an entity they
//! read changed. Only one delivery per entity re-runs at a time; the others wait for it to
//! settle, then the next re-runs. Without the line, every delivery decided from the same state
//! of a contended entity is re-run at once after each commit and all but one are refused again
//! — a storm of re-runs that grows with the square of the deliveries in flight. With it, a
//! delivery that meets a conflict is refused about once more at most (by runs decided before
//! it joined the line), and the entity's runs commit one after the other.

use std::collections::{HashMap, VecDeque};

use super::order::JobId;

/// The entities with a line, by the text of their lookup ref.
#[derive(Debug, Default)]
pub(super) struct HotEntities {
    lines: HashMap<String, Line>,
    /// Which entity's turn each delivery holds or waits for.
    of: HashMap<JobId, String>,
}

#[derive(Debug, Default)]
struct Line {
    /// The delivery whose re-run is in progress.
    turn: Option<JobId>,
    waiting: VecDeque<JobId>,
}

/// What to do with a delivery refused on an entity.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// Its turn: re-run it (after the re-run delay).
    Rerun,
    /// Another delivery's re-run on that entity is in progress: wait for it.
    Wait,
}

impl HotEntities {
    /// `job`'s run was refused because `entity` changed: what to do with it, and the
    /// delivery whose turn it is now on another entity, if `job` left that one's line.
    pub(super) fn refused(&mut self, job: JobId, entity: &str) -> (Refused, Option<JobId>) {
        let mut passed = None;
        if let Some(previous) = self.of.get(&job) {
            if previous != entity {
                // Refused on another entity now: it leaves the first line.
                let previous = previous.clone();
                passed = self.leave(job, &previous);
            }
        }
        self.of.insert(job, entity.to_owned());
        let line = self.lines.entry(entity.to_owned()).or_default();
        let refused = match line.turn {
            None => {
                line.turn = Some(job);
                Refused::Rerun
            }
            Some(turn) if turn == job => Refused::Rerun,
            Some(_) => {
                if !line.waiting.contains(&job) {
                    line.waiting.push_back(job);
                }
                Refused::Wait
            }
        };
        (refused, passed)
    }

    /// `job` settled (or left the worker): the next delivery waiting on its entity, whose turn
    /// it is now.
    pub(super) fn settled(&mut self, job: JobId) -> Option<JobId> {
        let entity = self.of.remove(&job)?;
        self.leave(job, &entity)
    }

    fn leave(&mut self, job: JobId, entity: &str) -> Option<JobId> {
        let line = self.lines.get_mut(entity)?;
        let mut next = None;
        if line.turn == Some(job) {
            line.turn = line.waiting.pop_front();
            next = line.turn;
        } else {
            line.waiting.retain(|j| *j != job);
        }
        if line.turn.is_none() && line.waiting.is_empty() {
            self.lines.remove(entity);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::{HotEntities, Refused};

    #[test]
    fn one_rerun_per_entity_at_a_time() {
        let mut hot = HotEntities::default();
        assert_eq!(hot.refused(1, "a"), (Refused::Rerun, None));
        assert_eq!(hot.refused(2, "a"), (Refused::Wait, None));
        assert_eq!(hot.refused(3, "a"), (Refused::Wait, None));
        assert_eq!(
            hot.refused(4, "b"),
            (Refused::Rerun, None),
            "another entity"
        );
        assert_eq!(
            hot.refused(1, "a"),
            (Refused::Rerun, None),
            "refused again: still its turn"
        );
        assert_eq!(hot.settled(1), Some(2));
        assert_eq!(hot.settled(3), None, "a waiter leaving passes no turn");
        assert_eq!(hot.settled(2), None);
        assert_eq!(
            hot.refused(5, "a"),
            (Refused::Rerun, None),
            "the line was emptied"
        );
        assert_eq!(hot.settled(9), None, "never in a line");
    }

    #[test]
    fn refused_on_another_entity_moves_lines() {
        let mut hot = HotEntities::default();
        assert_eq!(hot.refused(1, "a"), (Refused::Rerun, None));
        assert_eq!(hot.refused(2, "a"), (Refused::Wait, None));
        assert_eq!(
            hot.refused(1, "b"),
            (Refused::Rerun, Some(2)),
            "1 left a's line: 2's turn"
        );
        assert_eq!(hot.refused(2, "a"), (Refused::Rerun, None));
    }
}
