//! The part of a proxy that is the same for every engine: listeners, the
//! accept loops, connecting upstream, signals and the drain on shutdown.
//!
//! Start-up is all or nothing: every listener is bound before the first
//! connection is accepted, and if one cannot be bound the process exits
//! naming it. Then every worker (`server/workers.rs`: `--workers N`) runs
//! one accept loop per forward on its own single-threaded runtime (tokio,
//! or tokio-uring for the uring engine), all of them taking clients from
//! the forward's one listening socket; a client stays on the worker that
//! accepted it, which does every step:
//!
//! 1. take a slot from the forward's `--max-conns` semaphore (one per
//!    forward, for all workers; when the forward is full we stop calling
//!    accept, so new clients wait in the kernel's backlog instead of being
//!    accepted and reset);
//! 2. check there are file descriptors for the client and its upstream
//!    socket (`server/fds.rs`; when there are not, stop accepting, warn once,
//!    retry with a back-off);
//! 3. accept; a client that is one of our own upstream sockets is a
//!    forwarding loop and is reset at once (`loops.rs`);
//! 4. connect to a backend (see [`crate::upstream`]: balancing, retrying
//!    the next healthy backend, passive and active health; a hostname is
//!    resolved again for every connection) within `--connect-timeout`; if
//!    no backend answers the client is closed at once and one warning names
//!    both addresses;
//! 5. set TCP_NODELAY on the upstream socket (the client has it from the
//!    listener, see `server/listener.rs`) and hand both to the engine.
//!
//! A forward whose backends come from etcd gets each new set from its
//! watcher thread over a channel; the main loop applies it like a reload
//! that changed the forward's backends (`Live::discovered`).
//!
//! Signals ([`Signals`], installed before `ready` is logged):
//! - SIGTERM or SIGINT stops the accept loops and lets live connections
//!   finish for up to `--drain-timeout`; then the ones still live are
//!   aborted (RESET, not a clean FIN) and the process exits 0. A second
//!   SIGTERM/SIGINT during the drain aborts them at once and exits 1: the
//!   streams were cut, which is not a clean exit.
//! - SIGUSR1 logs the counters.
//! - SIGHUP never kills the process (its default action would): it reloads
//!   the `--config` file (as does a change of the file; see
//!   [`crate::reload`]), or logs that there is nothing to reload.

mod fds;
mod listener;
mod memory;
mod workers;

use crate::config::{Host, Settings};
use crate::discovery::etcd::Feeds;
use crate::engine::{Abort, Conn, Engine};
use crate::loops::{Origin, OwnUpstreams, Registration};
use crate::metrics::{ActiveGuard, ForwardStats};
pub use crate::reload::Reloader;
use crate::reload::{Etcd, Live};
use crate::upstream::{AttemptError, Failure, Upstreams};
use fds::{Backoff, FdBudget, Needs, Premade};
pub(crate) use listener::Listener;
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{Semaphore, oneshot, watch};
use workers::{Worker, Workers};

/// After the abort is raised, how long engines get to reset their
/// connections themselves before the process exits anyway (the sockets
/// already have SO_LINGER 0, so exiting resets them too).
const ABORT_GRACE: Duration = Duration::from_secs(2);

/// A start-up failure: printed, exit code 1.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{source_name}: cannot listen on {addr}: {err}{}", bind_hint(.err))]
    Bind {
        source_name: String,
        addr: SocketAddr,
        err: io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(io::Error),
    #[error("{0}")]
    Caps(String),
}

/// What a bind error most likely means, for the operator.
fn bind_hint(err: &io::Error) -> &'static str {
    if err.kind() == io::ErrorKind::PermissionDenied {
        " (ports below 1024 need CAP_NET_BIND_SERVICE, e.g. run as root or \
         `setcap cap_net_bind_service+ep`, or use a port ≥ 1024)"
    } else {
        ""
    }
}

/// How serving ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Every connection finished within the drain timeout (exit 0).
    Drained,
    /// The drain timeout expired; the connections left were reset (exit 0,
    /// as asked for by the operator's own timeout).
    TimedOut,
    /// A second SIGTERM/SIGINT cut the drain short; connections were reset
    /// (exit 1).
    Forced,
}

