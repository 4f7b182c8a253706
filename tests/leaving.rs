//! Leaving the kernel must not wait on a peer that waits on us.
//!
//! A spliced connection whose half outran its destination by more than the
//! in-flight cap leaves the kernel: both sockets come out of `VERDICT`, and
//! the bytes already redirected must drain into the destination before the
//! sockets can leave the maps. An echo-like upstream reads those bytes only
//! while its answers are taken. Before the fix nobody took them while
//! leaving (the other half's source was not read until both halves had
//! drained), so once the kernel buffers between the two were full the
//! connection stalled for good: seen on small guests (9.6 MB in flight at
//! the leave, the 6.12 kernel-matrix soak), made certain here with small
//! TCP buffers in a namespace of its own, a slow echo and a 16 MiB cap.
//! Now a half whose destination took every redirected byte is copied in
//! userspace while the other drains (`engine/sockmap/leaving.rs`).

mod support;

use ambassador_test_support::netns::private_netns;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::thread;
use std::time::Duration;
use support::{BIN, Proxy, free_port};

/// Each way; far more than the buffers of the namespace hold.
const BYTES: usize = 64 << 20;

fn byte(i: usize) -> u8 {
    (i % 251) as u8
}

/// An echo server that is slower than the client: 16 KiB reads, each
/// answered after a pause (the pause is the traffic pattern, not a wait),
/// so the client→server half outruns it and the connection leaves the
/// kernel with megabytes in flight.
fn slow_echo() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    thread::sleep(Duration::from_millis(1));
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
    });
    addr
}

#[test]
fn leaving_the_kernel_copies_the_drained_half_while_the_other_drains() {
    if !support::engine_available("sockmap") {
        eprintln!("skipped: sockmap not available here");
        return;
    }
    // TCP buffers of at most 128 KiB, in a namespace of this test's own.
    let small = "4096 16384 131072";
    private_netns(&[("ipv4/tcp_rmem", small), ("ipv4/tcp_wmem", small)]);
    let echo = slow_echo();
    let port = free_port();
    let fwd = format!("127.0.0.1:{port}={echo}");
    let mut cmd = Command::new(BIN);
    cmd.args(["--mode", "sockmap", "--splice", "always", "--forward", &fwd])
        .env_clear()
        .env("AMBASSADOR_SOCKMAP_INFLIGHT", (16u64 << 20).to_string());
    let proxy = Proxy::spawn(cmd, port).expect("proxy did not become ready");

    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // A stall shows as a timeout here, not as a hung test.
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = c.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let chunk: Vec<u8> = (0..1 << 16).map(byte).collect();
        let mut sent = 0;
        while sent < BYTES {
            // 65,536 is not a multiple of 251: offset the pattern.
            let off = sent % 251;
            let part: Vec<u8> = chunk
                .iter()
                .enumerate()
                .map(|(i, _)| byte(off + i))
                .collect();
            w.write_all(&part)?;
            sent += part.len();
        }
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut r = c;
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    while got < BYTES {
        let n = match r.read(&mut buf) {
            Ok(0) => panic!("EOF after {got} bytes: {}", proxy.log()),
            Ok(n) => n,
            Err(e) => panic!(
                "stalled after {got} of {BYTES} bytes ({e}): {}",
                tail(&proxy.log())
            ),
        };
        for (i, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, byte(got + i), "wrong byte at {}", got + i);
        }
        got += n;
    }
    writer.join().unwrap().expect("writer");
    assert_eq!(r.read(&mut buf).expect("EOF"), 0, "bytes after the stream");
    let log = proxy.log();
    assert!(
        log.contains("connection leaves the kernel"),
        "the connection never left the kernel, so the leave was not tested: {}",
        tail(&log)
    );
    proxy.signal(libc::SIGUSR1);
    assert!(
        support::wait_until(10, || proxy.stat("integrity_resets").is_some()),
        "no stats line"
    );
    assert_eq!(proxy.stat("integrity_resets"), Some(0), "{}", tail(&log));
}

fn tail(log: &str) -> &str {
    &log[log.len().saturating_sub(4000)..]
}
