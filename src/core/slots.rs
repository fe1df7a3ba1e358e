//! The places under `max_connections`, shared by every front-end, and resizable by a reload: a
//! semaphore with one permit per place. Raising the limit adds permits; lowering it forgets
//! the free ones and owes the rest, paid as held places are given back (the next admission
//! forgets what was returned), so connections already served are never cut.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub struct ConnectionSlots {
    permits: Arc<Semaphore>,
    /// The limit in force (for messages).
    limit: AtomicUsize,
    /// Permits still to forget after a lowered limit; read without the lock on every
    /// admission (almost always 0).
    owed: AtomicUsize,
    /// Serializes resizing and paying what is owed.
    resize: Mutex<()>,
}

impl ConnectionSlots {
    pub fn new(limit: usize) -> ConnectionSlots {
        ConnectionSlots {
            permits: Arc::new(Semaphore::new(limit)),
            limit: AtomicUsize::new(limit),
            owed: AtomicUsize::new(0),
            resize: Mutex::new(()),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Relaxed)
    }

    /// A place, or `None` when all `limit` are taken.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        if self.owed.load(Relaxed) > 0 {
            let _guard = self.resize.lock().unwrap_or_else(PoisonError::into_inner);
            let owed = self.owed.load(Relaxed);
            let paid = self.permits.forget_permits(owed);
            self.owed.store(owed - paid, Relaxed);
        }
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Puts `limit` in force.
    pub fn set_limit(&self, limit: usize) {
        let _guard = self.resize.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.limit.swap(limit, Relaxed);
        let owed = self.owed.load(Relaxed);
        if limit > old {
            let raise = limit - old;
            let forgiven = raise.min(owed);
            self.owed.store(owed - forgiven, Relaxed);
            self.permits.add_permits(raise - forgiven);
        } else {
            let cut = old - limit;
            let forgotten = self.permits.forget_permits(cut);
            self.owed.store(owed + cut - forgotten, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(slots: &ConnectionSlots, n: usize) -> Vec<OwnedSemaphorePermit> {
        (0..n)
            .map(|_| slots.try_acquire().expect("a place"))
            .collect()
    }

    #[test]
    fn a_raised_limit_admits_more_at_once() {
        let slots = ConnectionSlots::new(2);
        let _held = take(&slots, 2);
        assert!(slots.try_acquire().is_none());
        slots.set_limit(3);
        let _third = take(&slots, 1);
        assert!(slots.try_acquire().is_none());
        assert_eq!(slots.limit(), 3);
    }

    #[test]
    fn a_lowered_limit_keeps_held_places_and_admits_again_only_below_it() {
        let slots = ConnectionSlots::new(4);
        let mut held = take(&slots, 3);
        slots.set_limit(1);
        assert!(slots.try_acquire().is_none(), "3 held, limit 1");
        held.pop();
        assert!(slots.try_acquire().is_none(), "2 held, limit 1");
        held.pop();
        assert!(slots.try_acquire().is_none(), "1 held, limit 1");
        held.pop();
        let one = slots.try_acquire().expect("0 held, limit 1");
        assert!(slots.try_acquire().is_none(), "1 held, limit 1");
        drop(one);
        let _one = take(&slots, 1);
    }

    #[test]
    fn raising_while_owed_forgives_the_debt_first() {
        let slots = ConnectionSlots::new(4);
        let held = take(&slots, 4);
        slots.set_limit(1); // owes 3
        slots.set_limit(3); // owes 1
        drop(held); // 4 back, 1 forgotten at the next admission: 3 places
        let _three = take(&slots, 3);
        assert!(slots.try_acquire().is_none());
    }
}
