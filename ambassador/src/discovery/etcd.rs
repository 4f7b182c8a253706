//! The etcd side of discovery: the client, and starting watchers.
//!
//! The server's control loop (reload, discovery updates) runs on the first
//! worker's single-threaded runtime; the etcd client (tonic,
//! gRPC over HTTP/2) wants a runtime of its own and `Send` futures. So the
//! watching happens on other threads, and the two sides meet at one
//! channel: a watcher sends an [`Update`] (a forward's whole new backend
//! set) and the server's main loop applies it with the reload machinery
//! (`Upstreams::replacing`: kept backends keep their health and counters,
//! live connections keep their backend and drain).
//!
//! etcd forwards that dial the same endpoints with the same TLS settings
//! share one *hub* (`discovery/hub.rs`): one thread, one connection, one
//! read and one watch of the root, whatever the number of forwards. Its
//! life is a loop of *sessions*:
//!
//! 1. connect, read the root (in pages at one revision: `discovery/pages.rs`),
//!    send each forward its set;
//! 2. watch the root from the read's revision + 1, apply each event to the
//!    service's [`super::View`] and send the sets that changed;
//! 3. the watch ends: etcd was lost (warn once, keep the last sets, retry
//!    with a back-off up to 4 s, `etcd connection back` once it works), or
//!    the watch was compacted or cancelled (start again at 1 after 250 ms:
//!    a fresh read is the only way to be sure nothing was missed).
//!
//! A Docker forward still gets its own thread (`discovery/docker.rs`).
//!
//! At start-up [`Feeds::start_all`] waits for each first read, so that an
//! etcd that cannot be reached is one error line naming the URL (exit 2)
//! instead of a forward that silently has no backend (unless
//! `--etcd-start-empty`). A reload that adds an etcd forward does not wait.

use super::hub;
use super::tls::Tls;
use super::{Discovery, Kind};
use crate::config::{Forward, Target};
use etcdv3client::grpc::TonicClient;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The client type of every etcd call here.
pub type Client = etcdv3client::Client<TonicClient>;

/// How long a connect or a single call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A forward's new backend set, from watcher `watcher`.
#[derive(Debug)]
pub struct Update {
    pub listen: SocketAddr,
    /// Which watcher sent it: a replaced watcher's last words are ignored.
    pub watcher: u64,
    pub backends: Vec<Target>,
}

/// A running watcher; dropping it stops it (a Docker watcher's thread at
/// its next await; an etcd forward leaves its hub).
#[derive(Debug)]
pub struct Watcher {
    pub id: u64,
    pub discovery: Discovery,
    _stop: Stop,
}

#[derive(Debug)]
enum Stop {
    Thread(#[allow(dead_code)] oneshot::Sender<()>),
    Hub(#[allow(dead_code)] super::hub::Unsub),
}

/// Connect to the first endpoint that answers within [`CALL_TIMEOUT`].
/// HTTP/2 keep-alive pings notice an etcd that went silent. With `tls`
/// (`--etcd-ca` …) the files are read now and the endpoints are `https://`.
pub async fn connect(endpoints: &[String], tls: Option<&Tls>) -> Result<Client, String> {
    let tls = tls.map(Tls::client_config).transpose()?;
    let mut last = String::from("no endpoint");
    for ep in endpoints {
        let endpoint = match tonic::transport::Endpoint::from_shared(ep.clone()) {
            Ok(e) => e
                .connect_timeout(CALL_TIMEOUT)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true),
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        let endpoint = match &tls {
            Some(t) => match endpoint.tls_config(t.clone()) {
                Ok(e) => e,
                Err(e) => {
                    last = format!("{ep}: TLS settings: {}", error_chain(&e));
                    continue;
                }
            },
            None => endpoint,
        };
        match endpoint.connect().await {
            Ok(channel) => {
                return Ok(etcdv3client::Client::with_service(TonicClient::new(
                    channel,
                )));
            }
            Err(e) => last = format!("{ep}: {}", error_chain(&e)),
        }
    }
    Err(last)
}

/// An error and its causes on one line (tonic's own message is only
/// "transport error").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cause = c.source();
    }
    s
}

