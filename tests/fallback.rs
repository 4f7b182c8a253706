//! `--mode auto` takes the best engine that starts (sockmap only where its
//! kernel program can cut repeated bytes) and says why it skipped
//! the others; an explicitly requested engine that cannot start is an
//! error. The restrictions apply to the child process only: a seccomp filter
//! that makes io_uring_setup fail with EPERM (as Docker's default profile
//! does) and an empty capability set (as an unprivileged container has).

mod support;

use std::process::Command;
use support::*;

fn start(mode: &str, drop_caps: bool, deny_io_uring: bool) -> Result<Proxy, (Option<i32>, String)> {
    let echo = echo_server();
    let port = free_port();
    let mut cmd = Command::new(BIN);
    cmd.env_clear().args([
        "--mode",
        mode,
        "--forward",
        &format!("127.0.0.1:{port}=127.0.0.1:{echo}"),
    ]);
    restrict(&mut cmd, drop_caps, deny_io_uring);
    Proxy::spawn(cmd, port)
}

fn line_with<'a>(log: &'a str, needle: &str) -> &'a str {
    log.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no {needle:?} in:\n{log}"))
}

/// `auto` skipped `engine` with one line that says each of `why`, chose
/// `chosen`, and the chosen engine forwards.
fn assert_auto_skipped(p: &Proxy, engine: &str, why: &[&str], chosen: &str) {
    let log = p.log();
    let skipped = line_with(&log, &format!("engine skipped engine={engine}"));
    for w in why {
        assert!(skipped.contains(w), "{w:?} not in: {skipped}");
    }
    assert!(
        log.contains(&format!("engine chosen engine={chosen} mode=auto")),
        "{log}"
    );
    ping(p);
}

/// An explicitly requested `mode` did not start: exit 1, the line naming
/// the mode says `why`, and no other engine was taken instead.
fn assert_refused(started: Result<Proxy, (Option<i32>, String)>, mode: &str, why: &str) {
    let (code, log) = started.err().expect("must not start");
    assert_eq!(code, Some(1), "{log}");
    let line = line_with(&log, &format!("--mode {mode}:"));
    assert!(line.contains(why), "{line}");
    assert!(!log.contains("engine chosen"), "no silent fallback: {log}");
}

/// Round trip through a running proxy, so "chosen" also means "works".
fn ping(p: &Proxy) {
    use std::io::{Read, Write};
    let mut c = p.connect();
    c.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
}

/// With every privilege sockmap starts, its kernel program cuts repeated
/// bytes, and `auto` chooses it (one worker, said in the log) and forwards.
#[test]
fn auto_chooses_sockmap_where_it_cuts_repeated_bytes() {
    let p = start("auto", false, false).expect("starts");
    let log = p.log();
    assert!(
        log.contains("skbs that repeat bytes already spliced are cut in the kernel"),
        "{log}"
    );
    assert!(!log.contains("engine skipped"), "{log}");
    assert!(
        log.contains("engine chosen engine=sockmap mode=auto"),
        "{log}"
    );
    ping(&p);
}

/// With CAP_BPF and CAP_NET_ADMIN but neither CAP_PERFMON nor CAP_SYS_ADMIN
/// the program loads without the cut: `auto` does not choose it, says why
/// and how to opt in, and takes uring.
#[test]
fn auto_skips_sockmap_that_cannot_cut_repeated_bytes() {
    let echo = echo_server();
    let port = free_port();
    let mut cmd = Command::new("capsh");
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .args([
            "--drop=cap_perfmon,cap_sys_admin",
            "--",
            "-c",
            "exec \"$0\" \"$@\"",
            BIN,
            "--mode",
            "auto",
            "--forward",
            &format!("127.0.0.1:{port}=127.0.0.1:{echo}"),
        ]);
    let p = Proxy::spawn(cmd, port).expect("starts");
    assert_auto_skipped(
        &p,
        "sockmap",
        &["not chosen by auto", "CAP_PERFMON", "--mode sockmap"],
        "uring",
    );
}

#[test]
fn auto_without_capabilities_picks_uring_and_says_why() {
    let p = start("auto", true, false).expect("starts");
    assert_auto_skipped(&p, "sockmap", &["EPERM", "CAP_BPF"], "uring");
}

#[test]
fn auto_with_io_uring_blocked_picks_epoll_and_says_why() {
    let p = start("auto", true, true).expect("starts");
    assert!(
        p.log().contains("engine skipped engine=sockmap"),
        "{}",
        p.log()
    );
    assert_auto_skipped(&p, "uring", &["io_uring_setup: EPERM", "seccomp"], "epoll");
}

#[test]
fn uring_requested_but_blocked_is_an_error() {
    assert_refused(
        start("uring", false, true),
        "uring",
        "io_uring_setup: EPERM",
    );
}

#[test]
fn sockmap_requested_without_capabilities_is_an_error() {
    assert_refused(start("sockmap", true, false), "sockmap", "EPERM");
}
