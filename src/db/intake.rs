//! How every lane of the db thread takes its work in and stops: the
//! channel, the stop signal `DbThread::join` sends, and the shutdown clock.
//! A stop closes the channel; what was queued is still received, then the
//! channel reports its end, which starts the clock (`shutdown_flush`) the
//! lane's flush must beat. The presence writer, the durable lane and the
//! audit lane all stop this way, so they end on one deadline.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::time::{sleep_until, Instant};

/// The receiving end of a lane's channel, bounded or not.
pub(crate) trait Channel {
    type Item;
    fn recv_many<'a>(
        &'a mut self,
        buf: &'a mut Vec<Self::Item>,
        max: usize,
    ) -> impl Future<Output = usize> + 'a;
    fn close(&mut self);
}

impl<T> Channel for mpsc::Receiver<T> {
    type Item = T;
    fn recv_many<'a>(
        &'a mut self,
        buf: &'a mut Vec<T>,
        max: usize,
    ) -> impl Future<Output = usize> + 'a {
        mpsc::Receiver::recv_many(self, buf, max)
    }
    fn close(&mut self) {
        mpsc::Receiver::close(self);
    }
}

impl<T> Channel for mpsc::UnboundedReceiver<T> {
    type Item = T;
    fn recv_many<'a>(
        &'a mut self,
        buf: &'a mut Vec<T>,
        max: usize,
    ) -> impl Future<Output = usize> + 'a {
        mpsc::UnboundedReceiver::recv_many(self, buf, max)
    }
    fn close(&mut self) {
        mpsc::UnboundedReceiver::close(self);
    }
}

pub(crate) struct Intake<C> {
    pub(crate) rx: C,
    stop: Arc<Notify>,
    shutdown_flush: Duration,
    /// Set when the channel has ended: the flush must end by then.
    deadline: Option<Instant>,
}

impl<C: Channel> Intake<C> {
    pub(crate) fn new(rx: C, stop: Arc<Notify>, shutdown_flush: Duration) -> Self {
        Intake {
            rx,
            stop,
            shutdown_flush,
            deadline: None,
        }
    }

    /// What stops the lane (see the module doc).
    pub(crate) fn stopper(&self) -> Arc<Notify> {
        self.stop.clone()
    }

    /// The channel has ended: only the flush is left.
    pub(crate) fn closed(&self) -> bool {
        self.deadline.is_some()
    }

    /// The flush's time is up.
    pub(crate) fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Receives up to `max` items into `buf`; 0 when a stop closed the
    /// channel or it ended (then the clock starts). Never resolves once
    /// closed. Cancel safe: `recv_many` and `notified` both are.
    pub(crate) async fn receive(&mut self, buf: &mut Vec<C::Item>, max: usize) -> usize {
        if self.closed() {
            return std::future::pending().await;
        }
        let received = tokio::select! {
            n = self.rx.recv_many(buf, max) => n,
            _ = self.stop.notified() => {
                self.rx.close();
                return 0;
            }
        };
        if received == 0 {
            self.deadline = Some(Instant::now() + self.shutdown_flush);
        }
        received
    }
}

/// Sleeps until `deadline`, or forever without one.
pub(crate) async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => sleep_until(d).await,
        None => std::future::pending().await,
    }
}
