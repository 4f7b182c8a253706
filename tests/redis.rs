//! A real client through the classic configuration: redis-server started
//! here, the ambassador configured only by a link variable, and
//! redis-benchmark plus a byte-exact 1 MiB SET/GET through it, per engine.

#[path = "support/redis.rs"]
mod redis;
mod support;

use redis::Redis;
use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;
use support::*;

/// SET then GET a value of `n` random bytes with raw RESP.
fn set_get(addr: &str, n: usize) {
    let value = Stream::bytes(77, n);
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${n}\r\n").into_bytes();
    req.extend_from_slice(&value);
    req.extend_from_slice(b"\r\n*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n");
    c.write_all(&req).unwrap();
    let mut want = format!("+OK\r\n${n}\r\n").into_bytes();
    want.extend_from_slice(&value);
    want.extend_from_slice(b"\r\n");
    let mut got = vec![0u8; want.len()];
    c.read_exact(&mut got).unwrap();
    assert!(got == want, "GET returned the value byte for byte");
}

fn classic(mode: &str) {
    let redis = Redis::start();
    let listen = free_port();
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env(
            format!("DB_PORT_{listen}_TCP"),
            format!("tcp://127.0.0.1:{}", redis.port),
        )
        .args(["--mode", mode]);
    let mut p = Proxy::spawn(cmd, listen).expect("ambassador ready");
    assert!(
        p.log().contains(&format!(
            "listening forward=DB_PORT_{listen}_TCP listen=0.0.0.0:{listen}"
        )),
        "{}",
        p.log()
    );
    set_get(&format!("127.0.0.1:{listen}"), 1 << 20);
    let out = Command::new("redis-benchmark")
        .args([
            "-p",
            &listen.to_string(),
            "-n",
            "20000",
            "-c",
            "20",
            "-q",
            "-t",
            "set,get",
        ])
        .output()
        .expect("redis-benchmark");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    assert!(out.status.success(), "{text}");
    for op in ["SET: ", "GET: "] {
        let line = text
            .lines()
            .rfind(|l| l.starts_with(op))
            .unwrap_or_else(|| panic!("{op} in {text}"));
        let rps: f64 = line[op.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(rps > 0.0, "{line}");
        eprintln!("{mode} {line}");
    }
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(10), Some(0));
    // 20 benchmark clients x 2 tests + the SET/GET connection, no errors.
    assert!(p.stat("conns_total").unwrap() >= 41, "{}", p.log());
    assert_eq!(p.stat("errors"), Some(0), "{}", p.log());
}

#[test]
fn redis_through_classic_link_variable_epoll() {
    classic("epoll")
}

#[test]
fn redis_through_classic_link_variable_uring() {
    classic("uring")
}

#[test]
fn redis_through_classic_link_variable_sockmap() {
    classic("sockmap")
}
