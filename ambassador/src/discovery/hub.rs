//! One etcd connection for many forwards: the hub's thread and sessions.
//!
//! Every etcd forward that dials the same endpoints with the same TLS
//! settings is served by one hub: one thread with a small tokio runtime,
//! one gRPC connection, one read of the root (`/ambassador/services/`) and
//! one watch of it. 1,000 forwards cost one thread and one connection, not
//! 1,000 of each, and a change for `db` is one event on one stream.
//! [`super::fanout`] decides which forward gets which set; this file only
//! talks to etcd and carries commands and updates:
//!
//! - [`Cmd::Add`] / [`Cmd::Remove`] arrive from the server (a forward
//!   started, reloaded or dropped: dropping its [`Unsub`] removes it);
//! - each new set leaves as an [`Update`] on the server's channel;
//! - a session is connect → read the root → watch from the next revision;
//!   the read is paged (`discovery/pages.rs`: one snapshot, however many
//!   keys); a compacted or cancelled watch reads again; a lost connection keeps
//!   the last known sets, logs once, and retries with [`Backoff`];
//! - with no forward left the hub closes its connection and waits.

use super::etcd::{Client, First, Update, connect, short, timed};
use super::fanout::{Event, Fanout, Out};
use super::pages::Pages;
use super::tls::Tls;
use super::{Backoff, Link, ROOT};
use etcdv3client::pb;
use std::net::SocketAddr;
use tokio::sync::mpsc;

/// What the server asks of a hub.
pub enum Cmd {
    /// Follow `service` for forward `id` on `listen`; `first`: answer with
    /// the first set (or the reason there is none) as soon as it is known.
    Add {
        id: u64,
        listen: SocketAddr,
        service: String,
        first: Option<First>,
    },
    Remove(u64),
}

/// Held by a forward's watcher; dropping it stops following.
#[derive(Debug)]
pub struct Unsub {
    pub id: u64,
    pub tx: mpsc::UnboundedSender<Cmd>,
}

impl Drop for Unsub {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Remove(self.id));
    }
}

/// Start a hub's thread for `endpoints` and `tls`; its commands go to the
/// sender returned. `watch_from`: a test hook (see `etcd.rs`).
pub fn spawn(
    endpoints: Vec<String>,
    tls: Option<Tls>,
    updates: mpsc::UnboundedSender<Update>,
    watch_from: Option<i64>,
) -> Result<mpsc::UnboundedSender<Cmd>, String> {
    let (tx, cmds) = mpsc::unbounded_channel();
    let label = endpoints.join(",");
    let runner = Runner {
        endpoints,
        tls,
        label: label.clone(),
        updates,
        cmds,
        fanout: Fanout::default(),
        loaded: false,
        pending: Vec::new(),
        link: Link::default(),
        backoff: Backoff::new(),
        watch_from,
    };
    std::thread::Builder::new()
        .name(format!("etcd {label}"))
        .spawn(move || {
            // A runtime that cannot start drops `cmds`: every `first` then
            // reads "the watcher ended before its first read".
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(runner.run());
            }
        })
        .map_err(|e| format!("cannot start the discovery thread: {e}"))?;
    Ok(tx)
}

struct Runner {
    endpoints: Vec<String>,
    tls: Option<Tls>,
    /// The endpoints, for log lines.
    label: String,
    updates: mpsc::UnboundedSender<Update>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    fanout: Fanout,
    /// A read has filled `fanout` (the last known sets, kept when lost).
    loaded: bool,
    /// Forwards waiting for their first set.
    pending: Vec<(u64, First)>,
    link: Link,
    backoff: Backoff,
    watch_from: Option<i64>,
}

