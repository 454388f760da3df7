//! The writer's in-memory backlog: commands received from the shards and
//! not yet committed. Bounded by count; over the bound the OLDEST commands
//! are dropped (newer state is worth more than older state), and the caller
//! counts what was dropped.

use std::collections::VecDeque;

/// A FIFO of commands with a hard bound.
#[derive(Debug)]
pub(crate) struct Backlog<T> {
    queue: VecDeque<T>,
    max: usize,
}

impl<T> Backlog<T> {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            max: max.max(1),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The oldest command.
    pub(crate) fn front(&self) -> Option<&T> {
        self.queue.front()
    }

    /// Appends the newest commands; returns how many old ones were dropped
    /// to stay within the bound.
    pub(crate) fn extend(&mut self, cmds: impl IntoIterator<Item = T>) -> usize {
        self.queue.extend(cmds);
        self.trim()
    }

    /// Removes up to `n` of the oldest commands, to be written as a batch.
    pub(crate) fn take_batch(&mut self, n: usize) -> Vec<T> {
        let n = n.min(self.queue.len());
        self.queue.drain(..n).collect()
    }

    /// Puts back a batch that could not be written, ahead of everything
    /// received since (so order is kept); returns how many were dropped.
    pub(crate) fn requeue_front(&mut self, batch: Vec<T>) -> usize {
        for cmd in batch.into_iter().rev() {
            self.queue.push_front(cmd);
        }
        self.trim()
    }

    fn trim(&mut self) -> usize {
        let over = self.queue.len().saturating_sub(self.max);
        self.queue.drain(..over);
        over
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_batches_oldest_first() {
        let mut b = Backlog::new(10);
        assert_eq!(b.extend(1..=5), 0);
        assert_eq!(b.front(), Some(&1));
        assert_eq!(b.take_batch(3), vec![1, 2, 3]);
        assert_eq!(b.front(), Some(&4));
        assert_eq!(b.take_batch(10), vec![4, 5]);
        assert!(b.is_empty());
    }

    #[test]
    fn over_the_bound_drops_the_oldest() {
        let mut b = Backlog::new(3);
        assert_eq!(b.extend(1..=5), 2);
        assert_eq!(b.len(), 3);
        assert_eq!(b.take_batch(10), vec![3, 4, 5]);
    }

    #[test]
    fn requeued_batch_goes_first_and_is_dropped_first() {
        let mut b = Backlog::new(4);
        b.extend(1..=4);
        let batch = b.take_batch(2);
        b.extend([5, 6]);
        // 1,2 back in front of 3,4,5,6: two over the bound, and they are
        // the oldest.
        assert_eq!(b.requeue_front(batch), 2);
        assert_eq!(b.take_batch(10), vec![3, 4, 5, 6]);

        let mut b = Backlog::new(4);
        b.extend(1..=3);
        let batch = b.take_batch(2);
        assert_eq!(b.requeue_front(batch), 0);
        assert_eq!(b.take_batch(10), vec![1, 2, 3]);
    }
}
