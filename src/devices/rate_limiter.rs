//! Token-bucket rate limiting for device I/O (Firecracker's model): a bandwidth bucket counts
//! bytes, an ops bucket counts requests; each has a size, a refill time for a full bucket, and an
//! optional one-time burst spent before the regular budget. When a bucket runs dry the device
//! stops and a timerfd wakes it once enough tokens have accrued. Runs on the VMM thread.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

use serde::{Deserialize, Serialize};

use crate::config::{RateLimiterConfig, TokenBucketConfig};

/// A bucket's settings as snapshots store them (independent of the API's field names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBucket {
    pub size: u64,
    pub refill_time_ms: u64,
    pub one_time_burst: Option<u64>,
}

/// A limiter's settings as snapshots store them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLimits {
    pub bandwidth: Option<SavedBucket>,
    pub ops: Option<SavedBucket>,
}

impl From<&TokenBucketConfig> for SavedBucket {
    fn from(b: &TokenBucketConfig) -> Self {
        SavedBucket {
            size: b.size,
            refill_time_ms: b.refill_time,
            one_time_burst: b.one_time_burst,
        }
    }
}

impl From<SavedBucket> for TokenBucketConfig {
    fn from(b: SavedBucket) -> Self {
        TokenBucketConfig {
            size: b.size,
            refill_time: b.refill_time_ms,
            one_time_burst: b.one_time_burst,
        }
    }
}

impl From<Option<&RateLimiterConfig>> for SavedLimits {
    fn from(c: Option<&RateLimiterConfig>) -> Self {
        SavedLimits {
            bandwidth: c.and_then(|c| c.bandwidth.as_ref()).map(SavedBucket::from),
            ops: c.and_then(|c| c.ops.as_ref()).map(SavedBucket::from),
        }
    }
}

impl SavedLimits {
    /// The API form; `None` when unlimited.
    pub fn to_config(self) -> Option<RateLimiterConfig> {
        (self.bandwidth.is_some() || self.ops.is_some()).then(|| RateLimiterConfig {
            bandwidth: self.bandwidth.map(Into::into),
            ops: self.ops.map(Into::into),
        })
    }
}

/// The tokens left in a limiter's buckets, saved with a snapshot so a restored device does not
/// get a fresh budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimiterBudget {
    /// `(budget, one_time_burst)` of the bandwidth bucket.
    pub bandwidth: Option<(u64, u64)>,
    /// `(budget, one_time_burst)` of the ops bucket.
    pub ops: Option<(u64, u64)>,
}

/// One bucket. Token arithmetic in nanosecond-scaled integers to avoid drift.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u64,
    one_time_burst: u64,
    budget: u64,
    last_refill: Instant,
    /// Fractional tokens carried between refills, in units of 1/refill_ns tokens.
    carry: u128,
}

impl TokenBucket {
    /// `None` when the bucket would be unlimited (size or refill time 0).
    pub fn new(config: &TokenBucketConfig, now: Instant) -> Option<Self> {
        if config.size == 0 || config.refill_time == 0 {
            return None;
        }
        Some(TokenBucket {
            size: config.size,
            refill_ns: config.refill_time.saturating_mul(1_000_000),
            one_time_burst: config.one_time_burst.unwrap_or(0),
            budget: config.size,
            last_refill: now,
            carry: 0,
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_refill).as_nanos();
        self.last_refill = now;
        let scaled = elapsed * u128::from(self.size) + self.carry;
        let tokens = scaled / u128::from(self.refill_ns);
        self.carry = scaled % u128::from(self.refill_ns);
        let refilled = (u128::from(self.budget) + tokens).min(u128::from(self.size));
        self.budget = u64::try_from(refilled).unwrap_or(self.size);
        if self.budget == self.size {
            self.carry = 0;
        }
    }

    /// Takes `tokens` if available (one-time burst first); `false` leaves the bucket unchanged.
    pub fn consume(&mut self, tokens: u64, now: Instant) -> bool {
        self.refill(now);
        let from_burst = tokens.min(self.one_time_burst);
        let rest = tokens - from_burst;
        // A request larger than the whole bucket can never fit: let it through when full so it
        // is throttled by the refill rate instead of blocking forever.
        let needed = rest.min(self.size);
        if self.budget < needed {
            return false;
        }
        self.one_time_burst -= from_burst;
        self.budget -= needed;
        true
    }

    /// Time until `tokens` would be available.
    pub fn wait_for(&self, tokens: u64) -> Duration {
        let rest = tokens.saturating_sub(self.one_time_burst).min(self.size);
        let missing = rest.saturating_sub(self.budget);
        let ns = (u128::from(missing) * u128::from(self.refill_ns)).div_ceil(u128::from(self.size));
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)).max(Duration::from_micros(100))
    }
}

