//! Docker discovery and etcd TLS: the flags' validation (bad input is one
//! line naming the flag, exit 2; no secret in `--check`), and Docker
//! discovery live against the real dockerd (the one `tests/docker.rs`
//! uses): labelled redis containers (the FROM-scratch image of
//! `tests/support_docker`) become backends, start/stop/die events are
//! followed, a bad label is skipped with one warning naming it, and a lost
//! Docker socket keeps the last set and is followed again when it returns.
//! The live etcd-over-TLS test is `tests/etcd_tls.rs`.
//!
//! The ambassador runs on the host (`--mode epoll`) and reaches the
//! containers at their bridge addresses. Each test has its own service name,
//! so tests (and other people's containers) never see each other's
//! containers; every container is removed (`Containers`), every process
//! stopped (`Daemon`), every socket and directory removed, on drop.

mod support_docker;

use ambassador_test_support::{free_port, wait_until};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support_docker::docker::{Containers, docker, ensure_dockerd, ip_of, redis_image};
use support_docker::{Daemon, ambassador_bin, unique};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ambassador"))
        .arg("--no-env")
        .args(args)
        .output()
        .expect("run ambassador")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_docker_forward_needs_the_docker_flag() {
    let o = run(&["--forward", "17000=docker://db"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("--forward 17000=docker://db") && e.contains("--docker"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn a_missing_docker_socket_is_one_line_and_exit_2() {
    let o = run(&[
        "--docker",
        "/nonexistent/docker.sock",
        "--forward",
        "17001=docker://db",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("cannot reach docker at /nonexistent/docker.sock"),
        "{e}"
    );
}

#[test]
fn check_shows_a_docker_forward_without_contacting_docker() {
    let o = run(&[
        "--check",
        "--docker",
        "/nonexistent.sock",
        "--forward",
        "17002=docker://db",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("docker://db"));
}

#[test]
fn a_missing_tls_file_names_the_flag() {
    let o = run(&[
        "--etcd-ca",
        "/nonexistent/ca.pem",
        "--forward",
        "17003=etcd://127.0.0.1:1/db",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("ambassador: error: --etcd-ca /nonexistent/ca.pem: cannot read")
    );
    let o = run(&[
        "--etcd-cert",
        "/tmp/c.pem",
        "--forward",
        "17003=etcd://127.0.0.1:1/db",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--etcd-cert: needs --etcd-ca"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn key_contents_never_reach_check_or_errors() {
    let dir = std::env::temp_dir().join(format!("ambassador-tls-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nc2VjcmV0Q0E=\n").unwrap();
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nc2VjcmV0Q0VSVA==\n").unwrap();
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nS3VwZXJTZWNyZXRLZXk=\n").unwrap();
    let (ca, cert, key) = (
        ca.to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
    );
    let o = run(&[
        "--check",
        "--etcd-ca",
        ca,
        "--etcd-cert",
        cert,
        "--etcd-key",
        key,
        "--forward",
        "17004=etcd://127.0.0.1:1/db",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(all.contains("etcd://127.0.0.1:1/db"), "{all}");
    assert!(
        !all.contains("S3VwZXJTZWNyZXRLZXk") && !all.contains("BEGIN"),
        "{all}"
    );
    // A key file that is not PEM: named, its contents not shown.
    std::fs::write(dir.join("bad.pem"), "hunter2").unwrap();
    let bad = dir.join("bad.pem");
    let o = run(&[
        "--etcd-ca",
        ca,
        "--etcd-cert",
        cert,
        "--etcd-key",
        bad.to_str().unwrap(),
        "--forward",
        "17004=etcd://127.0.0.1:1/db",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--etcd-key") && !stderr(&o).contains("hunter2"),
        "{}",
        stderr(&o)
    );
    // Credentials in the URL are refused without being echoed.
    let o = run(&[
        "--check",
        "--forward",
        "17005=etcd://u:pa55word@127.0.0.1:1/db",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!stderr(&o).contains("pa55word"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Live: the real dockerd.

/// The bound for every wait on a condition (containers starting, events
/// arriving, the back-off reaching its next try); never a sleep.
const WAIT: Duration = Duration::from_secs(30);

/// dockerd's own socket (the proxy in [`SockProxy`] forwards to it).
const DOCKERD: &str = "/var/run/docker.sock";

/// A labelled redis container: its name and the tag that tells it apart
/// (its `dbfilename`, which `CONFIG GET` reads through the ambassador).
struct Db {
    name: String,
    tag: String,
}

/// `docker run -d` a redis labelled `ambassador.service=svc`,
/// `ambassador.port=port`, and wait until it answers at its bridge address.
fn db(c: &mut Containers, svc: &str, port: &str) -> Db {
    let tag = unique("db");
    let labels = [
        format!("ambassador.service={svc}"),
        format!("ambassador.port={port}"),
    ];
    let dbfile = format!("{tag}.rdb");
    let name = c.run(
        "amb-dd-",
        &[
            "--label",
            &labels[0],
            "--label",
            &labels[1],
            redis_image(),
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dbfilename",
            &dbfile,
        ],
    );
    let addr = format!("{}:6379", ip_of(&name));
    assert!(
        wait_until(WAIT, || who(&addr).as_deref() == Some(tag.as_str())),
        "{name} does not answer at {addr}"
    );
    Db { name, tag }
}

/// Ask the redis behind `addr` which one it is (`CONFIG GET dbfilename`,
/// then `QUIT`): its tag, or `None` when the connection is refused or closed
/// without an answer.
fn who(addr: &str) -> Option<String> {
    let reply = exchange(
        addr,
        b"*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n$10\r\ndbfilename\r\n*1\r\n$4\r\nQUIT\r\n",
    )?;
    let text = String::from_utf8_lossy(&reply);
    text.split("\r\n")
        .find_map(|l| l.strip_suffix(".rdb"))
        .map(String::from)
}

/// Send `req` to `addr`, read until the peer closes (bounded by a read
/// timeout): the bytes, or `None` if it could not connect or nothing came.
fn exchange(addr: &str, req: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(req).ok()?;
    let mut out = Vec::new();
    // A reset after the answer (or instead of one) ends the read too.
    let _ = s.read_to_end(&mut out);
    (!out.is_empty()).then_some(out)
}

/// RESP for `args`.
fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        v.extend_from_slice(a);
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// The ambassador on the host: `--docker SOCKET --forward
/// 127.0.0.1:PORT=docker://SVC`, ready.
struct Amb {
    d: Daemon,
    addr: String,
}

impl Amb {
    fn start(socket: &str, svc: &str) -> Amb {
        let port = free_port();
        let mut cmd = Command::new(ambassador_bin());
        cmd.args(["--no-env", "--mode", "epoll", "--docker", socket])
            .arg("--forward")
            .arg(format!("127.0.0.1:{port}=docker://{svc}"))
            .env_clear()
            .env("RUST_LOG", "info");
        let mut d = Daemon::spawn(&format!("ambassador docker://{svc}"), &mut cmd);
        d.wait_for("ready forwards=1", WAIT);
        Amb {
            d,
            addr: format!("127.0.0.1:{port}"),
        }
    }

    fn log(&self) -> String {
        self.d.log()
    }

    /// Where the log is now (for [`Amb::wait_line`] on what comes next).
    fn mark(&self) -> usize {
        self.log().len()
    }

    /// Wait for a line after `from` holding every one of `parts`; panic with
    /// the log if none comes.
    fn wait_line(&self, from: usize, parts: &[&str]) -> String {
        let mut found = None;
        let ok = wait_until(WAIT, || {
            found = self.log()[from..]
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
                .map(String::from);
            found.is_some()
        });
        assert!(ok, "no line with {parts:?} after the mark:\n{}", self.log());
        found.unwrap()
    }

    fn count(&self, pat: &str) -> usize {
        self.log().matches(pat).count()
    }

    /// The tags of `n` fresh clients' backends.
    fn whos(&self, n: usize) -> Vec<Option<String>> {
        (0..n).map(|_| who(&self.addr)).collect()
    }
}

/// The set a `docker backends changed` line must hold: `ip:6379` of each.
fn backends_field(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| format!("{}:6379", ip_of(n))).collect()
}

/// (a) A running labelled container is a backend: the ambassador started
/// after it forwards to it, and the bytes sent through the ambassador are
/// in that redis (read back from the container directly, not through the
/// ambassador). A container of another service is not a backend.
#[test]
fn a_running_labelled_container_is_a_backend() {
    ensure_dockerd();
    let svc = unique("amb-svc-a-");
    let mut c = Containers::new();
    let one = db(&mut c, &svc, "6379");
    let other = db(&mut c, &unique("amb-svc-other-"), "6379");
    let amb = Amb::start(DOCKERD, &svc);
    for t in amb.whos(4) {
        assert_eq!(t.as_deref(), Some(one.tag.as_str()), "{}", amb.log());
    }
    // 256 KiB through the ambassador, byte-exact in the container.
    let value: Vec<u8> = (0..256 * 1024).map(|i| b'a' + (i * 7 % 26) as u8).collect();
    let mut req = resp(&[b"SET", b"k", &value]);
    req.extend_from_slice(&resp(&[b"QUIT"]));
    let r = exchange(&amb.addr, &req).expect("no answer through the ambassador");
    assert!(r.starts_with(b"+OK\r\n"), "{}", String::from_utf8_lossy(&r));
    let mut get = resp(&[b"GET", b"k"]);
    get.extend_from_slice(&resp(&[b"QUIT"]));
    let direct = format!("{}:6379", ip_of(&one.name));
    let r = exchange(&direct, &get).expect("no answer from the container");
    let head = format!("${}\r\n", value.len());
    assert!(r.starts_with(head.as_bytes()), "GET: {} bytes", r.len());
    assert!(
        r[head.len()..head.len() + value.len()] == value[..],
        "not byte-exact"
    );
    let other_addr = format!("{}:6379", ip_of(&other.name));
    assert!(!amb.log().contains(&other_addr), "{}", amb.log());
}

/// (b) A container started after the ambassador is picked up (start event)
/// and clients reach both; paused it leaves the set, unpaused it is back;
/// killed (die) it leaves the set and new clients go
/// to the remaining one, while a client held on it before keeps working;
/// the last one stopped (stop) leaves no backend: a new client is closed at
/// once (not left waiting) and the log says why.
#[test]
fn containers_started_and_stopped_later_are_followed() {
    ensure_dockerd();
    let svc = unique("amb-svc-b-");
    let mut c = Containers::new();
    let one = db(&mut c, &svc, "6379");
    let amb = Amb::start(DOCKERD, &svc);
    assert_eq!(who(&amb.addr).as_deref(), Some(one.tag.as_str()));

    let m = amb.mark();
    let two = db(&mut c, &svc, "6379");
    let want = backends_field(&[&one.name, &two.name]);
    let line = amb.wait_line(m, &["docker backends changed", "count=2"]);
    for b in &want {
        assert!(line.contains(b), "{line}");
    }
    let tags = amb.whos(4);
    for t in [&one.tag, &two.tag] {
        assert!(tags.contains(&Some(t.clone())), "{tags:?}\n{}", amb.log());
    }

    // Paused, a container leaves the set (its clients would hang), and
    // comes back when unpaused.
    let m = amb.mark();
    docker(&["pause", &two.name]);
    let line = amb.wait_line(m, &["docker backends changed", "count=1"]);
    assert!(!line.contains(&want[1]), "{line}");
    for t in amb.whos(3) {
        assert_eq!(t.as_deref(), Some(one.tag.as_str()), "{}", amb.log());
    }
    let m = amb.mark();
    docker(&["unpause", &two.name]);
    amb.wait_line(m, &["docker backends changed", "count=2"]);
    let tags = amb.whos(4);
    assert!(tags.contains(&Some(two.tag.clone())), "{tags:?}");

    // A client on `one`, held across the other's death.
    let mut held = loop {
        let mut s = TcpStream::connect(&amb.addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(&resp(&[b"CONFIG", b"GET", b"dbfilename"]))
            .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap();
        if String::from_utf8_lossy(&buf[..n]).contains(&one.tag) {
            break s;
        }
    };

    let m = amb.mark();
    docker(&["kill", &two.name]);
    let line = amb.wait_line(m, &["docker backends changed", "count=1"]);
    assert!(
        line.contains(&want[0]) && !line.contains(&want[1]),
        "{line}"
    );
    for t in amb.whos(4) {
        assert_eq!(t.as_deref(), Some(one.tag.as_str()), "{}", amb.log());
    }
    held.write_all(&resp(&[b"PING"])).unwrap();
    let mut buf = [0u8; 16];
    let n = held.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"+PONG\r\n");
    drop(held);

    let m = amb.mark();
    docker(&["stop", &one.name]);
    amb.wait_line(m, &["docker backends changed: none registered"]);
    let mut s = TcpStream::connect(&amb.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "closed, not left waiting");
    amb.wait_line(m, &["no healthy backend"]);
}

/// (c) Bad `ambassador.port` labels (`notaport`, and `6379x`, which a
/// half-parser would read as 6379 — the redis really listens there) skip
/// the container with one warning naming the container and the label; one
/// found live (started after the ambassador) too; every client goes to the
/// good container; later events do not repeat the warnings.
#[test]
fn a_bad_port_label_is_logged_and_skipped() {
    ensure_dockerd();
    let svc = unique("amb-svc-c-");
    let mut c = Containers::new();
    let good = db(&mut c, &svc, "6379");
    let bad = db(&mut c, &svc, "notaport");
    let amb = Amb::start(DOCKERD, &svc);
    let line = amb.wait_line(0, &["docker container skipped", &bad.name]);
    assert!(
        line.contains("ambassador.port") && line.contains("notaport"),
        "{line}"
    );
    let m = amb.mark();
    let half = db(&mut c, &svc, "6379x");
    let line = amb.wait_line(m, &["docker container skipped", &half.name]);
    assert!(
        line.contains("ambassador.port") && line.contains("6379x"),
        "{line}"
    );
    for t in amb.whos(6) {
        assert_eq!(t.as_deref(), Some(good.tag.as_str()), "{}", amb.log());
    }
    // Another event (a good container joins): the bad ones are not
    // reported again, and never join the set.
    let m = amb.mark();
    let good2 = db(&mut c, &svc, "6379");
    let line = amb.wait_line(m, &["docker backends changed", "count=2"]);
    for b in backends_field(&[&bad.name, &half.name]) {
        assert!(!line.contains(&b), "{line}");
    }
    let log = amb.log();
    assert_eq!(log.matches(&*bad.name).count(), 1, "{log}");
    assert_eq!(log.matches(&*half.name).count(), 1, "{log}");
    let tags = amb.whos(4);
    assert!(tags.contains(&Some(good2.tag.clone())), "{tags:?}");
    assert!(
        tags.iter()
            .all(|t| *t == Some(good.tag.clone()) || *t == Some(good2.tag.clone())),
        "{tags:?}"
    );
}

/// What [`SockProxy`] does with a new connection.
const FORWARD: u8 = 0;
const REFUSE: u8 = 1;

/// A Docker socket that can go away: a unix socket in a temp directory
/// that forwards every connection to dockerd's (so the shared dockerd is
/// never stopped). [`SockProxy::lose`] cuts every connection and removes
/// the socket (dockerd gone); [`SockProxy::listen`] makes it again, with
/// `REFUSE` accepting and closing each connection at once (a daemon not
/// answering yet; they are counted) or `FORWARD`.
struct SockProxy {
    dir: PathBuf,
    path: PathBuf,
    mode: Arc<AtomicU8>,
    refused: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SockProxy {
    fn new() -> SockProxy {
        let dir = std::env::temp_dir().join(unique("amb-dsock-"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut p = SockProxy {
            path: dir.join("docker.sock"),
            dir,
            mode: Arc::new(AtomicU8::new(FORWARD)),
            refused: Arc::new(AtomicUsize::new(0)),
            conns: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        p.listen(FORWARD);
        p
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }

    fn listen(&mut self, mode: u8) {
        assert!(self.thread.is_none(), "already listening");
        self.mode.store(mode, Ordering::SeqCst);
        self.stop.store(false, Ordering::SeqCst);
        let l = UnixListener::bind(&self.path).unwrap();
        l.set_nonblocking(true).unwrap();
        let (mode, refused, conns, stop) = (
            self.mode.clone(),
            self.refused.clone(),
            self.conns.clone(),
            self.stop.clone(),
        );
        self.thread = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let s = match l.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        // The accept loop's own pace, not a synchronisation.
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(e) => panic!("accept: {e}"),
                };
                if mode.load(Ordering::SeqCst) == REFUSE {
                    refused.fetch_add(1, Ordering::SeqCst);
                    drop(s);
                    continue;
                }
                s.set_nonblocking(false).unwrap();
                let Ok(up) = UnixStream::connect(DOCKERD) else {
                    continue;
                };
                let mut kept = conns.lock().unwrap();
                for (from, to) in [(&s, &up), (&up, &s)] {
                    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
                kept.push(s);
                kept.push(up);
            }
        }));
    }

    /// Cut every connection, stop listening, remove the socket.
    fn lose(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for SockProxy {
    fn drop(&mut self) {
        self.lose();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// (d) The Docker socket lost while running: the last set keeps serving,
/// one warning however many reconnects fail (the socket gone, then there
/// but closing every connection), and once dockerd answers again a
/// container started meanwhile is picked up (the re-list is the resync).
#[test]
fn a_lost_docker_socket_keeps_the_set_and_is_followed_again() {
    ensure_dockerd();
    let svc = unique("amb-svc-d-");
    let mut c = Containers::new();
    let mut sock = SockProxy::new();
    let one = db(&mut c, &svc, "6379");
    let amb = Amb::start(sock.path(), &svc);
    assert_eq!(who(&amb.addr).as_deref(), Some(one.tag.as_str()));

    let m = amb.mark();
    sock.lose();
    let line = amb.wait_line(m, &["docker connection lost"]);
    assert!(line.contains(sock.path()), "{line}");
    for t in amb.whos(3) {
        assert_eq!(t.as_deref(), Some(one.tag.as_str()), "{}", amb.log());
    }
    // A change while it is gone.
    let two = db(&mut c, &svc, "6379");
    // Back but not answering: the back-off keeps trying (seen as refused
    // connections), without another warning.
    sock.listen(REFUSE);
    assert!(
        wait_until(WAIT, || sock.refused.load(Ordering::SeqCst) >= 3),
        "no reconnect tries:\n{}",
        amb.log()
    );
    for t in amb.whos(3) {
        assert_eq!(t.as_deref(), Some(one.tag.as_str()), "{}", amb.log());
    }
    assert_eq!(amb.count("docker connection lost"), 1, "{}", amb.log());
    assert_eq!(amb.count("docker connection back"), 0, "{}", amb.log());

    // dockerd answers again: the list picks up the container started meanwhile.
    sock.lose();
    let m = amb.mark();
    sock.listen(FORWARD);
    amb.wait_line(m, &["docker connection back"]);
    let line = amb.wait_line(m, &["docker backends changed", "count=2"]);
    for b in backends_field(&[&one.name, &two.name]) {
        assert!(line.contains(&b), "{line}");
    }
    let tags = amb.whos(4);
    assert!(
        tags.contains(&Some(two.tag.clone())),
        "{tags:?}\n{}",
        amb.log()
    );
    // And events are followed again.
    let m = amb.mark();
    docker(&["kill", &two.name]);
    amb.wait_line(m, &["docker backends changed", "count=1"]);
    assert_eq!(amb.count("docker connection lost"), 1, "{}", amb.log());
    assert_eq!(amb.count("docker connection back"), 1, "{}", amb.log());
}
