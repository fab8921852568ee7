//! The streams of one HTTP/2 connection: futures polled by the connection's task, each
//! woken on its own, in slots that the next streams reuse.
//!
//! `FuturesUnordered` does the same job with a new task allocation per future; a stream's
//! future (the request path's inside it) is kilobytes, above what the allocator keeps in its
//! per-thread cache, so each request paid a slow allocation and free for it. Here a finished
//! stream's slot (its pinned box and its waker) waits for the next stream; up to
//! [`KEPT`] empty slots are kept, the rest freed, and when no stream is left one slot stays,
//! so neither a burst of streams nor an idle connection holds more than that.
//!
//! The wake-up protocol is `FuturesUnordered`'s: a waker queues its slot unless it is queued
//! already, and the poll takes the slot off (`queued` back to false) before it polls, both
//! with sequentially consistent swaps, so a wake that races with the poll either is seen by
//! it or queues the slot again.

use futures_util::task::AtomicWaker;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};

/// Empty slots kept for the next streams.
pub const KEPT: usize = 16;

pub struct StreamSet<F> {
    slots: Vec<Option<Slot<F>>>,
    /// Indexes of `slots` kept without a future, for the next streams.
    kept: Vec<usize>,
    /// Indexes of `slots` freed (`None`).
    empty: Vec<usize>,
    ready: Arc<Ready>,
    /// The woken indexes being polled (swapped with the queue's, so both keep their room).
    polling: Vec<usize>,
    /// Indexes of streams pushed since the last poll (no lock: only the set's owner pushes).
    fresh: Vec<usize>,
}

struct Slot<F> {
    fut: Pin<Box<Option<F>>>,
    wake: Arc<SlotWake>,
    waker: Waker,
}

/// What the slots' wakers share: the indexes woken, and the connection task's waker.
struct Ready {
    queue: Mutex<Vec<usize>>,
    task: AtomicWaker,
}

struct SlotWake {
    index: usize,
    /// In the queue already (a second wake before the poll adds nothing).
    queued: AtomicBool,
    /// Weak: a waker that outlives the set (a finished stream's, held elsewhere) keeps
    /// neither the queue nor the connection task's waker alive.
    ready: Weak<Ready>,
}

impl Wake for SlotWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Queued already: the wake that queued it wakes the task.
        if self.queued.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(ready) = self.ready.upgrade() else {
            return;
        };
        ready
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.index);
        ready.task.wake();
    }
}

impl<F> StreamSet<F> {
    pub fn new() -> Self {
        StreamSet {
            slots: Vec::new(),
            kept: Vec::new(),
            empty: Vec::new(),
            ready: Arc::new(Ready {
                queue: Mutex::new(Vec::new()),
                task: AtomicWaker::new(),
            }),
            polling: Vec::new(),
            fresh: Vec::new(),
        }
    }

    /// Streams in progress.
    pub fn len(&self) -> usize {
        self.slots.len() - self.kept.len() - self.empty.len()
    }

    /// Adds a stream; it is polled at the next [`StreamSet::poll`], which the caller makes
    /// (the task is not woken for it).
    #[cfg(test)]
    pub fn push(&mut self, fut: F) {
        self.push_with(|| fut);
    }

