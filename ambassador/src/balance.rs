//! Choosing a backend, and passive health: the decisions, without any I/O.
//!
//! A forward may have several backends (`--forward 6379=db1:6379,db2:6379`).
//! For every client the server asks its [`Pool`] for a *plan*: the healthy
//! backends in the order to try them. It connects to the first; if that
//! connect fails before any byte was sent it tries the next, so each backend
//! is tried at most once per client. An empty plan means every backend is
//! down: the client is closed at once.
//!
//! The order comes from the [`Balance`] policy:
//! - `round-robin`: a cursor moves one backend on for every client, so
//!   consecutive clients start at consecutive backends;
//! - `least-conn`: the backends with the fewest live connections first
//!   (ties in round-robin order, so idle backends still share the load).
//!
//! Passive health is a small state machine per backend ([`Health`]), fed
//! only by what real connects do — no probe traffic:
//!
//! ```text
//!            connect ok (failures = 0)
//!            ┌──────┐
//!            ▼      │   `fails` consecutive failures
//!         ┌──────────┐ ─────────────────────────────▶ ┌──────┐
//!         │    Up    │                                 │ Down │ until now + backoff
//!         └──────────┘ ◀──────┐                        └──────┘
//!                             │ connect ok                 │ back-off over
//!                             │                            ▼
//!                          ┌───────┐  connect fails: Down again, back-off doubled
//!                          │ Trial │ ──────────────────────────────────▶ (up to backoff_max)
//!                          └───────┘
//! ```
//!
//! A `Trial` backend takes connections again; the first result decides.
//!
//! Active checks (`--health-interval`, off by default) add HAProxy's rise
//! and fall: a TCP connect to each backend every interval; `fall`
//! consecutive failed checks take an `Up` backend `Down`, and `rise`
//! consecutive good checks bring a `Down` backend back — with checks on, a
//! down backend returns only that way, never by time alone. Connect
//! failures of real clients still eject as above.
//!
//! The time is passed in (`now`), so the whole machine is tested without
//! sleeping.

use std::fmt;
use std::time::{Duration, Instant};

/// How a forward spreads clients over its backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Each new client starts at the next backend.
    #[default]
    RoundRobin,
    /// Each new client goes to the backend with the fewest live connections.
    LeastConn,
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Balance::RoundRobin => "round-robin",
            Balance::LeastConn => "least-conn",
        })
    }
}

/// Balancing and passive-health settings of one forward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    pub balance: Balance,
    /// Consecutive connect failures that eject a backend (at least 1).
    pub fails: u32,
    /// First ejection time; doubled after each failed trial.
    pub backoff: Duration,
    /// The longest ejection.
    pub backoff_max: Duration,
    /// Active TCP checks every `interval` (None: passive health only).
    pub interval: Option<Duration>,
    /// Active checks: consecutive successes that bring a down backend back.
    pub rise: u32,
    /// Active checks: consecutive failures that take an up backend down.
    pub fall: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            balance: Balance::RoundRobin,
            fails: 3,
            backoff: Duration::from_secs(10),
            backoff_max: Duration::from_secs(60),
            interval: None,
            rise: 2,
            fall: 3,
        }
    }
}

/// The passive health of one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Takes connections; `failures` consecutive connect failures so far.
    Up { failures: u32 },
    /// Ejected: takes no connections until `until`. `backoff` is how long
    /// this ejection lasts (the next one after a failed trial is twice it).
    Down { until: Instant, backoff: Duration },
    /// The back-off is over: takes connections, and the first result
    /// decides (ok: `Up`; failure: `Down` for twice `backoff`).
    Trial { backoff: Duration },
}

impl Health {
    /// For the `backend_up` gauge: does it take connections?
    pub fn is_up(&self) -> bool {
        !matches!(self, Health::Down { .. })
    }
}

/// A change of health worth one log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// `Up`/`Trial` → `Down` for `backoff`.
    Ejected { backoff: Duration },
    /// `Down` → `Trial`: the back-off is over.
    Trial,
    /// `Trial` → `Up`: a connect worked again.
    Restored,
}

#[derive(Clone, Debug)]
struct Member {
    health: Health,
    active: u64,
    /// Active checks: consecutive successes / failures so far.
    checks_ok: u32,
    checks_failed: u32,
}

/// The backends of one forward, their health and live connection counts.
/// Backends are referred to by index (their order in the configuration).
#[derive(Clone, Debug)]
pub struct Pool {
    cfg: PoolConfig,
    members: Vec<Member>,
    cursor: usize,
}

