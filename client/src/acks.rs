//! Acknowledgement boards: how `write_event` futures learn that their event is durable
//! without a channel per event.
//!
//! Each segment lane of a writer has a board. Every event queued for the lane takes the
//! next *ticket* (numbered in queue order), and its future holds the board and the ticket.
//! The lane settles a whole batch's tickets at once when the batch is acknowledged; a
//! future checks one atomic (every ticket below `settled` is done) and only otherwise takes
//! the board's lock to leave its waker in the ticket's slot. Compared with a oneshot
//! channel per event this saves an allocation and a free (on two different cores) and the
//! cache misses of a state word written by one core and read by the other for each event:
//! the slots of consecutive tickets share cache lines and are settled together.
//!
//! Tickets usually settle in order. Those of events moved to another lane by a scaling
//! settle when their new lane's batch does, out of order: a slot is marked done, and the
//! settled prefix advances once every ticket before it is done. Failures are kept per
//! ticket until the ticket's future has seen them (or is dropped), so a failed event is
//! never reported as written, and nothing stays behind once every future has answered.

use crate::error::ClientError;
use crossbeam_utils::CachePadded;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Waker;

/// One lane's tickets.
pub(crate) struct Board {
    /// Every ticket below this is settled (read without the lock by polling futures).
    settled: CachePadded<AtomicU64>,
    /// `inner.failures` is not empty.
    failures: AtomicBool,
    inner: Mutex<Inner>,
}

struct Inner {
    /// The first unsettled ticket; `slots[0]` is its slot.
    base: u64,
    slots: VecDeque<Slot>,
    /// Settled with an error and not yet seen by the ticket's future.
    failed: HashMap<u64, ClientError>,
    /// The lane's task is gone without settling its tickets: every unsettled one fails.
    closed: Option<ClientError>,
}

#[derive(Default)]
struct Slot {
    waker: Option<Waker>,
    settled: bool,
    /// The ticket's future was dropped before it was settled: nobody will ask.
    abandoned: bool,
}

impl Inner {
    fn slot(&mut self, ticket: u64) -> &mut Slot {
        let i = (ticket - self.base) as usize;
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, Slot::default);
        }
        &mut self.slots[i]
    }

    /// Settles one ticket at or beyond `base`; returns the waker to wake.
    fn settle(&mut self, ticket: u64, r: &Result<(), ClientError>) -> Option<Waker> {
        let slot = self.slot(ticket);
        if slot.settled {
            return None;
        }
        slot.settled = true;
        let abandoned = slot.abandoned;
        let waker = slot.waker.take();
        if let (Err(e), false) = (r, abandoned) {
            self.failed.insert(ticket, e.clone());
        }
        waker
    }

    /// Moves `base` past the settled tickets at the front.
    fn advance(&mut self) {
        while self.slots.front().is_some_and(|s| s.settled) {
            self.slots.pop_front();
            self.base += 1;
        }
    }
}

/// What a ticket's future finds when it looks.
pub(crate) enum Look {
    Pending,
    Done(Result<(), ClientError>),
}

impl Board {
    pub(crate) fn new() -> Self {
        Self {
            settled: CachePadded::new(AtomicU64::new(0)),
            failures: AtomicBool::new(false),
            inner: Mutex::new(Inner { base: 0, slots: VecDeque::new(), failed: HashMap::new(), closed: None }),
        }
    }

    /// Settles tickets `first..end` with `r` and wakes their futures.
    pub(crate) fn settle_range(&self, first: u64, end: u64, r: &Result<(), ClientError>) {
        if first >= end {
            return;
        }
        let mut wake = Vec::new();
        {
            let mut inner = self.inner.lock().expect("lock");
            let from = first.max(inner.base);
            for t in from..end {
                wake.extend(inner.settle(t, r));
            }
            self.publish(&mut inner);
        }
        for w in wake {
            w.wake();
        }
    }

    /// Settles one ticket (an event moved to another lane, or one that never left).
    pub(crate) fn settle(&self, ticket: u64, r: &Result<(), ClientError>) {
        self.settle_range(ticket, ticket + 1, r);
    }

    /// The lane's task stopped without settling (cancelled with its runtime): its tickets,
    /// those waiting and any not looked at yet, fail with `e`.
    pub(crate) fn close(&self, e: ClientError) {
        let mut wake = Vec::new();
        {
            let mut inner = self.inner.lock().expect("lock");
            let (base, n) = (inner.base, inner.slots.len() as u64);
            let r = Err(e.clone());
            for t in base..base + n {
                wake.extend(inner.settle(t, &r));
            }
            inner.closed = Some(e);
            self.publish(&mut inner);
        }
        for w in wake {
            w.wake();
        }
    }

    fn publish(&self, inner: &mut Inner) {
        inner.advance();
        self.failures.store(!inner.failed.is_empty(), Ordering::Release);
        self.settled.store(inner.base, Ordering::Release);
    }

