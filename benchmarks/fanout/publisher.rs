//! The publisher: one async-nats client in the parent, on a runtime of its own with one worker
//! thread (so that the connection keeps answering the server's pings between phases). It
//! publishes to `fan.x` on nats-server directly, paced, flat out for a while, or a burst at once.
//! Every payload starts `t=<ns since the epoch>;n=<sequence>;`, stamped just before the publish
//! call, and is padded with `x` to the payload size.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;

use crate::SUBJECT;

pub struct Publisher {
    runtime: tokio::runtime::Runtime,
    client: async_nats::Client,
    payload: usize,
}

/// What one phase published.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Published {
    pub messages: u64,
    /// From the first publish call to the end of the flush.
    pub seconds: f64,
}

fn message(seq: u64, size: usize) -> Bytes {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut text = format!("t={now};n={seq};");
    if text.len() < size {
        text.extend(std::iter::repeat_n('x', size - text.len()));
    }
    Bytes::from(text)
}

impl Publisher {
    pub fn connect(url: &str, payload: usize) -> Result<Publisher, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|err| format!("runtime: {err}"))?;
        let client = runtime
            .block_on(
                async_nats::ConnectOptions::new()
                    .name("fanout-publisher")
                    .connect(url),
            )
            .map_err(|err| format!("publisher: cannot connect to {url}: {err}"))?;
        Ok(Publisher {
            runtime,
            client,
            payload,
        })
    }

    /// `count` messages at `rate` a second.
    pub fn paced(&self, rate: f64, count: u64) -> Result<Published, String> {
        let (client, size) = (self.client.clone(), self.payload);
        self.runtime.block_on(async move {
            let started = Instant::now();
            let start = tokio::time::Instant::now();
            for seq in 0..count {
                tokio::time::sleep_until(start + Duration::from_secs_f64(seq as f64 / rate)).await;
                client
                    .publish(SUBJECT, message(seq, size))
                    .await
                    .map_err(|err| format!("publish: {err}"))?;
                client
                    .flush()
                    .await
                    .map_err(|err| format!("flush: {err}"))?;
            }
            Ok(Published {
                messages: count,
                seconds: started.elapsed().as_secs_f64(),
            })
        })
    }

    /// As fast as the client and the server take them, for `seconds`. No flush at the end:
    /// when the subscribers lag, nats-server holds the publisher back and a flush could take
    /// minutes. `messages` counts what async-nats accepted; what it still buffered goes out
    /// later (`settle`).
    pub fn flat_out(&self, seconds: f64) -> Result<Published, String> {
        let (client, size) = (self.client.clone(), self.payload);
        self.runtime.block_on(async move {
            let started = Instant::now();
            let until = tokio::time::Instant::now() + Duration::from_secs_f64(seconds);
            let mut seq = 0;
            while tokio::time::Instant::now() < until {
                match tokio::time::timeout_at(until, client.publish(SUBJECT, message(seq, size)))
                    .await
                {
                    Ok(Ok(())) => seq += 1,
                    Ok(Err(err)) => return Err(format!("publish: {err}")),
                    Err(_) => break,
                }
            }
            Ok(Published {
                messages: seq,
                seconds: started.elapsed().as_secs_f64(),
            })
        })
    }

    /// Waits (at most `patience`) until everything published has reached nats-server, so that
    /// nothing of one case arrives in the next.
    pub fn settle(&self, patience: Duration) {
        let client = self.client.clone();
        self.runtime.block_on(async move {
            let _ = tokio::time::timeout(patience, client.flush()).await;
        });
    }

    /// `count` messages at once, then a flush.
    pub fn burst(&self, count: u64) -> Result<Published, String> {
        let (client, size) = (self.client.clone(), self.payload);
        self.runtime.block_on(async move {
            let started = Instant::now();
            for seq in 0..count {
                client
                    .publish(SUBJECT, message(seq, size))
                    .await
                    .map_err(|err| format!("publish: {err}"))?;
            }
            client
                .flush()
                .await
                .map_err(|err| format!("flush: {err}"))?;
            Ok(Published {
                messages: count,
                seconds: started.elapsed().as_secs_f64(),
            })
        })
    }
}
