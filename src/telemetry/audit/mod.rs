//! The audit log: one JSON line per connection, operation, refusal and policy reload, written
//! by one writer thread fed by a bounded queue, so that the request path never waits for the
//! disk (docs/audit.md has the format and the operator's side).
//!
//! The queue holds `queue` slots. A record takes a slot when it enters the queue and gives it
//! back once the writer has formatted it. When no slot is free:
//! - `Overflow::Drop`: the record is lost and counted, exactly: in
//!   `ipc_gateway_audit_records_lost_total` and in an `audit_lost` record with that count,
//!   written as soon as the writer has room again.
//! - `Overflow::Block`: `reserve()`, taken where an operation is admitted, waits for a slot and
//!   holds it until the operation's record is written, so no record is lost and a slow disk
//!   slows the clients. `record()` (for events nobody can wait for, like a closed connection)
//!   never waits: without a free slot its record goes in over the bound.
//!
//! The writer thread formats records (the caller's thread never does), writes them in batches,
//! flushes whenever it has caught up with the queue, rotates the file by size, reopens it on
//! request, survives write errors by retrying (the queue then fills, and its overflow policy
//! applies), and at `shutdown()` writes everything queued before the call, fsyncs and closes.

mod file;
mod record;
mod writer;

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, oneshot};

pub use record::{AuditConn, AuditIdentity, AuditOp, Record, format_rfc3339_micros};

use crate::telemetry::metrics::Metrics;
use file::{LogFile, Output};

/// What happens to a record when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// Availability first: the record is lost, counted, and reported in an `audit_lost` record.
    #[default]
    Drop,
    /// Completeness first: operations wait at admission for room in the queue.
    Block,
}

impl Overflow {
    pub const fn as_str(self) -> &'static str {
        match self {
            Overflow::Drop => "drop",
            Overflow::Block => "block",
        }
    }
}

impl FromStr for Overflow {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "drop" => Ok(Overflow::Drop),
            "block" => Ok(Overflow::Block),
            other => Err(format!(
                "{other:?} is not an overflow policy: drop or block"
            )),
        }
    }
}

impl fmt::Display for Overflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The audit log's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The gateway id every record carries (`"gateway"`), so that the logs of several
    /// gateways can be merged; `None` leaves it out.
    pub gateway: Option<Arc<str>>,
    /// The file to append to; `-` is standard output; `None` turns the audit log off.
    pub path: Option<PathBuf>,
    pub overflow: Overflow,
    /// Records the queue holds (with `Block`: also reservations not yet written); at least 1.
    pub queue: usize,
    /// Rotate before the file would pass this size; 0 = never.
    pub max_bytes: u64,
    /// Rotated files kept (`.1` newest … `.keep` oldest); 0 = none (the file starts over).
    pub keep: usize,
}

impl AuditConfig {
    pub const DEFAULT_QUEUE: usize = 65_536;
    pub const DEFAULT_MAX_BYTES: u64 = 100 << 20;
    pub const DEFAULT_KEEP: usize = 5;
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            gateway: None,
            path: None,
            overflow: Overflow::Drop,
            queue: AuditConfig::DEFAULT_QUEUE,
            max_bytes: AuditConfig::DEFAULT_MAX_BYTES,
            keep: AuditConfig::DEFAULT_KEEP,
        }
    }
}

/// The audit log's handle: cheap to clone (one `Arc`), shared by everything that makes
/// records. `Audit::off()` (also `Default`) does nothing and costs nothing.
#[derive(Clone, Default)]
pub struct Audit {
    handle: Option<Arc<Handle>>,
}

impl fmt::Debug for Audit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.handle {
            None => f.write_str("Audit(off)"),
            Some(handle) => write!(f, "Audit({})", handle.overflow),
        }
    }
}

impl Audit {
    /// An audit log that records nothing.
    pub fn off() -> Audit {
        Audit { handle: None }
    }

    /// Opens the file (so that a bad path fails start-up with a clear error) and starts the
    /// writer thread. `path: None` gives `Audit::off()`; `-` writes to standard output.
    pub fn start(config: AuditConfig, metrics: Arc<Metrics>) -> Result<Audit, String> {
        let Some(path) = &config.path else {
            return Ok(Audit::off());
        };
        let output = if path == Path::new("-") {
            Output::Stream(Box::new(io::stdout()))
        } else {
            let file = LogFile::open(path, config.max_bytes, config.keep)
                .map_err(|err| format!("audit file {}: {err}", path.display()))?;
            Output::File(file)
        };
        Audit::spawn(&config, metrics, output)
    }

    /// Like `start`, writing to `writer` instead of `config.path` (no rotation, no reopen).
    pub fn start_with_writer(
        config: AuditConfig,
        metrics: Arc<Metrics>,
        writer: Box<dyn Write + Send>,
    ) -> Result<Audit, String> {
        Audit::spawn(&config, metrics, Output::Stream(writer))
    }

