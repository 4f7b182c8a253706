//! One etcd watch, many forwards: which forward gets which backend set.
//!
//! Every etcd forward that dials the same endpoints with the same TLS
//! settings shares one connection, one read and one watch of the common
//! root, `/ambassador/services/` (see `discovery/hub.rs` for the I/O).
//! This module is the part that decides, without I/O: it keeps a [`View`]
//! per service (every service under the root, so a forward a reload adds
//! is answered from memory, without another read), and the subscribed
//! forwards ([`Fanout::subscribe`]). A read ([`Fanout::reset`]) or a batch
//! of watch events ([`Fanout::apply`]) yields [`Out`]s: a new set for each
//! forward whose set changed (only those: an event for `db` costs nothing
//! to the 999 other forwards), and each newly skipped value, once per
//! service however many forwards follow it.
//!
//! A key belongs to service `S` when it is `ROOT` + `S` + `/` + anything,
//! exactly as a prefix read of `ROOT/S/` would find it; anything else
//! under the root (`ROOT/S` alone) belongs to no service.

use super::{ROOT, Skipped, View};
use crate::config::Target;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

/// A key and its value.
type Kv = (Vec<u8>, Vec<u8>);

/// A watch event, as the fan-out needs it.
#[derive(Debug, Clone)]
pub enum Event {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

/// What the I/O side must do after a change.
#[derive(Debug, PartialEq, Eq)]
pub enum Out {
    /// Subscriber `id` (serving `listen`) has a new set.
    Set {
        id: u64,
        listen: SocketAddr,
        backends: Vec<Target>,
    },
    /// A value of `service` was skipped (log it once).
    Skipped { service: String, skipped: Skipped },
}

#[derive(Debug)]
struct Sub {
    service: String,
    listen: SocketAddr,
    /// The last set sent; `None`: nothing sent yet (the first always goes).
    sent: Option<Vec<Target>>,
}

/// The services under the root and the forwards that follow them.
#[derive(Debug, Default)]
pub struct Fanout {
    views: BTreeMap<String, View>,
    subs: BTreeMap<u64, Sub>,
}

/// The service a key belongs to, if any.
pub fn service_of(key: &[u8]) -> Option<&str> {
    let rest = key.strip_prefix(ROOT.as_bytes())?;
    let slash = rest.iter().position(|&b| b == b'/')?;
    let service = std::str::from_utf8(&rest[..slash]).ok()?;
    (!service.is_empty()).then_some(service)
}

impl Fanout {
    /// Follow `service` for the forward on `listen`. Nothing is sent until
    /// [`Fanout::publish`] (or the next read or event).
    pub fn subscribe(&mut self, id: u64, listen: SocketAddr, service: &str) {
        let sub = Sub {
            service: service.to_string(),
            listen,
            sent: None,
        };
        self.subs.insert(id, sub);
    }

    /// Stop following; true when no forward is left.
    pub fn unsubscribe(&mut self, id: u64) -> bool {
        self.subs.remove(&id);
        self.subs.is_empty()
    }

    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// How many forwards follow, and how many services are known.
    pub fn counts(&self) -> (usize, usize) {
        (self.subs.len(), self.views.len())
    }

    /// A fresh read of the whole root replaces everything known; every
    /// forward whose set differs from the one it was sent gets it.
    pub fn reset(&mut self, kvs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) -> Vec<Out> {
        let mut by: BTreeMap<String, Vec<Kv>> = BTreeMap::new();
        for (k, v) in kvs {
            if let Some(s) = service_of(&k) {
                by.entry(s.to_string()).or_default().push((k, v));
            }
        }
        // Keep the views (and what they reported) of services still there.
        self.views.retain(|s, _| by.contains_key(s));
        for (s, kvs) in by {
            self.views.entry(s).or_default().reset(kvs);
        }
        let all: BTreeSet<String> = self.subs.values().map(|s| s.service.clone()).collect();
        self.publish_services(&all)
    }

    /// A batch of watch events; only the services they touch are looked at.
    pub fn apply(&mut self, events: impl IntoIterator<Item = Event>) -> Vec<Out> {
        let mut touched = BTreeSet::new();
        for ev in events {
            let key = match &ev {
                Event::Put(k, _) | Event::Delete(k) => k,
            };
            let Some(s) = service_of(key).map(str::to_string) else {
                continue;
            };
            match ev {
                Event::Put(k, v) => self.views.entry(s.clone()).or_default().put(k, v),
                Event::Delete(k) => {
                    if let Some(v) = self.views.get_mut(&s) {
                        v.delete(&k);
                    }
                }
            }
            touched.insert(s);
        }
        let outs = self.publish_services(&touched);
        // A service whose last key went is forgotten (a resync would too).
        self.views.retain(|_, v| !v.is_empty());
        outs
    }

    /// What subscriber `id` should be sent now (its first set, even an
    /// empty one), and the set itself.
    pub fn publish(&mut self, id: u64) -> (Vec<Target>, Vec<Out>) {
        let Some(service) = self.subs.get(&id).map(|s| s.service.clone()) else {
            return (Vec::new(), Vec::new());
        };
        let outs = self.publish_services(&BTreeSet::from([service.clone()]));
        let set = self.subs[&id].sent.clone().unwrap_or_default();
        (set, outs)
    }