impl Pool {
    pub fn new(backends: usize, cfg: PoolConfig) -> Pool {
        Pool {
            cfg,
            members: vec![
                Member {
                    health: Health::Up { failures: 0 },
                    active: 0,
                    checks_ok: 0,
                    checks_failed: 0,
                };
                backends
            ],
            cursor: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    pub fn health(&self, i: usize) -> Health {
        self.members[i].health
    }

    pub fn active(&self, i: usize) -> u64 {
        self.members[i].active
    }

    /// Move every `Down` backend whose back-off is over to `Trial`.
    /// Returns the indexes that changed, for logging. With active checks
    /// nothing moves by time: a down backend comes back after `rise`
    /// good checks ([`Pool::checked`]).
    pub fn tick(&mut self, now: Instant) -> Vec<usize> {
        let mut changed = Vec::new();
        if self.cfg.interval.is_some() {
            return changed;
        }
        for (i, m) in self.members.iter_mut().enumerate() {
            if let Health::Down { until, backoff } = m.health
                && now >= until
            {
                m.health = Health::Trial { backoff };
                changed.push(i);
            }
        }
        changed
    }

    /// The backends to try for one new client, in order; each at most once.
    /// Empty when every backend is down. Call [`Pool::tick`] first.
    pub fn plan(&mut self) -> Vec<usize> {
        let n = self.members.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self.cursor % n;
        self.cursor = (start + 1) % n;
        let mut order: Vec<usize> = (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| self.members[i].health.is_up())
            .collect();
        if self.cfg.balance == Balance::LeastConn {
            // Stable: equal counts keep the round-robin order.
            order.sort_by_key(|&i| self.members[i].active);
        }
        order
    }

    /// A connect to backend `i` worked.
    pub fn connected(&mut self, i: usize) -> Option<Transition> {
        let m = &mut self.members[i];
        let was = m.health;
        m.health = Health::Up { failures: 0 };
        matches!(was, Health::Trial { .. } | Health::Down { .. }).then_some(Transition::Restored)
    }

    /// A connect to backend `i` failed (refused, unreachable, timed out).
    pub fn failed(&mut self, i: usize, now: Instant) -> Option<Transition> {
        let (fails, first, max) = (
            self.cfg.fails.max(1),
            self.cfg.backoff,
            self.cfg.backoff_max,
        );
        let m = &mut self.members[i];
        let backoff = match m.health {
            Health::Up { failures } if failures + 1 >= fails => first.min(max),
            Health::Up { failures } => {
                m.health = Health::Up {
                    failures: failures + 1,
                };
                return None;
            }
            Health::Trial { backoff } => (backoff * 2).min(max),
            // Already ejected (a connect planned before the ejection).
            Health::Down { .. } => return None,
        };
        m.health = Health::Down {
            until: now + backoff,
            backoff,
        };
        // Active checks must show `rise` fresh successes to bring it back.
        m.checks_ok = 0;
        Some(Transition::Ejected { backoff })
    }

    /// The result of an active check of backend `i` (HAProxy's rise/fall):
    /// `fall` consecutive failures take an `Up` backend `Down`; `rise`
    /// consecutive successes bring a `Down` (or `Trial`) one back `Up`.
    pub fn checked(&mut self, i: usize, ok: bool, now: Instant) -> Option<Transition> {
        let (rise, fall) = (self.cfg.rise.max(1), self.cfg.fall.max(1));
        let backoff = self.cfg.backoff.min(self.cfg.backoff_max);
        let m = &mut self.members[i];
        if ok {
            m.checks_failed = 0;
            m.checks_ok = m.checks_ok.saturating_add(1);
            if !matches!(m.health, Health::Up { .. }) && m.checks_ok >= rise {
                m.health = Health::Up { failures: 0 };
                return Some(Transition::Restored);
            }
        } else {
            m.checks_ok = 0;
            m.checks_failed = m.checks_failed.saturating_add(1);
            if !matches!(m.health, Health::Down { .. }) && m.checks_failed >= fall {
                m.health = Health::Down {
                    until: now + backoff,
                    backoff,
                };
                return Some(Transition::Ejected { backoff });
            }
        }
        None
    }

    /// Take over backend `j` of `from` as backend `i` (a reload kept that
    /// backend): its health and check streaks, not its live connections
    /// (those stay counted where they started).
    pub fn adopt(&mut self, i: usize, from: &Pool, j: usize) {
        let m = &from.members[j];
        let to = &mut self.members[i];
        to.health = m.health;
        to.checks_ok = m.checks_ok;
        to.checks_failed = m.checks_failed;
    }

    /// A connection to backend `i` opened / closed (for `least-conn`).
    pub fn opened(&mut self, i: usize) {
        self.members[i].active += 1;
    }

    pub fn closed(&mut self, i: usize) {
        let a = &mut self.members[i].active;
        *a = a.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(balance: Balance) -> PoolConfig {
        PoolConfig {
            balance,
            ..PoolConfig::default()
        }
    }

    #[test]
    fn adopt_keeps_health_but_not_live_connections() {
        let now = Instant::now();
        let mut old = Pool::new(2, cfg(Balance::RoundRobin));
        for _ in 0..3 {
            old.failed(1, now);
        }
        old.opened(0);
        let mut new = Pool::new(3, cfg(Balance::RoundRobin));
        new.adopt(0, &old, 1);
        new.adopt(1, &old, 0);
        assert!(!new.health(0).is_up());
        assert_eq!(new.health(1), Health::Up { failures: 0 });
        assert_eq!(new.active(1), 0);
        assert_eq!(new.plan(), [1, 2]);
    }

    #[test]
    fn active_checks_rise_and_fall() {
        let now = Instant::now();
        let mut p = Pool::new(
            2,
            PoolConfig {
                interval: Some(Duration::from_secs(1)),
                rise: 2,
                fall: 3,
                ..PoolConfig::default()
            },
        );
        // A good check in between resets the failure streak.
        assert_eq!(p.checked(0, false, now), None);
        assert_eq!(p.checked(0, false, now), None);
        assert_eq!(p.checked(0, true, now), None);
        assert_eq!(p.checked(0, false, now), None);
        assert_eq!(p.checked(0, false, now), None);
        assert!(matches!(
            p.checked(0, false, now),
            Some(Transition::Ejected { .. })
        ));
        assert_eq!(p.plan(), [1]);
        // Time alone does not bring it back with active checks on.
        assert!(p.tick(now + Duration::from_secs(3600)).is_empty());
        assert_eq!(p.plan(), [1]);
        assert_eq!(p.checked(0, false, now), None, "already down");
        assert_eq!(p.checked(0, true, now), None);
        assert_eq!(p.checked(0, true, now), Some(Transition::Restored));
        assert_eq!(p.health(0), Health::Up { failures: 0 });
        assert_eq!(p.plan().len(), 2);
        // Passive ejection still works; checks bring it back.
        for _ in 0..3 {
            p.failed(1, now);
        }
        assert!(!p.health(1).is_up());
        p.checked(1, true, now);
        assert_eq!(p.checked(1, true, now), Some(Transition::Restored));
    }

    #[test]
    fn round_robin_rotates_the_start() {
        let mut p = Pool::new(3, cfg(Balance::RoundRobin));
        assert_eq!(p.plan(), [0, 1, 2]);
        assert_eq!(p.plan(), [1, 2, 0]);
        assert_eq!(p.plan(), [2, 0, 1]);
        assert_eq!(p.plan(), [0, 1, 2]);
    }

    #[test]
    fn least_conn_prefers_the_idle_backend() {
        let mut p = Pool::new(3, cfg(Balance::LeastConn));
        p.opened(0);
        p.opened(0);
        p.opened(2);
        assert_eq!(p.plan(), [1, 2, 0]);
        p.closed(0);
        p.closed(0);
        // 0 and 1 tie at zero: round-robin order among them (cursor at 1).
        assert_eq!(p.plan(), [1, 0, 2]);
    }

    #[test]
    fn consecutive_failures_eject_and_success_resets_the_count() {
        let t0 = Instant::now();
        let mut p = Pool::new(2, cfg(Balance::RoundRobin));
        assert_eq!(p.failed(0, t0), None);
        assert_eq!(p.failed(0, t0), None);
        p.connected(0);
        assert_eq!(p.health(0), Health::Up { failures: 0 });
        p.failed(0, t0);
        p.failed(0, t0);
        assert_eq!(
            p.failed(0, t0),
            Some(Transition::Ejected {
                backoff: Duration::from_secs(10)
            })
        );
        assert!(!p.health(0).is_up());
        // Only backend 1 is planned, whatever the cursor.
        assert_eq!(p.plan(), [1]);
        assert_eq!(p.plan(), [1]);
    }

    #[test]
    fn backoff_doubles_up_to_the_max_and_a_trial_success_restores() {
        let mut now = Instant::now();
        let mut p = Pool::new(1, cfg(Balance::RoundRobin));
        for _ in 0..3 {
            p.failed(0, now);
        }
        let mut seen = Vec::new();
        for _ in 0..5 {
            let Health::Down { until, backoff } = p.health(0) else {
                panic!("down: {:?}", p.health(0))
            };
            seen.push(backoff.as_secs());
            assert!(p.tick(until - Duration::from_millis(1)).is_empty());
            assert_eq!(p.plan(), Vec::<usize>::new(), "nothing while down");
            now = until;
            assert_eq!(p.tick(now), [0]);
            assert_eq!(p.plan(), [0], "a trial takes connections");
            assert!(matches!(p.failed(0, now), Some(Transition::Ejected { .. })));
        }
        assert_eq!(seen, [10, 20, 40, 60, 60]);
        let Health::Down { until, .. } = p.health(0) else {
            unreachable!()
        };
        p.tick(until);
        assert_eq!(p.connected(0), Some(Transition::Restored));
        assert_eq!(p.health(0), Health::Up { failures: 0 });
        // Restored: the next ejection starts from the first back-off again.
        for _ in 0..3 {
            p.failed(0, until);
        }
        assert!(matches!(
            p.health(0),
            Health::Down { backoff, .. } if backoff == Duration::from_secs(10)
        ));
    }

    #[test]
    fn a_failure_reported_after_ejection_changes_nothing() {
        let now = Instant::now();
        let mut p = Pool::new(
            1,
            PoolConfig {
                fails: 1,
                ..cfg(Balance::RoundRobin)
            },
        );
        assert!(p.failed(0, now).is_some());
        let before = p.health(0);
        assert_eq!(p.failed(0, now + Duration::from_secs(1)), None);
        assert_eq!(p.health(0), before);
    }
}
