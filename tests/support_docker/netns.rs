//! Two "hosts" for the chain test: network namespaces joined by a veth pair, with private
//! addresses that exist only inside them. Names are unique per test run, so tests (and other
//! people's tests) can run side by side; both namespaces (and anything still running in them)
//! are removed on drop.

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
            let pids = run(Command::new("ip").args(["netns", "pids", ns]), None, T).stdout_str();
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // Safety: kill(2); these pids are inside a namespace this test created.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = run(Command::new("ip").args(["netns", "del", ns]), None, T);
        }
    }
}

fn ip(args: &[&str]) {
    ok(Command::new("ip").args(args), None, T);
}
