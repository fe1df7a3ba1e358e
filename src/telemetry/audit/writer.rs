//! The writer thread: takes everything queued at once, formats it into one buffer, writes the
//! buffer (in 64 KiB chunks during a large batch, and whenever it has caught up, so `tail -f`
//! sees records promptly), rotates, reopens, and finishes at shutdown.
//!
//! A failed write keeps the unwritten bytes and is retried (100 ms, doubling to 1 s). Until it
//! succeeds the writer takes no more records, so the queue fills and its overflow policy
//! decides: lost and counted (drop), or clients wait (block). Nothing the writer has taken is
//! lost, except at shutdown if the file still cannot be written.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::file::Output;
use super::record::Record;
use super::{Inner, Queue, Waiters};
use crate::telemetry::metrics::Metrics;

/// Write the buffer once it holds this much, even in the middle of a batch.
const CHUNK: usize = 64 * 1024;
/// Slots are given back to the queue every this many formatted records.
const RELEASE_EVERY: usize = 256;
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);

pub(super) struct Writer {
    /// The gateway id every line carries.
    gateway: Option<Arc<str>>,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    out: Output,
    /// Formatted lines not yet written, from `start` on.
    buf: Vec<u8>,
    start: usize,
    /// Each line in `buf` not yet wholly written: its end offset, and whether it is a caller's
    /// record (counted in the metrics) rather than an `audit_lost` notice.
    lines: VecDeque<(usize, bool)>,
    /// Set while writing fails.
    failure: Option<Failure>,
    /// Whether a failed rotation was logged (once per run of failures).
    rotation_warned: bool,
    /// The batch being formatted; kept between batches for its capacity.
    batch: Vec<Record>,
    /// Set once the writer has finished (so that `Drop` knows it ended normally).
    finished: bool,
}

struct Failure {
    since: Instant,
    attempts: u64,
    delay: Duration,
    retry_at: Instant,
    error: String,
}

impl Writer {
    pub(super) fn new(
        queue: Arc<Queue>,
        metrics: Arc<Metrics>,
        out: Output,
        gateway: Option<Arc<str>>,
    ) -> Writer {
        Writer {
            gateway,
            queue,
            metrics,
            out,
            buf: Vec::with_capacity(CHUNK + 4096),
            start: 0,
            lines: VecDeque::new(),
            failure: None,
            rotation_warned: false,
            batch: Vec::new(),
            finished: false,
        }
    }

    pub(super) fn run(mut self) {
        loop {
            let (reopen, flush, closing) = self.wait();
            if !reopen.is_empty() {
                let result = self.reopen();
                for tx in reopen {
                    let _ = tx.send(result.clone());
                }
            }
            if self.failure.is_some() {
                self.write_pending();
            }
            if self.failure.is_none() || closing {
                self.take_batch();
                self.write_pending();
            }
            let status = self.status();
            for tx in flush {
                let _ = tx.send(status.clone());
            }
            if closing {
                let result = self.finish();
                self.finished = true;
                settle(&mut self.queue.lock(), result);
                return;
            }
        }
    }

