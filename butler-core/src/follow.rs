//! Following the event log by id from one read to the next, for the readers that act on what
//! other writers changed: the scheduler and the notification watcher.

use std::collections::{BTreeSet, VecDeque};

use crate::model::Id;

/// Where a reader of the event log is: where its next read starts, and which events after
/// that it has already handled.
///
/// A store may make event ids visible out of order (PostgreSQL's sequences, across concurrent
/// transactions): there each read starts where the read before the last one ended, so an event
/// that became visible after one with a larger id is still read, and the events already
/// handled are skipped. Where events become visible in id order
/// ([`RunStore::events_visible_in_id_order`](crate::RunStore::events_visible_in_id_order)),
/// each read starts where the last one ended.
#[derive(Debug)]
pub(crate) struct LogCursor {
    /// The largest id read or passed over.
    at: Id,
    /// Where the last reads ended, oldest first, at most `reads_back` of them.
    read_from: VecDeque<Id>,
    /// Events after the oldest of `read_from` already handled.
    seen: BTreeSet<Id>,
    reads_back: usize,
}

impl LogCursor {
    /// A cursor after event `at`, for a store whose events do or do not become visible in id
    /// order.
    pub fn new(at: Id, in_id_order: bool) -> Self {
        LogCursor {
            at,
            read_from: VecDeque::new(),
            seen: BTreeSet::new(),
            reads_back: if in_id_order { 1 } else { 2 },
        }
    }

    /// The id after which the next read starts.
    pub fn start(&self) -> Id {
        self.read_from.front().copied().unwrap_or(self.at)
    }

    /// Whether event `id`, read now, was not handled by an earlier read.
    pub fn is_new(&self, id: Id) -> bool {
        !self.seen.contains(&id)
    }

    /// Ends a read that handled the events `handled` and read or passed over everything up to
    /// `end`.
    pub fn finish(&mut self, end: Id, handled: impl IntoIterator<Item = Id>) {
        self.seen.extend(handled);
        self.at = self.at.max(end);
        self.read_from.push_back(self.at);
        if self.read_from.len() > self.reads_back {
            self.read_from.pop_front();
        }
        self.seen = self.seen.split_off(&(self.start() + 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_id_order_a_read_starts_where_the_last_ended() {
        let mut log = LogCursor::new(10, true);
        assert_eq!(log.start(), 10);
        log.finish(15, [12, 15]);
        assert_eq!(log.start(), 15);
        assert!(log.is_new(16));
        log.finish(20, []);
        assert_eq!(log.start(), 20);
    }

    #[test]
    fn out_of_order_a_read_starts_where_the_one_before_the_last_ended() {
        let mut log = LogCursor::new(10, false);
        log.finish(15, [12, 15]);
        assert_eq!(log.start(), 15);
        log.finish(20, [17, 20]);
        assert_eq!(
            log.start(),
            15,
            "the next read looks back over the last one"
        );
        assert!(
            !log.is_new(17) && !log.is_new(20),
            "and skips what it handled"
        );
        // Event 16 became visible after 17: the next read, from 15, finds it.
        assert!(log.is_new(16));
        log.finish(22, [16, 22]);
        assert_eq!(log.start(), 20);
        assert!(!log.is_new(22));
        assert!(log.is_new(17), "ids up to the start are forgotten");
    }
}