/// Bind every forward's listener, or fail naming the first that cannot be.
pub fn bind_all(settings: &Settings) -> Result<Vec<std::net::TcpListener>, StartError> {
    settings
        .forwards
        .iter()
        .map(|f| {
            bind(f.listen).map_err(|err| StartError::Bind {
                source_name: f.source.clone(),
                addr: f.listen,
                err,
            })
        })
        .collect()
}

pub(crate) fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // [::]:n and 0.0.0.0:n are separate forwards, as they are in the config.
        s.set_only_v6(true)?;
    }
    // Every accepted client inherits it (see `server/listener.rs`);
    // `handle` clears it again where `--nodelay` is off.
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Serve until SIGTERM/SIGINT and the drain. Runs on the calling thread.
pub fn run(
    settings: Settings,
    engine: Engine,
    listeners: Vec<std::net::TcpListener>,
) -> Result<Stop, StartError> {
    run_with(settings, engine, listeners, None, Feeds::none())
}

/// [`run`], with a way to reload the configuration on SIGHUP and when the
/// config file changes (see [`crate::reload`]), and the etcd watchers of
/// the forwards whose backends come from etcd (see [`crate::discovery`]).
pub fn run_with(
    settings: Settings,
    engine: Engine,
    listeners: Vec<std::net::TcpListener>,
    reloader: Option<Reloader>,
    feeds: Feeds,
) -> Result<Stop, StartError> {
    let workers = worker_count(&settings, &engine);
    let settings = Arc::new(settings);
    let uring = matches!(engine, Engine::Uring);
    let (abort_tx, abort_rx) = watch::channel(false);
    let start = Start {
        engine: Rc::new(engine),
        workers,
        abort: (abort_tx, abort_rx),
    };
    let serve = serve(settings, start, listeners, reloader, feeds);
    // When connections were cut, the runtime is not dropped: dropping it
    // would wait for (or cancel) every engine's pending operations, while
    // exiting lets the kernel close every socket at once, with the RST
    // that SO_LINGER 0 asks for.
    if uring {
        let rt = crate::engine::uring::runtime().map_err(StartError::Runtime)?;
        let stop = rt.block_on(serve);
        if !matches!(stop, Ok(Stop::Drained)) {
            std::mem::forget(rt);
        }
        stop
    } else {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        let local = tokio::task::LocalSet::new();
        let stop = local.block_on(&rt, serve);
        if !matches!(stop, Ok(Stop::Drained)) {
            std::mem::forget(local);
            std::mem::forget(rt);
        }
        stop
    }
}

/// The signal handlers, installed before `ready` so that a signal sent
/// right after it is never lost to a default action.
struct Signals {
    term: Signal,
    int: Signal,
    usr1: Signal,
    hup: Signal,
}

/// What a signal asks for.
enum Asked {
    Stop,
    Stats,
    Reload,
}

impl Signals {
    fn install() -> io::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            usr1: signal(SignalKind::user_defined1())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Asked {
        tokio::select! {
            _ = self.term.recv() => Asked::Stop,
            _ = self.int.recv() => Asked::Stop,
            _ = self.usr1.recv() => Asked::Stats,
            _ = self.hup.recv() => Asked::Reload,
        }
    }
}

/// How many workers: `--workers`, `auto` read from the CPUs we may use,
/// and 1 for the sockmap engine (said in the log, never silently).
fn worker_count(settings: &Settings, engine: &Engine) -> usize {
    let n = match settings.workers {
        crate::config::Workers::Auto => crate::cpus::available(),
        crate::config::Workers::Count(n) => n,
    };
    if n > 1 && matches!(engine, Engine::Sockmap(_)) {
        tracing::info!(
            asked = %settings.workers,
            "sockmap: 1 worker (its maps and per-connection state are single-threaded; \
             the uring and epoll engines run several)"
        );
        return 1;
    }
    n
}

/// What `serve` starts with besides the configuration.
struct Start {
    engine: Rc<Engine>,
    workers: usize,
    /// The abort signal (see [`Abort`]): raised by the server, seen by
    /// every worker.
    abort: (watch::Sender<bool>, watch::Receiver<bool>),
}