/// How a session ended.
enum End {
    /// Compacted or cancelled watch: read again (after a short pause).
    Resync(&'static str),
    /// etcd could not be reached, or the connection broke.
    Lost(String),
    /// No forward left.
    Idle,
    /// The server is gone.
    Closed,
}

impl Runner {
    async fn run(mut self) {
        loop {
            if self.fanout.is_empty() {
                self.loaded = false;
                match self.cmds.recv().await {
                    Some(c) => self.command(c),
                    None => return,
                }
                continue;
            }
            let pause = match self.session().await {
                End::Closed => return,
                End::Idle => continue,
                End::Resync(why) => {
                    tracing::info!(etcd = %self.label, reason = why,
                        "etcd watch ended: reading the prefix again");
                    // Not at once: a watch that etcd keeps cancelling must
                    // not become a busy loop of reads.
                    Backoff::FIRST
                }
                End::Lost(error) => {
                    // Forwards still waiting for a first set get the error
                    // (the server then starts without them, or exits).
                    for (id, f) in self.pending.drain(..) {
                        let _ = f.send(Err(error.clone()));
                        self.fanout.unsubscribe(id);
                    }
                    if self.fanout.is_empty() {
                        continue;
                    }
                    let never = self.link == Link::New;
                    if self.link.lost() {
                        let msg = match never {
                            true => "etcd unreachable: no backend until it answers, retrying",
                            false => {
                                "etcd connection lost: keeping the last known backends, retrying"
                            }
                        };
                        let forwards = self.fanout.counts().0;
                        tracing::warn!(etcd = %self.label, forwards, %error, "{msg}");
                    }
                    self.backoff.wait()
                }
            };
            // Sleep, but keep taking forwards in and out meanwhile.
            let deadline = tokio::time::Instant::now() + pause;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break,
                    c = self.cmds.recv() => match c {
                        Some(c) => self.command(c),
                        None => return,
                    },
                }
            }
        }
    }

    fn command(&mut self, c: Cmd) {
        match c {
            Cmd::Add {
                id,
                listen,
                service,
                first,
            } => {
                self.fanout.subscribe(id, listen, &service);
                if self.loaded {
                    let (set, outs) = self.fanout.publish(id);
                    self.send(outs);
                    if let Some(f) = first {
                        let _ = f.send(Ok(set));
                    }
                } else if let Some(f) = first {
                    self.pending.push((id, f));
                }
            }
            Cmd::Remove(id) => {
                self.fanout.unsubscribe(id);
                self.pending.retain(|(p, _)| *p != id);
            }
        }
    }

    fn send(&self, outs: Vec<Out>) {
        for o in outs {
            match o {
                Out::Set {
                    id,
                    listen,
                    backends,
                } => {
                    let _ = self.updates.send(Update {
                        listen,
                        watcher: id,
                        backends,
                    });
                }
                Out::Skipped { service, skipped } => {
                    tracing::warn!(etcd = %self.label, service, key = %skipped.key,
                        reason = %skipped.why, "etcd value skipped");
                }
            }
        }
    }

    /// Read, then watch, until the watch ends.
    async fn session(&mut self) -> End {
        let mut client = match connect(&self.endpoints, self.tls.as_ref()).await {
            Ok(c) => c,
            Err(e) => return End::Lost(e),
        };
        let (revision, kvs) = match read(&mut client).await {
            Ok(r) => r,
            Err(end) => return end,
        };
        let outs = self.fanout.reset(kvs);
        self.loaded = true;
        self.send(outs);
        for (id, f) in std::mem::take(&mut self.pending) {
            let _ = f.send(Ok(self.fanout.publish(id).0));
        }
        // The sets are loaded: from here a failure is a lost connection
        // that keeps them, not "unreachable" (etcd can die between the read
        // and the watch).
        if self.link.up() {
            tracing::info!(etcd = %self.label, "etcd connection back");
        }
        let mut create = client.watch.do_watch(ROOT).with_prefix();
        create.request.start_revision = self.watch_from.take().unwrap_or(revision + 1);
        let mut watch = match timed("starting the watch", create).await {
            Ok(w) => w,
            Err(e) => return End::Lost(e),
        };
        self.backoff.reset();
        loop {
            let resp = tokio::select! {
                m = watch.message() => match m {
                    Ok(Some(r)) => r,
                    Ok(None) => return End::Lost("the watch stream ended".into()),
                    Err(e) => return End::Lost(short(&e)),
                },
                c = self.cmds.recv() => {
                    match c {
                        Some(c) => self.command(c),
                        None => return End::Closed,
                    }
                    if self.fanout.is_empty() {
                        return End::Idle;
                    }
                    continue;
                }
            };
            if resp.compact_revision != 0 {
                return End::Resync("compacted");
            }
            if resp.canceled {
                return End::Resync("cancelled");
            }
            let events = resp.events.into_iter().filter_map(|ev| {
                let kv = ev.kv?;
                Some(match ev.r#type == pb::event::EventType::Delete as i32 {
                    true => Event::Delete(kv.key),
                    false => Event::Put(kv.key, kv.value),
                })
            });
            let outs = self.fanout.apply(events);
            self.send(outs);
        }
    }
}

/// Every key under the root, page by page at one revision: that revision
/// and the keys, or how the session ends (a page whose revision was
/// compacted meanwhile: read again from the start).
async fn read(client: &mut Client) -> Result<(i64, Vec<(Vec<u8>, Vec<u8>)>), End> {
    let mut pages = Pages::prefix(ROOT);
    while let Some(req) = pages.request() {
        let resp = match timed("reading the prefix", client.kv.range(req)).await {
            Ok(r) => r,
            Err(e) if pages.revision() != 0 && e.contains("compacted") => {
                return Err(End::Resync("compacted during the read"));
            }
            Err(e) => return Err(End::Lost(e)),
        };
        if let Err(bad) = pages.take(resp) {
            return Err(End::Lost(format!("reading the prefix: {bad}")));
        }
    }
    Ok((pages.revision(), pages.into_kvs()))
}
