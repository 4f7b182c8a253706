//! Docker discovery's decisions: which running containers are a service's
//! backends, and at which address (no I/O; the Docker side is
//! `discovery/docker.rs`).
//!
//! A container is a backend of `docker://SERVICE` when it runs and carries
//! the labels
//!
//! ```text
//! ambassador.service=SERVICE     which forward(s) it serves
//! ambassador.port=PORT           the port it listens on, inside its network
//! ambassador.network=NETWORK     optional: which of its networks to use
//! ```
//!
//! The address is the container's IP on one of its networks (the proxy
//! reaches it directly, not through a published port):
//!
//! - with `ambassador.network`, that network's address (a container not on
//!   it is skipped);
//! - else, when the container is on exactly one network, that network's
//!   address (the usual case: the default bridge, or one compose network);
//! - else it is skipped, naming its networks: picking one of several by
//!   name or order would be a guess that can route to the wrong network.
//!
//! The IPv4 address is used, the global IPv6 address when there is none. A
//! container with no address (`--network host`, `none`) is skipped. A bad
//! label (`ambassador.port=80x`, `0`, `70000`) skips the container — never
//! half-parsed — with one warning naming it; the same container is
//! reported again only after it changed (a new start is a new container
//! state, see [`Seen`]).

use crate::config::{Target, parse};
use std::collections::{BTreeMap, BTreeSet};

pub const SERVICE_LABEL: &str = "ambassador.service";
pub const PORT_LABEL: &str = "ambassador.port";
pub const NETWORK_LABEL: &str = "ambassador.network";

/// What discovery needs of a running container (from Docker's list).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    /// Its name without Docker's leading `/`.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Network name → (IPv4 address, global IPv6 address), either empty.
    pub networks: BTreeMap<String, (String, String)>,
}

/// A container that was skipped, and why (logged once).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub container: String,
    pub why: String,
}

/// A container → its backend address, or why it is not one.
pub fn backend(c: &Container) -> Result<Target, String> {
    let port = c
        .labels
        .get(PORT_LABEL)
        .ok_or_else(|| format!("no {PORT_LABEL} label"))?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{PORT_LABEL}={port:?} is not a port number"));
    }
    let port = parse::port(port).map_err(|e| format!("{PORT_LABEL}: {e}"))?;
    let (net, addrs) = match c.labels.get(NETWORK_LABEL) {
        Some(n) => match c.networks.get(n) {
            Some(a) => (n.as_str(), a),
            None => return Err(format!("{NETWORK_LABEL}={n:?}: the container is not on it")),
        },
        None => {
            let mut on = c.networks.iter();
            match (on.next(), on.next()) {
                (Some((n, a)), None) => (n.as_str(), a),
                (None, _) => return Err("the container is on no network".into()),
                (Some(_), Some(_)) => {
                    let names: Vec<&str> = c.networks.keys().map(String::as_str).collect();
                    return Err(format!(
                        "on several networks ({}): set {NETWORK_LABEL}",
                        names.join(", ")
                    ));
                }
            }
        }
    };
    let ip = match addrs {
        (v4, _) if !v4.is_empty() => v4.clone(),
        (_, v6) if !v6.is_empty() => format!("[{v6}]"),
        _ => {
            return Err(format!(
                "no IP address on network {net:?} (host or none mode?)"
            ));
        }
    };
    parse::target(&format!("{ip}:{port}")).map_err(|e| format!("network {net:?}: {e}"))
}

/// The reports made so far, so that each bad container is logged once; and
/// the containers Docker's events say stopped running.
#[derive(Debug, Default)]
pub struct Seen {
    reported: BTreeSet<(String, String)>,
    /// Ids whose last event was die, stop, pause or destroy. Docker sends
    /// the event before its list is updated (20.10: the list made right
    /// after `die` still shows the container `running`, and no later event
    /// comes for a killed container), so these are left out of the set
    /// until a start/unpause event, and forgotten once the list no longer
    /// shows them.
    down: BTreeSet<String>,
}

impl Seen {
    /// A Docker event for container `id`.
    pub fn event(&mut self, id: &str, action: &str) {
        match action {
            "die" | "stop" | "pause" | "destroy" => {
                self.down.insert(id.to_string());
            }
            "start" | "unpause" => {
                self.down.remove(id);
            }
            _ => {}
        }
    }

