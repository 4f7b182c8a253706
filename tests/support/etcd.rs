//! A real etcd (Debian's `etcd-server`, `/usr/bin/etcd`) for tests: one
//! member on free loopback ports with its own data directory, ready when
//! `etcdctl endpoint health` says so; killed and removed on drop. It can be
//! killed and started again on the same ports and data (a lost etcd that
//! comes back). `etcdctl` (Debian's `etcd-client`) reads and writes keys.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use ambassador_test_support::{poll, until, wait_until};

pub struct Etcd {
    child: Option<Child>,
    pub port: u16,
    peer_port: u16,
    dir: PathBuf,
}

impl Etcd {
    pub fn start() -> Etcd {
        let mut e = Etcd::unstarted();
        e.restart();
        e
    }

    /// Ports and a data directory chosen, not started yet ([`Etcd::restart`]
    /// starts it): an etcd that is not there yet.
    pub fn unstarted() -> Etcd {
        let port = crate::support::free_port();
        let peer_port = crate::support::free_port();
        let dir =
            std::env::temp_dir().join(format!("ambassador-etcd-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Etcd {
            child: None,
            port,
            peer_port,
            dir,
        }
    }

    /// `127.0.0.1:PORT`, as `--etcd` takes it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `etcd://127.0.0.1:PORT/SERVICE`, as a forward's backend.
    pub fn url(&self, service: &str) -> String {
        format!("etcd://127.0.0.1:{}/{service}", self.port)
    }

    /// Start (again, after [`Etcd::kill`]: same ports, same data) and wait
    /// until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let client = format!("http://127.0.0.1:{}", self.port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args(["--log-level", "error", "--logger", "zap"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (apt-get install etcd-server)");
        self.child = Some(child);
        until(
            Duration::from_secs(20),
            "etcd to answer `endpoint health`",
            || self.ctl(&["endpoint", "health"]).status.success(),
        );
    }

    /// Kill it (SIGKILL) and wait until its port refuses connections.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        until(
            Duration::from_secs(10),
            "the killed etcd's port to refuse",
            || std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err(),
        );
    }

    /// Send `sig` (SIGSTOP: an etcd that stops answering, sockets open).
    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("running").id();
        unsafe { libc::kill(pid as i32, sig) };
    }

    /// `etcdctl --endpoints … ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=http://127.0.0.1:{}", self.port))
            .args(["--dial-timeout=1s", "--command-timeout=2s"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("etcdctl (apt-get install etcd-client)")
    }

    pub fn put(&self, key: &str, value: &str) {
        let out = self.ctl(&["put", key, value]);
        assert!(out.status.success(), "etcdctl put: {out:?}");
    }

    pub fn del(&self, key: &str) {
        let out = self.ctl(&["del", key]);
        assert!(out.status.success(), "etcdctl del: {out:?}");
    }

    /// The value of `key`, if it exists.
    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.ctl(&["get", "--print-value-only", key]);
        assert!(out.status.success(), "etcdctl get: {out:?}");
        let v = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
        (!v.is_empty()).then_some(v)
    }

    /// Wait up to `secs` for `cond` on the value of `key`.
    pub fn wait_key(&self, key: &str, secs: u64, cond: impl Fn(Option<&str>) -> bool) -> bool {
        wait_until(Duration::from_secs(secs), || cond(self.get(key).as_deref()))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `ambassador register`; killed on drop.
pub struct Registrar {
    pub child: Child,
    pub key: String,
    /// Its stderr, in a file beside the etcd data directory.
    log: PathBuf,
}

impl Registrar {
    /// Register `address` as a backend of `service` and wait until the key
    /// is in etcd.
    pub fn start(etcd: &Etcd, service: &str, address: &str, ttl: &str) -> Registrar {
        let log = etcd
            .dir
            .with_extension(format!("register-{}.log", address.replace(':', "-")));
        let child = Command::new(crate::support::BIN)
            .args(["register", "--etcd", &etcd.addr(), "--service", service])
            .args(["--address", address, "--ttl", ttl])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn ambassador register");
        let key = format!("/ambassador/services/{service}/{address}");
        let r = Registrar { child, key, log };
        assert!(
            etcd.wait_key(&r.key, 10, |v| v == Some(address)),
            "{} was not registered",
            r.key
        );
        r
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait up to `secs` for the log to contain `needle`.
    pub fn wait_log(&self, needle: &str, secs: u64) -> bool {
        wait_until(Duration::from_secs(secs), || self.log().contains(needle))
    }

    /// Wait for exit (up to `secs`), returning the exit code.
    pub fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        let child = &mut self.child;
        poll(Duration::from_secs(secs), "register to exit", || {
            child.try_wait().ok().flatten()
        })
        .ok()
        .and_then(|st| st.code())
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}
