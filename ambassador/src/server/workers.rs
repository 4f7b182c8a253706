//! Worker threads: `--workers N` event loops serving connections at once.
//!
//! Each worker is one thread with its own single-threaded runtime (tokio
//! with a `LocalSet`, or tokio-uring with its own ring for the uring
//! engine), so the engines stay exactly as they are: every connection lives
//! and dies on one thread, with no locks on its path.
//!
//! **Every worker accepts.** A forward's listening socket is one socket
//! with one accept queue; each worker registers its own duplicate of the
//! descriptor (`dup(2)`) with its own reactor and runs the forward's accept
//! loop, so a client is accepted, connected upstream and relayed by one
//! thread, with no hand-over between threads. (Before: worker 0 accepted
//! for all and sent each client to the next worker over a channel, which
//! cost an `eventfd` wake-up and an `epoll_wait` of the receiving worker
//! per connection; see docs/benchmarks.md.) We chose one shared queue over
//! SO_REUSEPORT (one socket and queue per worker): a queue per worker makes
//! a client hashed to a busy worker wait while another worker is idle, can
//! keep a `--max-conns` slot waiting on an empty queue while a client waits
//! in another, and lets a second process that binds the port with
//! SO_REUSEPORT take a share of the clients instead of failing with
//! EADDRINUSE. One queue keeps these exact:
//!
//! - `--max-conns` is one semaphore per forward (tokio's, first come first
//!   served), taken before the accept by whichever worker's loop is next,
//!   so the limit is global and a waiting client is the next one admitted;
//! - clients are accepted in connect order.
//!
//! The descriptor budget (`server/fds.rs`) needs no lock between the
//! workers: each accept loop makes the sockets a connection needs before
//! it accepts.
//!
//! Every worker's reactor is told of each new client; the ones that lose
//! the race see EAGAIN and wait again (with two workers, at most one empty
//! `accept4` per client, and none while the workers are busy, when the
//! readiness is only noted).
//!
//! What crosses threads is a [`Job`] (a closure) on a worker's unbounded
//! channel: once per forward and worker, to start that worker's accept
//! loop. Everything a job carries is `Send`: the listener's duplicate,
//! `Arc`s of the forward's state (backends and health behind one mutex,
//! counters as atomics, the loop-check table).
//!
//! The sockmap engine runs one worker: its engine state (the maps and the
//! per-connection bookkeeping) is single-threaded; the server logs that at
//! start-up.
//!
//! Drain and abort: every worker installs a receiver of the one abort
//! signal ([`crate::engine::Abort`]), which its engine watches; and before
//! raising it the server itself sets SO_LINGER 0 on the sockets of every
//! worker's live connections ([`Workers::reset_all_live`]), so that when a
//! forced stop exits at once, every stream is cut with a reset whichever
//! worker it was on. Each worker's table of live sockets sits behind a
//! mutex for this: taken twice per connection by its own worker (never
//! contended but at that moment), and an entry is removed before its
//! sockets can close, so no socket can close while the server walks it.
//!
//! Every worker keeps one timer pending ([`tick`]), so that arming a
//! connection's connect timeout never has to wake its own reactor.

use crate::engine::{Abort, Engine};
use std::collections::HashMap;
use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How often a worker's runtime wakes with nothing to do (see [`tick`]).
const TICK: Duration = Duration::from_secs(1);

/// Keep one timer pending on this thread's runtime, always due within
/// [`TICK`]. tokio's time driver wakes its reactor (an `eventfd` write, then
/// one more event for the next `epoll_wait`) whenever a timer is armed
/// earlier than the driver's next planned wake-up; with no timer pending,
/// that is every timer, so every connection's connect timeout cost that
/// wake-up. With the tick pending, a connect timeout of `TICK` or more is
/// never the earliest timer and arming it wakes nothing (a shorter one
/// still does, as before). Cost: one wake-up per second per idle worker.
fn tick() {
    tokio::task::spawn_local(async {
        let mut every = tokio::time::interval(TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
        }
    });
}

/// What worker 0 sends another worker: run this on your thread.
pub(crate) type Job = Box<dyn FnOnce(&Rc<Worker>) + Send>;

/// One worker, as its own thread sees it.
pub(crate) struct Worker {
    pub engine: Rc<Engine>,
    live: Arc<Live>,
    counts: Arc<Counts>,
}

/// The sockets of every connection a worker's engine is relaying, by id:
/// see [`Workers::reset_all_live`].
#[derive(Default)]
pub(crate) struct Live(Mutex<HashMap<u64, [RawFd; 2]>>);

impl Live {
    fn table(&self) -> MutexGuard<'_, HashMap<u64, [RawFd; 2]>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Set SO_LINGER 0 on both sockets of every connection in the table,
    /// so that however they are closed (by the engine, or by the process
    /// exiting) the peers see RST.
    fn reset_all(&self) {
        for fds in self.table().values() {
            for &fd in fds {
                // Safety: an entry is in the table only while its engine's
                // `relay` runs (it is removed, under this lock, after
                // `relay` returns), and every engine keeps both sockets open
                // until `relay` returns; the lock is held for this loop.
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                crate::engine::set_reset_on_close(&fd);
            }
        }
    }
}

/// One worker's connection counters (read by the stats line).
#[derive(Default)]
pub(crate) struct Counts {
    pub conns_total: AtomicU64,
    pub conns_active: AtomicU64,
}

/// Marks a connection active on its worker for as long as it lives. Its
/// drop may give freed memory back to the kernel ([`super::memory`]): drop
/// it once the connection's memory is freed, and before the forward stops
/// counting the connection active, so that `conns_active=0` in a `stats`
/// line means that every trim it asked for is done.
pub(crate) struct Counted(Arc<Counts>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.conns_active.fetch_sub(1, Relaxed);
        super::memory::closed();
    }
}

