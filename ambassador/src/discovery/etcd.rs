//! The etcd side of discovery: a watcher per forward, on its own thread.
//!
//! The server runs on one thread with `Rc` state; the etcd client (tonic,
//! gRPC over HTTP/2) wants a runtime of its own and `Send` futures. So each
//! etcd-backed forward gets a small thread with a current-thread tokio
//! runtime, and the two sides meet at one channel: the watcher sends an
//! [`Update`] (the forward's whole new backend set) and the server's main
//! loop applies it with the reload machinery (`Upstreams::replacing`: kept
//! backends keep their health and counters, live connections keep their
//! backend and drain).
//!
//! A watcher's life is a loop of *sessions*:
//!
//! 1. connect, read the prefix (one `Range`), send the set;
//! 2. watch the prefix from the read's revision + 1, apply each event to
//!    the [`View`] and send the set when it changed;
//! 3. the watch ends: etcd was lost (warn once, keep the last set, retry
//!    with a back-off up to 4 s, `etcd connection back` once it works), or
//!    the watch was compacted or cancelled (start again at 1 after 250 ms:
//!    a fresh read is the only way to be sure nothing was missed).
//!
//! At start-up [`Feeds::start_all`] waits for each first read, so that an
//! etcd that cannot be reached is one error line naming the URL (exit 2)
//! instead of a forward that silently has no backend (unless
//! `--etcd-start-empty`). A reload that adds an etcd forward does not wait.

use super::tls::Tls;
use super::{Backoff, Discovery, Kind, Link, View};
use crate::config::{Forward, Target};
use etcdv3client::grpc::TonicClient;
use etcdv3client::pb;
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

