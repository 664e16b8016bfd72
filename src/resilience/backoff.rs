//! Exponential backoff with full jitter, and a circuit breaker that opens after repeated
//! failures (the worker then pauses consumption but stays in its group).

use std::time::Duration;

use rand::Rng;

thread_local! {
    /// A seeded jitter source for this thread (the deterministic simulation's), else random.
    static SEEDED: std::cell::RefCell<Option<rand_chacha::ChaCha8Rng>> =
        const { std::cell::RefCell::new(None) };
}

/// Make this thread's backoff jitter a function of `seed` (`None`: random again), so a
/// simulated schedule replays exactly.
pub fn seed_jitter(seed: Option<u64>) {
    use rand::SeedableRng;
    SEEDED.with(|s| *s.borrow_mut() = seed.map(rand_chacha::ChaCha8Rng::seed_from_u64));
}

fn jitter(range: std::ops::RangeInclusive<u64>) -> u64 {
    SEEDED.with(|s| match s.borrow_mut().as_mut() {
        Some(rng) => rng.random_range(range.clone()),
        None => rand::rng().random_range(range.clone()),
    })
}

#[derive(Debug, Clone)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next delay: uniform in [0, min(max, base * 2^attempt)].
    pub fn next_delay(&mut self) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt += 1;
        let ms = cap.as_millis() as u64;
        Duration::from_millis(jitter(ms / 2..=ms.max(1)))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// Closed until `threshold` consecutive failures; open until the next success.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    threshold: u32,
    failures: u32,
}

impl CircuitBreaker {
    pub fn new(threshold: u32) -> CircuitBreaker {
        CircuitBreaker {
            threshold,
            failures: 0,
        }
    }
    pub fn record_failure(&mut self) -> bool {
        self.failures += 1;
        self.is_open()
    }
    pub fn record_success(&mut self) {
        self.failures = 0;
    }
    pub fn is_open(&self) -> bool {
        self.failures >= self.threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] <= Duration::from_millis(100) && d[0] >= Duration::from_millis(50));
        assert!(d[7] <= Duration::from_secs(2) && d[7] >= Duration::from_secs(1));
        b.reset();
        assert_eq!(b.attempts(), 0);
    }

    #[test]
    fn the_breaker_opens_after_the_threshold_and_closes_on_success() {
        let mut c = CircuitBreaker::new(3);
        assert!(!c.record_failure());
        assert!(!c.record_failure());
        assert!(c.record_failure());
        c.record_success();
        assert!(!c.is_open());
    }
}
