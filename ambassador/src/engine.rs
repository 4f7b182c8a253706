//! The engines: three ways to move a connection's bytes, behind one contract.
//!
//! The server (`server.rs`) does everything that is the same for every
//! engine: it binds the listeners, accepts, connects upstream (with the
//! timeout, TCP_NODELAY, the per-forward connection cap) and drains on
//! SIGTERM. It then hands the two connected sockets to the engine as a
//! [`Conn`], and the engine moves bytes both ways until both sides are done:
//!
//! - [`sockmap`]: both sockets go into an eBPF SOCKHASH and the kernel
//!   redirects every segment to the peer socket; userspace only watches for
//!   FIN and errors.
//! - [`uring`]: a copy loop on io_uring (one submission per read or write,
//!   no readiness wake-up).
//! - [`epoll`]: a copy loop on tokio (readiness via epoll).
//!
//! Every engine honours the same per-connection contract: half-close is
//! propagated (a FIN reaches the other side after every byte before it, and
//! the other direction keeps flowing), a reset on one side resets the other,
//! `--idle-timeout` closes a silent connection, the counters in
//! [`ForwardStats`] are kept up to date, and [`Abort::current`] — raised when
//! the drain timeout expires or a second SIGTERM forces the exit — ends the
//! connection at once with a RESET on both sockets (SO_LINGER 0, see
//! [`set_reset_on_close`]), so a client can tell a cut stream from a
//! finished one. (As a safety net the server also sets SO_LINGER 0 on the
//! sockets of every connection still live at that point, so even an engine
//! that does not watch `abort` resets them when the process exits.)
//!
//! [`select`] picks the engine for `--mode`: `auto` takes the best one that
//! starts here and logs, for each engine it skipped, the exact reason
//! (syscall and errno). An explicitly requested engine that cannot start is
//! an error, never a silent fallback.

pub mod epoll;
mod side;
pub mod sockmap;
pub mod uring;

pub use side::Side;

use crate::config::{Mode, Settings};
use crate::metrics::ForwardStats;
use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One proxied connection, ready for an engine: the accepted client socket
/// and the connected upstream socket (both non-blocking; see [`Side`] for
/// which reactor, if any, each is registered with), with what the engine
/// needs to log and count.
pub struct Conn {
    /// Process-unique connection number, for logs.
    pub id: u64,
    /// The forward's source (variable or flag), for logs.
    pub forward: Arc<str>,
    pub client: Side,
    pub upstream: Side,
    pub client_addr: SocketAddr,
    pub upstream_addr: SocketAddr,
    pub stats: Arc<ForwardStats>,
    pub settings: Arc<Settings>,
}

thread_local! {
    /// The abort signal of the server, as this thread's runtime sees it
    /// (each worker's runtime is single-threaded, and so is every
    /// connection's engine code; every worker gets a receiver of the one
    /// signal).
    static ABORT: std::cell::RefCell<Option<tokio::sync::watch::Receiver<bool>>> =
        const { std::cell::RefCell::new(None) };
}

/// "Cut every connection now": raised once by the server when it gives up
/// on the live connections (drain timeout, forced exit). Every engine
/// watches [`Abort::current`] next to its idle timer and, when it resolves,
/// stops moving bytes and closes both sockets with RST.
///
/// It is a per-thread signal rather than a field of [`Conn`] so that code
/// that builds a `Conn` without a server (tests) needs nothing: with no
/// server on the thread it never fires.
#[derive(Clone)]
pub struct Abort(Option<tokio::sync::watch::Receiver<bool>>);

impl Abort {
    /// A new signal, installed for this thread; the server keeps the sender
    /// and raises it with `send(true)`.
    pub fn install() -> tokio::sync::watch::Sender<bool> {
        let (tx, rx) = tokio::sync::watch::channel(false);
        Abort::install_rx(rx);
        tx
    }

    /// Install another thread's receiver of the signal (a worker's).
    pub fn install_rx(rx: tokio::sync::watch::Receiver<bool>) {
        ABORT.with(|a| *a.borrow_mut() = Some(rx));
    }

    /// The signal of the server on this thread (one that never fires if
    /// there is none).
    pub fn current() -> Abort {
        Abort(ABORT.with(|a| a.borrow().clone()))
    }

    /// Has the abort been raised?
    pub fn is_raised(&self) -> bool {
        self.0.as_ref().is_some_and(|rx| *rx.borrow())
    }

    /// Resolves once the abort is raised (or the server is gone, which
    /// means the same thing); never without a server.
    pub async fn raised(&self) {
        match &self.0 {
            Some(rx) => {
                let _ = rx.clone().wait_for(|&v| v).await;
            }
            None => std::future::pending().await,
        }
    }
}

/// The engine chosen at start-up.
pub enum Engine {
    Sockmap(Rc<sockmap::Sockmap>),
    Uring,
    Epoll,
}

impl Engine {
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Sockmap(_) => "sockmap",
            Engine::Uring => "uring",
            Engine::Epoll => "epoll",
        }
    }

    /// Bring the counters up to date before they are logged (the sockmap
    /// engine reads the kernel's per-connection counters here).
    pub fn refresh_stats(&self) {
        if let Engine::Sockmap(s) = self {
            s.refresh_stats();
        }
    }

    /// Move bytes both ways until both directions are closed.
    ///
    /// Each engine's future is boxed on its own, and this returns the box
    /// rather than awaiting it (an `async fn` would keep a second copy of
    /// `conn` next to it): a connection's task then holds only its engine's
    /// state (sockmap ~1.5 KiB, uring ~1.4, epoll ~1.3) for as long as it
    /// lives, not the largest engine's next to what connecting needed
    /// (6.8 KiB per task before).
    pub fn relay(&self, conn: Conn) -> Pin<Box<dyn Future<Output = io::Result<()>> + '_>> {
        match self {
            Engine::Sockmap(s) => Box::pin(sockmap::relay(s, conn)),
            Engine::Uring => Box::pin(uring::relay(conn)),
            Engine::Epoll => Box::pin(epoll::relay(conn)),
        }
    }
}