/// What the accept loops of the process share, on every worker.
pub(crate) struct Process {
    /// The last connection id given out.
    ids: AtomicU64,
    fds: Arc<FdBudget>,
    own: Arc<OwnUpstreams>,
}

/// The server's own view (worker 0's): the process's shared state and
/// every worker.
pub(crate) struct Shared {
    process: Arc<Process>,
    workers: Workers,
}

/// A forward's listening socket once per worker: registered with worker
/// 0's reactor, and duplicated (`dup(2)`: the same socket, one accept
/// queue) for each other worker to register with its own.
pub(crate) struct Listeners {
    first: Listener,
    others: Vec<std::net::TcpListener>,
}

/// Resolve once every accept loop of the forwards started so far has first
/// waited for a slot or a client (see [`Shared::accept`]).
pub(crate) type Up = Vec<oneshot::Receiver<()>>;

impl Shared {
    /// `listener` (bound, see [`bind`]) for every worker.
    pub fn listeners(&self, listener: std::net::TcpListener) -> io::Result<Listeners> {
        let others = (1..self.workers.len())
            .map(|_| listener.try_clone())
            .collect::<io::Result<_>>()?;
        Ok(Listeners {
            first: Listener::from_std(listener)?,
            others,
        })
    }

    /// Start the forward's accept loop on every worker; they stop when
    /// `stop` says so. The `--max-conns` semaphore is made here: one for
    /// all of them.
    pub fn accept(&self, listeners: Listeners, fwd: &Arc<Fwd>, stop: &watch::Receiver<bool>) -> Up {
        let max_conns = fwd.current().settings.max_conns;
        let slots = (max_conns > 0).then(|| Arc::new(Semaphore::new(max_conns)));
        let for_worker = || AcceptLoop {
            fwd: fwd.clone(),
            process: self.process.clone(),
            slots: slots.clone(),
            stop: stop.clone(),
        };
        let mut up = Vec::new();
        let (tx, rx) = oneshot::channel();
        let first = accept_loop(listeners.first, for_worker(), self.workers.local().clone());
        tokio::task::spawn_local(announced(first, tx));
        up.push(rx);
        for (i, listener) in listeners.others.into_iter().enumerate() {
            let (tx, rx) = oneshot::channel();
            let lp = for_worker();
            let sent = self.workers.send(
                i + 1,
                Box::new(
                    move |worker: &Rc<Worker>| match Listener::from_std(listener) {
                        Ok(l) => {
                            let each = accept_loop(l, lp, worker.clone());
                            tokio::task::spawn_local(announced(each, tx));
                        }
                        Err(e) => tracing::warn!(forward = %lp.fwd.origin.source, worker = i + 1,
                        error = %e, "cannot accept on this worker: the others accept for it"),
                    },
                ),
            );
            if sent {
                up.push(rx);
            }
        }
        up
    }
}

/// Run `inner`, and say so on `up` once it was first polled (for an accept
/// loop: once it waits for its first slot or client).
async fn announced(inner: impl Future<Output = ()>, up: oneshot::Sender<()>) {
    let mut inner = pin!(inner);
    let mut up = Some(up);
    std::future::poll_fn(|cx| {
        let polled = inner.as_mut().poll(cx);
        if let Some(up) = up.take() {
            let _ = up.send(());
        }
        polled
    })
    .await
}

