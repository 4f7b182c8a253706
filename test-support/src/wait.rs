//! The one way tests wait: poll a condition until it holds or a deadline passes.
//!
//! A test that sleeps a fixed time and then looks is both slow (the sleep is sized for the worst
//! machine) and flaky (the worst machine is sometimes worse). Polling a condition returns as
//! soon as it holds, and the timeout only bounds a failure. Every wait in the tests and test
//! tools goes through one loop (`checks`): it checks at once, then after a backoff that grows
//! from 1 ms to [`POLL`], and once more at the deadline. That loop is written once for both
//! ways to pause: it is an `async fn` that awaits whatever pause it is given, so [`poll`] hands
//! it a blocking `thread::sleep` (its future then never waits, and one poll of it runs the whole
//! wait) and `poll_async` hands it `tokio::time::sleep`. Its callers name what they wait for,
//! so a timeout says which condition never came:
//!
//! - [`poll`]: until a closure gives `Some(value)`; `Err(TimedOut)` names the wait;
//! - [`until`]: until a condition holds, panicking with its name otherwise (most tests);
//! - [`wait_until`]: the same, as a `bool` for callers that build their own message;
//! - `poll_async` (feature `tokio`): [`poll`] inside a tokio runtime, pausing without blocking
//!   the tasks that make the condition true.

use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::{Duration, Instant};

/// The longest pause between two checks.
pub const POLL: Duration = Duration::from_millis(20);
/// The first pause: a condition that is nearly there costs next to nothing.
const FIRST: Duration = Duration::from_millis(1);

/// A wait that gave up: what it waited for, and how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedOut {
    pub what: String,
    pub after: Duration,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timed out after {:?} waiting for {}",
            self.after, self.what
        )
    }
}

impl std::error::Error for TimedOut {}

/// The schedule every wait follows: when to check next, and when to give up.
struct Schedule {
    end: Instant,
    pause: Duration,
}

impl Schedule {
    fn new(timeout: Duration) -> Schedule {
        Schedule {
            end: Instant::now() + timeout,
            pause: FIRST,
        }
    }

    /// How long to pause before the next check; None: the deadline has passed.
    fn next(&mut self) -> Option<Duration> {
        let left = self.end.checked_duration_since(Instant::now())?;
        if left.is_zero() {
            return None;
        }
        let p = self.pause.min(left);
        self.pause = (self.pause * 2).min(POLL);
        Some(p)
    }
}

fn timed_out(what: &str, after: Duration) -> TimedOut {
    TimedOut {
        what: what.to_string(),
        after,
    }
}

/// The loop of every wait: call `f` until it returns `Some`, on the schedule, pausing with
/// `pause` between two checks.
async fn checks<T, P: Future<Output = ()>>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
    mut pause: impl FnMut(Duration) -> P,
) -> Result<T, TimedOut> {
    let mut s = Schedule::new(timeout);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        match s.next() {
            Some(p) => pause(p).await,
            None => return Err(timed_out(what, timeout)),
        }
    }
}

/// Call `f` until it returns `Some` (its value is returned), for up to `timeout` (and once
/// more at the end); `what` names the wait in the error.
pub fn poll<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> Result<T, TimedOut> {
    // The pauses block and are ready at once, so the wait runs to its end in one poll.
    let blocking = |p| {
        thread::sleep(p);
        std::future::ready(())
    };
    let wait = pin!(checks(timeout, what, f, blocking));
    match wait.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r,
        Poll::Pending => unreachable!("a wait whose pauses block never pends"),
    }
}

/// [`poll`] for a test that runs inside a tokio runtime whose own tasks make `f` true (a
/// blocking wait would stop them): the pauses are `tokio::time::sleep`.
#[cfg(feature = "tokio")]
pub async fn poll_async<T>(
    timeout: Duration,
    what: &str,
    f: impl FnMut() -> Option<T>,
) -> Result<T, TimedOut> {
    checks(timeout, what, f, tokio::time::sleep).await
}

/// Wait up to `timeout` for `cond`; panic naming `what` if it never holds.
#[track_caller]
pub fn until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    if let Err(e) = poll(timeout, what, || cond().then_some(())) {
        panic!("{e}");
    }
}

/// Wait up to `timeout` for `cond`: whether it became true.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    poll(timeout, "a condition", || cond().then_some(())).is_ok()
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

    #[test]
    fn poll_returns_the_value_or_names_the_wait() {
        let mut n = 0;
        let v = poll(Duration::from_secs(5), "n to reach 4", || {
            n += 1;
            (n == 4).then_some(n * 10)
        });
        assert_eq!(v, Ok(40));
        let e = poll::<()>(Duration::from_millis(30), "the impossible", || None).unwrap_err();
        assert_eq!(e.what, "the impossible");
        assert!(e.to_string().contains("waiting for the impossible"), "{e}");
    }

    /// On a one-thread runtime the task that makes the condition true runs only while the wait
    /// pauses: a wait that blocked the thread would time out.
    #[cfg(feature = "tokio")]
    #[test]
    fn poll_async_pauses_without_blocking_the_runtime() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let set = done.clone();
        let (v, e) = rt.block_on(async move {
            tokio::spawn(async move { set.store(true, Ordering::SeqCst) });
            let v = poll_async(Duration::from_secs(5), "the task to run", || {
                done.load(Ordering::SeqCst).then_some(7)
            })
            .await;
            let e = poll_async::<()>(Duration::from_millis(30), "never", || None).await;
            (v, e)
        });
        assert_eq!(v, Ok(7));
        assert_eq!(e.unwrap_err().what, "never");
    }

    #[test]
    #[should_panic(expected = "waiting for nothing")]
    fn until_panics_with_the_name() {
        until(Duration::ZERO, "nothing", || false);
    }
}