/// A device's limiter: optional bandwidth and ops buckets plus the wake-up timer.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    limits: SavedLimits,
    timer: TimerFd,
    blocked: bool,
    /// Times the device had to wait, for metrics.
    pub throttled: u64,
}

impl RateLimiter {
    pub fn new(config: Option<&RateLimiterConfig>) -> std::io::Result<Self> {
        let mut limiter = RateLimiter {
            bandwidth: None,
            ops: None,
            limits: SavedLimits::default(),
            timer: TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?,
            blocked: false,
            throttled: 0,
        };
        limiter.update(config);
        Ok(limiter)
    }

    /// Replaces the buckets (PATCH of a drive or interface); unset buckets become unlimited.
    pub fn update(&mut self, config: Option<&RateLimiterConfig>) {
        let now = Instant::now();
        let bucket = |b: Option<&TokenBucketConfig>| b.and_then(|b| TokenBucket::new(b, now));
        self.bandwidth = bucket(config.and_then(|c| c.bandwidth.as_ref()));
        self.ops = bucket(config.and_then(|c| c.ops.as_ref()));
        self.limits = SavedLimits::from(config);
    }

    /// The limits in force, in saved form.
    pub fn limits(&self) -> SavedLimits {
        self.limits
    }

    /// The tokens left now.
    pub fn budget(&self) -> LimiterBudget {
        let now = Instant::now();
        let left = |b: &Option<TokenBucket>| {
            b.as_ref().map(|b| {
                let mut b = b.clone();
                b.refill(now);
                (b.budget, b.one_time_burst)
            })
        };
        LimiterBudget {
            bandwidth: left(&self.bandwidth),
            ops: left(&self.ops),
        }
    }

    /// Applies a saved budget (capped by the bucket sizes in force).
    pub fn set_budget(&mut self, budget: &LimiterBudget) {
        let apply = |b: &mut Option<TokenBucket>, saved: Option<(u64, u64)>| {
            if let (Some(b), Some((budget, burst))) = (b.as_mut(), saved) {
                b.budget = budget.min(b.size);
                b.one_time_burst = burst;
                b.carry = 0;
            }
        };
        apply(&mut self.bandwidth, budget.bandwidth);
        apply(&mut self.ops, budget.ops);
    }

    /// Whether a request of `bytes` may go now. When not, the timer is armed and the caller
    /// must stop until [`RateLimiter::timer_fired`].
    pub fn consume(&mut self, bytes: u64) -> bool {
        if self.blocked {
            return false;
        }
        let now = Instant::now();
        let ops_ok = self.ops.as_mut().is_none_or(|b| b.consume(1, now));
        if !ops_ok {
            let wait = self.ops.as_ref().map_or(Duration::ZERO, |b| b.wait_for(1));
            self.block(wait);
            return false;
        }
        let bytes_ok = self
            .bandwidth
            .as_mut()
            .is_none_or(|b| b.consume(bytes, now));
        if !bytes_ok {
            // Give the op back: the request did not happen.
            if let Some(ops) = self.ops.as_mut() {
                ops.budget = (ops.budget + 1).min(ops.size);
            }
            let wait = self
                .bandwidth
                .as_ref()
                .map_or(Duration::ZERO, |b| b.wait_for(bytes));
            self.block(wait);
            return false;
        }
        true
    }

    fn block(&mut self, wait: Duration) {
        self.blocked = true;
        self.throttled += 1;
        if let Err(e) = self.timer.reset(wait, None) {
            crate::warn_limited!("cannot arm the rate limiter timer: {e}");
            self.blocked = false;
        }
    }