async fn serve(
    settings: Arc<Settings>,
    start: Start,
    listeners: Vec<std::net::TcpListener>,
    reloader: Option<Reloader>,
    feeds: Feeds,
) -> Result<Stop, StartError> {
    let Start {
        engine,
        workers,
        abort: (abort_tx, abort_rx),
    } = start;
    Abort::install_rx(abort_rx.clone());
    let mut signals = Signals::install().map_err(StartError::Runtime)?;
    // Before the workers start: threads inherit the capability sets.
    match crate::caps::drop_all() {
        Ok(crate::caps::Dropped(Some(held))) => tracing::info!(was = %held, "capabilities dropped"),
        Ok(crate::caps::Dropped(None)) => {}
        Err(e) => return Err(StartError::Caps(e)),
    }
    let workers = Workers::start(workers, engine.clone(), abort_rx).map_err(StartError::Runtime)?;
    let shared = Rc::new(Shared {
        process: Arc::new(Process {
            ids: AtomicU64::new(0),
            fds: FdBudget::new().map_err(StartError::Runtime)?,
            own: Arc::default(),
        }),
        workers,
    });
    // The running forwards; a reload adds, removes and changes them.
    let Feeds {
        starter,
        rx: mut discovered,
        mut started,
    } = feeds;
    let mut live = Live::new(settings.clone(), shared.clone(), starter);
    let mut up = Up::new();
    for (forward, listener) in settings.forwards.iter().zip(listeners) {
        let listeners = shared.listeners(listener).map_err(StartError::Runtime)?;
        let etcd = started.remove(&forward.listen).map(Etcd::new);
        up.extend(live.start(forward.clone(), listeners, etcd));
    }
    // Every worker accepts before `ready` (a worker that is gone says so
    // by dropping its sender).
    for u in up {
        let _ = u.await;
    }
    let mut changes = reloader.as_ref().and_then(Reloader::watch);
    crate::exporter::on_ready(engine.clone());
    tracing::info!(forwards = settings.forwards.len(), engine = %engine.name(),
        workers = shared.workers.len(), "ready");

    loop {
        tokio::select! {
            asked = signals.next() => match asked {
                Asked::Stop => break,
                Asked::Stats => AllStats(live.all_stats(), &shared.workers).log(&engine),
                Asked::Reload => live.reload(reloader.as_ref(), "SIGHUP"),
            },
            () = crate::reload::changed(&mut changes) => {
                live.reload(reloader.as_ref(), "config file changed")
            }
            Some(update) = discovered.recv() => live.discovered(update),
        }
    }
    live.stop_all();
    crate::exporter::global().set_draining();
    let all_stats = AllStats(live.all_stats(), &shared.workers);
    let stop = drain(&live.settings(), &engine, &all_stats, &mut signals).await;
    if stop != Stop::Drained {
        // Every worker's, before the abort: a forced stop exits at once.
        shared.workers.reset_all_live();
        let _ = abort_tx.send(true);
        if stop == Stop::TimedOut {
            // Let the engines reset their connections (bounded: the
            // process exits anyway, and the exit resets what is left).
            let _ = tokio::time::timeout(ABORT_GRACE, all_stats.idle()).await;
        }
    }
    all_stats.log(&engine);
    tracing::info!("stopped");
    Ok(stop)
}

/// Every forward's counters, for the drain and the `stats` lines, and the
/// workers' (one `workers` line).
struct AllStats<'a>(Vec<(String, Arc<ForwardStats>)>, &'a Workers);

impl AllStats<'_> {
    fn active(&self) -> u64 {
        self.0
            .iter()
            .map(|(_, s)| s.conns_active.load(Relaxed))
            .sum()
    }

    /// Resolves once no connection is live.
    async fn idle(&self) {
        while self.active() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn log(&self, engine: &Engine) {
        engine.refresh_stats();
        self.1.log();
        for (source, s) in &self.0 {
            s.log(source);
        }
    }
}

/// The accept loops have stopped: wait for the live connections to finish,
/// up to the drain timeout or a second stop signal, and say which it was.
async fn drain(
    settings: &Settings,
    engine: &Engine,
    all_stats: &AllStats<'_>,
    signals: &mut Signals,
) -> Stop {
    let active = all_stats.active();
    tracing::info!(active, drain_timeout = ?settings.drain_timeout, "draining");
    let drained = all_stats.idle();
    let timeout = tokio::time::sleep(settings.drain_timeout);
    tokio::pin!(drained, timeout);
    let stop = loop {
        tokio::select! {
            () = &mut drained => break Stop::Drained,
            () = &mut timeout => break Stop::TimedOut,
            asked = signals.next() => match asked {
                Asked::Stop => break Stop::Forced,
                Asked::Stats => all_stats.log(engine),
                Asked::Reload => reload(),
            },
        }
    };
    let active = all_stats.active();
    match stop {
        Stop::Drained => {}
        Stop::TimedOut => {
            tracing::warn!(
                active,
                "drain timeout: closing live connections with a reset"
            );
        }
        Stop::Forced => tracing::warn!(
            active,
            "second stop signal: resetting live connections and exiting now (exit code 1)"
        ),
    }
    stop
}

