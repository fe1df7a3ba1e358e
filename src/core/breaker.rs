//! Circuit breakers, one per subject group (the subject's first N tokens), shared by every
//! front-end so that one failing service costs the others nothing. CLOSED → OPEN after N
//! consecutive failures or a failure rate over a window; OPEN → HALF_OPEN after the cool-down;
//! HALF_OPEN lets exactly one trial request through, whose success closes the breaker and whose
//! failure opens it again. A trial that ends without an outcome (its admission dropped: the
//! request was cancelled, or failed for a reason that says nothing about the service) gives its
//! slot back, so the breaker can never stay HALF_OPEN for good.
//!
//! What counts against whom, so that one client cannot open a breaker healthy requests share:
//! - `TIMEOUT` counts against the group (a slow service is slow for all its subjects), but only
//!   when the request waited at least `min_timeout`: a client's own impatient `timeout_ms`
//!   says nothing about the service.
//! - `NO_RESPONDERS` counts against the exact subject only: nobody listening on
//!   `demo.echo.nope` says nothing about `demo.echo`. Such an entry opens and refuses only that
//!   subject; it is checked beside the group's.
//! - A success counts for both.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::time::Instant;

use crate::protocol::{ErrorCode, GatewayError};

/// The tracked entries (groups, and exact subjects after a `NO_RESPONDERS`) by name. Names
/// come from clients' subjects, so the hash is seeded at random per process; the table is
/// bounded by `MAX_GROUPS`.
#[derive(Default)]
struct Groups {
    by_name: HashMap<Arc<str>, Arc<Entry>, foldhash::fast::RandomState>,
    /// How many of them are exact subjects: while none is, a request looks up its group only.
    exact: usize,
}

/// One tracked entry. An admission holds it, so recording the outcome locks the entry alone,
/// without a second look-up by name (a request's admit and record took three look-ups and two
/// locks of the whole table: 7 % of a binary request's instructions, callgrind).
#[derive(Debug)]
struct Entry {
    /// The name it is stored under.
    key: Arc<str>,
    /// An exact subject's entry, not a group's.
    exact: bool,
    group: Mutex<Group>,
}

impl Entry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Group> {
        self.group.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Groups {
    /// Forgets the entries `keep` says no to (when the table is full).
    fn retain(&mut self, keep: impl Fn(&Group) -> bool) {
        self.by_name.retain(|_, entry| keep(&entry.lock()));
        self.exact = self.by_name.values().filter(|entry| entry.exact).count();
    }

    /// Makes room for one more entry when the table is full: forgets healthy groups (closed,
    /// no failure since their last success) first and, with `any_closed`, then any closed one.
    /// False when it is still full.
    fn make_room(&mut self, any_closed: bool) -> bool {
        if self.by_name.len() < MAX_GROUPS {
            return true;
        }
        self.retain(|g| g.state != State::Closed || g.consecutive_failures > 0);
        if any_closed && self.by_name.len() >= MAX_GROUPS {
            self.retain(|g| g.state != State::Closed);
        }
        self.by_name.len() < MAX_GROUPS
    }

    fn insert(&mut self, name: &str, exact: bool, now: Instant) -> Arc<Entry> {
        let key: Arc<str> = Arc::from(name);
        let entry = Arc::new(Entry {
            key: key.clone(),
            exact,
            group: Mutex::new(Group::new(now)),
        });
        if self.by_name.insert(key, entry.clone()).is_none() && exact {
            self.exact += 1;
        }
        entry
    }
}

/// Groups tracked at once; past it, closed groups with no recent failure are forgotten.
const MAX_GROUPS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Subject tokens that name a group (`svc.orders.create` → `svc.orders` with 2).
    pub group_tokens: usize,
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// How long an open breaker refuses before it lets a trial through.
    pub cooldown: Duration,
    /// Failure rate (0..1) over `window` that opens the breaker; 0 turns the rule off.
    pub failure_rate: f64,
    pub window: Duration,
    /// Requests a window needs before its failure rate counts.
    pub min_requests: u32,
    /// After a NATS connection comes up, how long `NO_RESPONDERS` does not count.
    pub reconnect_grace: Duration,
    /// A `TIMEOUT` counts only when the request waited at least this long.
    pub min_timeout: Duration,
}