    fn spawn(config: &AuditConfig, metrics: Arc<Metrics>, output: Output) -> Result<Audit, String> {
        if config.queue == 0 || config.queue > Semaphore::MAX_PERMITS {
            return Err(format!(
                "audit queue: must be between 1 and {}",
                Semaphore::MAX_PERMITS
            ));
        }
        let queue = Arc::new(Queue {
            inner: Mutex::new(Inner::default()),
            wake: Condvar::new(),
            slots: Semaphore::new(config.queue),
            capacity: config.queue,
        });
        let writer = writer::Writer::new(
            queue.clone(),
            metrics.clone(),
            output,
            config.gateway.clone(),
        );
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run())
            .map_err(|err| format!("audit: cannot start the writer thread: {err}"))?;
        Ok(Audit {
            handle: Some(Arc::new(Handle {
                queue,
                overflow: config.overflow,
                metrics,
                warned_closed: AtomicBool::new(false),
            })),
        })
    }

    pub fn is_on(&self) -> bool {
        self.handle.is_some()
    }

    /// The slots in use now: records queued for the writer, and slots reserved (block mode)
    /// by operations still running. The `ipc_gateway_audit_queue` gauge is this as of the
    /// writer's last batch; `/status` reads it live, so a stalled writer shows.
    pub fn queued(&self) -> u64 {
        self.handle.as_ref().map_or(0, |handle| {
            let queue = &handle.queue;
            queue
                .capacity
                .saturating_sub(queue.slots.available_permits()) as u64
        })
    }

    /// `reserve` if it is ready at once; `None` when it would wait (block mode, queue full).
    pub fn try_reserve(&self) -> Option<Reservation> {
        let Some(handle) = &self.handle else {
            return Some(Reservation::off());
        };
        let slot = match handle.overflow {
            Overflow::Drop => false,
            Overflow::Block => match handle.queue.slots.try_acquire() {
                Ok(permit) => {
                    permit.forget();
                    true
                }
                Err(tokio::sync::TryAcquireError::NoPermits) => return None,
                // Closed only by shutdown: the reservation then holds nothing.
                Err(tokio::sync::TryAcquireError::Closed) => false,
            },
        };
        Some(Reservation {
            handle: Some(handle.clone()),
            slot,
        })
    }

    /// Room for one record, taken when an operation is admitted; the operation's record goes
    /// in with `Reservation::write` when it is done. With `Overflow::Block` this waits for a
    /// free slot and holds it (so the write cannot fail); with `Overflow::Drop` or off it is
    /// ready at once and holds nothing (the write takes a slot if one is free, else the
    /// record is lost and counted). After `shutdown` it is ready at once, and its record lost.
    ///
    /// In block mode a slot is only freed when a reservation's record is written (or the
    /// reservation dropped). So a task that drives operations holding reservations must keep
    /// driving them while it waits here (await it as one branch of the loop that also
    /// completes operations, or in the reading half only): if it stops completing them to
    /// wait for a slot, and they hold the last slots, nothing ever frees one.
    pub async fn reserve(&self) -> Reservation {
        if let Some(ready) = self.try_reserve() {
            return ready;
        }
        // Only block mode waits: for a free slot, or until shutdown closes the queue (the
        // reservation then holds nothing).
        let Some(handle) = &self.handle else {
            return Reservation::off();
        };
        let slot = match handle.queue.slots.acquire().await {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
        };
        Reservation {
            handle: Some(handle.clone()),
            slot,
        }
    }

    /// Queues `record` without ever waiting, for events nobody can wait for (a connection
    /// closed, a policy reload). If the queue is full: with `Overflow::Drop` the record is
    /// lost and counted; with `Overflow::Block` it goes in over the bound (so use it for
    /// events bounded by something else, like one per connection).
    pub fn record(&self, record: Record) {
        if let Some(handle) = &self.handle {
            handle.offer(record);
        }
    }

    /// Resolves when everything queued before the call has been written to the file (handed
    /// to the operating system, not fsynced). An error says why it could not be written yet
    /// (the writer keeps retrying).
    pub async fn flush(&self) -> Result<(), String> {
        self.command(Command::Flush).await
    }

    /// Opens the file again by its path, creating it (SIGHUP, after logrotate moved it away):
    /// records the writer has not yet written go to the new file. If the path cannot be
    /// opened, the old file stays in use and the error is returned (and logged).
    pub async fn reopen(&self) -> Result<(), String> {
        self.command(Command::Reopen).await
    }

    /// Writes everything queued before the call, fsyncs and closes the file, and stops the
    /// writer. Records offered afterwards are lost (counted, and logged once). Call it at the
    /// very end of the drain, once every operation has been answered. Calling it again returns
    /// the first call's result.
    pub async fn shutdown(&self) -> Result<(), String> {
        let result = self.command(Command::Shutdown).await;
        if let Some(handle) = &self.handle {
            // Wakes block-mode reservations still waiting (they then hold nothing).
            handle.queue.slots.close();
        }
        result
    }

    async fn command(&self, command: Command) -> Result<(), String> {
        let Some(handle) = &self.handle else {
            return Ok(());
        };
        let (tx, rx) = oneshot::channel();
        {
            let mut inner = handle.queue.lock();
            if let Some(result) = &inner.finished {
                return result.clone();
            }
            match command {
                Command::Flush => inner.flush.push(tx),
                Command::Reopen => inner.reopen.push(tx),
                Command::Shutdown => {
                    inner.closed = true;
                    inner.shutdown.push(tx);
                }
            }
        }
        handle.queue.wake.notify_one();
        rx.await
            .unwrap_or_else(|_| Err("audit writer stopped".to_string()))
    }
}