    /// The state of `ticket`; leaves `waker` to be woken if it is not settled yet.
    pub(crate) fn look(&self, ticket: u64, waker: &Waker) -> Look {
        if ticket < self.settled.load(Ordering::Acquire) && !self.failures.load(Ordering::Acquire) {
            return Look::Done(Ok(()));
        }
        let mut inner = self.inner.lock().expect("lock");
        if ticket >= inner.base {
            if let Some(e) = &inner.closed
                && !inner.slots.get((ticket - inner.base) as usize).is_some_and(|s| s.settled)
            {
                return Look::Done(Err(e.clone()));
            }
            let slot = inner.slot(ticket);
            if !slot.settled {
                match &slot.waker {
                    Some(w) if w.will_wake(waker) => {}
                    _ => slot.waker = Some(waker.clone()),
                }
                return Look::Pending;
            }
        }
        let r = inner.failed.remove(&ticket).map_or(Ok(()), Err);
        self.failures.store(!inner.failed.is_empty(), Ordering::Release);
        Look::Done(r)
    }

    /// The future of `ticket` is dropped before it saw its outcome.
    pub(crate) fn forget(&self, ticket: u64) {
        if ticket < self.settled.load(Ordering::Acquire) && !self.failures.load(Ordering::Acquire) {
            return;
        }
        let mut inner = self.inner.lock().expect("lock");
        if ticket >= inner.base {
            let slot = inner.slot(ticket);
            if !slot.settled {
                slot.abandoned = true;
                slot.waker = None;
                return;
            }
        }
        inner.failed.remove(&ticket);
        self.failures.store(!inner.failed.is_empty(), Ordering::Release);
    }

    /// Tickets below `end` not settled yet.
    #[cfg(test)]
    fn unsettled_below(&self, end: u64) -> u64 {
        let inner = self.inner.lock().expect("lock");
        let mut n = 0;
        for (i, s) in inner.slots.iter().enumerate() {
            if inner.base + i as u64 >= end {
                break;
            }
            n += u64::from(!s.settled);
        }
        n + end.saturating_sub(inner.base + inner.slots.len() as u64)
    }

    /// Failures kept for futures that have not seen them yet.
    #[cfg(test)]
    fn failures_kept(&self) -> usize {
        self.inner.lock().expect("lock").failed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    fn err() -> ClientError {
        ClientError::ConnectionLost("test".into())
    }

    #[test]
    fn tickets_settle_in_ranges_and_wake_their_futures() {
        let b = Board::new();
        let (c, w) = waker();
        assert!(matches!(b.look(3, &w), Look::Pending));
        assert!(matches!(b.look(3, &w), Look::Pending), "the same waker is kept, not doubled");
        b.settle_range(0, 3, &Ok(()));
        assert_eq!(c.0.load(Ordering::SeqCst), 0);
        b.settle_range(3, 5, &Ok(()));
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
        assert!(matches!(b.look(3, &w), Look::Done(Ok(()))));
        assert_eq!(b.unsettled_below(5), 0);
        assert_eq!(b.unsettled_below(7), 2);
    }

    #[test]
    fn out_of_order_settles_hold_the_prefix_until_the_gap_closes() {
        let b = Board::new();
        let (c, w) = waker();
        b.settle(2, &Ok(()));
        assert!(matches!(b.look(2, &w), Look::Done(Ok(()))));
        assert!(matches!(b.look(0, &w), Look::Pending));
        assert_eq!(b.settled.load(Ordering::SeqCst), 0);
        b.settle_range(0, 2, &Ok(()));
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
        assert_eq!(b.settled.load(Ordering::SeqCst), 3);
        b.settle(1, &Err(err()));
        assert!(matches!(b.look(1, &w), Look::Done(Ok(()))), "a ticket settles once");
    }

    #[test]
    fn failures_are_reported_once_and_not_kept_after() {
        let b = Board::new();
        let (_, w) = waker();
        b.forget(1); // dropped before it was settled: its failure is not kept
        b.settle_range(0, 4, &Err(err()));
        assert_eq!(b.failures_kept(), 3);
        assert!(matches!(b.look(0, &w), Look::Done(Err(ClientError::ConnectionLost(_)))));
        b.forget(2); // dropped after: its failure goes with it
        assert!(matches!(b.look(3, &w), Look::Done(Err(_))));
        assert_eq!(b.failures_kept(), 0);
        b.settle_range(4, 6, &Ok(()));
        assert!(matches!(b.look(5, &w), Look::Done(Ok(()))));
    }

    #[test]
    fn a_closed_board_fails_every_unsettled_ticket() {
        let b = Board::new();
        let (c, w) = waker();
        b.settle(0, &Ok(()));
        assert!(matches!(b.look(2, &w), Look::Pending));
        b.close(err());
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
        assert!(matches!(b.look(0, &w), Look::Done(Ok(()))));
        assert!(matches!(b.look(2, &w), Look::Done(Err(_))));
        assert!(matches!(b.look(9, &w), Look::Done(Err(_))), "one never looked at before the close");
    }
}
