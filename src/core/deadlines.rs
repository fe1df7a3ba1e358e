//! The deadlines of a reply router's waiting requests, for its timer to find the earliest.
//!
//! Most requests share a few timeouts (the configured ceiling, or what a client asks for), and
//! a request's deadline is its start plus its timeout, so one timeout's deadlines come in
//! order, or nearly. A queue per timeout holds them sorted at the cost of a push, where an
//! ordered set paid a tree walk on every add and every remove (about 3.5 % of a request's
//! instructions). A request answered in time is not looked for: its entry stays in its queue
//! until it reaches the front, where it is dropped because its token no longer waits. So that
//! answered entries cannot pile up behind a slow one, the queues are compacted once they hold
//! more than twice the waiting requests.
//!
//! What does not fit that shape goes to an ordered set, so nothing costs more than a tree walk:
//! an entry earlier than its queue's last (another task took its clock reading first, or a
//! retried request keeps its old deadline), and timeouts beyond the first `MAX_QUEUES` in use.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

/// Distinct timeouts with a queue of their own; requests with others go to the ordered set.
const MAX_QUEUES: usize = 8;

#[derive(Default)]
pub struct Deadlines {
    queues: Vec<(Duration, VecDeque<(Instant, u64)>)>,
    others: BTreeSet<(Instant, u64)>,
    /// Entries in the queues, answered ones included.
    queued: usize,
}

impl Deadlines {
    /// Adds request `token`'s deadline. `waiting` is how many requests wait, this one included
    /// (the bound for compaction); `is_waiting` tells whether a token still waits.
    pub fn add(
        &mut self,
        timeout: Duration,
        deadline: Instant,
        token: u64,
        waiting: usize,
        is_waiting: impl Fn(u64) -> bool,
    ) {
        if self.queued > 2 * waiting + 64 {
            self.compact(&is_waiting);
        }
        let queue = match self.queues.iter().position(|(t, _)| *t == timeout) {
            Some(index) => Some(&mut self.queues[index].1),
            None if self.queues.len() < MAX_QUEUES => {
                self.queues.push((timeout, VecDeque::new()));
                self.queues.last_mut().map(|(_, queue)| queue)
            }
            None => None,
        };
        match queue {
            Some(queue) if queue.back().is_none_or(|&(last, _)| last <= deadline) => {
                queue.push_back((deadline, token));
                self.queued += 1;
            }
            _ => {
                self.others.insert((deadline, token));
            }
        }
    }

    /// Request `token` no longer waits. Queued entries are left for `earliest` to drop.
    pub fn remove(&mut self, deadline: Instant, token: u64) {
        if !self.others.is_empty() {
            self.others.remove(&(deadline, token));
        }
    }

    /// The earliest deadline of a request that still waits, and its token. Entries of
    /// requests that no longer wait are dropped on the way.
    pub fn earliest(&mut self, is_waiting: impl Fn(u64) -> bool) -> Option<(Instant, u64)> {
        let mut best: Option<(Instant, u64)> = self.others.first().copied();
        let mut index = 0;
        while index < self.queues.len() {
            let queue = &mut self.queues[index].1;
            while let Some(&(_, token)) = queue.front()
                && !is_waiting(token)
            {
                queue.pop_front();
                self.queued -= 1;
            }
            match queue.front() {
                None => {
                    // An empty queue gives its place to another timeout.
                    self.queues.swap_remove(index);
                    continue;
                }
                Some(&front) if best.is_none_or(|b| front < b) => best = Some(front),
                Some(_) => {}
            }
            index += 1;
        }
        best
    }

    /// Removes the entry `earliest` returned.
    pub fn pop(&mut self, entry: (Instant, u64)) {
        if self.others.first() == Some(&entry) {
            self.others.pop_first();
            return;
        }
        for (_, queue) in &mut self.queues {
            if queue.front() == Some(&entry) {
                queue.pop_front();
                self.queued -= 1;
                return;
            }
        }
    }

    pub fn clear(&mut self) {
        self.queues.clear();
        self.others.clear();
        self.queued = 0;
    }

    fn compact(&mut self, is_waiting: &impl Fn(u64) -> bool) {
        for (_, queue) in &mut self.queues {
            queue.retain(|&(_, token)| is_waiting(token));
            queue.shrink_to(queue.len() * 2);
        }
        self.queues.retain(|(_, queue)| !queue.is_empty());
        self.queued = self.queues.iter().map(|(_, queue)| queue.len()).sum();
    }