/// An etcd client error in a few words: the client shows a failed call as
/// `[Grpc] Status { code: …, message: "…", source: … }` (its cause's Debug
/// form); the gRPC message alone says what happened.
pub fn short(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    let Some(start) = s.find("message: \"").map(|i| i + "message: \"".len()) else {
        return s;
    };
    match s[start..].find('"') {
        Some(end) if end > 0 => s[start..start + end].to_string(),
        _ => s,
    }
}

/// `fut`, or an error after [`CALL_TIMEOUT`].
pub async fn timed<T, E: std::fmt::Display>(
    what: &str,
    fut: impl std::future::IntoFuture<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {}", short(&e))),
        Err(_) => Err(format!("{what}: no answer within {CALL_TIMEOUT:?}")),
    }
}

/// Starts watchers; every one sends on the same channel. etcd forwards
/// that dial the same endpoints with the same TLS settings share one hub
/// (one thread, connection and watch: see `discovery/hub.rs`).
pub struct Starter {
    tx: mpsc::UnboundedSender<Update>,
    next: u64,
    hubs: Vec<(HubKey, mpsc::UnboundedSender<hub::Cmd>)>,
}

/// What makes two etcd forwards share a hub.
type HubKey = (Vec<String>, Option<Tls>);

/// The watchers started before serving, and where their updates arrive.
pub struct Feeds {
    pub starter: Starter,
    pub rx: mpsc::UnboundedReceiver<Update>,
    /// By listen address: the watcher and the first read's set.
    pub started: BTreeMap<SocketAddr, (Watcher, Vec<Target>)>,
}

impl Feeds {
    /// No watcher yet (the channel stays open: `rx` never ends).
    pub fn none() -> Feeds {
        let (tx, rx) = mpsc::unbounded_channel();
        Feeds {
            starter: Starter {
                tx,
                next: 0,
                hubs: Vec::new(),
            },
            rx,
            started: BTreeMap::new(),
        }
    }

    /// A watcher for every etcd forward; with `wait`, each after its first
    /// read (the error is one line naming the forward and the URL), else
    /// at once with no backend (`--etcd-start-empty`).
    pub fn start_all(forwards: &[Forward], wait: bool) -> Result<Feeds, String> {
        let mut feeds = Feeds::none();
        for f in forwards {
            if let Some(d) = &f.discovery {
                // A Docker forward always waits: a socket that is not there
                // at start is a bad --docker (one line, exit 2).
                let wait = wait || d.kind == Kind::Docker;
                let started = feeds.starter.start(d, f.listen, wait).map_err(|e| {
                    // A refused client certificate looks like a dropped call.
                    let e = d.tls.as_ref().map_or(e.clone(), |t| t.explain(&e));
                    match (&d.kind, f.source.contains(&d.url)) {
                        (Kind::Docker, _) => format!(
                            "{}: cannot reach docker at {}: {e}",
                            f.source,
                            d.endpoints.join(",")
                        ),
                        // A flag's source shows the URL already; a file's does not.
                        (Kind::Etcd, true) => format!("{}: cannot reach etcd: {e}", f.source),
                        (Kind::Etcd, false) => {
                            format!("{}: cannot reach etcd at {}: {e}", f.source, d.url)
                        }
                    }
                })?;
                feeds.started.insert(f.listen, started);
            }
        }
        Ok(feeds)
    }
}

impl Starter {
    /// Start watching `d` for the forward on `listen`. With `wait`, block
    /// until the first read and return its set, or the reason it failed
    /// (then no thread is left running); without, return at once with an
    /// empty set (the first read arrives as an [`Update`]).
    pub fn start(
        &mut self,
        d: &Discovery,
        listen: SocketAddr,
        wait: bool,
    ) -> Result<(Watcher, Vec<Target>), String> {
        self.next += 1;
        match d.kind {
            Kind::Docker => spawn(d, listen, self.next, self.tx.clone(), wait),
            Kind::Etcd => self.subscribe(d, listen, self.next, wait),
        }
    }

