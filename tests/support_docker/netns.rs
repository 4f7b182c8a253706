//! Two "hosts" for the chain tests (`tests/chain.rs`, `tests/discovery_chain.rs`): network
//! namespaces joined by a veth pair, with private addresses that exist only inside them. This is
//! the one implementation of that set-up. Names are unique per test run, so tests (and other
//! people's tests) can run side by side. [`TwoHosts`] is a guard: both namespaces (and anything
//! still running in them, and the veth pair, whose ends live inside them) are removed on drop,
//! also when a test panics or when the set-up itself fails halfway (the guard exists before the
//! first `ip` command). Programs run inside a host through [`TwoHosts::cmd`]; code of the test
//! itself through [`in_ns`].

use super::{ok, run};
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

pub struct TwoHosts {
    /// Namespace names.
    pub host1: String,
    pub host2: String,
    /// host1's and host2's address on the veth link (10.200.1.0/24, inside the namespaces only).
    pub addr1: Ipv4Addr,
    pub addr2: Ipv4Addr,
}

impl TwoHosts {
    pub fn new() -> TwoHosts {
        let tag = super::unique("");
        let hosts = TwoHosts {
            host1: format!("amb-host1-{tag}"),
            host2: format!("amb-host2-{tag}"),
            addr1: Ipv4Addr::new(10, 200, 1, 1),
            addr2: Ipv4Addr::new(10, 200, 1, 2),
        };
        // From here on, Drop removes whatever part was made.
        for ns in [&hosts.host1, &hosts.host2] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        // Both ends are created directly inside the namespaces, so the interface names never
        // exist in (or collide in) the root namespace.
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &hosts.host1,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &hosts.host2,
        ]);
        for (ns, a) in [(&hosts.host1, hosts.addr1), (&hosts.host2, hosts.addr2)] {
            ip(&["-n", ns, "addr", "add", &format!("{a}/24"), "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
        }
        hosts
    }

    /// A command that runs `prog` inside namespace `ns` (`ip netns exec` execs it, so the
    /// child's pid is the program's).
    pub fn cmd(ns: &str, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(prog);
        c
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.host1, &self.host2] {
            // Stragglers (a daemon whose guard was leaked) would keep the namespace alive.
            for pid in pids(ns) {
                // Safety: kill(2); these pids are inside a namespace this test created.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = run(Command::new("ip").args(["netns", "del", ns]), None, T);
        }
    }
}

/// Run `f` on a thread of its own inside network namespace `ns` (sockets it opens stay in
/// `ns`; the test's other threads are not moved), and return its result.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // Safety: setns(2) on this (fresh) thread only, with a namespace file we opened.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in namespace")
}

/// The processes inside namespace `ns` (`ip netns pids`).
pub fn pids(ns: &str) -> Vec<i32> {
    run(Command::new("ip").args(["netns", "pids", ns]), None, T)
        .stdout_str()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The names `ip netns list` shows.
pub fn namespaces() -> Vec<String> {
    ok(Command::new("ip").args(["netns", "list"]), None, T)
        .stdout_str()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn ip(args: &[&str]) {
    ok(Command::new("ip").args(args), None, T);
}