    /// Entries held (answered ones included), for tests.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.queued + self.others.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// A model of the router: the waiting tokens and their deadlines.
    struct Router {
        deadlines: Deadlines,
        waiting: HashSet<u64>,
    }

    impl Router {
        fn new() -> Router {
            Router {
                deadlines: Deadlines::default(),
                waiting: HashSet::new(),
            }
        }

        fn add(&mut self, timeout: Duration, deadline: Instant, token: u64) {
            self.waiting.insert(token);
            let waiting = &self.waiting;
            self.deadlines
                .add(timeout, deadline, token, waiting.len(), |t| {
                    waiting.contains(&t)
                });
        }

        fn answer(&mut self, deadline: Instant, token: u64) {
            self.waiting.remove(&token);
            self.deadlines.remove(deadline, token);
        }

        /// Expires everything due at `now`, in order.
        fn expire(&mut self, now: Instant) -> Vec<u64> {
            let mut expired = Vec::new();
            loop {
                let waiting = &self.waiting;
                let Some(entry) = self.deadlines.earliest(|t| waiting.contains(&t)) else {
                    return expired;
                };
                if entry.0 > now {
                    return expired;
                }
                self.deadlines.pop(entry);
                self.waiting.remove(&entry.1);
                expired.push(entry.1);
            }
        }
    }

    #[test]
    fn deadlines_expire_in_order_across_timeouts_and_out_of_order_adds() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut router = Router::new();
        // Two timeouts, interleaved; token 4 is added after a later deadline of its timeout.
        router.add(ms(100), start + ms(100), 1);
        router.add(ms(30), start + ms(30), 2);
        router.add(ms(100), start + ms(110), 3);
        router.add(ms(100), start + ms(105), 4);
        router.add(ms(30), start + ms(35), 5);
        assert_eq!(router.expire(start + ms(29)), Vec::<u64>::new());
        assert_eq!(router.expire(start + ms(104)), [2, 5, 1]);
        assert_eq!(router.expire(start + ms(200)), [4, 3]);
        assert_eq!(router.deadlines.held(), 0);
    }

    #[test]
    fn answered_requests_never_expire_and_do_not_pile_up() {
        let start = Instant::now();
        let timeout = Duration::from_secs(5);
        let mut router = Router::new();
        // One request that is never answered, then 10,000 answered at once behind it.
        router.add(timeout, start + timeout, 0);
        for token in 1..=10_000u64 {
            let deadline = start + timeout + Duration::from_micros(token);
            router.add(timeout, deadline, token);
            router.answer(deadline, token);
        }
        // Compaction keeps at most twice the waiting requests (counted at the last add, which
        // included the one added) plus 64, and that add's own entry.
        assert!(
            router.deadlines.held() <= 2 * (router.waiting.len() + 1) + 64 + 1,
            "{} entries held for {} waiting",
            router.deadlines.held(),
            router.waiting.len()
        );
        assert_eq!(router.expire(start + timeout * 2), [0]);
    }

    #[test]
    fn many_distinct_timeouts_still_expire_in_order() {
        let start = Instant::now();
        let mut router = Router::new();
        let mut expected = Vec::new();
        // 50 timeouts (past the queues' number), each added twice, the second answered.
        for n in 0..50u64 {
            let timeout = Duration::from_millis(1000 - n * 7);
            router.add(timeout, start + timeout, n);
            router.add(
                timeout,
                start + timeout + Duration::from_millis(1),
                1000 + n,
            );
            router.answer(start + timeout + Duration::from_millis(1), 1000 + n);
            expected.push((start + timeout, n));
        }
        expected.sort();
        let order: Vec<u64> = expected.iter().map(|&(_, token)| token).collect();
        assert_eq!(router.expire(start + Duration::from_secs(2)), order);
        assert_eq!(router.deadlines.held(), 0);
    }

    #[test]
    fn an_answered_entry_in_the_ordered_set_is_removed_at_once() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut router = Router::new();
        router.add(ms(100), start + ms(100), 1);
        // Earlier than its queue's last: it goes to the ordered set.
        router.add(ms(100), start + ms(90), 2);
        assert_eq!(router.deadlines.others.len(), 1);
        router.answer(start + ms(90), 2);
        assert!(router.deadlines.others.is_empty());
        assert_eq!(router.expire(start + ms(100)), [1]);
    }
}
