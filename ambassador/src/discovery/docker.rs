//! The Docker side of discovery: a watcher per `docker://SERVICE` forward,
//! following the Docker Engine API on a unix socket (`--docker`, default
//! `/var/run/docker.sock`).
//!
//! It runs like an etcd watcher (`discovery/etcd.rs`: a thread with its own
//! current-thread runtime, one [`Update`] per new set on the shared
//! channel, applied by the server like a reload that changed the forward's
//! backends, so live connections keep their backend and drain). A
//! session is:
//!
//! 1. connect: the client starts at API 1.41 (Docker 20.10) and negotiates
//!    down if the daemon is older (`GET /version`);
//! 2. list the running containers labelled `ambassador.service=SERVICE`
//!    and send the set ([`Seen`] decides which are backends and at which
//!    address, see `discovery/containers.rs`);
//! 3. follow `GET /events` for those containers (`since` a second before
//!    the list, so nothing between the list and the subscription is
//!    missed; a replayed event costs one more list) and list again at each
//!    start, die, stop, pause, unpause or destroy. Listing again rather
//!    than patching the set from the event keeps one source of truth: the
//!    list — except that Docker sends some events (die, pause, unpause)
//!    before its list shows them, so the list is made once it caught up
//!    (`Job::follow`), and a container whose last event says it stopped is
//!    left out until the list agrees (`Seen::event`).
//!
//! The socket lost (dockerd stopped or restarted): the last set keeps
//! serving, one `WARN docker connection lost`, reconnects with the same
//! back-off as etcd (250 ms doubling to 4 s), one `docker connection back`
//! once a list worked again — which is the resync.

use super::containers::{Container, SERVICE_LABEL, Seen};
use super::etcd::{First, Update, error_chain};
use super::{Backoff, Discovery, Link};
use crate::config::Target;
use bollard::container::ListContainersOptions;
use bollard::system::EventsOptions;
use bollard::{ClientVersion, Docker};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;

/// Where dockerd listens by default.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// The API version the client starts at: Docker 20.10's. Newer daemons
/// still speak it; an older one makes the client go down to its own.
const API: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// How long a list or the version call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The events that can change which containers run.
const EVENTS: [&str; 6] = ["start", "die", "stop", "pause", "unpause", "destroy"];

/// What a Docker watcher thread works on.
pub struct Job {
    pub d: Discovery,
    pub listen: SocketAddr,
    pub id: u64,
    pub tx: mpsc::UnboundedSender<Update>,
}

impl Job {
    fn socket(&self) -> &str {
        self.d
            .endpoints
            .first()
            .map_or(DEFAULT_SOCKET, String::as_str)
    }

    /// Sessions until the thread is stopped; with `first`, the first list's
    /// result (or why it failed, then the watcher ends) goes there.
    pub async fn run(self, mut first: Option<First>) {
        let mut seen = Seen::default();
        let mut link = Link::default();
        let mut backoff = Backoff::new();
        let mut sent: Option<Vec<Target>> = None;
        loop {
            let error = self
                .session(&mut seen, &mut link, &mut sent, &mut first, &mut backoff)
                .await;
            if let Some(f) = first.take() {
                let _ = f.send(Err(error));
                return;
            }
            let never = link == Link::New;
            if link.lost() {
                let msg = match never {
                    true => "docker unreachable: no backend until it answers, retrying",
                    false => "docker connection lost: keeping the last known backends, retrying",
                };
                tracing::warn!(listen = %self.listen, docker = self.socket(), %error, "{msg}");
            }
            tokio::time::sleep(backoff.wait()).await;
        }
    }