impl Worker {
    fn new(engine: Rc<Engine>, live: Arc<Live>, counts: Arc<Counts>) -> Rc<Worker> {
        Rc::new(Worker {
            engine,
            live,
            counts,
        })
    }

    /// Connection `id`'s sockets are live on this worker's engine (until
    /// [`Worker::relayed`]).
    pub fn relaying(&self, id: u64, fds: [RawFd; 2]) {
        self.live.table().insert(id, fds);
    }

    /// Connection `id`'s `relay` returned: call it before its sockets
    /// close.
    pub fn relayed(&self, id: u64) {
        self.live.table().remove(&id);
    }

    /// Count a connection on this worker until the guard is dropped.
    pub fn count(&self) -> Counted {
        self.counts.conns_total.fetch_add(1, Relaxed);
        self.counts.conns_active.fetch_add(1, Relaxed);
        super::memory::opened();
        Counted(self.counts.clone())
    }
}

/// Worker 0's handle on every worker.
pub(crate) struct Workers {
    /// Worker 0: the server's own thread.
    local: Rc<Worker>,
    /// Workers 1..: their job channels.
    remote: Vec<mpsc::UnboundedSender<Job>>,
    /// Every worker's counters, worker 0 first.
    counts: Vec<Arc<Counts>>,
    /// Every worker's live sockets, worker 0 first.
    live: Vec<Arc<Live>>,
}

impl Workers {
    /// Worker 0 on this thread with `engine`, and `n - 1` more threads
    /// with their own runtime (uring or epoll, like `engine`). Call it
    /// after the capabilities are dropped: threads inherit the sets.
    pub fn start(n: usize, engine: Rc<Engine>, abort: watch::Receiver<bool>) -> io::Result<Self> {
        let uring = matches!(*engine, Engine::Uring);
        let counts: Vec<Arc<Counts>> = (0..n.max(1)).map(|_| Arc::default()).collect();
        let live: Vec<Arc<Live>> = (0..n.max(1)).map(|_| Arc::default()).collect();
        tick();
        let mut remote = Vec::new();
        for i in 1..counts.len() {
            let state = (live[i].clone(), counts[i].clone());
            remote.push(spawn(i, uring, state, abort.clone())?);
        }
        Ok(Workers {
            local: Worker::new(engine, live[0].clone(), counts[0].clone()),
            remote,
            counts,
            live,
        })
    }

    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// Worker 0 (this thread's).
    pub fn local(&self) -> &Rc<Worker> {
        &self.local
    }

    /// Run `job` on worker `index` (1..): false if that worker is gone,
    /// which only happens when its thread panicked.
    pub fn send(&self, index: usize, job: Job) -> bool {
        self.remote[index - 1].send(job).is_ok()
    }

    /// Set SO_LINGER 0 on both sockets of every live connection of every
    /// worker (see the module doc), before the abort is raised.
    pub fn reset_all_live(&self) {
        for live in &self.live {
            live.reset_all();
        }
    }

    /// Log one `workers` line: connections served and live per worker.
    pub fn log(&self) {
        let list = |f: fn(&Counts) -> u64| {
            let v: Vec<String> = self.counts.iter().map(|c| f(c).to_string()).collect();
            v.join(",")
        };
        tracing::info!(
            workers = self.len(),
            worker_conns = %list(|c| c.conns_total.load(Relaxed)),
            worker_active = %list(|c| c.conns_active.load(Relaxed)),
            "workers"
        );
    }
}

/// Start worker `index`'s thread; its runtime is up when this returns.
fn spawn(
    index: usize,
    uring: bool,
    state: (Arc<Live>, Arc<Counts>),
    abort: watch::Receiver<bool>,
) -> io::Result<mpsc::UnboundedSender<Job>> {
    let (tx, rx) = mpsc::unbounded_channel::<Job>();
    let (up_tx, up_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    std::thread::Builder::new()
        .name(format!("ambassador-w{index}"))
        .spawn(move || run(uring, state, abort, rx, up_tx))?;
    up_rx
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other(format!("worker {index} did not start"))))?;
    Ok(tx)
}

/// A worker thread: its runtime, then jobs until the server is gone.
fn run(
    uring: bool,
    (live, counts): (Arc<Live>, Arc<Counts>),
    abort: watch::Receiver<bool>,
    jobs: mpsc::UnboundedReceiver<Job>,
    up: std::sync::mpsc::Sender<io::Result<()>>,
) {
    let engine = Rc::new(if uring { Engine::Uring } else { Engine::Epoll });
    let body = serve(Worker::new(engine, live, counts), abort, jobs);
    if uring {
        match crate::engine::uring::runtime() {
            Ok(rt) => {
                let _ = up.send(Ok(()));
                rt.block_on(body);
            }
            Err(e) => {
                let _ = up.send(Err(e));
            }
        }
    } else {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        match rt {
            Ok(rt) => {
                let _ = up.send(Ok(()));
                tokio::task::LocalSet::new().block_on(&rt, body);
            }
            Err(e) => {
                let _ = up.send(Err(e));
            }
        }
    }
}

async fn serve(
    worker: Rc<Worker>,
    abort: watch::Receiver<bool>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
) {
    Abort::install_rx(abort);
    tick();
    while let Some(job) = jobs.recv().await {
        job(&worker);
    }
    // The server is done. After a drain nothing is live; after an abort the
    // process is about to exit, and that closes every socket with the RST
    // already asked for: never tear the runtime down under them.
    if Abort::current().is_raised() {
        std::future::pending::<()>().await;
    }
}
