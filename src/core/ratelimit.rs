//! Per-connection rate limits: token buckets for requests per second and payload bytes per
//! second, each holding up to one second's worth (the burst). Off when the rate is 0. Over the
//! limit, a command is refused with `OVERLOADED`; nothing queues.

use tokio::time::Instant;

use crate::protocol::{ErrorCode, GatewayError};

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilled at `rate` tokens a second; `None` when the rate is 0 (off).
    pub fn new(rate: u64, now: Instant) -> Option<TokenBucket> {
        (rate > 0).then_some(TokenBucket {
            rate: rate as f64,
            tokens: rate as f64,
            last: now,
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.last = now;
    }

    /// Whether `amount` tokens are there (a cost above the whole bucket is allowed when the
    /// bucket is full, so one large message is never refused for ever).
    fn can_take(&mut self, amount: f64, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= amount || (amount > self.rate && self.tokens >= self.rate)
    }

    fn take(&mut self, amount: f64) {
        self.tokens -= amount;
    }
}

/// A connection's two buckets.
#[derive(Debug, Clone, Default)]
pub struct RateLimit {
    requests: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

impl RateLimit {
    pub fn new(requests_per_sec: u64, bytes_per_sec: u64) -> RateLimit {
        let now = Instant::now();
        RateLimit {
            requests: TokenBucket::new(requests_per_sec, now),
            bytes: TokenBucket::new(bytes_per_sec, now),
        }
    }

    pub fn is_off(&self) -> bool {
        self.requests.is_none() && self.bytes.is_none()
    }

    /// Admits one command carrying `bytes` of payload, or says why not. A refused command
    /// takes nothing from either bucket.
    pub fn admit(&mut self, bytes: usize, now: Instant) -> Result<(), GatewayError> {
        if let Some(bucket) = &mut self.requests
            && !bucket.can_take(1.0, now)
        {
            return Err(GatewayError::new(
                ErrorCode::Overloaded,
                format!(
                    "this connection is over its rate limit of {} requests a second; slow down",
                    bucket.rate
                ),
            ));
        }
        if let Some(bucket) = &mut self.bytes
            && !bucket.can_take(bytes as f64, now)
        {
            return Err(GatewayError::new(
                ErrorCode::Overloaded,
                format!(
                    "this connection is over its rate limit of {} payload bytes a second; slow down",
                    bucket.rate
                ),
            ));
        }
        if let Some(bucket) = &mut self.requests {
            bucket.take(1.0);
        }
        if let Some(bucket) = &mut self.bytes {
            bucket.take(bytes as f64);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_rate_of_zero_is_off() {
        let mut limit = RateLimit::new(0, 0);
        assert!(limit.is_off());
        let now = Instant::now();
        for _ in 0..10_000 {
            assert!(limit.admit(1 << 20, now).is_ok());
        }
    }

    #[test]
    fn requests_over_the_rate_are_refused_until_tokens_come_back() {
        let now = Instant::now();
        let mut limit = RateLimit::new(10, 0);
        for _ in 0..10 {
            assert!(limit.admit(0, now).is_ok(), "a burst of one second's worth");
        }
        let refused = limit.admit(0, now).unwrap_err();
        assert_eq!(refused.code, ErrorCode::Overloaded);
        assert!(limit.admit(0, now + Duration::from_millis(50)).is_err());
        assert!(
            limit.admit(0, now + Duration::from_millis(100)).is_ok(),
            "one token per 100 ms"
        );
    }

    #[test]
    fn a_command_refused_for_its_bytes_spends_no_request_token() {
        let now = Instant::now();
        let mut limit = RateLimit::new(2, 100);
        assert!(limit.admit(100, now).is_ok());
        for _ in 0..5 {
            assert!(limit.admit(50, now).is_err(), "over the byte budget");
        }
        assert!(
            limit.admit(0, now).is_ok(),
            "the second request token is still there"
        );
        assert!(limit.admit(0, now).is_err());
    }

    #[test]
    fn bytes_are_limited_separately_and_a_large_message_fits_a_full_bucket() {
        let now = Instant::now();
        let mut limit = RateLimit::new(0, 1000);
        assert!(limit.admit(600, now).is_ok());
        assert!(limit.admit(600, now).is_err());
        let later = now + Duration::from_secs(1);
        assert!(
            limit.admit(5000, later).is_ok(),
            "bigger than the bucket, but it was full"
        );
        assert!(
            limit.admit(1, later).is_err(),
            "and the bucket is now in debt"
        );
    }
}
