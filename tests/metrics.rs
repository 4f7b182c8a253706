//! `--metrics`: known traffic through `--mode epoll`, scraped over HTTP,
//! checked by promtool (Prometheus's own parser and linter) and parsed in
//! Rust with `prometheus-parse`; the values must equal the traffic sent.
//! Also `/healthz`, `/readyz` (503 while draining) and the loopback rule.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

/// `GET path` over a fresh connection: (status, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Scraped(prometheus_parse::Scrape);

impl Scraped {
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("{name}: {other:?}"),
            })
    }
}

fn scrape(port: u16) -> (String, Scraped) {
    let (status, text) = get(port, "/metrics");
    assert_eq!(status, 200, "{text}");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    (
        text.clone(),
        Scraped(prometheus_parse::Scrape::parse(lines).unwrap()),
    )
}

#[test]
fn metrics_equal_the_traffic_sent() {
    const N: u64 = 5;
    const K: u64 = 100_000;
    let echo = echo_server();
    let dead = free_port();
    let mport = free_port();
    let dead_listen = free_port();
    let dead_fwd = format!("127.0.0.1:{dead_listen}=127.0.0.1:{dead}");
    let maddr = format!("127.0.0.1:{mport}");
    let p = Proxy::forward(
        "epoll",
        &format!("127.0.0.1:{echo}"),
        &["--forward", &dead_fwd, "--metrics", &maddr],
    );
    assert_eq!(get(mport, "/healthz").0, 200);
    assert_eq!(get(mport, "/readyz").0, 200);
    assert_eq!(get(mport, "/nope").0, 404);

    for seed in 0..N {
        let mut c = p.connect();
        send_stream(&mut c, seed, K).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(check_stream(&mut c, seed, K), Ok(K));
    }
    // Two clients of the dead forward: two connect errors, still up (the
    // ejection threshold is 3).
    for _ in 0..2 {
        let mut c = TcpStream::connect(("127.0.0.1", dead_listen)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert!(matches!(c.read(&mut [0u8; 1]), Ok(0) | Err(_)));
    }
    let fwd = p.addr();
    let fwd = [("listen", fwd.as_str())];
    let backend = format!("127.0.0.1:{echo}");
    let be = [("listen", fwd[0].1), ("backend", backend.as_str())];
    let dl = format!("127.0.0.1:{dead_listen}");
    let dead_be = format!("127.0.0.1:{dead}");
    let dbe = [("listen", dl.as_str()), ("backend", dead_be.as_str())];
    // Every connection has ended (the last close may trail the client's EOF).
    assert!(
        wait_until(10, || {
            scrape(mport).1.value("ambassador_connections_active", &fwd) == Some(0.0)
        }),
        "{}",
        scrape(mport).0
    );
    let (text, m) = scrape(mport);
    promtool_check(&text);
    let n = N as f64;
    let k = (N * K) as f64;
    for (name, labels, want) in [
        ("ambassador_connections_total", &fwd[..], n),
        ("ambassador_connections_active", &fwd[..], 0.0),
        ("ambassador_bytes_to_upstream_total", &fwd[..], k),
        ("ambassador_bytes_to_client_total", &fwd[..], k),
        ("ambassador_spliced_to_upstream_total", &fwd[..], 0.0),
        ("ambassador_spliced_to_client_total", &fwd[..], 0.0),
        ("ambassador_integrity_resets_total", &fwd[..], 0.0),
        ("ambassador_errors_total", &fwd[..], 0.0),
        ("ambassador_backend_connections_total", &be[..], n),
        ("ambassador_backend_connections_active", &be[..], 0.0),
        ("ambassador_connect_errors_total", &be[..], 0.0),
        ("ambassador_backend_up", &be[..], 1.0),
        ("ambassador_connect_errors_total", &dbe[..], 2.0),
        ("ambassador_backend_up", &dbe[..], 1.0),
        (
            "ambassador_errors_total",
            &[("listen", dl.as_str())][..],
            2.0,
        ),
        ("ambassador_engine_info", &[("engine", "epoll")][..], 1.0),
    ] {
        assert_eq!(
            m.value(name, labels),
            Some(want),
            "{name} {labels:?}\n{text}"
        );
    }
    assert_eq!(
        m.value("ambassador_engine_info", &[("engine", "uring")]),
        None
    );

    // A third failure ejects the dead backend: its gauge drops to 0.
    let mut c = TcpStream::connect(("127.0.0.1", dead_listen)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(matches!(c.read(&mut [0u8; 1]), Ok(0) | Err(_)));
    let (text, m) = scrape(mport);
    assert_eq!(m.value("ambassador_backend_up", &dbe), Some(0.0), "{text}");
    assert_eq!(
        m.value("ambassador_connect_errors_total", &dbe),
        Some(3.0),
        "{text}"
    );
    drop(p);
}

#[test]
fn readyz_is_503_while_draining() {
    let echo = echo_server();
    let mport = free_port();
    let maddr = format!("127.0.0.1:{mport}");
    let mut p = Proxy::forward(
        "epoll",
        &format!("127.0.0.1:{echo}"),
        &["--metrics", &maddr],
    );
    assert_eq!(get(mport, "/readyz").0, 200);
    // A live connection keeps the drain going.
    let mut c = p.connect();
    c.write_all(b"x").unwrap();
    assert_eq!(c.read(&mut [0u8; 1]).unwrap(), 1);
    p.signal(libc::SIGTERM);
    assert!(p.wait_log("draining", 10), "{}", p.log());
    assert_eq!(get(mport, "/readyz").0, 503);
    assert_eq!(get(mport, "/healthz").0, 200);
    drop(c);
    assert_eq!(p.wait_exit(10), Some(0), "{}", p.log());
}

#[test]
fn metrics_refuses_a_public_address_without_the_flag() {
    let run = |args: &[&str]| {
        Command::new(BIN)
            .env_clear()
            .args(["--forward", "7000=127.0.0.1:1"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--check", "--metrics", "0.0.0.0:9464"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--metrics 0.0.0.0:9464: "), "{err}");
    assert!(err.contains("--metrics-public"), "{err}");
    let out = run(&["--check", "--metrics", "0.0.0.0:9464", "--metrics-public"]);
    assert_eq!(out.status.code(), Some(0));
    let out = run(&["--check", "--metrics", "nope"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Through the sockmap engine the kernel's counters are folded in before
/// each scrape: copied plus spliced bytes equal the bytes sent, each way.
#[test]
fn sockmap_spliced_bytes_are_scraped() {
    if !engine_available("sockmap") {
        eprintln!("sockmap engine not available here: skipped");
        return;
    }
    const K: u64 = 4 << 20;
    let echo = echo_server();
    let mport = free_port();
    let maddr = format!("127.0.0.1:{mport}");
    let p = Proxy::forward(
        "sockmap",
        &format!("127.0.0.1:{echo}"),
        &["--metrics", &maddr],
    );
    let mut c = p.connect();
    let mut r = c.try_clone().unwrap();
    let check = std::thread::spawn(move || check_stream(&mut r, 9, K));
    send_stream(&mut c, 9, K).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(check.join().unwrap(), Ok(K));
    let fwd = p.addr();
    let fwd = [("listen", fwd.as_str())];
    assert!(
        wait_until(10, || scrape(mport)
            .1
            .value("ambassador_connections_active", &fwd)
            == Some(0.0)),
        "{}",
        p.log()
    );
    let (text, m) = scrape(mport);
    promtool_check(&text);
    let v = |name: &str| {
        m.value(name, &fwd)
            .unwrap_or_else(|| panic!("{name}\n{text}"))
    };
    assert_eq!(
        v("ambassador_bytes_to_upstream_total") + v("ambassador_spliced_to_upstream_total"),
        K as f64,
        "{text}"
    );
    assert_eq!(
        v("ambassador_bytes_to_client_total") + v("ambassador_spliced_to_client_total"),
        K as f64,
        "{text}"
    );
    assert!(
        v("ambassador_spliced_to_upstream_total") > 0.0,
        "spliced: {text}"
    );
    assert_eq!(
        m.value("ambassador_engine_info", &[("engine", "sockmap")]),
        Some(1.0)
    );
}
