//! Running out of file descriptors without hurting anyone.
//!
//! Every proxied connection needs two descriptors: the accepted client and
//! the upstream socket. If the process accepted a client with only one
//! descriptor left, the upstream socket would fail with EMFILE and the
//! client would be accepted and then dropped, which is worse than never
//! accepting it: a client left in the kernel's backlog just waits (its
//! handshake is done, its bytes are buffered) until we take it.
//!
//! So a client is accepted only once its upstream socket exists: the
//! accept loop makes the upstream socket *before* it accepts ([`Premade`];
//! `socket(2)` failing with EMFILE means: do not accept yet), and
//! `accept4(2)` itself then fails with EMFILE, harmlessly, when there is no
//! descriptor for the client. When every backend of the forward is an IP
//! address of one family (the usual case) that is one socket of that
//! family, and costs no syscall beyond the two the connection needs anyway.
//! Otherwise (a hostname, resolved per connection, or mixed families) the
//! family is unknown until the connection resolves it, so the loop makes
//! one socket of each family and the connection closes the one it does
//! not use: one `socket` and one `close` more per connection.
//!
//! That is exact without bookkeeping of every descriptor the process opens,
//! and without a lock between the workers (each runs its own accept loops,
//! see `server/workers.rs`): every descriptor a connection needs is taken
//! by the thread that accepts it, before or by the accept. (We measured
//! the alternative, a check of free descriptors and the accept under one
//! lock shared by the workers: the lock cost 1.5 `futex` calls per
//! connection with two workers, and about 5% of the connection rate.)
//! Only when neither family's socket can be made for a reason that is not
//! about descriptors (say IPv6 is off and the backend is an IPv6 address)
//! does the loop fall back to checking for two free descriptors
//! ([`FdBudget::room_for_one`]: it duplicates a spare `/dev/null`
//! descriptor twice and closes the copies again); the connection then
//! reports why its own socket failed.
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
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
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
    /// An out-of-descriptors episode is going on (its warning was logged).
    exhausted: AtomicBool,
    /// This episode's `accepting again` line was logged.
    resumed: AtomicBool,
}

impl FdBudget {
    pub fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(FdBudget {
            spare: File::open("/dev/null")?,
            exhausted: AtomicBool::new(false),
            resumed: AtomicBool::new(false),
        }))
    }

    /// Is there room for one more connection (its client and its upstream
    /// socket)? Only for a loop that could make no upstream socket in
    /// advance.
    pub fn room_for_one(&self) -> bool {
        self.room_for(2)
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
        if self.room_for(2 + EPISODE_MARGIN) {
            self.exhausted.store(false, SeqCst);
            tracing::debug!("out-of-descriptors episode over");
        }
    }
}

/// The next connection's upstream socket, made before its client is
/// accepted (see the module doc): non-blocking and close-on-exec. One of
/// the forward's family, or one of each when that is not known.
#[derive(Default)]
pub struct Premade {
    v4: Option<socket2::Socket>,
    v6: Option<socket2::Socket>,
}

/// The upstream socket(s) the next connection of a forward may need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// None: the forward has no backend (the client is closed at once).
    Nothing,
    /// Every backend is an IP address of this family.
    One(socket2::Domain),
    /// A hostname, or both families: one socket of each.
    Either,
}

impl Needs {
    /// What a forward with `backends`' family (see
    /// [`crate::upstream::Upstreams::family`]) needs.
    pub fn of(upstreams: &crate::upstream::Upstreams) -> Needs {
        match upstreams.family() {
            Some(d) => Needs::One(d),
            None if upstreams.is_empty() => Needs::Nothing,
            None => Needs::Either,
        }
    }
}

/// What [`Premade::fill`] says about the next accept.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// Every socket the next connection may need exists.
    Made,
    /// Out of descriptors: do not accept.
    Exhausted,
    /// No socket could be made, for a reason that is not about
    /// descriptors: the connection makes its own (and says why it fails).
    Unmade,
}

impl Premade {
    /// Make what is missing for the next connection.
    pub fn fill(&mut self, needs: Needs) -> Fill {
        let wanted = |d| match needs {
            Needs::Nothing => false,
            Needs::One(f) => f == d,
            Needs::Either => true,
        };
        let mut made = false;
        for (domain, slot) in [
            (socket2::Domain::IPV4, &mut self.v4),
            (socket2::Domain::IPV6, &mut self.v6),
        ] {
            if !wanted(domain) {
                *slot = None;
                continue;
            }
            if slot.is_none() {
                match socket(domain) {
                    Ok(s) => *slot = Some(s),
                    Err(e) if is_fd_exhaustion(&e) => return Fill::Exhausted,
                    Err(_) => continue,
                }
            }
            made = true;
        }
        if made || needs == Needs::Nothing {
            Fill::Made
        } else {
            Fill::Unmade
        }
    }

    /// Take what was made for the client just accepted (leaves this empty).
    pub fn take(&mut self) -> Premade {
        std::mem::take(self)
    }

    /// The socket for `domain` if one was made; the other is closed.
    pub fn into_socket(self, domain: socket2::Domain) -> Option<socket2::Socket> {
        if domain == socket2::Domain::IPV6 {
            self.v6
        } else {
            self.v4
        }
    }
}

/// A new upstream socket: non-blocking and close-on-exec.
pub fn socket(domain: socket2::Domain) -> io::Result<socket2::Socket> {
    let ty = socket2::Type::STREAM.nonblocking().cloexec();
    socket2::Socket::new(domain, ty, None)
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

    use socket2::Domain;

    fn made(p: &Premade) -> (bool, bool) {
        (p.v4.is_some(), p.v6.is_some())
    }

    /// One family: one socket, and a change of family drops the other.
    /// Unknown: one of each, and the connection keeps the one it uses.
    /// No backend: nothing.
    #[test]
    fn premade_sockets_follow_what_the_forward_needs() {
        let mut p = Premade::default();
        assert_eq!(p.fill(Needs::One(Domain::IPV4)), Fill::Made);
        assert_eq!(made(&p), (true, false));
        assert_eq!(p.fill(Needs::Either), Fill::Made);
        let v6 = p.v6.is_some(); // false where IPv6 is off
        assert_eq!(made(&p), (true, v6));
        let taken = p.take();
        assert_eq!(made(&p), (false, false), "taken by the connection");
        let s = taken.into_socket(Domain::IPV4).expect("the IPv4 socket");
        assert_eq!(s.domain().unwrap(), Domain::IPV4);
        assert!(s.nonblocking().unwrap());
        if v6 {
            assert_eq!(p.fill(Needs::One(Domain::IPV6)), Fill::Made);
            assert_eq!(made(&p), (false, true));
        }
        assert_eq!(p.fill(Needs::Nothing), Fill::Made);
        assert_eq!(made(&p), (false, false));
    }

    #[test]
    fn backoff_grows_to_a_second() {
        let mut b = Backoff::new();
        let v: Vec<u128> = (0..10).map(|_| b.next().as_millis()).collect();
        assert_eq!(v, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.next(), BACKOFF_MIN);
    }
}
