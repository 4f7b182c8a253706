//! Worker threads: `--workers N` event loops serving connections at once.
//!
//! Each worker is one thread with its own single-threaded runtime (tokio
//! with a `LocalSet`, or tokio-uring with its own ring for the uring
//! engine), so the engines stay exactly as they are: every connection lives
//! and dies on one thread, with no locks on its path.
//!
//! **Accepting stays on the first worker** (the thread that runs the
//! server), which hands each accepted client round-robin to a worker; that
//! worker connects upstream and relays. We measured nothing yet that says
//! an accept loop per worker on SO_REUSEPORT listeners would be faster on
//! two CPUs, and one accept loop keeps three things exact that SO_REUSEPORT
//! would break (each listener has its own accept queue, and a client hashed
//! to a busy worker's queue waits even while another worker is idle):
//!
//! - `--max-conns` is one semaphore per forward, taken before the accept,
//!   so the limit is global and a waiting client is the next one admitted;
//! - the descriptor budget (`server/fds.rs`) checks and accepts on one
//!   thread, so it stays exact;
//! - clients are accepted in connect order.
//!
//! The hand-over is a `Job` (a closure that spawns the connection's task)
//! on the worker's unbounded channel: one wake-up of the worker's runtime
//! per connection. Everything a job carries is `Send`: the std sockets,
//! `Arc`s of the forward's state (backends and health behind one mutex,
//! counters as atomics, the loop-check table).
//!
//! The sockmap engine runs one worker: its engine state (the maps and the
//! per-connection bookkeeping) is single-threaded; the server logs that at
//! start-up.
//!
//! Drain and abort need nothing per worker but this: every worker installs
//! a receiver of the one abort signal ([`crate::engine::Abort`]) and, when
//! it is raised, sets SO_LINGER 0 on the sockets of its own live
//! connections (its table is its own, so no socket can close under it).

use crate::engine::{Abort, Engine};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::sync::{mpsc, watch};

/// What the accept side sends a worker: run this on your thread.
pub(crate) type Job = Box<dyn FnOnce(&Rc<Worker>) + Send>;

/// One worker, as its own thread sees it.
pub(crate) struct Worker {
    pub engine: Rc<Engine>,
    /// The sockets of every connection this worker's engine is relaying,
    /// by id: see [`Worker::reset_all_live`].
    pub live: RefCell<HashMap<u64, [RawFd; 2]>>,
    counts: Arc<Counts>,
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
    fn new(engine: Rc<Engine>, counts: Arc<Counts>) -> Rc<Worker> {
        Rc::new(Worker {
            engine,
            live: RefCell::default(),
            counts,
        })
    }

    /// Count a connection on this worker until the guard is dropped.
    pub fn count(&self) -> Counted {
        self.counts.conns_total.fetch_add(1, Relaxed);
        self.counts.conns_active.fetch_add(1, Relaxed);
        super::memory::opened();
        Counted(self.counts.clone())
    }

    /// Set SO_LINGER 0 on both sockets of every live connection of this
    /// worker, so that however they are closed (by the engine, or by the
    /// process exiting) the peers see RST.
    pub fn reset_all_live(&self) {
        for fds in self.live.borrow().values() {
            for &fd in fds {
                // Safety: an entry lives only while its engine's `relay`
                // runs, and every engine keeps both sockets open until
                // `relay` returns; this worker's runtime is single-threaded
                // and the table is its own, so no socket of it can close
                // while this loop runs.
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                crate::engine::set_reset_on_close(&fd);
            }
        }
    }
}

/// The accept side's handle on every worker.
pub(crate) struct Workers {
    /// Worker 0: the server's own thread.
    local: Rc<Worker>,
    /// Workers 1..: their job channels.
    remote: Vec<mpsc::UnboundedSender<Job>>,
    next: Cell<usize>,
    /// Every worker's counters, worker 0 first.
    counts: Vec<Arc<Counts>>,
}

impl Workers {
    /// Worker 0 on this thread with `engine`, and `n - 1` more threads
    /// with their own runtime (uring or epoll, like `engine`). Call it
    /// after the capabilities are dropped: threads inherit the sets.
    pub fn start(n: usize, engine: Rc<Engine>, abort: watch::Receiver<bool>) -> io::Result<Self> {
        let uring = matches!(*engine, Engine::Uring);
        let counts: Vec<Arc<Counts>> = (0..n.max(1)).map(|_| Arc::default()).collect();
        let mut remote = Vec::new();
        for (i, c) in counts.iter().enumerate().skip(1) {
            remote.push(spawn(i, uring, c.clone(), abort.clone())?);
        }
        Ok(Workers {
            local: Worker::new(engine, counts[0].clone()),
            remote,
            next: Cell::new(0),
            counts,
        })
    }

    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// Worker 0 (this thread's).
    pub fn local(&self) -> &Rc<Worker> {
        &self.local
    }

    /// Run `job` on the next worker, round-robin (on this one if that
    /// worker is gone, which only happens when its thread panicked).
    pub fn dispatch(&self, job: impl FnOnce(&Rc<Worker>) + Send + 'static) {
        let i = self.next.get();
        self.next.set((i + 1) % self.len());
        if i == 0 {
            return job(&self.local);
        }
        if let Err(mpsc::error::SendError(job)) = self.remote[i - 1].send(Box::new(job)) {
            job(&self.local);
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
    counts: Arc<Counts>,
    abort: watch::Receiver<bool>,
) -> io::Result<mpsc::UnboundedSender<Job>> {
    let (tx, rx) = mpsc::unbounded_channel::<Job>();
    let (up_tx, up_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    std::thread::Builder::new()
        .name(format!("ambassador-w{index}"))
        .spawn(move || run(uring, counts, abort, rx, up_tx))?;
    up_rx
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other(format!("worker {index} did not start"))))?;
    Ok(tx)
}

/// A worker thread: its runtime, then jobs until the server is gone.
fn run(
    uring: bool,
    counts: Arc<Counts>,
    abort: watch::Receiver<bool>,
    jobs: mpsc::UnboundedReceiver<Job>,
    up: std::sync::mpsc::Sender<io::Result<()>>,
) {
    let engine = Rc::new(if uring { Engine::Uring } else { Engine::Epoll });
    let body = serve(Worker::new(engine, counts), abort, jobs);
    if uring {
        match tokio_uring::Runtime::new(&tokio_uring::builder()) {
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
    let w = worker.clone();
    tokio::task::spawn_local(async move {
        Abort::current().raised().await;
        w.reset_all_live();
    });
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
