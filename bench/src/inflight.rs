//! Outstanding acknowledgements of single events, one queue per routing key.
//!
//! A key's events go to one segment, and a segment's acknowledgements settle in the order its
//! events were written, so only the front of each queue needs polling: no allocation and no
//! wake-up bookkeeping per event, unlike a `FuturesUnordered` (an allocation and a wake per
//! event: it took half of the bench's CPU at a million events a second). Should a later
//! event of a key ever settle first (a scaling moves events between segments), it is counted
//! when the ones before it are: its latency can only be overstated, never understated.

use hdrhistogram::Histogram;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Instant;

pub struct KeyedAcks<F> {
    /// Each acknowledgement with its send time, if it is to be timed.
    queues: Vec<VecDeque<(F, Option<Instant>)>>,
    len: usize,
}

impl<F, E> KeyedAcks<F>
where
    F: Future<Output = Result<(), E>> + Unpin,
    E: std::fmt::Display,
{
    pub fn new(keys: usize) -> Self {
        Self { queues: (0..keys.max(1)).map(|_| VecDeque::new()).collect(), len: 0 }
    }

    /// Events awaiting acknowledgement.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Adds the acknowledgement of an event with key number `key`, sent at `sent` (`None`:
    /// counted, not timed, e.g. during a warm-up).
    pub fn push(&mut self, key: usize, ack: F, sent: Option<Instant>) {
        let n = self.queues.len();
        self.queues[key % n].push_back((ack, sent));
        self.len += 1;
    }

    /// Waits until at least one acknowledgement is in (none if nothing is outstanding),
    /// records every one that is, and returns how many. The first failure ends the wait.
    pub async fn next_ready(&mut self, hist: &mut Histogram<u64>) -> Result<u64, String> {
        if self.len == 0 {
            return Ok(0);
        }
        std::future::poll_fn(|cx| {
            let mut now = None;
            let mut done = 0u64;
            for q in &mut self.queues {
                while let Some((ack, sent)) = q.front_mut() {
                    match Pin::new(ack).poll(cx) {
                        Poll::Pending => break,
                        Poll::Ready(r) => {
                            if let Err(e) = r {
                                q.pop_front();
                                self.len -= done as usize + 1;
                                return Poll::Ready(Err(e.to_string()));
                            }
                            if let Some(sent) = sent {
                                let now = *now.get_or_insert_with(Instant::now);
                                hist.saturating_record(now.saturating_duration_since(*sent).as_micros() as u64);
                            }
                            q.pop_front();
                            done += 1;
                        }
                    }
                }
            }
            self.len -= done as usize;
            if done > 0 { Poll::Ready(Ok(done)) } else { Poll::Pending }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::oneshot;

    type Outcome = Result<(), String>;
    type Settle = fn(Result<Outcome, oneshot::Canceled>) -> Outcome;
    type Ack = futures::future::Map<oneshot::Receiver<Outcome>, Settle>;

    fn ack() -> (oneshot::Sender<Outcome>, Ack) {
        use futures::FutureExt;
        let (tx, rx) = oneshot::channel();
        let settle: Settle = |r| r.unwrap_or_else(|_| Err("dropped".into()));
        (tx, rx.map(settle))
    }

    fn hist() -> Histogram<u64> {
        crate::micros_histogram()
    }

    #[tokio::test]
    async fn counts_settled_fronts_of_every_key_and_waits_for_the_rest() {
        let mut acks = KeyedAcks::new(2);
        let mut senders = Vec::new();
        for i in 0..6 {
            let (tx, f) = ack();
            acks.push(i % 2, f, (i != 5).then(Instant::now));
            senders.push(tx);
        }
        assert_eq!(acks.len(), 6);
        let mut h = hist();
        // Key 0 holds events 0, 2, 4; key 1 holds 1, 3, 5. Settle 0, 2 and 1: three in.
        let mut s: Vec<Option<_>> = senders.into_iter().map(Some).collect();
        for i in [0, 2, 1] {
            s[i].take().expect("sender").send(Ok(())).expect("receiver");
        }
        assert_eq!(acks.next_ready(&mut h).await, Ok(3));
        assert_eq!(h.len(), 3);
        // Event 5 settles before 3: nothing of key 1 counts until 3 does.
        s[5].take().expect("sender").send(Ok(())).expect("receiver");
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(20), acks.next_ready(&mut h)).await;
        assert!(waiting.is_err(), "event 5 must wait for event 3");
        s[3].take().expect("sender").send(Ok(())).expect("receiver");
        assert_eq!(acks.next_ready(&mut h).await, Ok(2));
        assert_eq!(h.len(), 4, "event 5 was counted, not timed");
        s[4].take().expect("sender").send(Err("segment sealed".into())).expect("receiver");
        assert_eq!(acks.next_ready(&mut h).await, Err("segment sealed".to_string()));
        assert_eq!(h.len(), 4);
    }

    #[tokio::test]
    async fn nothing_outstanding_returns_at_once() {
        let mut acks: KeyedAcks<Ack> = KeyedAcks::new(4);
        assert_eq!(acks.next_ready(&mut hist()).await, Ok(0));
    }
}
