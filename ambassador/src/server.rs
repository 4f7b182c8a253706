//! The part of a proxy that is the same for every engine: listeners, the
//! accept loops, connecting upstream, signals and the drain on shutdown.
//!
//! Start-up is all or nothing: every listener is bound before the first
//! connection is accepted, and if one cannot be bound the process exits
//! naming it. Then one accept loop per forward runs on a single-threaded
//! runtime (tokio, or tokio-uring for the uring engine):
//!
//! 1. take a slot from the forward's `--max-conns` semaphore (when the
//!    forward is full we stop calling accept, so new clients wait in the
//!    kernel's backlog instead of being accepted and reset);
//! 2. accept, then connect to a backend (see [`crate::upstream`]: balancing,
//!    retrying the next healthy backend, passive and active health; a
//!    hostname is resolved again for every connection) within
//!    `--connect-timeout`; if no backend answers the client is closed at
//!    once and one warning names both addresses;
//! 3. set TCP_NODELAY on both sockets and hand them to the engine.
//!
//! SIGTERM or SIGINT stops the accept loops, lets live connections finish
//! for up to `--drain-timeout`, logs the counters and returns. SIGUSR1 logs
//! the counters. SIGHUP (and a change of the `--config` file) reloads the
//! forwards without dropping a connection: see [`crate::reload`].

use crate::config::Settings;
use crate::engine::{Conn, Engine};
use crate::metrics::{ActiveGuard, ForwardStats};
use crate::reload::Live;
pub use crate::reload::Reloader;
use crate::upstream::Upstreams;
use std::cell::Cell;
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Semaphore, watch};

/// A start-up failure: printed, exit code 1.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{source_name}: cannot listen on {addr}: {err}")]
    Bind {
        source_name: String,
        addr: SocketAddr,
        err: io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(io::Error),
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
) -> Result<(), StartError> {
    run_with(settings, engine, listeners, None)
}

/// [`run`], with a way to reload the configuration on SIGHUP and when the
/// config file changes (see [`crate::reload`]).
pub fn run_with(
    settings: Settings,
    engine: Engine,
    listeners: Vec<std::net::TcpListener>,
    reloader: Option<Reloader>,
) -> Result<(), StartError> {
    let settings = Rc::new(settings);
    let uring = matches!(engine, Engine::Uring);
    let serve = serve(settings, Rc::new(engine), listeners, reloader);
    if uring {
        let rt = tokio_uring::Runtime::new(&tokio_uring::builder()).map_err(StartError::Runtime)?;
        rt.block_on(serve)
    } else {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, serve)
    }
}

async fn serve(
    settings: Rc<Settings>,
    engine: Rc<Engine>,
    listeners: Vec<std::net::TcpListener>,
    reloader: Option<Reloader>,
) -> Result<(), StartError> {
    let ids = Rc::new(Cell::new(0u64));
    // The running forwards; a reload adds, removes and changes them.
    let mut live = Live::new(settings.clone(), engine.clone(), ids);
    for (forward, listener) in settings.forwards.iter().zip(listeners) {
        let listener = TcpListener::from_std(listener).map_err(StartError::Runtime)?;
        live.start(forward.clone(), listener);
    }
    let mut changes = reloader.as_ref().and_then(Reloader::watch);
    // Before `ready`: a SIGHUP right after it must reload, not kill.
    let mut hup = signal(SignalKind::hangup()).map_err(StartError::Runtime)?;
    crate::caps::drop_all();
    crate::exporter::on_ready(engine.clone());
    tracing::info!(forwards = settings.forwards.len(), engine = %engine.name(), "ready");

    let mut term = signal(SignalKind::terminate()).map_err(StartError::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartError::Runtime)?;
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(StartError::Runtime)?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = usr1.recv() => {
                engine.refresh_stats();
                log_stats(&live.all_stats());
            }
            _ = hup.recv() => live.reload(reloader.as_ref(), "SIGHUP"),
            () = crate::reload::changed(&mut changes) => {
                live.reload(reloader.as_ref(), "config file changed")
            }
        }
    }

    // Drain: stop accepting, wait for the live connections to finish.
    live.stop_all();
    let settings = live.settings();
    let all_stats = live.all_stats();
    crate::exporter::global().set_draining();
    let active = || {
        all_stats
            .iter()
            .map(|(_, s)| s.conns_active.load(Relaxed))
            .sum::<u64>()
    };
    tracing::info!(active = active(), drain_timeout = ?settings.drain_timeout, "draining");
    let drained = tokio::time::timeout(settings.drain_timeout, async {
        while active() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(active = active(), "drain timeout: closing live connections");
    }
    engine.refresh_stats();
    log_stats(&all_stats);
    tracing::info!("stopped");
    Ok(())
}