    /// Call when the timer fd is readable: the device may try again.
    pub fn timer_fired(&mut self) {
        let _ = self.timer.wait();
        self.blocked = false;
    }

    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, refill_ms: u64, burst: Option<u64>, now: Instant) -> TokenBucket {
        TokenBucket::new(
            &TokenBucketConfig {
                size,
                refill_time: refill_ms,
                one_time_burst: burst,
            },
            now,
        )
        .unwrap()
    }

    #[test]
    fn full_bucket_allows_its_size_then_refuses() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 100, None, t0);
        assert!(b.consume(600, t0));
        assert!(b.consume(400, t0));
        assert!(!b.consume(1, t0));
    }

    #[test]
    fn tokens_refill_in_proportion_to_elapsed_time() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 100, None, t0);
        assert!(b.consume(1000, t0));
        let t1 = t0 + Duration::from_millis(25);
        assert!(b.consume(250, t1));
        assert!(!b.consume(1, t1));
        let t2 = t1 + Duration::from_millis(200);
        assert!(
            b.consume(1000, t2),
            "refill is capped at the bucket size, not beyond"
        );
        assert!(!b.consume(1, t2));
    }

    #[test]
    fn fractional_refill_is_not_lost() {
        let t0 = Instant::now();
        let mut b = bucket(3, 1000, None, t0);
        assert!(b.consume(3, t0));
        // 1 token per 333.3 ms: after three 200 ms steps (600 ms) one token is due, not zero.
        let mut t = t0;
        for _ in 0..3 {
            t += Duration::from_millis(200);
            b.refill(t);
        }
        assert_eq!(b.budget, 1);
    }

    #[test]
    fn one_time_burst_is_spent_first_and_only_once() {
        let t0 = Instant::now();
        let mut b = bucket(100, 1000, Some(500), t0);
        assert!(b.consume(500, t0));
        assert!(b.consume(100, t0));
        assert!(!b.consume(1, t0));
    }

    #[test]
    fn wait_time_matches_missing_tokens() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 100, None, t0);
        assert!(b.consume(1000, t0));
        assert_eq!(b.wait_for(500), Duration::from_millis(50));
    }

    #[test]
    fn request_larger_than_bucket_goes_through_when_full() {
        let t0 = Instant::now();
        let mut b = bucket(100, 10, None, t0);
        assert!(b.consume(5000, t0));
        assert!(!b.consume(5000, t0));
    }

    #[test]
    fn zero_size_bucket_means_unlimited() {
        let cfg = TokenBucketConfig {
            size: 0,
            refill_time: 100,
            one_time_burst: None,
        };
        assert!(TokenBucket::new(&cfg, Instant::now()).is_none());
    }

    #[test]
    fn limiter_blocks_and_unblocks_through_its_timer() {
        let cfg = RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 2,
                refill_time: 20,
                one_time_burst: None,
            }),
        };
        let mut rl = RateLimiter::new(Some(&cfg)).unwrap();
        assert!(rl.consume(10));
        assert!(rl.consume(10));
        assert!(!rl.consume(10));
        assert!(rl.is_blocked());
        rl.timer_fired(); // blocks until the timer expires (~10 ms)
        assert!(rl.consume(10));
    }

    #[test]
    fn bandwidth_refusal_returns_the_op_token() {
        let cfg = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 100,
                refill_time: 1000,
                one_time_burst: None,
            }),
            ops: Some(TokenBucketConfig {
                size: 1,
                refill_time: 1000,
                one_time_burst: None,
            }),
        };
        let mut rl = RateLimiter::new(Some(&cfg)).unwrap();
        assert!(rl.consume(100));
        let mut rl2 = RateLimiter::new(Some(&cfg)).unwrap();
        rl2.bandwidth.as_mut().unwrap().budget = 0;
        assert!(!rl2.consume(50));
        assert_eq!(rl2.ops.as_ref().unwrap().budget, 1);
    }

    #[test]
    fn a_saved_budget_carries_over_to_a_new_limiter() {
        let config = RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 10,
                refill_time: 1_000_000,
                one_time_burst: None,
            }),
        };
        let mut first = RateLimiter::new(Some(&config)).unwrap();
        for _ in 0..8 {
            assert!(first.consume(1));
        }
        let saved = first.budget();
        assert_eq!(saved.ops, Some((2, 0)));
        assert_eq!(first.limits().to_config(), Some(config));
        let mut second = RateLimiter::new(first.limits().to_config().as_ref()).unwrap();
        second.set_budget(&saved);
        assert!(second.consume(1));
        assert!(second.consume(1));
        assert!(
            !second.consume(1),
            "the restored limiter has only what was left"
        );
    }
}
