//! etcd over TLS with client certificates, live: a CA, a server certificate
//! (SAN 127.0.0.1) and client certificates made with `openssl` (the test PKI
//! of `ambassador_test_support::pki`),
//! a real etcd (Debian's `etcd-server` 3.4) started with `--cert-file
//! --key-file --client-cert-auth --trusted-ca-file` on free loopback ports.
//!
//! - `ambassador register --etcd https://… --etcd-ca --etcd-cert --etcd-key`
//!   registers, a forward `etcd://…` with the same flags picks the backend
//!   up and bytes flow through it;
//! - without the client certificate, with a client certificate of another
//!   CA, or trusting the wrong CA, both the forward and `register` fail at
//!   start with one error line and exit code 2 (start-up configuration, like
//!   an etcd that cannot be reached);
//! - the private key's contents never appear in any log (at debug level) or
//!   in `--check` output; only paths do.
//!
//! Everything made (the etcd process and its data, the certificates, the
//! ambassadors) is removed or stopped on drop, also when an assertion fails.

#[path = "support/redis.rs"]
mod redis;
mod support;

use ambassador_test_support::pki;
use redis::{Redis, command, connect};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;
use support::*;

/// A directory of its own, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!(
            "ambassador-etcd-tls-{tag}-{}-{}",
            std::process::id(),
            free_port()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    /// The path of `name` inside, as a string for a flag.
    fn file(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The certificates of one test: `ca` (etcd's and the clients' CA),
/// `server` (SAN 127.0.0.1), `client` (signed by `ca`), and a second CA
/// `other` with a client certificate `stranger` signed by it.
struct Pki {
    dir: Dir,
}

impl Pki {
    fn new() -> Pki {
        let dir = Dir::new("pki");
        let d = &dir.0;
        pki::make(d).expect("test PKI");
        pki::ca(d, "other").expect("second CA");
        pki::cert(d, "stranger", "other", pki::CLIENT).expect("stranger's certificate");
        Pki { dir }
    }

    fn file(&self, name: &str) -> String {
        self.dir.file(name)
    }

    /// `--etcd-ca CA [--etcd-cert NAME.pem --etcd-key NAME.key]`.
    fn flags(&self, ca: &str, client: Option<&str>) -> Vec<String> {
        let mut v = vec!["--etcd-ca".to_string(), self.file(&format!("{ca}.pem"))];
        if let Some(c) = client {
            v.push("--etcd-cert".into());
            v.push(self.file(&format!("{c}.pem")));
            v.push("--etcd-key".into());
            v.push(self.file(&format!("{c}.key")));
        }
        v
    }

    /// What must never be shown: every line of every private key's PEM body
    /// (a shown key would show at least one of them), and the PEM header.
    fn secrets(&self) -> Vec<String> {
        let mut v = vec!["PRIVATE KEY".to_string()];
        for k in ["client", "stranger", "server", "ca", "other"] {
            let text = std::fs::read_to_string(self.file(&format!("{k}.key"))).unwrap();
            v.extend(
                text.lines()
                    .filter(|l| !l.starts_with("-----") && l.len() >= 16)
                    .map(String::from),
            );
        }
        assert!(v.len() > 5, "{v:?}");
        v
    }

    /// Panic if `text` (`what`) holds any part of a private key.
    fn assert_no_secret(&self, what: &str, text: &str) {
        for s in self.secrets() {
            assert!(
                !text.contains(&s),
                "{what} shows key material {s:?}:\n{text}"
            );
        }
    }
}

/// etcd 3.4 with TLS and client-certificate auth on free loopback ports
/// (the peer URL stays plain: one member, nothing else connects to it);
/// killed, its data removed, on drop.
struct TlsEtcd {
    child: Child,
    port: u16,
    _data: Dir,
}

impl TlsEtcd {
    fn start(pki: &Pki) -> TlsEtcd {
        let data = Dir::new("data");
        let (port, peer_port) = (free_port(), free_port());
        let client = format!("https://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(&data.0)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args(["--cert-file", &pki.file("server.pem")])
            .args(["--key-file", &pki.file("server.key")])
            .args(["--trusted-ca-file", &pki.file("ca.pem")])
            .arg("--client-cert-auth")
            .args(["--log-level", "error", "--logger", "zap"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (apt-get install etcd-server)");
        let e = TlsEtcd {
            child,
            port,
            _data: data,
        };
        assert!(
            ambassador_test_support::wait_until(Duration::from_secs(30), || e
                .ctl(pki, &["endpoint", "health"])
                .status
                .success()),
            "etcd with TLS did not start"
        );
        e
    }

    /// `etcdctl` over TLS with the good client certificate.
    fn ctl(&self, pki: &Pki, args: &[&str]) -> Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=https://127.0.0.1:{}", self.port))
            .args(["--cacert", &pki.file("ca.pem")])
            .args(["--cert", &pki.file("client.pem")])
            .args(["--key", &pki.file("client.key")])
            .args(["--dial-timeout=2s", "--command-timeout=3s"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("etcdctl (apt-get install etcd-client)")
    }

    fn get(&self, pki: &Pki, key: &str) -> Option<String> {
        let out = self.ctl(pki, &["get", "--print-value-only", key]);
        assert!(out.status.success(), "etcdctl get: {out:?}");
        let v = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
        (!v.is_empty()).then_some(v)
    }

    fn https(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A forward's backend URL for `service`.
    fn url(&self, service: &str) -> String {
        format!("etcd://127.0.0.1:{}/{service}", self.port)
    }
}

impl Drop for TlsEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `ambassador register` (stderr kept in a file); killed on drop.
struct Register {
    child: Child,
    log: PathBuf,
    _dir: Dir,
}

impl Register {
    fn spawn(args: &[String]) -> Register {
        let dir = Dir::new("register");
        let log = dir.0.join("register.log");
        let child = Command::new(BIN)
            .arg("register")
            .args(args)
            .env_clear()
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn ambassador register");
        Register {
            child,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM (revokes the lease), wait for the exit: its code.
    fn stop(mut self) -> Option<i32> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let mut code = None;
        let exited = ambassador_test_support::wait_until(Duration::from_secs(10), || {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    code = st.code();
                    true
                }
                _ => false,
            }
        });
        assert!(exited, "register did not exit on SIGTERM:\n{}", self.log());
        code
    }
}

impl Drop for Register {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ambassador ARGS` to completion (bounded: start-up fails or `--check`
/// prints) with `RUST_LOG=log` (`""`: the default, what a user sees; `debug`:
/// everything the program and its libraries would ever log, to be checked
/// for secrets): exit code, stdout, stderr.
fn run_to_end(args: &[String], log: &str) -> (Option<i32>, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env_clear()
        .env("RUST_LOG", log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ambassador");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let mut code = None;
    let done =
        ambassador_test_support::wait_until(Duration::from_secs(30), || match child.try_wait() {
            Ok(Some(st)) => {
                code = st.code();
                true
            }
            _ => false,
        });
    if !done {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (o, e) = (o.join().unwrap(), e.join().unwrap());
    assert!(done, "ambassador {args:?} did not exit:\n{e}");
    (code, o, e)
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The whole way with client certificates: register over TLS, a forward
/// over TLS finds the backend, bytes flow, `--check` shows paths only, and
/// no log or output ever holds key material. Then the ways it must fail.
#[test]
fn client_certificates_register_and_forward() {
    let pki = Pki::new();
    let etcd = TlsEtcd::start(&pki);
    let r = Redis::start();
    let tls = pki.flags("ca", Some("client"));

    // register over https:// with the client certificate.
    let mut args = strings(&["--etcd", &etcd.https(), "--service", "db"]);
    args.extend(strings(&["--address", &r.addr(), "--ttl", "10s"]));
    args.extend(tls.iter().cloned());
    let reg = Register::spawn(&args);
    let key = format!("/ambassador/services/db/{}", r.addr());
    assert!(
        ambassador_test_support::wait_until(Duration::from_secs(20), || etcd
            .get(&pki, &key)
            .as_deref()
            == Some(r.addr().as_str())),
        "not registered over TLS:\n{}",
        reg.log()
    );

    // A forward with the same flags: the backend is found, bytes flow.
    let port = free_port();
    let mut cmd = Command::new(BIN);
    cmd.args(["--no-env", "--mode", "epoll", "--forward"])
        .arg(format!("127.0.0.1:{port}={}", etcd.url("db")))
        .args(&tls)
        .env_clear();
    let p = Proxy::spawn(cmd, port)
        .unwrap_or_else(|(code, log)| panic!("the TLS forward did not start ({code:?}):\n{log}"));
    let mut c = connect(&p.addr());
    assert_eq!(command(&mut c, &["SET", "tls", "through-etcd-tls"]), "+OK");
    let mut direct = connect(&r.addr());
    assert_eq!(
        command(&mut direct, &["GET", "tls"]),
        "through-etcd-tls",
        "the SET did not reach the registered redis"
    );
    assert_eq!(command(&mut c, &["GET", "tls"]), "through-etcd-tls");

    // The forward follows changes over TLS: deregistered, the set empties.
    assert_eq!(reg.stop(), Some(0));
    assert!(
        p.wait_log("etcd backends changed: none registered", 20),
        "{}",
        p.log()
    );
    pki.assert_no_secret("the forward's log", &p.log());

    // --check: the URL and the TLS paths, no contents.
    let mut args = strings(&["--no-env", "--check", "--forward"]);
    args.push(format!("7000={}", etcd.url("db")));
    args.extend(tls.iter().cloned());
    let (code, out, err) = run_to_end(&args, "debug");
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&etcd.url("db")), "{out}");
    pki.assert_no_secret("--check", &format!("{out}{err}"));
}

/// The CA that signed the client certificate is not etcd's, no client
/// certificate at all, or the CA given to the ambassador is not the one
/// that signed etcd's certificate: at start, a forward and `register` each
/// fail with one error line naming the etcd, and exit code 2 — the same as
/// an etcd that cannot be reached (start-up configuration). No key material
/// is shown.
#[test]
fn wrong_certificates_are_one_line_and_exit_2() {
    let pki = Pki::new();
    let etcd = TlsEtcd::start(&pki);
    for (what, ca, client) in [
        ("no client certificate", "ca", None),
        ("a client certificate of another CA", "ca", Some("stranger")),
        (
            "the wrong CA for etcd's certificate",
            "other",
            Some("client"),
        ),
    ] {
        let tls = pki.flags(ca, client);
        let mut fwd = strings(&["--no-env", "--mode", "epoll", "--forward"]);
        fwd.push(format!("127.0.0.1:{}={}", free_port(), etcd.url("db")));
        fwd.extend(tls.iter().cloned());
        let mut reg = strings(&["register", "--etcd", &etcd.https(), "--service", "db"]);
        reg.extend(strings(&["--address", "127.0.0.1:6399"]));
        reg.extend(tls.iter().cloned());
        for (args, says) in [(&fwd, "cannot reach etcd"), (&reg, "cannot register")] {
            // What a user sees: one line.
            let (code, out, err) = run_to_end(args, "");
            eprintln!("{what}: {err}");
            assert_eq!(code, Some(2), "{what}: {out}{err}");
            assert_eq!(err.lines().count(), 1, "{what}: {err}");
            assert!(
                err.starts_with("ambassador: error: ") && err.contains(says),
                "{what}: {err}"
            );
            assert!(
                err.contains(&format!("127.0.0.1:{}", etcd.port)),
                "{what}: {err}"
            );
            // It says what to look at: the certificate (by path) or the CA.
            let why = match client {
                None => "require a client certificate".to_string(),
                Some("stranger") => {
                    format!("refuse the client certificate {}", pki.file("stranger.pem"))
                }
                _ => "invalid peer certificate".to_string(),
            };
            assert!(err.contains(&why), "{what}: {err}");
            pki.assert_no_secret(what, &format!("{out}{err}"));
            // Everything logged at debug level: the same exit, no key material.
            let (code, out, err) = run_to_end(args, "debug");
            assert_eq!(code, Some(2), "{what}: {out}{err}");
            pki.assert_no_secret(what, &format!("{out}{err}"));
        }
    }
    // Nothing was registered by any of them.
    assert_eq!(
        etcd.get(&pki, "/ambassador/services/db/127.0.0.1:6399"),
        None
    );
}

/// The same TLS through the config file (`etcd_ca`, `etcd_cert`,
/// `etcd_key`): the forward finds a key put with etcdctl and bytes flow;
/// `--check --config` shows the forward and no key material.
#[test]
fn config_file_keys_give_the_same_tls() {
    let pki = Pki::new();
    let etcd = TlsEtcd::start(&pki);
    let r = Redis::start();
    let put = etcd.ctl(&pki, &["put", "/ambassador/services/cache/one", &r.addr()]);
    assert!(put.status.success(), "etcdctl put: {put:?}");
    let dir = Dir::new("conf");
    let file = dir.file("a.toml");
    let port = free_port();
    std::fs::write(
        &file,
        format!(
            "etcd_ca = \"{}\"\netcd_cert = \"{}\"\netcd_key = \"{}\"\n\n\
             [[forward]]\nname = \"cache\"\nlisten = \"127.0.0.1:{port}\"\nbackends = [\"{}\"]\n",
            pki.file("ca.pem"),
            pki.file("client.pem"),
            pki.file("client.key"),
            etcd.url("cache")
        ),
    )
    .unwrap();
    let (code, out, err) = run_to_end(
        &strings(&["--no-env", "--check", "--config", &file]),
        "debug",
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&etcd.url("cache")), "{out}");
    pki.assert_no_secret("--check --config", &format!("{out}{err}"));

    let mut cmd = Command::new(BIN);
    cmd.args(["--no-env", "--mode", "epoll", "--config", &file])
        .env_clear();
    let p = Proxy::spawn(cmd, port)
        .unwrap_or_else(|(code, log)| panic!("the TLS forward did not start ({code:?}):\n{log}"));
    let mut c = connect(&p.addr());
    assert_eq!(command(&mut c, &["SET", "conf", "via-config"]), "+OK");
    let mut direct = connect(&r.addr());
    assert_eq!(command(&mut direct, &["GET", "conf"]), "via-config");
    pki.assert_no_secret("the forward's log", &p.log());
}