enum Command {
    Flush,
    Reopen,
    Shutdown,
}

/// Room for one record (see `Audit::reserve`). Dropping it unused gives the room back.
#[must_use = "a reservation holds room for a record: write it"]
pub struct Reservation {
    handle: Option<Arc<Handle>>,
    /// Whether this reservation holds a queue slot (block mode).
    slot: bool,
}

impl Reservation {
    /// A reservation that records nothing.
    pub fn off() -> Reservation {
        Reservation {
            handle: None,
            slot: false,
        }
    }

    /// Queues the record; never waits. With a slot held it always goes in (until shutdown);
    /// without one it is `Audit::record`.
    pub fn write(mut self, record: Record) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        if std::mem::take(&mut self.slot) {
            handle.push(record, true);
        } else {
            handle.offer(record);
        }
    }

    /// Whether this reservation holds room in the queue (only in block mode).
    pub fn holds_slot(&self) -> bool {
        self.slot
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let (Some(handle), true) = (&self.handle, self.slot) {
            handle.queue.slots.add_permits(1);
        }
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("on", &self.handle.is_some())
            .field("slot", &self.slot)
            .finish()
    }
}

/// What the callers' side holds; when the last handle (and reservation) goes, the writer
/// writes what is queued and stops, as at shutdown but with nobody waiting.
struct Handle {
    queue: Arc<Queue>,
    overflow: Overflow,
    metrics: Arc<Metrics>,
    /// Whether "record after shutdown" was logged already.
    warned_closed: AtomicBool,
}

impl Handle {
    /// A record without a reserved slot: takes a free one, else follows the overflow policy.
    fn offer(&self, record: Record) {
        match self.queue.slots.try_acquire() {
            Ok(permit) => {
                permit.forget();
                self.push(record, true);
            }
            Err(_) if self.overflow == Overflow::Block => self.push(record, false),
            Err(_) => self.lose(),
        }
    }

    /// Queues a record; `slot`: it holds a queue slot (the writer gives it back).
    fn push(&self, record: Record, slot: bool) {
        let mut inner = self.queue.lock();
        if inner.closed {
            drop(inner);
            self.lost_after_shutdown(slot);
            return;
        }
        inner.records.push(record);
        if !slot {
            inner.over_bound += 1;
        }
        let wake = std::mem::take(&mut inner.writer_waiting);
        drop(inner);
        if wake {
            self.queue.wake.notify_one();
        }
    }

    /// A record found the queue full (drop mode).
    fn lose(&self) {
        let mut inner = self.queue.lock();
        if inner.closed {
            drop(inner);
            self.lost_after_shutdown(false);
            return;
        }
        // Counted under the lock that the writer takes the count under: every loss before
        // shutdown is in an audit_lost record.
        inner.lost += 1;
        drop(inner);
        self.metrics.audit_lost.increment(1);
    }

    fn lost_after_shutdown(&self, slot: bool) {
        if slot {
            self.queue.slots.add_permits(1);
        }
        self.metrics.audit_lost.increment(1);
        if !self.warned_closed.swap(true, Ordering::Relaxed) {
            tracing::warn!("audit: a record came after the audit log was shut down and is lost");
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.slots.close();
        self.queue.wake.notify_one();
    }
}

/// The queue between the callers and the writer thread.
struct Queue {
    inner: Mutex<Inner>,
    /// The writer waits on it for records (when `writer_waiting`) and commands.
    wake: Condvar,
    /// One permit per free place; taken by a record entering (or a block-mode reservation),
    /// given back by the writer once the record is formatted.
    slots: Semaphore,
    capacity: usize,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct Inner {
    records: Vec<Record>,
    /// Records in `records` that hold no slot (block mode `record()` with the queue full).
    over_bound: usize,
    /// Records lost since the writer last took the count.
    lost: u64,
    /// The writer sleeps until records come (producers notify it only then).
    writer_waiting: bool,
    flush: Waiters,
    reopen: Waiters,
    shutdown: Waiters,
    /// No more records are taken in (shutdown was called, or every handle is gone).
    closed: bool,
    /// The writer has stopped, with this result.
    finished: Option<Result<(), String>>,
}

/// Callers waiting for a command's result.
type Waiters = Vec<oneshot::Sender<Result<(), String>>>;

#[cfg(test)]
mod tests;