/// Why `--mode auto` does not pick a sockmap engine that started: the kernel
/// program cannot cut skbs that repeat bytes already spliced (docs/sockmap.md,
/// "Overlapping skbs"), so such a connection would end in an integrity reset.
/// A reset is never a wrong byte, but a proxy that cuts a connection a few
/// times in a thousand is not the best engine; `--mode sockmap` opts in.
pub fn auto_skips_sockmap(why: &str) -> String {
    format!(
        "works here, but not chosen by auto: skbs that repeat bytes already spliced cannot be \
         cut ({why}), so such a connection would be reset; use --mode sockmap to opt in"
    )
}

/// The engine for `settings.mode`. `auto` tries sockmap, uring, epoll in that
/// order and logs why each skipped engine could not start; an explicit mode
/// returns its reason as the error.
pub fn select(settings: &Settings) -> Result<Engine, String> {
    let mode = settings.mode;
    let try_sockmap = || sockmap::Sockmap::start(settings).map(|s| Engine::Sockmap(Rc::new(s)));
    // `auto` chooses sockmap only where it is safe as well as fast: where
    // the kernel program cuts the repeated bytes of partly old
    // retransmissions (needs CAP_PERFMON or CAP_SYS_ADMIN and the skb layout
    // the start-up self-test checks). `--mode sockmap` opts in without it.
    let auto_sockmap = || -> Result<Engine, String> {
        let engine = try_sockmap()?;
        if let Engine::Sockmap(s) = &engine {
            s.trims().map_err(|why| auto_skips_sockmap(&why))?;
        }
        Ok(engine)
    };
    let try_uring = || uring::probe().map(|()| Engine::Uring);
    let engine = match mode {
        Mode::Sockmap => try_sockmap().map_err(|r| format!("--mode sockmap: {r}"))?,
        Mode::Uring => try_uring().map_err(|r| format!("--mode uring: {r}"))?,
        Mode::Epoll => Engine::Epoll,
        Mode::Auto => {
            let mut chosen = None;
            for (name, attempt) in [
                (
                    "sockmap",
                    &auto_sockmap as &dyn Fn() -> Result<Engine, String>,
                ),
                ("uring", &try_uring),
            ] {
                match attempt() {
                    Ok(e) => {
                        chosen = Some(e);
                        break;
                    }
                    Err(reason) => tracing::warn!(engine = %name, %reason, "engine skipped"),
                }
            }
            chosen.unwrap_or(Engine::Epoll)
        }
    };
    tracing::info!(engine = %engine.name(), mode = %mode, "engine chosen");
    Ok(engine)
}

/// When a connection last moved a byte, for `--idle-timeout`. Both
/// directions of a connection touch it; one watchdog reads it.
#[derive(Clone)]
pub struct Activity(Rc<Cell<Instant>>);

impl Activity {
    pub fn new() -> Self {
        Activity(Rc::new(Cell::new(Instant::now())))
    }

    pub fn touch(&self) {
        self.0.set(Instant::now());
    }

    /// Resolves once nothing has moved for `idle` (never, if `None`).
    pub async fn idle(&self, idle: Option<Duration>) {
        let Some(idle) = idle else {
            return std::future::pending().await;
        };
        loop {
            let deadline = self.0.get() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// Make `close()` send RST instead of FIN (SO_LINGER {on, 0}): how a reset
/// on one side is passed on to the other.
pub fn set_reset_on_close(s: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Did the peer reset (or otherwise kill) the connection, as opposed to a
/// local problem?
pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection over loopback, as the server hands it to an engine.
    fn conn() -> Conn {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = std::net::TcpStream::connect(addr).unwrap();
        let (client, client_addr) = listener.accept().unwrap();
        let settings = Settings {
            forwards: vec![],
            mode: Mode::Epoll,
            splice: crate::config::SplicePolicy::Never,
            nodelay: true,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: None,
            max_conns: 0,
            drain_timeout: Duration::from_secs(5),
            workers: crate::config::Workers::Count(1),
        };
        Conn {
            id: 1,
            forward: "test".into(),
            client: client.into(),
            upstream: upstream.into(),
            client_addr,
            upstream_addr: addr,
            stats: Arc::new(ForwardStats::default()),
            settings: Arc::new(settings),
        }
    }

    /// An idle connection holds its engine's relay future for its whole
    /// life, so its size is most of what the connection costs the process
    /// (docs/benchmarks.md, items 5 and 8). It was 1,848 bytes (epoll) and
    /// 2,344 (uring) while the relays were `async fn`s that kept their
    /// argument twice and uring built its two directions twice; a change
    /// that brings either back fails here. (Building a future runs none of
    /// it: these are never polled, and dropping them closes the sockets.)
    #[test]
    fn relay_futures_hold_no_second_copy() {
        let epoll = std::mem::size_of_val(&epoll::relay(conn()));
        let uring = std::mem::size_of_val(&uring::relay(conn()));
        assert!(epoll <= 1_450, "epoll relay future: {epoll} bytes");
        assert!(uring <= 1_550, "uring relay future: {uring} bytes");
    }
}
