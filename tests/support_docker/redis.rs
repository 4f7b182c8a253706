//! redis-server and redis-cli inside one of the [`TwoHosts`](super::netns::TwoHosts)
//! namespaces, shared by the two-host chain tests (`tests/chain.rs`, `tests/discovery_chain.rs`).
//!
//! The server keeps nothing on disk (no RDB save, no AOF), runs in the foreground so that its
//! [`Daemon`] owns it (stopped on drop, even when an assertion fails), and is ready once it
//! logs so.

use super::Daemon;
use super::netns::TwoHosts;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const START: Duration = Duration::from_secs(30);

/// A redis-server in namespace `ns` on `addr:port`, working directory `dir`; ready.
pub fn redis_server(ns: &str, addr: Ipv4Addr, port: u16, dir: &Path) -> Daemon {
    let mut d = Daemon::spawn(
        &format!("redis :{port}"),
        TwoHosts::cmd(ns, "redis-server")
            .args(["--bind", &addr.to_string(), "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--daemonize", "no", "--maxclients", "1000"])
            .arg("--dir")
            .arg(dir),
    );
    d.wait_for("Ready to accept connections", START);
    d
}

/// `redis-cli -h HOST -p PORT` inside namespace `ns` (add the command's arguments).
pub fn redis_cli(ns: &str, host: &str, port: u16) -> Command {
    let mut c = TwoHosts::cmd(ns, "redis-cli");
    c.args(["-h", host, "-p", &port.to_string()]);
    c
}