    /// Adds the stream `make` makes, written straight into its slot: a stream's future is
    /// kilobytes, and `Pin::set` of one made by the caller moved it twice (the compiler may
    /// still build it aside and copy it in once: about 330 instructions per HTTP/2 request
    /// in a callgrind profile). Polled at the next [`StreamSet::poll`], which the caller
    /// makes (the task is not woken for it).
    pub fn push_with(&mut self, make: impl FnOnce() -> F) -> usize {
        let index = match self.kept.pop().or_else(|| self.empty.pop()) {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let slot = match &mut self.slots[index] {
            Some(slot) => slot,
            empty => {
                let wake = Arc::new(SlotWake {
                    index,
                    queued: AtomicBool::new(false),
                    ready: Arc::downgrade(&self.ready),
                });
                // `Box::pin(None)` builds the `None` aside and copies all of the future's
                // kilobytes into the box, the unset ones too; this writes only what `None`
                // sets.
                let mut fut = Box::<Option<F>>::new_uninit();
                fut.write(None);
                empty.insert(Slot {
                    // SAFETY: written just above.
                    fut: Box::into_pin(unsafe { fut.assume_init() }),
                    waker: Waker::from(wake.clone()),
                    wake,
                })
            }
        };
        let place = slot.fut.as_mut();
        assert!(place.is_none(), "a kept slot is empty");
        // SAFETY: the slot holds `None` (asserted above: a finished stream's future is dropped
        // before its slot is kept), so nothing is overwritten without its drop; the new
        // future is written where it stays until it is dropped in place (`set(None)`) or
        // with its box, which keeps the pin's promise.
        unsafe { std::ptr::write(place.get_unchecked_mut(), Some(make())) };
        // Marked for the next poll without a wake-up: the caller polls the set next (a wake
        // would only poll its task once more for nothing). A slot just reused may still be
        // queued by its last stream's waker; one poll takes it either way.
        if !slot.wake.queued.swap(true, Ordering::SeqCst) {
            self.fresh.push(index);
        }
        index
    }

    /// Has the stream in slot `index` polled at the next [`StreamSet::poll_with`], as its
    /// own waker would, without waking the task (the caller polls the set next).
    pub fn wake(&mut self, index: usize) {
        if let Some(slot) = &self.slots[index] {
            if !slot.wake.queued.swap(true, Ordering::SeqCst) {
                self.fresh.push(index);
            }
        }
    }

    /// Streams pushed or woken by the caller since the last poll.
    pub fn has_fresh(&self) -> bool {
        !self.fresh.is_empty()
    }

    /// Polls the streams woken since the last call (each once) with `poll`, given each
    /// one's slot index, with `cx`'s waker registered for the next wake-up. Ready when no
    /// stream is left.
    pub fn poll_with(
        &mut self,
        cx: &mut Context<'_>,
        mut poll: impl FnMut(usize, Pin<&mut F>, &mut Context<'_>) -> Poll<()>,
    ) -> Poll<()> {
        self.ready.task.register(cx.waker());
        {
            let mut queue = self.ready.queue.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut *queue, &mut self.polling);
        }
        self.polling.append(&mut self.fresh);
        for n in 0..self.polling.len() {
            let index = self.polling[n];
            // A waker of a slot freed or reused since may still wake it: nothing to do, or
            // one poll more for the future there now.
            let Some(slot) = &mut self.slots[index] else {
                continue;
            };
            slot.wake.queued.swap(false, Ordering::SeqCst);
            let Some(fut) = slot.fut.as_mut().as_pin_mut() else {
                continue;
            };
            if poll(index, fut, &mut Context::from_waker(&slot.waker)).is_pending() {
                continue;
            }
            slot.fut.set(None);
            if self.kept.len() < KEPT {
                self.kept.push(index);
            } else {
                self.slots[index] = None;
                self.empty.push(index);
            }
        }
        self.polling.clear();
        if self.len() > 0 {
            return Poll::Pending;
        }
        // Idle: one slot stays for the next stream.
        while self.kept.len() > 1 {
            let i = self.kept.pop().expect("more than one");
            self.slots[i] = None;
            self.empty.push(i);
        }
        Poll::Ready(())
    }
}

#[cfg(test)]
impl<F: std::future::Future<Output = ()>> StreamSet<F> {
    /// [`StreamSet::poll_with`] for streams that are futures.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.poll_with(cx, |_, fut, cx| fut.poll(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A future that is pending until its flag is set, counting its polls.
    fn gated(
        open: Arc<AtomicBool>,
        polls: Arc<AtomicUsize>,
        done: Arc<AtomicUsize>,
        waker: Arc<Mutex<Option<Waker>>>,
    ) -> impl Future<Output = ()> {
        std::future::poll_fn(move |cx| {
            polls.fetch_add(1, Ordering::SeqCst);
            if open.load(Ordering::SeqCst) {
                done.fetch_add(1, Ordering::SeqCst);
                Poll::Ready(())
            } else {
                *waker.lock().unwrap() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }

    #[test]
    fn only_woken_streams_are_polled_and_slots_are_reused() {
        let task = Arc::new(Count(AtomicUsize::new(0)));
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);
        let mut set = StreamSet::new();
        let done = Arc::new(AtomicUsize::new(0));
        let mut gates = Vec::new();
        for _ in 0..3 {
            let g = (
                Arc::new(AtomicBool::new(false)),
                Arc::new(AtomicUsize::new(0)),
                Arc::new(Mutex::new(None::<Waker>)),
            );
            set.push(gated(g.0.clone(), g.1.clone(), done.clone(), g.2.clone()));
            gates.push(g);
        }
        assert_eq!(set.len(), 3);
        assert!(set.poll(&mut cx).is_pending());
        for g in &gates {
            assert_eq!(g.1.load(Ordering::SeqCst), 1, "each new stream polled once");
        }
        // Nothing woken: nothing polled.
        assert!(set.poll(&mut cx).is_pending());
        assert_eq!(gates[0].1.load(Ordering::SeqCst), 1);
        // The second is opened and woken (twice: polled once), from another thread.
        gates[1].0.store(true, Ordering::SeqCst);
        let w = gates[1].2.lock().unwrap().take().unwrap();
        let before = task.0.load(Ordering::SeqCst);
        std::thread::spawn(move || {
            w.wake_by_ref();
            w.wake();
        })
        .join()
        .unwrap();
        assert!(task.0.load(Ordering::SeqCst) > before, "the task is woken");
        assert!(set.poll(&mut cx).is_pending());
        assert_eq!(gates[1].1.load(Ordering::SeqCst), 2);
        assert_eq!(gates[0].1.load(Ordering::SeqCst), 1);
        assert_eq!(gates[2].1.load(Ordering::SeqCst), 1);
        assert_eq!(done.load(Ordering::SeqCst), 1);
        assert_eq!(set.len(), 2);
        // A new stream takes the free slot, not a new one.
        let g = (
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(Mutex::new(None::<Waker>)),
        );
        set.push(gated(g.0.clone(), g.1.clone(), done.clone(), g.2.clone()));
        assert_eq!(set.slots.len(), 3);
        assert!(set.poll(&mut cx).is_pending());
        assert_eq!(done.load(Ordering::SeqCst), 2);
        // A stale waker of the reused slot: a spurious wake, no harm.
        for g in [&gates[0], &gates[2]] {
            g.0.store(true, Ordering::SeqCst);
            g.2.lock().unwrap().take().unwrap().wake();
        }
        assert!(set.poll(&mut cx).is_ready(), "every stream ended");
        assert_eq!(done.load(Ordering::SeqCst), 4);
        assert_eq!(set.len(), 0);
    }

    /// A pending future whose gate opens it (with the waker it was last polled with).
    struct Gate {
        open: Arc<AtomicBool>,
        polls: Arc<AtomicUsize>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    fn gate(done: &Arc<AtomicUsize>) -> (Gate, impl Future<Output = ()>) {
        let g = Gate {
            open: Arc::new(AtomicBool::new(false)),
            polls: Arc::new(AtomicUsize::new(0)),
            waker: Arc::new(Mutex::new(None)),
        };
        let fut = gated(
            g.open.clone(),
            g.polls.clone(),
            done.clone(),
            g.waker.clone(),
        );
        (g, fut)
    }

    fn boxed(f: impl Future<Output = ()> + 'static) -> Pin<Box<dyn Future<Output = ()>>> {
        Box::pin(f)
    }

    fn context() -> (Arc<Count>, Waker) {
        let task = Arc::new(Count(AtomicUsize::new(0)));
        (task.clone(), Waker::from(task))
    }

    #[test]
    fn a_stream_woken_twice_is_polled_once_and_its_own_wake_waits_for_the_next_poll() {
        let (task, w) = context();
        let mut cx = Context::from_waker(&w);
        let mut set = StreamSet::new();
        let done = Arc::new(AtomicUsize::new(0));
        let (g, fut) = gate(&done);
        set.push(fut);
        assert!(set.poll(&mut cx).is_pending());
        assert_eq!(g.polls.load(Ordering::SeqCst), 1, "a new stream is polled");
        let woken = task.0.load(Ordering::SeqCst);
        let waker = g.waker.lock().unwrap().clone().unwrap();
        waker.wake_by_ref();
        waker.wake_by_ref();
        assert_eq!(
            task.0.load(Ordering::SeqCst),
            woken + 1,
            "one wake-up queued"
        );
        assert!(set.poll(&mut cx).is_pending());
        assert_eq!(
            g.polls.load(Ordering::SeqCst),
            2,
            "polled once for two wakes"
        );
        // A stream pushed while the task's waker is registered: the caller polls the set
        // next, so nobody is woken for it, and that poll polls it.
        let woken = task.0.load(Ordering::SeqCst);
        let (second, fut) = gate(&done);
        set.push(fut);
        assert_eq!(task.0.load(Ordering::SeqCst), woken, "a push wakes nobody");
        assert!(set.poll(&mut cx).is_pending());
        assert_eq!(
            second.polls.load(Ordering::SeqCst),
            1,
            "a new stream is polled"
        );
        assert_eq!(g.polls.load(Ordering::SeqCst), 2, "not the one not woken");
        // A stream that wakes itself while polled: once per poll, not in a loop.
        let mut selfish = StreamSet::new();
        let polls = Arc::new(AtomicUsize::new(0));
        let p = polls.clone();
        selfish.push(std::future::poll_fn(move |cx| {
            p.fetch_add(1, Ordering::SeqCst);
            cx.waker().wake_by_ref();
            Poll::<()>::Pending
        }));
        for n in 1..=3 {
            assert!(selfish.poll(&mut cx).is_pending());
            assert_eq!(polls.load(Ordering::SeqCst), n);
        }
    }

    #[test]
    fn a_burst_keeps_a_few_empty_slots_and_an_idle_set_one() {
        let (_, w) = context();
        let mut cx = Context::from_waker(&w);
        let mut set = StreamSet::new();
        let done = Arc::new(AtomicUsize::new(0));
        let (g, fut) = gate(&done);
        set.push(boxed(fut));
        for _ in 0..100 {
            set.push(boxed(std::future::ready(())));
        }
        assert!(set.poll(&mut cx).is_pending());
        let boxes = |set: &StreamSet<_>| set.slots.iter().filter(|s| s.is_some()).count();
        assert_eq!(
            boxes(&set),
            KEPT + 1,
            "the open stream's and KEPT empty ones"
        );
        assert_eq!(set.len(), 1);
        // The last stream ends: one slot stays.
        g.open.store(true, Ordering::SeqCst);
        g.waker.lock().unwrap().take().unwrap().wake();
        assert!(set.poll(&mut cx).is_ready());
        assert_eq!(boxes(&set), 1);
        assert_eq!(set.len(), 0);
        // The next burst reuses it and the freed indexes.
        for _ in 0..20 {
            set.push(boxed(std::future::ready(())));
        }
        assert_eq!(set.len(), 20);
        assert_eq!(set.slots.len(), 101, "no index beyond the ones there were");
        assert!(set.poll(&mut cx).is_ready());
        assert_eq!(boxes(&set), 1);
    }

    #[test]
    fn a_finished_streams_waker_does_not_reach_the_stream_in_its_slot_later() {
        let (_, w) = context();
        let mut cx = Context::from_waker(&w);
        let mut set = StreamSet::new();
        let done = Arc::new(AtomicUsize::new(0));
        let (first, fut) = gate(&done);
        set.push(fut);
        let (keep, fut) = gate(&done);
        set.push(fut);
        assert!(set.poll(&mut cx).is_pending());
        let stale = first.waker.lock().unwrap().clone().unwrap();
        first.open.store(true, Ordering::SeqCst);
        stale.wake_by_ref();
        assert!(set.poll(&mut cx).is_pending());
        // The next stream takes the first one's slot; the old waker wakes it once at most
        // (a spurious poll), and the set's own waker queues it as usual.
        let (next, fut) = gate(&done);
        set.push(fut);
        assert!(set.poll(&mut cx).is_pending());
        assert_eq!(next.polls.load(Ordering::SeqCst), 1);
        stale.wake_by_ref();
        assert!(set.poll(&mut cx).is_pending());
        assert!(next.polls.load(Ordering::SeqCst) <= 2);
        assert_eq!(
            keep.polls.load(Ordering::SeqCst),
            1,
            "the other stream untouched"
        );
        // A waker that outlives its set does nothing.
        drop(set);
        stale.wake_by_ref();
        next.waker.lock().unwrap().take().unwrap().wake();
    }
}