    fn publish_services(&mut self, services: &BTreeSet<String>) -> Vec<Out> {
        let mut outs = Vec::new();
        for service in services {
            let (set, skipped) = match self.views.get_mut(service) {
                Some(v) => v.backends(),
                None => (Vec::new(), Vec::new()),
            };
            outs.extend(skipped.into_iter().map(|skipped| Out::Skipped {
                service: service.clone(),
                skipped,
            }));
            for (&id, sub) in self.subs.iter_mut().filter(|(_, s)| &s.service == service) {
                if sub.sent.as_ref() != Some(&set) {
                    sub.sent = Some(set.clone());
                    outs.push(Out::Set {
                        id,
                        listen: sub.listen,
                        backends: set.clone(),
                    });
                }
            }
        }
        outs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: &str) -> (Vec<u8>, Vec<u8>) {
        (k.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    fn sets(outs: &[Out]) -> Vec<(u64, Vec<String>)> {
        outs.iter()
            .filter_map(|o| match o {
                Out::Set { id, backends, .. } => {
                    Some((*id, backends.iter().map(|t| t.to_string()).collect()))
                }
                Out::Skipped { .. } => None,
            })
            .collect()
    }

    #[test]
    fn keys_belong_to_the_service_a_prefix_read_would_find_them_under() {
        assert_eq!(service_of(b"/ambassador/services/db/x"), Some("db"));
        assert_eq!(service_of(b"/ambassador/services/db/"), Some("db"));
        assert_eq!(service_of(b"/ambassador/services/db"), None);
        assert_eq!(service_of(b"/ambassador/services//x"), None);
        assert_eq!(service_of(b"/other/db/x"), None);
    }

    #[test]
    fn each_forward_gets_its_services_set_and_only_when_it_changes() {
        let mut f = Fanout::default();
        f.subscribe(1, addr(1), "db");
        f.subscribe(2, addr(2), "cache");
        f.subscribe(3, addr(3), "db");
        let outs = f.reset([
            kv("/ambassador/services/db/a", "10.0.0.1:1"),
            kv("/ambassador/services/cache/a", "10.0.0.9:1"),
            kv("/ambassador/services/db2/a", "10.0.0.5:1"),
        ]);
        assert_eq!(
            sets(&outs),
            [
                (2, vec!["10.0.0.9:1".to_string()]),
                (1, vec!["10.0.0.1:1".to_string()]),
                (3, vec!["10.0.0.1:1".to_string()]),
            ]
        );
        // An event for db touches db's forwards only; db2 is not db.
        let outs = f.apply([
            Event::Put(
                b"/ambassador/services/db/b".to_vec(),
                b"10.0.0.2:1".to_vec(),
            ),
            Event::Put(
                b"/ambassador/services/db2/b".to_vec(),
                b"10.0.0.6:1".to_vec(),
            ),
        ]);
        let two = vec!["10.0.0.1:1".to_string(), "10.0.0.2:1".to_string()];
        assert_eq!(sets(&outs), [(1, two.clone()), (3, two)]);
        // A resync that finds the same keys sends nothing.
        let outs = f.reset([
            kv("/ambassador/services/db/a", "10.0.0.1:1"),
            kv("/ambassador/services/db/b", "10.0.0.2:1"),
            kv("/ambassador/services/cache/a", "10.0.0.9:1"),
        ]);
        assert!(outs.is_empty(), "{outs:?}");
        // The service's last key goes: an empty set, sent.
        let outs = f.apply([Event::Delete(b"/ambassador/services/cache/a".to_vec())]);
        assert_eq!(sets(&outs), [(2, vec![])]);
        assert_eq!(f.counts(), (3, 1)); // the resync found no db2: only db is known
        assert!(!f.unsubscribe(2));
        assert!(!f.unsubscribe(1));
        assert!(f.unsubscribe(3));
    }

    #[test]
    fn a_late_forward_is_answered_from_memory_even_with_no_backend() {
        let mut f = Fanout::default();
        f.reset([kv("/ambassador/services/db/a", "10.0.0.1:1")]);
        f.subscribe(7, addr(7), "db");
        let (set, outs) = f.publish(7);
        assert_eq!(set.len(), 1);
        assert_eq!(sets(&outs), [(7, vec!["10.0.0.1:1".to_string()])]);
        f.subscribe(8, addr(8), "none");
        let (set, outs) = f.publish(8);
        assert!(set.is_empty());
        assert_eq!(sets(&outs), [(8, vec![])]);
        // Published once: not again.
        assert!(f.publish(8).1.is_empty());
    }

    #[test]
    fn a_bad_value_is_reported_once_per_service_not_per_forward() {
        let mut f = Fanout::default();
        f.subscribe(1, addr(1), "db");
        f.subscribe(2, addr(2), "db");
        let outs = f.reset([
            kv("/ambassador/services/db/a", "10.0.0.1:1"),
            kv("/ambassador/services/db/bad", "10.0.0.1:1,10.0.0.2:1"),
        ]);
        let skipped: Vec<_> = outs
            .iter()
            .filter(|o| matches!(o, Out::Skipped { .. }))
            .collect();
        assert_eq!(skipped.len(), 1, "{outs:?}");
        assert_eq!(sets(&outs).len(), 2);
        let outs = f.apply([Event::Put(
            b"/ambassador/services/db/c".to_vec(),
            b"10.0.0.3:1".to_vec(),
        )]);
        assert!(
            outs.iter().all(|o| matches!(o, Out::Set { .. })),
            "{outs:?}"
        );
    }
}