    /// The running containers of a service → the backend set (ordered by
    /// container name, each address once) and the containers newly found
    /// bad.
    pub fn backends(&mut self, running: &[Container]) -> (Vec<Target>, Vec<Skipped>) {
        self.down.retain(|id| running.iter().any(|c| &c.id == id));
        let mut sorted: Vec<&Container> = running
            .iter()
            .filter(|c| !self.down.contains(&c.id))
            .collect();
        sorted.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        let mut set: Vec<Target> = Vec::new();
        let mut skipped = Vec::new();
        let mut now = BTreeSet::new();
        for c in sorted {
            match backend(c) {
                Ok(t) if !set.contains(&t) => set.push(t),
                Ok(_) => {}
                Err(why) => {
                    let k = (c.id.clone(), why.clone());
                    if !self.reported.contains(&k) {
                        skipped.push(Skipped {
                            container: c.name.clone(),
                            why,
                        });
                    }
                    now.insert(k);
                }
            }
        }
        // Forget what is gone or fixed: a container that turns bad again
        // later is reported again.
        self.reported = now;
        (set, skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, labels: &[(&str, &str)], nets: &[(&str, &str, &str)]) -> Container {
        Container {
            id: format!("id-{name}"),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            networks: nets
                .iter()
                .map(|(n, v4, v6)| (n.to_string(), (v4.to_string(), v6.to_string())))
                .collect(),
        }
    }

    const SVC: (&str, &str) = ("ambassador.service", "db");

    #[test]
    fn one_network_is_used() {
        let a = c(
            "a",
            &[SVC, ("ambassador.port", "6379")],
            &[("bridge", "172.17.0.2", "")],
        );
        assert_eq!(backend(&a).unwrap().to_string(), "172.17.0.2:6379");
        let v6 = c(
            "b",
            &[SVC, ("ambassador.port", "80")],
            &[("n", "", "fd00::2")],
        );
        assert_eq!(backend(&v6).unwrap().to_string(), "[fd00::2]:80");
    }

    #[test]
    fn several_networks_need_the_label() {
        let nets = [("back", "10.1.0.2", ""), ("front", "10.2.0.2", "")];
        let two = c("a", &[SVC, ("ambassador.port", "80")], &nets);
        let e = backend(&two).unwrap_err();
        assert!(e.contains("several networks (back, front)"), "{e}");
        let picked = c(
            "a",
            &[
                SVC,
                ("ambassador.port", "80"),
                ("ambassador.network", "front"),
            ],
            &nets,
        );
        assert_eq!(backend(&picked).unwrap().to_string(), "10.2.0.2:80");
        let wrong = c(
            "a",
            &[SVC, ("ambassador.port", "80"), ("ambassador.network", "x")],
            &nets,
        );
        assert!(backend(&wrong).unwrap_err().contains("not on it"));
        let host = c("h", &[SVC, ("ambassador.port", "80")], &[("host", "", "")]);
        assert!(backend(&host).unwrap_err().contains("no IP address"));
        let none = c("n", &[SVC, ("ambassador.port", "80")], &[]);
        assert!(backend(&none).is_err());
    }

    #[test]
    fn bad_ports_are_never_half_parsed() {
        for bad in ["80x", "", "0", "70000", "+80", " 80", "80,81", "-1"] {
            let x = c(
                "x",
                &[SVC, ("ambassador.port", bad)],
                &[("b", "10.0.0.2", "")],
            );
            assert!(backend(&x).is_err(), "{bad:?}");
        }
        let missing = c("x", &[SVC], &[("b", "10.0.0.2", "")]);
        assert!(
            backend(&missing)
                .unwrap_err()
                .contains("no ambassador.port")
        );
    }

    #[test]
    fn a_container_that_died_is_left_out_while_the_list_lags() {
        let a = c(
            "a",
            &[SVC, ("ambassador.port", "1")],
            &[("n", "10.0.0.1", "")],
        );
        let b = c(
            "b",
            &[SVC, ("ambassador.port", "1")],
            &[("n", "10.0.0.2", "")],
        );
        let both = [a.clone(), b.clone()];
        let mut seen = Seen::default();
        assert_eq!(seen.backends(&both).0.len(), 2);
        // `die` arrives; the list made just after still shows b running.
        seen.event(&b.id, "die");
        let (set, _) = seen.backends(&both);
        let s: Vec<String> = set.iter().map(|t| t.to_string()).collect();
        assert_eq!(s, ["10.0.0.1:1"]);
        // The list catches up: b is forgotten ...
        assert_eq!(seen.backends(std::slice::from_ref(&a)).0.len(), 1);
        // ... so when it runs again it is back, even without its start event.
        assert_eq!(seen.backends(&both).0.len(), 2);
        // pause/unpause, and a start after a die.
        seen.event(&a.id, "pause");
        assert_eq!(seen.backends(&both).0.len(), 1);
        seen.event(&a.id, "unpause");
        assert_eq!(seen.backends(&both).0.len(), 2);
        seen.event(&a.id, "die");
        seen.event(&a.id, "start");
        assert_eq!(seen.backends(&both).0.len(), 2);
        seen.event(&a.id, "kill");
        assert_eq!(seen.backends(&both).0.len(), 2, "kill alone is not a death");
    }

    #[test]
    fn a_bad_container_is_reported_once() {
        let good = c(
            "b",
            &[SVC, ("ambassador.port", "1")],
            &[("n", "10.0.0.2", "")],
        );
        let good2 = c(
            "a",
            &[SVC, ("ambassador.port", "1")],
            &[("n", "10.0.0.1", "")],
        );
        let bad = c(
            "bad",
            &[SVC, ("ambassador.port", "x")],
            &[("n", "10.0.0.3", "")],
        );
        let mut seen = Seen::default();
        let (set, skipped) = seen.backends(&[good.clone(), bad.clone(), good2.clone()]);
        let s: Vec<String> = set.iter().map(|t| t.to_string()).collect();
        assert_eq!(s, ["10.0.0.1:1", "10.0.0.2:1"], "ordered by name");
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].container, "bad");
        assert!(seen.backends(&[good.clone(), bad.clone()]).1.is_empty());
        // Gone, then back: reported again.
        assert!(seen.backends(std::slice::from_ref(&good)).1.is_empty());
        assert_eq!(seen.backends(&[good, bad]).1.len(), 1);
    }
}
