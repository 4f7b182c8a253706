//! The one way tests wait: poll a condition until it holds or a deadline passes.
//!
//! A test that sleeps a fixed time and then looks is both slow (the sleep is sized for the worst
//! machine) and flaky (the worst machine is sometimes worse). Polling a condition every few
//! milliseconds returns as soon as it holds, and the timeout only bounds a failure.

use std::thread;
use std::time::{Duration, Instant};

/// How often [`wait_until`] checks its condition.
pub const POLL: Duration = Duration::from_millis(20);

/// Check `cond` every [`POLL`] for up to `timeout` (and once more at the end): whether it became
/// true.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if cond() {
            return true;
        }
        thread::sleep(POLL);
    }
    cond()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn true_at_once_and_false_after_the_timeout() {
        assert!(wait_until(Duration::from_secs(5), || true));
        assert!(!wait_until(Duration::ZERO, || false));
        let mut n = 0;
        assert!(wait_until(Duration::from_secs(5), || {
            n += 1;
            n == 3
        }));
    }
}