    /// Sleeps until there is work: records (unless writing is failing), a command, or the
    /// time to retry a failed write. Returns the reopen and flush requests and whether to
    /// close.
    fn wait(&mut self) -> (Waiters, Waiters, bool) {
        let mut inner = self.queue.lock();
        loop {
            if inner.closed || !inner.flush.is_empty() || !inner.reopen.is_empty() {
                break;
            }
            match &self.failure {
                None if !inner.records.is_empty() => break,
                None => {
                    inner.writer_waiting = true;
                    inner = self
                        .queue
                        .wake
                        .wait(inner)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                Some(failure) => {
                    let now = Instant::now();
                    if now >= failure.retry_at {
                        break;
                    }
                    inner.writer_waiting = false;
                    inner = self
                        .queue
                        .wake
                        .wait_timeout(inner, failure.retry_at - now)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
            }
        }
        inner.writer_waiting = false;
        (
            std::mem::take(&mut inner.reopen),
            std::mem::take(&mut inner.flush),
            inner.closed,
        )
    }

    /// Takes every queued record and the count of lost ones, formats them, and gives their
    /// slots back.
    fn take_batch(&mut self) {
        let mut batch = std::mem::take(&mut self.batch);
        let (over_bound, lost) = {
            let mut inner = self.queue.lock();
            std::mem::swap(&mut inner.records, &mut batch);
            (
                std::mem::take(&mut inner.over_bound),
                std::mem::take(&mut inner.lost),
            )
        };
        let taken = batch.len();
        let mut to_release = taken - over_bound;
        for (n, record) in batch.drain(..).enumerate() {
            self.push_line(&record, true);
            drop(record);
            if n % RELEASE_EVERY == RELEASE_EVERY - 1 && to_release > 0 {
                let release = to_release.min(RELEASE_EVERY);
                self.queue.slots.add_permits(release);
                to_release -= release;
            }
        }
        self.queue.slots.add_permits(to_release);
        if lost > 0 {
            self.push_line(&Record::audit_lost(lost), false);
        }
        if taken < 1024 && batch.capacity() > 4096 {
            batch.shrink_to(1024);
        }
        self.batch = batch;
        let in_use = self
            .queue
            .capacity
            .saturating_sub(self.queue.slots.available_permits());
        self.metrics.audit_queue.set(in_use as f64);
    }

    /// Formats one record into the buffer; rotates first if the line would take the file past
    /// its size, and writes the buffer when it is large.
    fn push_line(&mut self, record: &Record, counts: bool) {
        let line_start = self.buf.len();
        if let Err(err) =
            serde_json::to_writer(&mut self.buf, &record.line(self.gateway.as_deref()))
        {
            self.buf.truncate(line_start);
            if counts {
                self.metrics.audit_lost.increment(1);
            }
            tracing::error!("audit: a record could not be formatted and is lost: {err}");
            return;
        }
        self.buf.push(b'\n');
        self.lines.push_back((self.buf.len(), counts));
        if self.failure.is_some() {
            return;
        }
        let before = (line_start - self.start) as u64;
        let after = (self.buf.len() - self.start) as u64;
        if self.out.rotation_due(before, after) && self.write_until(line_start) {
            self.rotate();
        }
        if self.failure.is_none() && self.buf.len() - self.start >= CHUNK {
            self.write_until(self.buf.len());
        }
    }

    /// Writes `buf[start..end]`; false (and the failure noted) if it could not.
    fn write_until(&mut self, end: usize) -> bool {
        let mut result = Ok(());
        while self.start < end {
            match self.out.write(&self.buf[self.start..end]) {
                Ok(0) => {
                    result = Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the audit output took no bytes",
                    ));
                    break;
                }
                Ok(n) => self.start += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    result = Err(err);
                    break;
                }
            }
        }
        self.account_written();
        match result {
            Ok(()) => true,
            Err(err) => {
                self.fail(err);
                false
            }
        }
    }

    /// Counts the lines wholly written and forgets them.
    fn account_written(&mut self) {
        let mut records = 0;
        while let Some(&(end, counts)) = self.lines.front() {
            if end > self.start {
                break;
            }
            self.lines.pop_front();
            records += u64::from(counts);
        }
        if records > 0 {
            self.metrics.audit_records.increment(records);
        }
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// Writes and flushes everything formatted; ends a failure if that works.
    fn write_pending(&mut self) -> bool {
        if !self.out.is_open()
            && let Err(err) = self.out.reopen()
        {
            self.fail(err);
            return false;
        }
        if !self.write_until(self.buf.len()) {
            return false;
        }
        if let Err(err) = self.out.flush() {
            self.fail(err);
            return false;
        }
        if let Some(failure) = self.failure.take() {
            tracing::info!(
                "audit: writing to {} again after {} failed attempts over {:.1} s",
                self.out.describe(),
                failure.attempts,
                failure.since.elapsed().as_secs_f64()
            );
        }
        // A backlog written after a failure may have taken the file past its size.
        if self.out.rotation_due(0, 0) {
            self.rotate();
        }
        true
    }

    fn rotate(&mut self) {
        match self.out.rotate() {
            Ok(()) => self.rotation_warned = false,
            Err(err) if self.out.is_open() => {
                self.metrics.audit_write_errors.increment(1);
                if !std::mem::replace(&mut self.rotation_warned, true) {
                    tracing::warn!(
                        "audit: cannot rotate {}: {err}; writing on to the current file",
                        self.out.describe()
                    );
                }
            }
            // The old file is rotated away but no new one opened: records wait.
            Err(err) => self.fail(err),
        }
    }

    fn fail(&mut self, err: io::Error) {
        self.metrics.audit_write_errors.increment(1);
        let now = Instant::now();
        match &mut self.failure {
            None => {
                tracing::warn!(
                    "audit: cannot write to {}: {err}; records wait in the queue and writing is retried",
                    self.out.describe()
                );
                self.failure = Some(Failure {
                    since: now,
                    attempts: 1,
                    delay: RETRY_FIRST,
                    retry_at: now + RETRY_FIRST,
                    error: err.to_string(),
                });
            }
            Some(failure) => {
                failure.attempts += 1;
                failure.delay = (failure.delay * 2).min(RETRY_MAX);
                failure.retry_at = now + failure.delay;
                failure.error = err.to_string();
            }
        }
    }

    fn status(&self) -> Result<(), String> {
        match &self.failure {
            None => Ok(()),
            Some(failure) => Err(format!(
                "audit: cannot write to {}: {}",
                self.out.describe(),
                failure.error
            )),
        }
    }

    /// SIGHUP: what is formatted goes to the old file if it can, then the path is opened
    /// again. A line half-written to the old file (a write failed in its middle) is dropped,
    /// so that the new file starts with whole lines.
    fn reopen(&mut self) -> Result<(), String> {
        if self.failure.is_none() {
            self.write_pending();
        }
        self.drop_partial_line();
        match self.out.reopen() {
            Ok(()) => {
                if self.failure.is_some() {
                    self.write_pending();
                }
                Ok(())
            }
            Err(err) => {
                self.metrics.audit_write_errors.increment(1);
                let message = format!("audit: cannot reopen {}: {err}", self.out.describe());
                tracing::warn!("{message}; writing on to the old file");
                Err(message)
            }
        }
    }

    fn drop_partial_line(&mut self) {
        if self.start == 0 || self.buf[self.start - 1] == b'\n' {
            return;
        }
        if let Some((end, counts)) = self.lines.pop_front() {
            self.start = end;
            if counts {
                self.metrics.audit_lost.increment(1);
            }
            self.account_written();
        }
    }

    /// Shutdown: the last batch has been taken and written if it could be; syncs and closes.
    fn finish(&mut self) -> Result<(), String> {
        let mut result = Ok(());
        if let Some(failure) = &self.failure {
            let left = self.lines.iter().filter(|(_, counts)| *counts).count();
            self.metrics.audit_lost.increment(left as u64);
            let message = format!(
                "audit: cannot write to {} at shutdown: {}; {left} audit records are lost",
                self.out.describe(),
                failure.error
            );
            tracing::error!("{message}");
            result = Err(message);
        }
        if let Err(err) = self.out.close() {
            self.metrics.audit_write_errors.increment(1);
            let message = format!("audit: cannot sync {}: {err}", self.out.describe());
            tracing::error!("{message}");
            result = result.and(Err(message));
        }
        result
    }
}

impl Drop for Writer {
    /// If the writer stops for any other reason than shutdown (a bug: a panic), the callers
    /// must not wait for it forever: the queue closes and every waiter gets an error.
    fn drop(&mut self) {
        if !self.finished {
            let mut inner = self.queue.lock();
            inner.closed = true;
            settle(&mut inner, Err("audit writer stopped".to_string()));
            drop(inner);
            self.queue.slots.close();
        }
    }
}

/// Records the writer's final result and answers everyone waiting.
fn settle(inner: &mut Inner, result: Result<(), String>) {
    inner.finished = Some(result.clone());
    let waiters = std::mem::take(&mut inner.shutdown)
        .into_iter()
        .chain(std::mem::take(&mut inner.flush))
        .chain(std::mem::take(&mut inner.reopen));
    for tx in waiters {
        let _ = tx.send(result.clone());
    }
}