/// SIGHUP during the drain: the forwards are stopping, nothing to reload.
fn reload() {
    tracing::info!("reload requested while draining: ignored");
}

/// What an accept loop uses for each new connection: the forward's
/// backends and the settings. A reload replaces it; connections already
/// running keep what they started with.
pub(crate) struct Current {
    pub upstreams: Arc<Upstreams>,
    pub settings: Arc<Settings>,
}

/// One forward, as its accept loop and connections (on every worker) see
/// it.
pub(crate) struct Fwd {
    pub origin: Origin,
    pub current: Mutex<Current>,
}

impl Fwd {
    /// The backends and settings for the next client.
    pub fn current(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What one worker's accept loop for a forward needs besides its
/// listener.
struct AcceptLoop {
    fwd: Arc<Fwd>,
    process: Arc<Process>,
    /// The forward's `--max-conns` slots, shared by every worker's loop.
    slots: Option<Arc<Semaphore>>,
    stop: watch::Receiver<bool>,
}

/// The forward's accept loop on `worker`. Its first upstream socket (see
/// `server/fds.rs`) is made before this returns, so the descriptors the
/// process holds once `ready` is logged include it.
fn accept_loop(listener: Listener, lp: AcceptLoop, worker: Rc<Worker>) -> impl Future<Output = ()> {
    let mut premade = Premade::default();
    premade.fill(Needs::of(&lp.fwd.current().upstreams));
    accepting(listener, lp, worker, premade)
}

async fn accepting(listener: Listener, lp: AcceptLoop, worker: Rc<Worker>, mut premade: Premade) {
    let AcceptLoop {
        fwd,
        process,
        slots,
        mut stop,
    } = lp;
    let source = fwd.origin.source.clone();
    let mut backoff = Backoff::new();
    loop {
        // Wait for a free slot before accepting: a full forward leaves new
        // clients in the kernel's backlog.
        let permit = match &slots {
            Some(s) => tokio::select! {
                p = s.clone().acquire_owned() => Some(p.expect("semaphore never closed")),
                _ = stop.changed() => break,
            },
            None => None,
        };
        let needs = Needs::of(&fwd.current().upstreams);
        let room = Room {
            budget: &process.fds,
            needs,
            premade: &mut premade,
        };
        let accepted = next_client(&listener, room, &source, &mut backoff, &mut stop).await;
        let Some((client, client_addr)) = accepted else {
            break;
        };
        backoff.reset();
        process.fds.accepted(&source);
        if is_own_connection(&process.own, &client, client_addr, &source) {
            crate::engine::set_reset_on_close(&client);
            continue;
        }
        let made = premade.take();
        let id = process.ids.fetch_add(1, Relaxed) + 1;
        let (fwd, own, worker) = (fwd.clone(), process.own.clone(), worker.clone());
        let (upstreams, settings) = {
            let c = fwd.current();
            (c.upstreams.clone(), c.settings.clone())
        };
        let active = ActiveGuard::new(fwd.origin.stats.clone());
        tokio::task::spawn_local(async move {
            let counted = worker.count();
            let conf = (&upstreams, settings);
            handle(id, client, client_addr, &fwd, conf, (&own, &worker), made).await;
            // The connection's sockets and buffers are freed: first the
            // worker's count (which may give memory back), then the
            // forward's active count and the --max-conns slot.
            drop(counted);
            drop((active, permit));
        });
    }
    tracing::debug!(forward = %source, "stopped accepting");
}

/// How the accept loop makes sure of a descriptor for the next client's
/// upstream socket (see `server/fds.rs`).
struct Room<'a> {
    budget: &'a FdBudget,
    needs: Needs,
    /// The next connection's upstream socket(s), once made.
    premade: &'a mut Premade,
}

impl Room<'_> {
    /// Is there room for one more connection? This makes the upstream
    /// socket(s) now.
    fn for_one(&mut self) -> bool {
        match self.premade.fill(self.needs) {
            fds::Fill::Made => true,
            fds::Fill::Exhausted => false,
            fds::Fill::Unmade => self.budget.room_for_one(),
        }
    }
}

