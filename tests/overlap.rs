//! The kernel trap behind the sockmap engine's duplicated bytes, made on
//! purpose: a TCP segment that starts with bytes the receiver already has.
//!
//! TCP queues such a "partial packet" whole (`tcp_data_queue`), and in
//! verdict-only mode `tcp_read_skb` hands the whole skb to our program
//! without skipping the old part. In the wild it comes from a spurious loss
//! probe merged with the next segment in the socket backlog (rare, timing
//! dependent; docs/sockmap.md, "Overlapping skbs"). Here it is crafted:
//!
//! 1. in a network namespace of its own (loopback only, TCP timestamps off
//!    so a hand-made header needs no options), an app connects through
//!    `ambassador --mode sockmap --splice always` to a sink, sends A and
//!    waits until the proxy spliced it;
//! 2. the app's exact sequence numbers are read with `TCP_REPAIR` (and
//!    repair mode is left again without a window probe);
//! 3. a raw socket sends one segment in the app's name that repeats the last
//!    40,000 bytes of A and carries B after them;
//! 4. the app then sends B itself (TCP drops it as old, which keeps the
//!    app's own sequence space in step) and C, and closes.
//!
//! The sink must get exactly A, B, C; the proxy must count the 40,000 bytes
//! as cut and reset nothing. Before the cut existed the repeated bytes went
//! through twice and the integrity check reset the connection.

mod support;

use ambassador_test_support::netns::private_netns;
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread;
use support::{Proxy, wait_until};

const TCP_REPAIR: libc::c_int = 19;
const TCP_REPAIR_QUEUE: libc::c_int = 20;
const TCP_QUEUE_SEQ: libc::c_int = 21;
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
const TCP_REPAIR_ON: libc::c_int = 1;
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;

fn setopt(s: &TcpStream, name: libc::c_int, v: libc::c_int) {
    // Safety: a c_int option on a socket we own.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        r,
        0,
        "setsockopt {name}: {}",
        std::io::Error::last_os_error()
    );
}

fn getopt(s: &TcpStream, name: libc::c_int) -> u32 {
    let mut v: u32 = 0;
    let mut len = size_of::<u32>() as libc::socklen_t;
    // Safety: a u32 option into a u32 we own.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            name,
            (&mut v as *mut u32).cast(),
            &mut len,
        )
    };
    assert_eq!(
        r,
        0,
        "getsockopt {name}: {}",
        std::io::Error::last_os_error()
    );
    v
}

/// (next sequence number the app sends, next one it expects), from repair
/// mode, which is then left without sending anything.
fn sequence_numbers(app: &TcpStream) -> (u32, u32) {
    setopt(app, TCP_REPAIR, TCP_REPAIR_ON);
    setopt(app, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE);
    let snd = getopt(app, TCP_QUEUE_SEQ);
    setopt(app, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE);
    let rcv = getopt(app, TCP_QUEUE_SEQ);
    setopt(app, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP);
    (snd, rcv)
}

/// Bytes in the socket's send queue not yet acknowledged (`SIOCOUTQ`).
fn outq(s: &TcpStream) -> i32 {
    let mut n: libc::c_int = 0;
    // Safety: TIOCOUTQ (= SIOCOUTQ) writes one c_int.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    assert_eq!(r, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
    n
}

/// The Internet checksum of `parts`, concatenated.
fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Send one PSH|ACK segment `from` -> `to` with `seq`, `ack` and `payload`
/// through a raw socket (the kernel adds the IP header).
fn inject(from: SocketAddrV4, to: SocketAddrV4, seq: u32, ack: u32, payload: &[u8]) {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&from.port().to_be_bytes());
    h[2..4].copy_from_slice(&to.port().to_be_bytes());
    h[4..8].copy_from_slice(&seq.to_be_bytes());
    h[8..12].copy_from_slice(&ack.to_be_bytes());
    h[12] = 5 << 4; // 20-byte header, no options
    h[13] = 0x18; // PSH | ACK
    h[14..16].copy_from_slice(&1024u16.to_be_bytes()); // scaled by the app's wscale
    let len = (h.len() + payload.len()) as u16;
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&from.ip().octets());
    pseudo.extend_from_slice(&to.ip().octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
    pseudo.extend_from_slice(&len.to_be_bytes());
    let sum = checksum(&[&pseudo, &h, payload]);
    h[16..18].copy_from_slice(&sum.to_be_bytes());
    let packet = [&h[..], payload].concat();
    // Safety: a raw socket we create, use and close here.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let dst = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(*to.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let n = libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&dst as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(
            n,
            packet.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
        libc::close(fd);
    }
}