fn log_stats(all: &[(String, Arc<ForwardStats>)]) {
    for (source, s) in all {
        s.log(source);
    }
}

/// What an accept loop uses for each new connection: the forward's
/// backends and the settings. A reload replaces it; connections already
/// running keep what they started with.
pub(crate) struct Current {
    pub upstreams: Rc<Upstreams>,
    pub settings: Rc<Settings>,
}

pub(crate) async fn accept_loop(
    listener: TcpListener,
    current: Rc<RefCell<Current>>,
    stats: Arc<ForwardStats>,
    engine: Rc<Engine>,
    ids: Rc<Cell<u64>>,
    mut stop: watch::Receiver<bool>,
) {
    let max_conns = current.borrow().settings.max_conns;
    let slots = (max_conns > 0).then(|| Arc::new(Semaphore::new(max_conns)));
    let mut source = current.borrow().upstreams.source();
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
        let (client, client_addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE, ENOBUFS, ...: back off instead of spinning.
                    tracing::warn!(forward = %source, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let id = ids.get() + 1;
        ids.set(id);
        let (upstreams, settings) = {
            let c = current.borrow();
            (c.upstreams.clone(), c.settings.clone())
        };
        source = upstreams.source();
        let (stats, engine, source) = (stats.clone(), engine.clone(), source.clone());
        tokio::task::spawn_local(async move {
            let _permit = permit;
            let _active = ActiveGuard::new(&stats);
            handle(
                id,
                client,
                client_addr,
                &upstreams,
                source,
                stats.clone(),
                settings,
                &engine,
            )
            .await;
        });
    }
    tracing::debug!(forward = %source, "stopped accepting");
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    id: u64,
    client: TcpStream,
    client_addr: SocketAddr,
    upstreams: &Rc<Upstreams>,
    source: Rc<str>,
    stats: Arc<ForwardStats>,
    settings: Rc<Settings>,
    engine: &Engine,
) {
    // Pick a backend and connect (retrying the next healthy one); the lease
    // counts this connection against its backend until it ends.
    let (upstream, upstream_addr, _lease) = match upstreams
        .connect(id, client_addr, settings.connect_timeout)
        .await
    {
        Ok(c) => c,
        Err(failure) => {
            ForwardStats::add(&stats.errors, 1);
            failure.log(id, &source, client_addr, upstreams);
            return;
        }
    };
    if settings.nodelay {
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
    }
    let (client, upstream) = match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(id, error = %e, "cannot take sockets from the reactor");
            return;
        }
    };
    tracing::debug!(id, forward = %source, client = %client_addr, upstream = %upstream_addr, "connection open");
    let conn = Conn {
        id,
        forward: source.clone(),
        client,
        upstream,
        client_addr,
        upstream_addr,
        stats: stats.clone(),
        settings,
    };
    match engine.relay(conn).await {
        Ok(()) => {
            tracing::debug!(id, forward = %source, client = %client_addr, upstream = %upstream_addr, "connection closed")
        }
        Err(e) => {
            ForwardStats::add(&stats.errors, 1);
            tracing::warn!(id, forward = %source, client = %client_addr, upstream = %upstream_addr, error = %e, "connection error");
        }
    }
}
