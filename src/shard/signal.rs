//! A one-shot, single-threaded signal that any number of a shard's tasks can
//! await (shutdown requested; all connections gone). Shard tasks never share
//! it across threads, so it needs no atomics.
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// Lets every other runnable task of the shard run once (monoio has no
/// `yield_now`): used to gather a whole turn's work into one batch.
pub async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

#[derive(Default)]
pub struct LocalSignal {
    fired: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

impl LocalSignal {
    pub fn fire(&self) {
        if self.fired.replace(true) {
            return;
        }
        for waker in self.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }

    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.fired.get() {
                return Poll::Ready(());
            }
            self.waiters.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}