/// What a finished request says about the service behind its subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// `TIMEOUT`: the service did not answer in time.
    Failure,
    /// `NO_RESPONDERS`: nobody listens. A failure, except just after a NATS connection came
    /// (back) up, when services are still reconnecting themselves.
    NoResponders,
    /// Anything else (a client's bad request, NATS down, overload): says nothing.
    Neutral,
}

impl Outcome {
    pub fn of(result: Result<(), ErrorCode>) -> Outcome {
        match result {
            Ok(()) => Outcome::Success,
            Err(ErrorCode::Timeout) => Outcome::Failure,
            Err(ErrorCode::NoResponders) => Outcome::NoResponders,
            Err(_) => Outcome::Neutral,
        }
    }

    /// A finished request's outcome: a `TIMEOUT` of a request that waited less than
    /// `min_timeout` is the client's impatience, not the service's failure.
    pub fn of_request(
        result: Result<(), ErrorCode>,
        waited: Duration,
        min_timeout: Duration,
    ) -> Outcome {
        match Outcome::of(result) {
            Outcome::Failure if waited < min_timeout => Outcome::Neutral,
            outcome => outcome,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[repr(u8)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    /// The state's name in metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
struct Group {
    state: State,
    /// OPEN: when a trial may go. HALF_OPEN: unused.
    open_until: Instant,
    /// HALF_OPEN: a trial request is out.
    trial_out: bool,
    consecutive_failures: u32,
    successes: u64,
    failures: u64,
    window_start: Instant,
    window_requests: u32,
    window_failures: u32,
    last_change: SystemTime,
}

impl Group {
    fn new(now: Instant) -> Group {
        Group {
            state: State::Closed,
            open_until: now,
            trial_out: false,
            consecutive_failures: 0,
            successes: 0,
            failures: 0,
            window_start: now,
            window_requests: 0,
            window_failures: 0,
            last_change: SystemTime::now(),
        }
    }

    fn change(&mut self, state: State) {
        self.state = state;
        self.last_change = SystemTime::now();
    }

    fn open(&mut self, now: Instant, cooldown: Duration) {
        self.open_until = now + cooldown;
        self.trial_out = false;
        self.change(State::Open);
    }
}

/// One group's state, for `/status` and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    pub group: String,
    pub state: State,
    pub consecutive_failures: u32,
    pub successes: u64,
    pub failures: u64,
    /// Milliseconds since the Unix epoch.
    pub last_change_ms: u64,
}

pub struct Breakers {
    config: BreakerConfig,
    groups: Mutex<Groups>,
    /// When a NATS connection of the pool last came up. Services reconnect on their own
    /// schedule, often a little after the gateway: `NO_RESPONDERS` within
    /// `config.reconnect_grace` of it is not held against them. Without this, the gateway
    /// reconnecting first after a NATS restart opened every busy service's breaker for a whole
    /// cool-down (measured in the soak).
    connected_at: Mutex<Option<Instant>>,
    /// Steps the retry hints' jitter (no need for a real random source: it only has to differ
    /// from one refusal to the next).
    jitter: std::sync::atomic::AtomicU64,
}

/// Up to this share of the wait is added to a retry hint, so that clients refused together do
/// not all come back together when the cool-down ends.
const RETRY_JITTER: f64 = 0.2;

/// `wait` plus 0 to `RETRY_JITTER` of it, picked from `seed` (splitmix64).
fn jittered(wait: Duration, seed: u64) -> Duration {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let share = (z >> 11) as f64 / (1u64 << 53) as f64;
    wait + wait.mul_f64(RETRY_JITTER * share)
}

/// Permission for one request to go through; report its outcome with `record`.
#[must_use]
pub struct Admission {
    breakers: Arc<Breakers>,
    /// `None` when the group is not tracked (the table of groups is full of open ones).
    group: Option<Arc<Entry>>,
    trial: bool,
    /// The exact subject's own entry (see the top of the file), when it has one.
    subject: Option<Arc<Entry>>,
    subject_trial: bool,
    recorded: bool,
}

impl Breakers {
    pub fn new(config: BreakerConfig) -> Arc<Breakers> {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |t| t.as_nanos() as u64);
        Arc::new(Breakers {
            config,
            groups: Mutex::new(Groups::default()),
            connected_at: Mutex::new(None),
            jitter: std::sync::atomic::AtomicU64::new(seed),
        })
    }

    /// A NATS connection of the pool came up (at start or after a loss).
    pub fn nats_connected(&self) {
        self.nats_connected_at(Instant::now());
    }

    pub fn nats_connected_at(&self, now: Instant) {
        *self.connected_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
    }

    fn in_reconnect_grace(&self, now: Instant) -> bool {
        self.connected_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| now.saturating_duration_since(at) < self.config.reconnect_grace)
    }

    fn groups(&self) -> std::sync::MutexGuard<'_, Groups> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The group a subject belongs to.
    pub fn group_of<'a>(&self, subject: &'a str) -> &'a str {
        // A byte loop, not `match_indices('.')`: its `memchr` costs more than a subject's
        // short tokens (this runs on every request).
        let mut dots = subject
            .bytes()
            .enumerate()
            .filter_map(|(at, byte)| (byte == b'.').then_some(at));
        match dots.nth(self.config.group_tokens.max(1) - 1) {
            Some(end) => &subject[..end],
            None => subject,
        }
    }

    /// Lets a request through, or refuses it with `CIRCUIT_OPEN` and a retry hint.
    pub fn admit(self: &Arc<Self>, subject: &str) -> Result<Admission, GatewayError> {
        self.admit_at(subject, Instant::now())
    }

    pub fn admit_at(
        self: &Arc<Self>,
        subject: &str,
        now: Instant,
    ) -> Result<Admission, GatewayError> {
        let name = self.group_of(subject);
        let mut groups = self.groups();
        // The exact subject's entry first (it exists only after a NO_RESPONDERS on it).
        let mut exact = None;
        if groups.exact > 0
            && name != subject
            && let Some(entry) = groups.by_name.get(subject)
        {
            let trial = self.try_pass(&entry.key, &mut entry.lock(), now)?;
            exact = Some((entry.clone(), trial));
        }
        let (subject_entry, subject_trial) = exact.map_or((None, false), |(e, t)| (Some(e), t));
        let mut admission = Admission {
            breakers: self.clone(),
            group: None,
            trial: false,
            subject: subject_entry,
            subject_trial,
            recorded: false,
        };
        // The common case, a group tracked already, takes one look-up.
        let entry = match groups.by_name.get(name) {
            Some(entry) => entry.clone(),
            None => {
                // If every group is open, the new one goes untracked (a breaker cannot open
                // for it, nothing grows).
                if !groups.make_room(true) {
                    return Ok(admission);
                }
                groups.insert(name, false, now)
            }
        };
        drop(groups);
        let passed = self.try_pass(&entry.key, &mut entry.lock(), now);
        match passed {
            Ok(trial) => {
                admission.group = Some(entry);
                admission.trial = trial;
                Ok(admission)
            }
            Err(refusal) => {
                // The subject's trial slot (if it took one) goes back with the admission.
                drop(admission);
                Err(refusal)
            }
        }
    }

    /// Whether an entry lets a request through now: `Ok(true)` for its one trial.
    fn try_pass(&self, key: &str, group: &mut Group, now: Instant) -> Result<bool, GatewayError> {
        match group.state {
            State::Closed => Ok(false),
            State::Open if now >= group.open_until => {
                group.change(State::HalfOpen);
                group.trial_out = true;
                Ok(true)
            }
            State::HalfOpen if !group.trial_out => {
                group.trial_out = true;
                Ok(true)
            }
            State::Open | State::HalfOpen => {
                let wait = if group.state == State::Open {
                    group.open_until - now
                } else {
                    self.config.cooldown
                };
                let mut error = GatewayError::new(
                    ErrorCode::CircuitOpen,
                    format!(
                        "the circuit for {key} is open after repeated failures; retry after the hint"
                    ),
                );
                let seed = self
                    .jitter
                    .fetch_add(0x9E37_79B9_7F4A_7C15, std::sync::atomic::Ordering::Relaxed);
                let hint = jittered(wait, seed);
                error.retry_after_ms = Some(hint.as_millis().clamp(1, u32::MAX as u128) as u32);
                Err(error)
            }
        }
    }

    /// Records an outcome for a subject that has no entry yet: its first `NO_RESPONDERS`
    /// makes one (see the top of the file).
    fn settle_untracked(&self, subject: &str, outcome: Outcome, now: Instant) {
        if self.counted(outcome, now) != Outcome::Failure {
            return;
        }
        let entry = {
            let mut groups = self.groups();
            match groups.by_name.get(subject) {
                Some(entry) => entry.clone(),
                None => {
                    if !groups.make_room(false) {
                        return;
                    }
                    groups.insert(subject, true, now)
                }
            }
        };
        self.settle(&entry, false, outcome, now);
    }

    /// `NO_RESPONDERS` is a failure, except within the grace after a NATS connection came up.
    fn counted(&self, outcome: Outcome, now: Instant) -> Outcome {
        match outcome {
            Outcome::NoResponders if self.in_reconnect_grace(now) => Outcome::Neutral,
            Outcome::NoResponders => Outcome::Failure,
            other => other,
        }
    }

    /// Records an outcome for one entry.
    fn settle(&self, entry: &Entry, trial: bool, outcome: Outcome, now: Instant) {
        let outcome = self.counted(outcome, now);
        let config = self.config;
        let mut group = entry.lock();
        match outcome {
            Outcome::Success => {
                group.successes += 1;
                group.consecutive_failures = 0;
            }
            // (`NoResponders` was turned into one of the others above.)
            Outcome::Failure | Outcome::NoResponders => {
                group.failures += 1;
                group.consecutive_failures += 1;
            }
            Outcome::Neutral => {}
        }
        if trial {
            match outcome {
                Outcome::Success => {
                    group.trial_out = false;
                    group.window_start = now;
                    group.window_requests = 0;
                    group.window_failures = 0;
                    group.change(State::Closed);
                }
                Outcome::Failure | Outcome::NoResponders => group.open(now, config.cooldown),
                // The slot goes back: the next request is the trial.
                Outcome::Neutral => group.trial_out = false,
            }
            return;
        }
        if group.state != State::Closed || outcome == Outcome::Neutral {
            return;
        }
        if now.duration_since(group.window_start) >= config.window {
            group.window_start = now;
            group.window_requests = 0;
            group.window_failures = 0;
        }
        group.window_requests += 1;
        if outcome == Outcome::Failure {
            group.window_failures += 1;
        }
        let by_count = group.consecutive_failures >= config.failures;
        let by_rate = config.failure_rate > 0.0
            && group.window_requests >= config.min_requests
            && f64::from(group.window_failures) / f64::from(group.window_requests)
                >= config.failure_rate;
        if by_count || by_rate {
            group.open(now, config.cooldown);
        }
    }

    /// Every tracked group, for `/status`. An open breaker whose cool-down is over shows as
    /// HALF_OPEN: the next request is its trial.
    pub fn status(&self) -> Vec<GroupStatus> {
        let now = Instant::now();
        let mut all: Vec<GroupStatus> = self
            .groups()
            .by_name
            .iter()
            .map(|(name, entry)| (name, entry.lock()))
            .map(|(name, group)| GroupStatus {
                group: name.to_string(),
                state: if group.state == State::Open && now >= group.open_until {
                    State::HalfOpen
                } else {
                    group.state
                },
                consecutive_failures: group.consecutive_failures,
                successes: group.successes,
                failures: group.failures,
                last_change_ms: group
                    .last_change
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            })
            .collect();
        all.sort_by(|a, b| a.group.cmp(&b.group));
        all
    }
}

