//! Discovery at scale: many etcd services, one etcd forward each (issue 13).
//!
//! One run, for one ambassador binary, prints one JSON line:
//!
//! 1. start a real etcd (Debian's `etcd-server`) on free loopback ports with
//!    a scratch data directory;
//! 2. write `services × per` endpoints in `ambassador register`'s layout
//!    (`/ambassador/services/sN/127.0.0.2:PORT`) through the JSON gateway;
//! 3. start the binary with a config file of one etcd forward per service
//!    (listening on `FWD0 + N`); it is ready once the last forward accepts
//!    (the server waits for every first read before it listens);
//! 4. after a short settle, read its `VmRSS`, `VmHWM`, thread and fd counts
//!    from `/proc`, and count the established connections to etcd (`ss`:
//!    all, and the ambassador's own);
//! 5. `changes` times, move one service: delete its keys, put one endpoint
//!    that is a real listener answering `N`, and time from the delete to the
//!    first connection through the ambassador that reads `N`; p50/p99/max.
//!
//! With `--tls` the ambassador dials etcd's HTTPS listener with a client
//! certificate (`pki.rs` makes them) while the driver writes over plain HTTP.
//!
//! Every loop is bounded in count and time; every process started is
//! stopped and the scratch directory removed, also on error.

use super::gateway::Gateway;
use anyhow::{Context, Result, bail};
use serde_json::json;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Forward N listens on `127.0.0.1:FWD0 + N`.
const FWD0: u16 = 30000;
/// How many moves may take in all, and one move at most.
const CHANGES_BUDGET: Duration = Duration::from_secs(240);
const ONE_CHANGE: Duration = Duration::from_secs(5);

/// How big a run is.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    pub services: u16,
    pub per: u16,
    pub changes: u32,
    /// The ambassador dials etcd over TLS with a client certificate
    /// (`etcd_ca`, `etcd_cert`, `etcd_key`); the driver keeps a plain HTTP
    /// listener of the same etcd for its own writes.
    pub tls: bool,
}