    /// Connect, list, follow events until they end; returns why.
    async fn session(
        &self,
        seen: &mut Seen,
        link: &mut Link,
        sent: &mut Option<Vec<Target>>,
        first: &mut Option<First>,
        backoff: &mut Backoff,
    ) -> String {
        let docker = match connect(self.socket()).await {
            Ok(d) => d,
            Err(e) => return e,
        };
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs().saturating_sub(1));
        if let Err(e) = self.list(&docker, seen, sent).await {
            return e;
        }
        let set = sent.clone().unwrap_or_default();
        if let Some(f) = first.take() {
            let _ = f.send(Ok(set));
        }
        if link.up() {
            tracing::info!(listen = %self.listen, docker = self.socket(), "docker connection back");
        }
        backoff.reset();
        let label = format!("{SERVICE_LABEL}={}", self.d.service);
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("label".to_string(), vec![label]),
            ("event".to_string(), EVENTS.map(String::from).to_vec()),
        ]);
        let mut events = docker.events(Some(EventsOptions::<String> {
            since: Some(since.to_string()),
            until: None,
            filters,
        }));
        loop {
            match events.next().await {
                Some(Ok(ev)) => {
                    tracing::debug!(listen = %self.listen, action = ?ev.action, "docker event");
                    let id = ev.actor.and_then(|a| a.id).unwrap_or_default();
                    let action = ev.action.unwrap_or_default();
                    if let Err(e) = self.follow(&docker, seen, sent, &id, &action).await {
                        return e;
                    }
                }
                Some(Err(e)) => return format!("events: {}", error_chain(&e)),
                None => return "the events stream ended".into(),
            }
        }
    }

    /// An event for container `id`: list again once Docker's list has
    /// caught up with it. Docker 20.10 sends die, pause and unpause while
    /// it holds the container's lock and updates its list after: the list
    /// made at the event can still show the old state (a killed container
    /// `running`, an unpaused one `paused`), and no later event comes. An
    /// inspect takes that lock, so it returns once the update is done;
    /// `Seen::event` keeps stopped containers out whatever the list says;
    /// a container that should run and is not listed yet gets a few more
    /// lists (100 ms, 200 ms, 400 ms apart).
    async fn follow(
        &self,
        docker: &Docker,
        seen: &mut Seen,
        sent: &mut Option<Vec<Target>>,
        id: &str,
        action: &str,
    ) -> Result<(), String> {
        seen.event(id, action);
        if !id.is_empty() {
            let inspect = docker.inspect_container(id, None);
            // Only a barrier: a container already removed answers 404.
            let _ = tokio::time::timeout(CALL_TIMEOUT, inspect).await;
        }
        let up = matches!(action, "start" | "unpause");
        for wait in [100, 200, 400, 0] {
            let running = self.list(docker, seen, sent).await?;
            if !up || running.iter().any(|c| c == id) || wait == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        Ok(())
    }

    /// List the service's running containers, log the newly skipped ones,
    /// send the set if it changed. Returns the listed containers' ids.
    async fn list(
        &self,
        docker: &Docker,
        seen: &mut Seen,
        sent: &mut Option<Vec<Target>>,
    ) -> Result<Vec<String>, String> {
        let filters = HashMap::from([
            (
                "label".to_string(),
                vec![format!("{SERVICE_LABEL}={}", self.d.service)],
            ),
            ("status".to_string(), vec!["running".to_string()]),
        ]);
        let opts = ListContainersOptions::<String> {
            filters,
            ..Default::default()
        };
        let list = tokio::time::timeout(CALL_TIMEOUT, docker.list_containers(Some(opts)));
        let running: Vec<Container> = match list.await {
            Ok(Ok(l)) => l.into_iter().map(container).collect(),
            Ok(Err(e)) => return Err(format!("listing containers: {}", error_chain(&e))),
            Err(_) => {
                return Err(format!(
                    "listing containers: no answer within {CALL_TIMEOUT:?}"
                ));
            }
        };
        let (set, skipped) = seen.backends(&running);
        for s in skipped {
            tracing::warn!(listen = %self.listen, service = %self.d.service,
                container = %s.container, reason = %s.why, "docker container skipped");
        }
        if sent.as_ref() != Some(&set) {
            *sent = Some(set.clone());
            let _ = self.tx.send(Update {
                listen: self.listen,
                watcher: self.id,
                backends: set.clone(),
            });
        }
        Ok(running.into_iter().map(|c| c.id).collect())
    }
}

/// A client on `socket`, at the API version the daemon speaks (≤ 1.41).
async fn connect(socket: &str) -> Result<Docker, String> {
    let docker = Docker::connect_with_unix(socket, CALL_TIMEOUT.as_secs(), &API)
        .map_err(|e| error_chain(&e))?;
    match tokio::time::timeout(CALL_TIMEOUT, docker.negotiate_version()).await {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(error_chain(&e)),
        Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
    }
}

/// Docker's list entry → what [`containers`] decides on.
fn container(s: bollard::models::ContainerSummary) -> Container {
    let name = s
        .names
        .and_then(|n| n.into_iter().next())
        .map(|n| n.trim_start_matches('/').to_string())
        .unwrap_or_default();
    let networks = s
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default()
        .into_iter()
        .map(|(net, e)| {
            let v4 = e.ip_address.unwrap_or_default();
            let v6 = e.global_ipv6_address.unwrap_or_default();
            (net, (v4, v6))
        })
        .collect();
    Container {
        id: s.id.unwrap_or_default(),
        name,
        labels: s.labels.unwrap_or_default().into_iter().collect(),
        networks,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_summary_becomes_a_container() {
        let json = r#"{"Id":"abc","Names":["/db1"],"Labels":{"ambassador.service":"db","ambassador.port":"6379"},
            "NetworkSettings":{"Networks":{"bridge":{"IPAddress":"172.17.0.2","GlobalIPv6Address":""}}}}"#;
        let s: bollard::models::ContainerSummary = serde_json::from_str(json).unwrap();
        let c = super::container(s);
        assert_eq!(c.name, "db1");
        assert_eq!(
            crate::discovery::containers::backend(&c)
                .unwrap()
                .to_string(),
            "172.17.0.2:6379"
        );
    }
}