impl Admission {
    /// The configured `min_timeout` (see `Outcome::of_request`).
    pub fn min_timeout(&self) -> Duration {
        self.breakers.config.min_timeout
    }

    /// Reports what a request to `subject` said about its service (see the top of the file
    /// for what counts against the group and what against the exact subject).
    pub fn record(self, outcome: Outcome, subject: &str) {
        self.record_for(outcome, subject, Instant::now())
    }

    /// `record` for a request whose subject is its group's name (tests, mostly).
    pub fn record_at(self, outcome: Outcome, now: Instant) {
        let group = self.group.as_ref().map(|entry| entry.key.clone());
        self.record_for(outcome, group.as_deref().unwrap_or(""), now)
    }

    pub fn record_for(mut self, outcome: Outcome, subject: &str, now: Instant) {
        self.recorded = true;
        let (for_group, for_subject) = match outcome {
            Outcome::Success => (Outcome::Success, Outcome::Success),
            Outcome::Failure => (Outcome::Failure, Outcome::Neutral),
            Outcome::NoResponders => (Outcome::Neutral, Outcome::NoResponders),
            Outcome::Neutral => (Outcome::Neutral, Outcome::Neutral),
        };
        let group = self.group.as_deref();
        // A subject that is its own group keeps one entry: NO_RESPONDERS counts there.
        if group.is_some_and(|entry| *entry.key == *subject)
            || (group.is_none() && self.subject.is_none())
        {
            if let Some(group) = group {
                self.breakers.settle(group, self.trial, outcome, now);
            }
            return;
        }
        if let Some(group) = group {
            self.breakers.settle(group, self.trial, for_group, now);
        }
        match &self.subject {
            Some(entry) => self
                .breakers
                .settle(entry, self.subject_trial, for_subject, now),
            None if for_subject == Outcome::NoResponders && !subject.is_empty() => {
                self.breakers.settle_untracked(subject, for_subject, now)
            }
            None => {}
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.recorded {
            return;
        }
        let now = Instant::now();
        if self.trial
            && let Some(group) = &self.group
        {
            self.breakers.settle(group, true, Outcome::Neutral, now);
        }
        if self.subject_trial
            && let Some(subject) = &self.subject
        {
            self.breakers.settle(subject, true, Outcome::Neutral, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breakers(failure_rate: f64) -> Arc<Breakers> {
        Breakers::new(BreakerConfig {
            group_tokens: 2,
            failures: 3,
            cooldown: Duration::from_secs(5),
            failure_rate,
            window: Duration::from_secs(10),
            min_requests: 4,
            reconnect_grace: Duration::from_secs(5),
            min_timeout: Duration::from_secs(1),
        })
    }

    fn state(b: &Breakers, group: &str) -> State {
        b.status()
            .into_iter()
            .find(|s| s.group == group)
            .unwrap()
            .state
    }

    fn fail(b: &Arc<Breakers>, subject: &str, now: Instant) {
        b.admit_at(subject, now)
            .unwrap()
            .record_at(Outcome::Failure, now);
    }

    #[test]
    fn groups_are_the_first_tokens_of_the_subject() {
        let b = breakers(0.0);
        assert_eq!(b.group_of("svc.orders.create"), "svc.orders");
        assert_eq!(b.group_of("svc.orders"), "svc.orders");
        assert_eq!(b.group_of("svc"), "svc");
    }

    #[test]
    fn consecutive_failures_open_it_and_other_groups_are_unaffected() {
        let b = breakers(0.0);
        let now = Instant::now();
        fail(&b, "svc.a.x", now);
        fail(&b, "svc.a.y", now);
        b.admit_at("svc.a.x", now)
            .unwrap()
            .record_at(Outcome::Success, now);
        fail(&b, "svc.a.x", now);
        fail(&b, "svc.a.x", now);
        assert_eq!(
            state(&b, "svc.a"),
            State::Closed,
            "a success resets the count"
        );
        fail(&b, "svc.a.x", now);
        assert_eq!(state(&b, "svc.a"), State::Open);
        let error = b
            .admit_at("svc.a.z", now + Duration::from_secs(1))
            .err()
            .unwrap();
        assert_eq!(error.code, ErrorCode::CircuitOpen);
        let hint = error.retry_after_ms.unwrap();
        assert!(
            (4000..=4800).contains(&hint),
            "the cool-down left plus jitter: {hint}"
        );
        assert!(b.admit_at("svc.b.x", now).is_ok());
    }

    #[test]
    fn neutral_outcomes_do_not_count() {
        let b = breakers(0.0);
        let now = Instant::now();
        for _ in 0..10 {
            b.admit_at("svc.a", now)
                .unwrap()
                .record_at(Outcome::Neutral, now);
        }
        assert_eq!(state(&b, "svc.a"), State::Closed);
        assert_eq!(Outcome::of(Err(ErrorCode::BadRequest)), Outcome::Neutral);
        assert_eq!(Outcome::of(Err(ErrorCode::Timeout)), Outcome::Failure);
        assert_eq!(
            Outcome::of(Err(ErrorCode::NoResponders)),
            Outcome::NoResponders
        );
        assert_eq!(Outcome::of(Ok(())), Outcome::Success);
    }

    #[test]
    fn after_the_cooldown_exactly_one_trial_goes_and_its_success_closes() {
        let b = breakers(0.0);
        let now = Instant::now();
        for _ in 0..3 {
            fail(&b, "svc.a", now);
        }
        let later = now + Duration::from_secs(5);
        let trial = b.admit_at("svc.a", later).unwrap();
        assert_eq!(state(&b, "svc.a"), State::HalfOpen);
        assert_eq!(
            b.admit_at("svc.a", later).err().unwrap().code,
            ErrorCode::CircuitOpen,
            "only one trial at a time"
        );
        trial.record_at(Outcome::Success, later);
        assert_eq!(state(&b, "svc.a"), State::Closed);
        assert!(b.admit_at("svc.a", later).is_ok());
    }

    #[test]
    fn a_failed_trial_opens_it_again_for_another_cooldown() {
        let b = breakers(0.0);
        let now = Instant::now();
        for _ in 0..3 {
            fail(&b, "svc.a", now);
        }
        let later = now + Duration::from_secs(6);
        b.admit_at("svc.a", later)
            .unwrap()
            .record_at(Outcome::Failure, later);
        assert_eq!(state(&b, "svc.a"), State::Open);
        let error = b
            .admit_at("svc.a", later + Duration::from_secs(1))
            .err()
            .unwrap();
        let hint = error.retry_after_ms.unwrap();
        assert!((4000..=4800).contains(&hint), "{hint}");
    }

    #[test]
    fn a_cancelled_trial_gives_its_slot_back() {
        let b = breakers(0.0);
        let now = Instant::now();
        for _ in 0..3 {
            fail(&b, "svc.a", now);
        }
        let later = now + Duration::from_secs(5);
        drop(b.admit_at("svc.a", later).unwrap());
        assert_eq!(state(&b, "svc.a"), State::HalfOpen);
        let next = b
            .admit_at("svc.a", later)
            .expect("the next request is the trial");
        next.record_at(Outcome::Success, later);
        assert_eq!(state(&b, "svc.a"), State::Closed);
    }

    #[test]
    fn a_neutral_trial_gives_its_slot_back_too() {
        let b = breakers(0.0);
        let now = Instant::now();
        for _ in 0..3 {
            fail(&b, "svc.a", now);
        }
        let later = now + Duration::from_secs(5);
        b.admit_at("svc.a", later)
            .unwrap()
            .record_at(Outcome::Neutral, later);
        assert!(b.admit_at("svc.a", later).is_ok());
    }

    #[test]
    fn a_failure_rate_over_the_window_opens_it() {
        let b = breakers(0.5);
        let now = Instant::now();
        for outcome in [Outcome::Failure, Outcome::Success, Outcome::Failure] {
            b.admit_at("svc.a", now).unwrap().record_at(outcome, now);
        }
        assert_eq!(
            state(&b, "svc.a"),
            State::Closed,
            "too few requests to judge"
        );
        b.admit_at("svc.a", now)
            .unwrap()
            .record_at(Outcome::Success, now);
        assert_eq!(state(&b, "svc.a"), State::Open, "2 failures in 4 is 50 %");
    }

    #[test]
    fn the_window_starts_over_when_it_ends() {
        let b = breakers(0.5);
        let now = Instant::now();
        for _ in 0..3 {
            b.admit_at("svc.a", now)
                .unwrap()
                .record_at(Outcome::Success, now);
        }
        b.admit_at("svc.a", now)
            .unwrap()
            .record_at(Outcome::Failure, now);
        let later = now + Duration::from_secs(11);
        b.admit_at("svc.a", later)
            .unwrap()
            .record_at(Outcome::Failure, later);
        assert_eq!(
            state(&b, "svc.a"),
            State::Closed,
            "one failure in a new window"
        );
    }

    #[test]
    fn retry_hints_are_spread_over_a_fifth_of_the_wait() {
        let wait = Duration::from_millis(1000);
        let hints: Vec<Duration> = (0..1000u64)
            .map(|n| jittered(wait, n.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            .collect();
        assert!(hints.iter().all(|h| *h >= wait && *h <= wait.mul_f64(1.2)));
        let low = hints.iter().filter(|h| **h < wait.mul_f64(1.1)).count();
        assert!(
            (350..=650).contains(&low),
            "about half below the middle: {low}"
        );
    }

    #[test]
    fn no_responders_just_after_a_nats_reconnect_do_not_count() {
        let b = breakers(0.0);
        let now = Instant::now();
        b.nats_connected_at(now);
        let soon = now + Duration::from_secs(1);
        for _ in 0..10 {
            b.admit_at("svc.a.x", soon)
                .unwrap()
                .record_at(Outcome::NoResponders, soon);
        }
        assert_eq!(
            state(&b, "svc.a"),
            State::Closed,
            "services are reconnecting"
        );
        // A timeout is still a failure, grace or not.
        for _ in 0..3 {
            b.admit_at("svc.t.x", soon)
                .unwrap()
                .record_at(Outcome::Failure, soon);
        }
        assert_eq!(state(&b, "svc.t"), State::Open);
        let later = now + Duration::from_secs(5) + Duration::from_millis(1);
        for _ in 0..3 {
            b.admit_at("svc.a.x", later)
                .unwrap()
                .record_at(Outcome::NoResponders, later);
        }
        assert_eq!(
            state(&b, "svc.a"),
            State::Open,
            "after the grace they count"
        );
    }

    fn nobody_listens(b: &Arc<Breakers>, subject: &str, times: usize, now: Instant) {
        for _ in 0..times {
            b.admit_at(subject, now)
                .unwrap()
                .record_for(Outcome::NoResponders, subject, now);
        }
    }

    #[test]
    fn no_responders_on_one_subject_open_only_that_subject() {
        let b = breakers(0.0);
        let now = Instant::now() + Duration::from_secs(60); // past the reconnect grace
        nobody_listens(&b, "demo.echo.nope", 3, now);
        assert_eq!(
            state(&b, "demo.echo"),
            State::Closed,
            "the group is healthy"
        );
        assert_eq!(state(&b, "demo.echo.nope"), State::Open);
        let refused = b.admit_at("demo.echo.nope", now).err().unwrap();
        assert_eq!(refused.code, ErrorCode::CircuitOpen);
        assert!(refused.message.contains("demo.echo.nope"), "{refused}");
        // The healthy subjects of the group still go through.
        for subject in ["demo.echo", "demo.echo.other"] {
            b.admit_at(subject, now)
                .unwrap()
                .record_for(Outcome::Success, subject, now);
        }
        // After the cool-down one trial goes to the subject; its success closes it.
        let later = now + Duration::from_secs(6);
        let trial = b.admit_at("demo.echo.nope", later).unwrap();
        assert_eq!(
            b.admit_at("demo.echo.nope", later).err().map(|e| e.code),
            Some(ErrorCode::CircuitOpen),
            "one trial at a time"
        );
        trial.record_for(Outcome::Success, "demo.echo.nope", later);
        assert_eq!(state(&b, "demo.echo.nope"), State::Closed);
    }

    #[test]
    fn a_full_table_forgets_healthy_groups_and_keeps_open_subjects() {
        let b = breakers(0.0);
        let now = Instant::now() + Duration::from_secs(60); // past the reconnect grace
        nobody_listens(&b, "demo.echo.nope", 3, now);
        // The table fills with healthy groups; each new one past the limit forgets them.
        for i in 0..MAX_GROUPS + 10 {
            let subject = format!("g{i}.x.y");
            b.admit_at(&subject, now)
                .unwrap()
                .record_for(Outcome::Success, &subject, now);
        }
        let tracked = b.status();
        assert!(tracked.len() <= MAX_GROUPS, "{} tracked", tracked.len());
        assert!(
            !tracked.iter().any(|g| g.group == "demo.echo"),
            "the healthy group was forgotten"
        );
        // The open subject was kept, and is still looked up although its group is gone.
        assert_eq!(state(&b, "demo.echo.nope"), State::Open);
        let refused = b.admit_at("demo.echo.nope", now).err().unwrap();
        assert_eq!(refused.code, ErrorCode::CircuitOpen);
        assert!(b.admit_at("demo.echo.other", now).is_ok());
    }

    #[test]
    fn timeouts_count_against_the_group_only_when_the_request_waited_long_enough() {
        let b = breakers(0.0);
        let now = Instant::now();
        let min = Duration::from_secs(1);
        for _ in 0..10 {
            let impatient =
                Outcome::of_request(Err(ErrorCode::Timeout), Duration::from_millis(5), min);
            assert_eq!(impatient, Outcome::Neutral);
            b.admit_at("svc.a.x", now)
                .unwrap()
                .record_for(impatient, "svc.a.x", now);
        }
        assert_eq!(state(&b, "svc.a"), State::Closed);
        for _ in 0..3 {
            let slow = Outcome::of_request(Err(ErrorCode::Timeout), min, min);
            b.admit_at("svc.a.x", now)
                .unwrap()
                .record_for(slow, "svc.a.x", now);
        }
        assert_eq!(
            state(&b, "svc.a"),
            State::Open,
            "a slow service opens its group"
        );
        assert!(b.admit_at("svc.a.other", now).is_err());
    }
}