    /// Join (or start) the hub of `d`'s endpoints and TLS settings.
    fn subscribe(
        &mut self,
        d: &Discovery,
        listen: SocketAddr,
        id: u64,
        wait: bool,
    ) -> Result<(Watcher, Vec<Target>), String> {
        let key: HubKey = (d.endpoints.clone(), d.tls.clone());
        // A hub whose thread is gone (it could not start) is replaced.
        self.hubs.retain(|(_, tx)| !tx.is_closed());
        let tx = match self.hubs.iter().find(|(k, _)| *k == key) {
            Some((_, tx)) => tx.clone(),
            None => {
                let tx = hub::spawn(key.0.clone(), key.1.clone(), self.tx.clone(), watch_from())?;
                self.hubs.push((key, tx.clone()));
                tx
            }
        };
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let add = hub::Cmd::Add {
            id,
            listen,
            service: d.service.clone(),
            first: wait.then_some(first_tx),
        };
        tx.send(add)
            .map_err(|_| "the etcd watcher is not running".to_string())?;
        let unsub = hub::Unsub { id, tx };
        let initial = match wait {
            true => match first_rx.recv() {
                Ok(Ok(set)) => set,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err("the watcher ended before its first read".into()),
            },
            false => Vec::new(),
        };
        let w = Watcher {
            id,
            discovery: d.clone(),
            _stop: Stop::Hub(unsub),
        };
        Ok((w, initial))
    }
}

/// A test hook: the first watch starts at this revision instead of after
/// the read (an old, compacted one makes etcd cancel it).
fn watch_from() -> Option<i64> {
    std::env::var("AMBASSADOR_ETCD_TEST_WATCH_FROM")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// A Docker forward's watcher: its own thread (it follows one socket).
fn spawn(
    d: &Discovery,
    listen: SocketAddr,
    id: u64,
    tx: mpsc::UnboundedSender<Update>,
    wait: bool,
) -> Result<(Watcher, Vec<Target>), String> {
    let (stop, stop_rx) = oneshot::channel();
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let first = wait.then_some(first_tx);
    let job = super::docker::Job {
        d: d.clone(),
        listen,
        id,
        tx,
    };
    std::thread::Builder::new()
        .name(format!("{} {listen}", d.kind_name()))
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match rt {
                Ok(rt) => rt.block_on(async move {
                    tokio::select! {
                        () = job.run(first) => {}
                        _ = stop_rx => {}
                    }
                }),
                Err(e) => {
                    if let Some(f) = first {
                        let _ = f.send(Err(format!("cannot start the discovery runtime: {e}")));
                    }
                }
            }
        })
        .map_err(|e| format!("cannot start the discovery thread: {e}"))?;
    let initial = if wait {
        match first_rx.recv() {
            Ok(Ok(set)) => set,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("the watcher ended before its first read".into()),
        }
    } else {
        Vec::new()
    };
    let w = Watcher {
        id,
        discovery: d.clone(),
        _stop: Stop::Thread(stop),
    };
    Ok((w, initial))
}

/// The first read's result, for [`Starter::start`] with `wait`.
pub type First = std::sync::mpsc::Sender<Result<Vec<Target>, String>>;

#[cfg(test)]
mod tests {
    #[test]
    fn short_errors() {
        let long =
            r#"[Grpc] Status { code: Unknown, message: "h2 protocol error: eof", source: None }"#;
        assert_eq!(super::short(&long), "h2 protocol error: eof");
        assert_eq!(super::short(&"plain"), "plain");
        assert_eq!(super::short(&r#"message: """#), r#"message: """#);
    }
}