/// The next client of `listener`, accepted only when there are descriptors
/// for it and its upstream socket (see `server/fds.rs`); `None` once the
/// drain starts.
async fn next_client(
    listener: &Listener,
    mut room: Room<'_>,
    source: &str,
    backoff: &mut Backoff,
    stop: &mut watch::Receiver<bool>,
) -> Option<(std::net::TcpStream, SocketAddr)> {
    loop {
        // The upstream socket is made right before each accept attempt
        // (inside the same poll), on this thread: nothing can take the
        // room it needs.
        let attempt = std::future::poll_fn(|cx| {
            if !room.for_one() {
                return Poll::Ready(Err(None));
            }
            listener.poll_accept(cx).map_err(Some)
        });
        let result = tokio::select! {
            r = attempt => r,
            _ = stop.changed() => return None,
        };
        let wait = match result {
            Ok(c) => return Some(c),
            Err(None) => {
                room.budget.exhausted(
                    source,
                    "no descriptors left for a client and its upstream socket",
                );
                backoff.next()
            }
            Err(Some(e)) if fds::is_fd_exhaustion(&e) => {
                room.budget.exhausted(source, &format!("accept: {e}"));
                backoff.next()
            }
            Err(Some(e)) => {
                // ENOBUFS, ENOMEM, ...: back off instead of spinning.
                tracing::warn!(forward = %source, error = %e, "accept failed");
                Duration::from_millis(100)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return None,
        }
    }
}

/// Is this accepted client one of our own upstream sockets (a loop)?
fn is_own_connection(
    own: &OwnUpstreams,
    client: &std::net::TcpStream,
    client_addr: SocketAddr,
    source: &str,
) -> bool {
    if !own.may_be_own(client_addr) {
        return false;
    }
    match client.local_addr() {
        Ok(local) => own.is_own(client_addr, local, source),
        Err(_) => false,
    }
}

async fn handle(
    id: u64,
    client: std::net::TcpStream,
    client_addr: SocketAddr,
    fwd: &Fwd,
    (upstreams, settings): (&Arc<Upstreams>, Arc<Settings>),
    (own, worker): (&Arc<OwnUpstreams>, &Worker),
    premade: Premade,
) {
    let (source, stats) = (&fwd.origin.source, &fwd.origin.stats);
    let settings = &settings;
    // Pick a backend and connect (retrying the next healthy one); the lease
    // counts this connection against its backend until it ends. The
    // premade socket goes to the first attempt.
    let premade = Rc::new(RefCell::new(Some(premade)));
    let attempt = |target: crate::config::Target| {
        let (own, origin, premade) = (own.clone(), fwd.origin.clone(), premade.clone());
        async move {
            connect(&target, &own, &origin, &premade)
                .await
                .map_err(|(e, looped)| match looped {
                    true => AttemptError::Stop(e),
                    false => AttemptError::Failed(e),
                })
        }
    };
    // Boxed: what connecting needs is freed once connected, instead of
    // staying in the connection's task for its whole life.
    // (Matched at once: a named result would keep its 120 bytes in the
    // task for the connection's life.)
    let connecting = upstreams.connect_with(id, client_addr, settings.connect_timeout, attempt);
    let ((upstream, upstream_addr, registration), _lease) = match Box::pin(connecting).await {
        Ok(c) => c,
        // The attempt came back to us: already reported as a loop.
        Err(Failure::Looped) => return,
        Err(failure) => {
            ForwardStats::add(&stats.errors, 1);
            failure.log(id, source, client_addr, upstreams);
            return;
        }
    };
    if Abort::current().is_raised() {
        // Connected after the server gave up on live connections.
        crate::engine::set_reset_on_close(&client);
        crate::engine::set_reset_on_close(&upstream);
        return;
    }
    // The client has TCP_NODELAY from the listener (see `bind`).
    if settings.nodelay {
        let _ = upstream.set_nodelay(true);
    } else {
        let _ = client.set_nodelay(false);
    }
    tracing::debug!(id, forward = %source, client = %client_addr, upstream = %upstream_addr, "connection open");
    let fds = [client.as_raw_fd(), upstream.as_raw_fd()];
    let conn = Conn {
        id,
        forward: source.clone(),
        client: client.into(),
        // Still registered with this worker's reactor, where it connected.
        upstream: upstream.into(),
        client_addr,
        upstream_addr,
        stats: stats.clone(),
        settings: settings.clone(),
    };
    worker.relaying(id, fds);
    let result = worker.engine.relay(conn).await;
    worker.relayed(id);
    let looped = registration.looped();
    if !looped {
        // A connection got through: a loop episode on this forward is over.
        fwd.origin.episode.store(false, Relaxed);
    }
    match result {
        Ok(()) => {
            tracing::debug!(id, forward = %source, client = %client_addr, upstream = %upstream_addr, "connection closed")
        }
        Err(e) if looped => {
            tracing::debug!(id, forward = %source, error = %e, "looped connection closed");
        }
        Err(e) => {
            ForwardStats::add(&stats.errors, 1);
            tracing::warn!(id, forward = %source, client = %client_addr, upstream = %upstream_addr, error = %e, "connection error");
        }
    }
}

/// Connect to the target, resolving a hostname now (so a moved name needs
/// no restart) and trying each address in turn. Returns the address that
/// answered and the socket's loop-check registration. An error says
/// whether the attempt came back to us (then it is already reported).
async fn connect(
    target: &crate::config::Target,
    own: &Arc<OwnUpstreams>,
    origin: &Origin,
    premade: &RefCell<Option<Premade>>,
) -> Result<(TcpStream, SocketAddr, Registration), (io::Error, bool)> {
    let addrs: Vec<SocketAddr> = match &target.host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, target.port)],
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), target.port))
            .await
            .map_err(|e| {
                let e = io::Error::new(e.kind(), format!("resolving {name}: {e}"));
                (e, false)
            })?
            .collect(),
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, "name resolved to no address");
    for addr in addrs {
        match connect_one(addr, own, origin, premade).await {
            Ok((s, reg)) => return Ok((s, addr, reg)),
            Err((e, true)) => return Err((e, true)),
            Err((e, false)) => last = io::Error::new(e.kind(), format!("{addr}: {e}")),
        }
    }
    Err((last, false))
}