/// A child process killed (and reaped) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run once for `bin`; the result as one JSON line (no newline).
pub fn run(bin: &Path, scale: Scale) -> Result<String> {
    anyhow::ensure!(
        u32::from(scale.services) + u32::from(FWD0) < 65535,
        "--services {} does not fit above port {FWD0}",
        scale.services
    );
    let dir = Scratch(std::env::temp_dir().join(format!("amb-disc-bench-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0)?;
    let [client, peer, secure] = ambassador_test_support::free_ports::<3>()?;
    if scale.tls {
        super::pki::make(&dir.0)?;
    }
    let _etcd = start_etcd(&dir.0, client, peer, scale.tls.then_some(secure))?;
    // The port the ambassador dials.
    let dialed = if scale.tls { secure } else { client };
    let gw = Gateway::new(client);
    wait(Duration::from_secs(20), || gw.answers()).context("etcd did not answer")?;

    let t = Instant::now();
    for s in 0..scale.services {
        for e in 0..scale.per {
            let a = format!("127.0.0.2:{}", 40000 + e);
            gw.put(&format!("/ambassador/services/s{s}/{a}"), &a)?;
        }
    }
    let load_s = t.elapsed().as_secs_f64();

    // The endpoint every move goes to: accepts, says N, closes.
    let new = TcpListener::bind("127.0.0.1:0")?;
    let new_addr = new.local_addr()?;
    std::thread::spawn(move || {
        for c in new.incoming().flatten() {
            let mut c = c;
            let _ = c.write_all(b"N");
        }
    });

    let conf = dir.0.join("a.toml");
    let mut text = String::new();
    if scale.tls {
        let f = |n: &str| dir.0.join(n).display().to_string();
        text.push_str(&format!(
            "etcd_ca = \"{}\"\netcd_cert = \"{}\"\netcd_key = \"{}\"\n\n",
            f("ca.pem"),
            f("client.pem"),
            f("client.key")
        ));
    }
    for s in 0..scale.services {
        text.push_str(&format!(
            "[[forward]]\nlisten = \"127.0.0.1:{}\"\nbackends = [\"etcd://127.0.0.1:{dialed}/s{s}\"]\n\n",
            FWD0 + s
        ));
    }
    std::fs::write(&conf, text)?;
    let log = std::fs::File::create(dir.0.join("amb.log"))?;
    let t = Instant::now();
    let amb = Killed(
        Command::new(bin)
            .args(["--mode", "epoll", "--config"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?,
    );
    let last: SocketAddr = ([127, 0, 0, 1], FWD0 + scale.services - 1).into();
    wait(Duration::from_secs(120), || {
        TcpStream::connect_timeout(&last, Duration::from_secs(1)).is_ok()
    })
    .with_context(|| {
        let log = std::fs::read_to_string(dir.0.join("amb.log")).unwrap_or_default();
        format!("the last forward {last} never accepted: {}", tail(&log))
    })?;
    let ready_s = t.elapsed().as_secs_f64();
    // Settle: let the start-up's transient buffers go before reading RSS.
    std::thread::sleep(Duration::from_secs(2));
    let pid = amb.0.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let (conns, own_conns) = etcd_connections(dialed, pid)?;

    let mut lat = Vec::new();
    let budget = Instant::now();
    for i in 0..scale.changes {
        if budget.elapsed() > CHANGES_BUDGET {
            break;
        }
        let s = ((i as u64 * 7) % u64::from(scale.services)) as u16;
        let t = Instant::now();
        gw.delete_prefix(&format!("/ambassador/services/s{s}/"))?;
        gw.put(
            &format!("/ambassador/services/s{s}/{new_addr}"),
            &new_addr.to_string(),
        )?;
        let fwd: SocketAddr = ([127, 0, 0, 1], FWD0 + s).into();
        while t.elapsed() < ONE_CHANGE {
            if answer(fwd) == Some(b'N') {
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    lat.sort_by(f64::total_cmp);
    let q = |p| quantile(&lat, p).map(|v| (v * 100.0).round() / 100.0);
    let line = json!({
        "bin": bin.display().to_string(),
        "services": scale.services,
        "tls": scale.tls,
        "endpoints": u32::from(scale.services) * u32::from(scale.per),
        "etcd_load_s": (load_s * 10.0).round() / 10.0,
        "ready_s": (ready_s * 100.0).round() / 100.0,
        "VmRSS": field(&status, "VmRSS"),
        "VmHWM": field(&status, "VmHWM"),
        "threads": field(&status, "Threads").and_then(|t| t.parse::<u64>().ok()),
        "fds": fds,
        "etcd_connections": conns,
        "ambassador_etcd_connections": own_conns,
        "changes": lat.len(),
        "change_to_first_conn_ms": { "p50": q(0.5), "p99": q(0.99), "max": q(1.0) },
    });
    Ok(line.to_string())
}

/// etcd on `client` (plain HTTP) and, with `secure`, also HTTPS there with
/// client certificates required (the files of `pki.rs` in `dir`).
fn start_etcd(dir: &Path, client: u16, peer: u16, secure: Option<u16>) -> Result<Killed> {
    let mut c = format!("http://127.0.0.1:{client}");
    if let Some(s) = secure {
        c.push_str(&format!(",https://127.0.0.1:{s}"));
    }
    let p = format!("http://127.0.0.1:{peer}");
    let mut cmd = Command::new("etcd");
    if secure.is_some() {
        let f = |n: &str| dir.join(n);
        cmd.arg("--cert-file").arg(f("server.pem"));
        cmd.arg("--key-file").arg(f("server.key"));
        cmd.arg("--trusted-ca-file").arg(f("ca.pem"));
        cmd.arg("--client-cert-auth");
    }
    let child = cmd
        .arg("--data-dir")
        .arg(dir.join("etcd"))
        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
        .args([
            "--listen-peer-urls",
            &p,
            "--initial-advertise-peer-urls",
            &p,
        ])
        .args(["--initial-cluster", &format!("default={p}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting etcd (apt-get install etcd-server)")?;
    Ok(Killed(child))
}

/// The first byte a new connection through `fwd` reads, if any in time.
fn answer(fwd: SocketAddr) -> Option<u8> {
    let mut c = TcpStream::connect_timeout(&fwd, Duration::from_secs(1)).ok()?;
    c.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    let mut b = [0u8; 1];
    match c.read(&mut b) {
        Ok(1) => Some(b[0]),
        _ => None,
    }
}

/// Established TCP connections to etcd's client port (`ss`, iproute2): all
/// of them (the driver's gateway connection and etcd's own gateway among
/// them, as the Python driver counted), and those of process `pid`.
fn etcd_connections(port: u16, pid: u32) -> Result<(usize, usize)> {
    let o = Command::new("ss")
        .args(["-tnpH", "state", "established"])
        .arg(format!("( dport = :{port} )"))
        .output()
        .context("ss (apt-get install iproute2)")?;
    anyhow::ensure!(
        o.status.success(),
        "ss: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout);
    let own = format!("pid={pid},");
    let all = text.lines().count();
    Ok((all, text.lines().filter(|l| l.contains(&own)).count()))
}

/// Poll `cond` every 100 ms for up to `limit`.
fn wait(limit: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("not within {limit:?}")
}

/// The value of `Name:` in a `/proc/PID/status` text, trimmed.
fn field(status: &str, name: &str) -> Option<String> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == name).then(|| v.trim().to_string())
    })
}

/// The `p` quantile of sorted `v` (nearest rank below: index ⌊p·n⌋, the
/// last for p = 1), as the Python driver computed it.
fn quantile(v: &[f64], p: f64) -> Option<f64> {
    let i = ((p * v.len() as f64) as usize).min(v.len().checked_sub(1)?);
    Some(v[i])
}

/// The last lines of a log, for an error.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_as_the_python_driver() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(51.0));
        assert_eq!(quantile(&v, 0.99), Some(100.0));
        assert_eq!(quantile(&v, 1.0), Some(100.0));
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[3.0], 0.99), Some(3.0));
    }

    #[test]
    fn status_fields() {
        let s = "Name:\tambassador\nVmHWM:\t   12345 kB\nVmRSS:\t   10000 kB\nThreads:\t3\n";
        assert_eq!(field(s, "VmRSS").as_deref(), Some("10000 kB"));
        assert_eq!(field(s, "Threads").as_deref(), Some("3"));
        assert_eq!(field(s, "Vm").as_deref(), None);
    }
}
