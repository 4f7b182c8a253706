//! The proxy under test (the real release binary, one forward, started and
//! stopped like production: `ready` on start, SIGTERM and its final `stats`
//! line on exit) and the optional CPU hog.

use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// The engine configurations the soak knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Config {
    SockmapAlways,
    SockmapAdaptive,
    SockmapNever,
    Uring,
    Epoll,
}

impl Config {
    pub fn name(self) -> &'static str {
        match self {
            Config::SockmapAlways => "sockmap-always",
            Config::SockmapAdaptive => "sockmap-adaptive",
            Config::SockmapNever => "sockmap-never",
            Config::Uring => "uring",
            Config::Epoll => "epoll",
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Config::SockmapAlways => &["--mode", "sockmap", "--splice", "always"],
            Config::SockmapAdaptive => &["--mode", "sockmap", "--splice", "adaptive"],
            Config::SockmapNever => &["--mode", "sockmap", "--splice", "never"],
            Config::Uring => &["--mode", "uring"],
            Config::Epoll => &["--mode", "epoll"],
        }
    }
}

/// The proxy's final counters (its last `stats` line).
#[derive(Debug, Default, Clone)]
pub struct ProxyStats {
    pub conns_total: u64,
    pub errors: u64,
    pub spliced: u64,
    pub integrity_resets: u64,
    pub splice_fallbacks: u64,
}

impl ProxyStats {
    /// Parse a `stats forward=… key=value …` line.
    fn parse(line: &str) -> ProxyStats {
        let get = |key: &str| -> u64 {
            line.split_whitespace()
                .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.trim_matches('"').parse().ok())
                .unwrap_or(0)
        };
        ProxyStats {
            conns_total: get("conns_total"),
            errors: get("errors"),
            spliced: get("spliced_to_upstream") + get("spliced_to_client"),
            integrity_resets: get("integrity_resets"),
            splice_fallbacks: get("splice_fallbacks"),
        }
    }
}

/// How the proxy ended.
pub struct Stopped {
    /// None: it had to be killed after the drain did not finish.
    pub status: Option<ExitStatus>,
    pub stats: Option<ProxyStats>,
    /// Its WARN/ERROR lines (the first few).
    pub notable: Vec<String>,
}

/// What the log reader keeps: the last `stats` line and the first notable lines.
#[derive(Default)]
struct Log {
    stats: Option<String>,
    notable: Vec<String>,
    notable_seen: usize,
}

const KEEP_NOTABLE: usize = 40;

pub struct Proxy {
    child: Child,
    log: Arc<Mutex<Log>>,
    reader: Option<JoinHandle<()>>,
    pub addr: SocketAddr,
}

fn free_port() -> Result<u16> {
    Ok(ambassador_test_support::free_ports::<1>()?[0])
}

impl Proxy {
    /// Start `bin` forwarding a fresh loopback port to `upstream`; wait for `ready`.
    pub fn start(bin: &Path, cfg: Config, upstream: SocketAddr) -> Result<Proxy> {
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.args(cfg.args())
            .arg("--forward")
            .arg(format!("127.0.0.1:{port}={upstream}"))
            .args(["--no-env", "--drain-timeout", "20s", "--log-format", "text"])
            // AMBASSADOR_SOAK_RUST_LOG=debug for a replay's full story.
            .env(
                "RUST_LOG",
                std::env::var("AMBASSADOR_SOAK_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let stderr = child.stderr.take().context("proxy stderr")?;
        let log = Arc::new(Mutex::new(Log::default()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        let reader = thread::spawn(move || read_log(stderr, &log2, tx));
        let p = Proxy {
            child,
            log,
            reader: Some(reader),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let notable = p.stop_now().notable.join("\n");
            bail!(
                "{}: the proxy did not log `ready` in 20 s:\n{notable}",
                cfg.name()
            );
        }
        Ok(p)
    }

    /// Has the proxy exited on its own?
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, wait for the drain (up to 40 s), then SIGKILL if needed.
    pub fn stop(mut self) -> Stopped {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let status =
            ambassador_test_support::poll(Duration::from_secs(40), "the drain", || self.exited())
                .ok();
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let mut s = self.finish();
        s.status = status;
        s
    }

    /// Kill at once (start-up failed).
    fn stop_now(mut self) -> Stopped {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.finish()
    }

    fn finish(&mut self) -> Stopped {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let mut notable = log.notable.clone();
        if log.notable_seen > notable.len() {
            notable.push(format!(
                "... and {} more WARN/ERROR lines",
                log.notable_seen - notable.len()
            ));
        }
        Stopped {
            status: None,
            stats: log.stats.as_deref().map(ProxyStats::parse),
            notable,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.reader.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_log(stderr: std::process::ChildStderr, log: &Mutex<Log>, ready: mpsc::Sender<()>) {
    let mut ready = Some(ready);
    // AMBASSADOR_SOAK_PROXY_LOG=FILE keeps every line of the proxy's log.
    let mut keep =
        std::env::var_os("AMBASSADOR_SOAK_PROXY_LOG").and_then(|p| std::fs::File::create(p).ok());
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if let Some(f) = keep.as_mut() {
            use std::io::Write;
            let _ = writeln!(f, "{line}");
        }
        if line.contains(" ready ") || line.ends_with(" ready") {
            if let Some(tx) = ready.take() {
                let _ = tx.send(());
            }
        }
        let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
        if line.contains(" stats ") {
            l.stats = Some(line);
        } else if line.contains("WARN") || line.contains("ERROR") {
            l.notable_seen += 1;
            if l.notable.len() < KEEP_NOTABLE {
                l.notable.push(line);
            }
        }
    }
}

/// Busy-loop children, one per CPU, killed on drop: the proxy and the
/// kernel's workers then compete for every CPU.
pub struct Hog(Vec<Child>);

impl Hog {
    pub fn start() -> Result<Hog> {
        let n = thread::available_parallelism().map_or(2, |n| n.get());
        let mut v = Vec::new();
        for _ in 0..n {
            let c = Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .spawn()
                .context("starting the CPU hog")?;
            v.push(c);
        }
        eprintln!("soak: CPU hog running ({n} busy loops)");
        Ok(Hog(v))
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