/// One non-blocking `connect(2)`. The socket is registered for the loop
/// check with the table locked across the call, so an accept loop (on any
/// worker's thread) cannot check a client before its record is in
/// (see [`OwnUpstreams::connect_registered`]). The first attempt uses the
/// socket the accept loop made (when its family fits).
async fn connect_one(
    addr: SocketAddr,
    own: &Arc<OwnUpstreams>,
    origin: &Origin,
    premade: &RefCell<Option<Premade>>,
) -> Result<(TcpStream, Registration), (io::Error, bool)> {
    let plain = |e: io::Error| (e, false);
    let domain = socket2::Domain::for_address(addr);
    // The first attempt takes the premade socket of its family (the other
    // one, if any, is closed); a later attempt, or a family none was made
    // for, makes its own.
    let made = premade.borrow_mut().take();
    let sock = match made.and_then(|p| p.into_socket(domain)) {
        Some(sock) => sock,
        None => fds::socket(domain).map_err(plain)?,
    };
    let registration = own
        .connect_registered(addr, origin.clone(), || {
            match sock.connect(&addr.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e),
            }
            sock.local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("upstream socket has no IP address"))
        })
        .map_err(plain)?;
    let stream = TcpStream::from_std(sock.into()).map_err(plain)?;
    let looped = |e| {
        let looped = registration.looped();
        (e, looped)
    };
    stream.writable().await.map_err(looped)?;
    if let Some(e) = stream.take_error().map_err(looped)? {
        return Err(looped(e));
    }
    Ok((stream, registration))
}