/// A running watcher; dropping it stops the thread (at its next await).
#[derive(Debug)]
pub struct Watcher {
    pub id: u64,
    pub discovery: Discovery,
    _stop: oneshot::Sender<()>,
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

/// Starts watchers; every one sends on the same channel.
pub struct Starter {
    tx: mpsc::UnboundedSender<Update>,
    next: u64,
}

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
            starter: Starter { tx, next: 0 },
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
        spawn(d, listen, self.next, self.tx.clone(), wait)
    }
}

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
    // A test hook: the first watch starts at this revision instead of
    // after the read (an old, compacted one makes etcd cancel it).
    let watch_from = std::env::var("AMBASSADOR_ETCD_TEST_WATCH_FROM")
        .ok()
        .and_then(|v| v.parse().ok());
    let kind = d.kind.clone();
    let job = Job {
        d: d.clone(),
        listen,
        id,
        tx,
        watch_from: std::cell::Cell::new(watch_from),
    };
    std::thread::Builder::new()
        .name(format!("{} {listen}", d.kind_name()))
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match rt {
                Ok(rt) => rt.block_on(async move {
                    let work = async move {
                        match kind {
                            Kind::Etcd => job.run(first).await,
                            Kind::Docker => {
                                let job = super::docker::Job {
                                    d: job.d,
                                    listen: job.listen,
                                    id: job.id,
                                    tx: job.tx,
                                };
                                job.run(first).await
                            }
                        }
                    };
                    tokio::select! {
                        () = work => {}
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
        _stop: stop,
    };
    Ok((w, initial))
}

/// What a watcher thread works on.
struct Job {
    d: Discovery,
    listen: SocketAddr,
    id: u64,
    tx: mpsc::UnboundedSender<Update>,
    /// `AMBASSADOR_ETCD_TEST_WATCH_FROM`, for the first watch only.
    watch_from: std::cell::Cell<Option<i64>>,
}

/// The first read's result, for [`Starter::start`] with `wait`.
pub type First = std::sync::mpsc::Sender<Result<Vec<Target>, String>>;

/// How a session ended.
enum End {
    /// Compacted or cancelled watch: read again (after a short pause).
    Resync(&'static str),
    /// etcd could not be reached, or the connection broke.
    Lost(String),
}

impl Job {
    async fn run(self, mut first: Option<First>) {
        let url = self.d.url.as_str();
        let mut view = View::default();
        let mut link = Link::default();
        let mut backoff = Backoff::new();
        let mut sent: Option<Vec<Target>> = None;
        loop {
            let end = self
                .session(&mut view, &mut link, &mut sent, &mut first, &mut backoff)
                .await;
            match end {
                End::Resync(why) => {
                    tracing::info!(listen = %self.listen, etcd = url, reason = why,
                        "etcd watch ended: reading the prefix again");
                    // Not at once: a watch that etcd keeps cancelling must
                    // not become a busy loop of reads.
                    tokio::time::sleep(Backoff::FIRST).await;
                }
                End::Lost(error) => {
                    if let Some(f) = first.take() {
                        let _ = f.send(Err(error));
                        return;
                    }
                    let never = link == Link::New;
                    if link.lost() {
                        let msg = match never {
                            true => "etcd unreachable: no backend until it answers, retrying",
                            false => {
                                "etcd connection lost: keeping the last known backends, retrying"
                            }
                        };
                        tracing::warn!(listen = %self.listen, etcd = url, %error, "{msg}");
                    }
                    tokio::time::sleep(backoff.wait()).await;
                }
            }
        }
    }

    /// Read, then watch, until the watch ends.
    async fn session(
        &self,
        view: &mut View,
        link: &mut Link,
        sent: &mut Option<Vec<Target>>,
        first: &mut Option<First>,
        backoff: &mut Backoff,
    ) -> End {
        let prefix = self.d.prefix();
        let mut client = match connect(&self.d.endpoints, self.d.tls.as_ref()).await {
            Ok(c) => c,
            Err(e) => return End::Lost(e),
        };
        let read = timed(
            "reading the prefix",
            client.kv.do_range(prefix.as_str()).with_prefix(),
        );
        let resp = match read.await {
            Ok(r) => r,
            Err(e) => return End::Lost(e),
        };
        let revision = resp.header.as_ref().map_or(0, |h| h.revision);
        view.reset(resp.kvs.into_iter().map(|kv| (kv.key, kv.value)));
        let set = self.publish(view, sent);
        if let Some(f) = first.take() {
            let _ = f.send(Ok(set));
        }
        let mut create = client.watch.do_watch(prefix.as_str()).with_prefix();
        create.request.start_revision = self.watch_from.take().unwrap_or(revision + 1);
        let mut watch = match timed("starting the watch", create).await {
            Ok(w) => w,
            Err(e) => return End::Lost(e),
        };
        if link.up() {
            tracing::info!(listen = %self.listen, etcd = %self.d.url, "etcd connection back");
        }
        backoff.reset();
        loop {
            let resp = match watch.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return End::Lost("the watch stream ended".into()),
                Err(e) => return End::Lost(short(&e)),
            };
            if resp.compact_revision != 0 {
                return End::Resync("compacted");
            }
            if resp.canceled {
                return End::Resync("cancelled");
            }
            for ev in resp.events {
                let Some(kv) = ev.kv else { continue };
                if ev.r#type == pb::event::EventType::Delete as i32 {
                    view.delete(&kv.key);
                } else {
                    view.put(kv.key, kv.value);
                }
            }
            self.publish(view, sent);
        }
    }

    /// Log the newly skipped values; send the set if it changed.
    fn publish(&self, view: &mut View, sent: &mut Option<Vec<Target>>) -> Vec<Target> {
        let (set, skipped) = view.backends();
        for s in skipped {
            tracing::warn!(listen = %self.listen, etcd = %self.d.url, key = %s.key, reason = %s.why,
                "etcd value skipped");
        }
        if sent.as_ref() != Some(&set) {
            *sent = Some(set.clone());
            let _ = self.tx.send(Update {
                listen: self.listen,
                watcher: self.id,
                backends: set.clone(),
            });
        }
        set
    }
}

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
