//! Running out of file descriptors without hurting anyone.
//!
//! Every proxied connection needs two descriptors: the accepted client and
//! the upstream socket. If the process accepted a client with only one
//! descriptor left, the upstream socket would fail with EMFILE and the
//! client would be accepted and then dropped, which is worse than never
//! accepting it: a client left in the kernel's backlog just waits (its
//! handshake is done, its bytes are buffered) until we take it.
//!
//! So a client is accepted only once its upstream socket is sure to get a
//! descriptor. When every backend of the forward is an IP address of one
//! family (the usual case), the accept loop simply makes the upstream
//! socket *before* it accepts ([`Spare`]; `socket(2)` failing with EMFILE
//! means: do not accept yet), and `accept4(2)` itself then fails with
//! EMFILE, harmlessly, when there is no descriptor for the client. That
//! costs no syscall beyond the two the connection needs anyway.
//!
//! Otherwise (a hostname, resolved per connection, or mixed families) the
//! family of the upstream socket is unknown until the connection resolves
//! it, and [`FdBudget`] checks for room: it duplicates a spare `/dev/null`
//! descriptor `2 + pending` times and closes the copies again, where
//! `pending` counts clients accepted whose upstream socket is not open yet
//! (each still needs one). If that fails we do not accept. This costs two
//! `fcntl(F_DUPFD_CLOEXEC)` and two `close` per connection.
//!
//! Both need no bookkeeping of every descriptor the process opens, and are
//! exact because every accept loop runs on one thread (the first worker;
//! the others only connect and relay, see `server/workers.rs`): a worker's
//! upstream socket is counted in `pending` until it exists, so nothing can
//! take the room the check saw before the accept (a premade socket is
//! checked for pending ones too, at no cost while there are none).
//!
//! While out of descriptors an accept loop retries after a back-off that
//! doubles from 10 ms to 1 s. The process logs ONE warning when an episode
//! starts and one `accepting again` line at the first accept after it, not
//! a line per try. Descriptors come back one connection at a time, so right
//! after resuming the process often runs out again; that is the same
//! episode, which ends only once [`EPISODE_MARGIN`] descriptors beyond the
//! next connection's are free again.

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

/// First and longest wait before retrying while out of descriptors.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Free descriptors (beyond what the next connection needs) that end an
/// out-of-descriptors episode.
pub const EPISODE_MARGIN: usize = 16;

/// Shared by every accept loop of the process (the descriptor table is the
/// process's).
pub struct FdBudget {
    spare: File,
    pending: AtomicUsize,
    /// An out-of-descriptors episode is going on (its warning was logged).
    exhausted: AtomicBool,
    /// This episode's `accepting again` line was logged.
    resumed: AtomicBool,
}

impl FdBudget {
    pub fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(FdBudget {
            spare: File::open("/dev/null")?,
            pending: AtomicUsize::new(0),
            exhausted: AtomicBool::new(false),
            resumed: AtomicBool::new(false),
        }))
    }

    /// Is there room for one more connection (its client and its upstream
    /// socket, plus the upstream sockets of the clients still connecting)?
    pub fn room_for_one(&self) -> bool {
        self.room_for(2 + self.pending.load(SeqCst))
    }

    /// Is there room for the upstream sockets of the clients still
    /// connecting? (No syscall while there are none.)
    pub fn room_for_pending(&self) -> bool {
        match self.pending.load(SeqCst) {
            0 => true,
            n => self.room_for(n),
        }
    }

    fn room_for(&self, n: usize) -> bool {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            match self.spare.try_clone() {
                Ok(f) => held.push(f),
                Err(_) => return false,
            }
        }
        true
    }

    /// Out of descriptors (the check failed, or accept said EMFILE/ENFILE):
    /// warn if this starts an episode.
    pub fn exhausted(&self, forward: &str, why: &str) {
        if !self.exhausted.swap(true, SeqCst) {
            self.resumed.store(false, SeqCst);
            let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map(|(soft, _)| soft.to_string())
                .unwrap_or_else(|_| "?".into());
            tracing::warn!(
                forward = %forward,
                limit = %limit,
                reason = %why,
                "out of file descriptors: not accepting until connections close \
                 (new clients wait in the backlog)"
            );
        }
    }

    /// A connection was accepted: say so once per episode, and end the
    /// episode once there is room to spare again.
    pub fn accepted(&self, forward: &str) {
        if !self.exhausted.load(SeqCst) {
            return;
        }
        if !self.resumed.swap(true, SeqCst) {
            tracing::info!(forward = %forward, "accepting again");
        }
        if self.room_for(2 + self.pending.load(SeqCst) + EPISODE_MARGIN) {
            self.exhausted.store(false, SeqCst);
            tracing::debug!("out-of-descriptors episode over");
        }
    }

    /// Count a client whose upstream socket is not open yet, until the
    /// guard is dropped.
    pub fn pending(self: &Arc<Self>) -> Pending {
        self.pending.fetch_add(1, SeqCst);
        Pending(self.clone())
    }
}

/// See [`FdBudget::pending`].
pub struct Pending(Arc<FdBudget>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, SeqCst);
    }
}

/// The next connection's upstream socket, made before its client is
/// accepted (see the module doc): non-blocking and close-on-exec.
pub struct Spare {
    pub domain: socket2::Domain,
    pub socket: socket2::Socket,
}

impl Spare {
    pub fn new(domain: socket2::Domain) -> io::Result<Spare> {
        let ty = socket2::Type::STREAM.nonblocking().cloexec();
        let socket = socket2::Socket::new(domain, ty, None)?;
        Ok(Spare { domain, socket })
    }
}

/// What an accepted client holds for its upstream socket: the socket
/// itself, or its place in `pending` until that socket exists.
pub struct Reserved {
    pub premade: Option<Spare>,
    pub pending: Option<Pending>,
}

/// Is this accept error "no descriptor for the new socket"?
pub fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// The growing wait between retries while out of descriptors.
pub struct Backoff(Option<Duration>);

impl Backoff {
    pub fn new() -> Self {
        Backoff(None)
    }

    /// The next wait: 10 ms, 20 ms, … up to 1 s.
    pub fn next(&mut self) -> Duration {
        let d = self.0.map_or(BACKOFF_MIN, |d| (d * 2).min(BACKOFF_MAX));
        self.0 = Some(d);
        d
    }

    pub fn reset(&mut self) {
        self.0 = None;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_second() {
        let mut b = Backoff::new();
        let v: Vec<u128> = (0..10).map(|_| b.next().as_millis()).collect();
        assert_eq!(v, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.next(), BACKOFF_MIN);
    }
}