fn v4(a: std::net::SocketAddr) -> SocketAddrV4 {
    match a {
        std::net::SocketAddr::V4(a) => a,
        a => panic!("not IPv4: {a}"),
    }
}

fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8))
        .collect()
}

#[test]
fn a_segment_repeating_spliced_bytes_is_cut_in_the_kernel() {
    if !support::engine_available("sockmap") {
        eprintln!("skipped: sockmap not available here");
        return;
    }
    // Loopback only, and TCP timestamps off so a hand-made header needs no options.
    private_netns(&[("ipv4/tcp_timestamps", "0")]);
    // Ten 4,095-byte cuts and a remainder: the program's loop, not one call.
    const REPEAT: usize = 40_000;
    let (a, b, c) = (pattern(1, 50_000), pattern(2, 20_000), pattern(3, 3000));

    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let got = Arc::new(Mutex::new((Vec::new(), None::<std::io::ErrorKind>)));
    let g = got.clone();
    thread::spawn(move || {
        let (mut s, _) = sink.accept().unwrap();
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => g.lock().unwrap().0.extend_from_slice(&buf[..n]),
                Err(e) => {
                    g.lock().unwrap().1 = Some(e.kind());
                    break;
                }
            }
        }
        g.lock()
            .unwrap()
            .1
            .get_or_insert(std::io::ErrorKind::UnexpectedEof);
    });
    let received = || got.lock().unwrap().0.len();

    let proxy = Proxy::forward("sockmap", &sink_addr.to_string(), &[]);
    assert!(
        proxy.log().contains("are cut in the kernel"),
        "the program must be loaded with the cut on: {}",
        proxy.log()
    );
    let mut app = proxy.connect();
    app.write_all(&a).unwrap();
    assert!(wait_until(10, || received() == a.len()), "A never arrived");
    // Every byte of A acknowledged, so the app's send queue is empty and
    // its next sequence number is the receiver's next expected one.
    assert!(wait_until(10, || outq(&app) == 0), "A never acknowledged");
    proxy.signal(libc::SIGUSR1);
    assert!(
        wait_until(10, || proxy.stat("spliced_to_upstream")
            == Some(a.len() as u64)),
        "A was not spliced: {}",
        proxy.log()
    );

    let (snd, rcv) = sequence_numbers(&app);
    let segment = [&a[a.len() - REPEAT..], &b[..]].concat();
    let from = v4(app.local_addr().unwrap());
    let to = v4(app.peer_addr().unwrap());
    inject(from, to, snd.wrapping_sub(REPEAT as u32), rcv, &segment);
    assert!(
        wait_until(10, || received() >= a.len() + b.len()),
        "the crafted segment never arrived"
    );
    // B again from the app itself: already received, so TCP drops it and
    // acknowledges, and the app's sequence space catches up.
    app.write_all(&b).unwrap();
    app.write_all(&c).unwrap();
    app.shutdown(std::net::Shutdown::Write).unwrap();
    let total = a.len() + b.len() + c.len();
    assert!(
        wait_until(20, || got.lock().unwrap().1.is_some()),
        "the sink never saw the end of the stream ({} bytes so far)",
        received()
    );
    let (bytes, end) = got.lock().unwrap().clone();
    assert_eq!(end, Some(std::io::ErrorKind::UnexpectedEof), "clean end");
    assert_eq!(bytes.len(), total, "the sink got {} bytes", bytes.len());
    assert!(bytes == [a, b, c].concat(), "the sink got other bytes");

    drop(app);
    proxy.signal(libc::SIGUSR1);
    assert!(
        wait_until(10, || proxy.stat("spliced_trimmed") == Some(REPEAT as u64)),
        "the proxy must count the {REPEAT} repeated bytes as cut: {}",
        proxy.log()
    );
    assert_eq!(proxy.stat("integrity_resets"), Some(0), "{}", proxy.log());
}
