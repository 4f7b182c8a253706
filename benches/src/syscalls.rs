//! Syscalls per connection: `strace -c -f` attached to a row's processes while
//! a fixed number of connections goes through it.
//!
//! Why a count and not a time: the syscalls a proxy makes per connection
//! (accept, connect, socket options, `epoll_ctl`, reads, writes, shutdowns,
//! closes) are what its connection rate pays for, and unlike a rate the count
//! hardly moves with the machine's load. strace stops the proxy at every
//! syscall and slows it several times over, so this is measured in its own
//! step after the timed rounds, on freshly started rows, never while timing.
//!
//! How: start the row, attach `strace -c -f -o FILE -p PID...` to every
//! process of the row (`-f` with `-p` attaches every thread, and follows
//! socat's forks), wait until strace says it attached, run `n` HTTP/1.1
//! `Connection: close` requests from 4 client threads (each one a new
//! connection through the row to the HTTP backend, read to EOF), let the
//! proxy finish its closes, detach (SIGINT), and divide strace's total by `n`.
//! Whatever the proxy does besides (timers, idle wake-ups) in those few
//! seconds counts too: it is small next to thousands of connections.
//!
//! The io_uring engine is the exception to read with care: operations it
//! submits through its ring are not syscalls, only `io_uring_enter` is.
//!
//! `parse_summary` (strace's `-c` table → counts) is sans-IO and unit-tested.

use crate::peers::Running;
use crate::sys::{self, Proc};
use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// What one measurement found.
#[derive(Debug)]
pub struct Count {
    /// All syscalls over the window, divided by the connections.
    pub per_conn: f64,
    /// The biggest syscalls, per connection, largest first (at most 8).
    pub top: Vec<(String, f64)>,
}

/// strace's `-c` summary: (total calls, per-syscall calls as listed).
///
/// A row is `% time, seconds, usecs/call, calls, [errors], syscall`; the
/// errors column is blank when there were none, so `calls` is always the
/// fourth field and the name the last. The `total` row gives the total.
pub fn parse_summary(text: &str) -> Result<(u64, Vec<(String, u64)>)> {
    let mut total = None;
    let mut each = Vec::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() < 5 || w[0].parse::<f64>().is_err() {
            continue;
        }
        let Ok(calls) = w[3].parse::<u64>() else {
            continue;
        };
        let name = w[w.len() - 1];
        if name == "total" {
            total = Some(calls);
        } else {
            each.push((name.to_string(), calls));
        }
    }
    let total = total.context("no `total` line in strace's summary")?;
    Ok((total, each))
}

/// Measure `row` with `n` connections to its listen port `port` (the HTTP forward).
pub fn measure(row: &Running, port: u16, n: usize, dir: &Path) -> Result<Count> {
    anyhow::ensure!(n > 0, "no connections asked");
    let pids: Vec<i32> = row
        .procs
        .iter()
        .flat_map(|p| sys::group_pids(p.pid()))
        .collect();
    anyhow::ensure!(!pids.is_empty(), "the row has no process to trace");
    let threads: usize = pids
        .iter()
        .map(|p| {
            std::fs::read_dir(format!("/proc/{p}/task"))
                .map(|d| d.count())
                .unwrap_or(1)
        })
        .sum();
    let out = dir.join(format!("strace-{}.txt", pids[0]));
    let _ = std::fs::remove_file(&out);
    let mut args = vec![
        "-c".into(),
        "-f".into(),
        "-o".into(),
        out.display().to_string(),
    ];
    for p in &pids {
        args.extend(["-p".to_string(), p.to_string()]);
    }
    let mut st = Proc::spawn("strace", None, "strace", &args)?;
    wait_attached(&mut st, pids.len(), threads)?;
    let failed = connections(port, n, Duration::from_secs(120));
    // Let the proxy finish closing the last connections before detaching.
    std::thread::sleep(Duration::from_millis(300));
    // Safety: signalling our own child; strace detaches and writes its summary.
    unsafe { libc::kill(st.pid(), libc::SIGINT) };
    let t0 = Instant::now();
    while st.alive() {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(15),
            "strace did not exit after SIGINT: {}",
            st.last_words()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let failed = failed?;
    anyhow::ensure!(
        failed * 100 <= n,
        "{failed} of {n} connections failed under strace"
    );
    let text = std::fs::read_to_string(&out)
        .with_context(|| format!("reading strace's summary {}", out.display()))?;
    let (total, mut each) = parse_summary(&text)?;
    each.sort_by_key(|e| std::cmp::Reverse(e.1));
    let per = |c: u64| c as f64 / n as f64;
    Ok(Count {
        per_conn: per(total),
        top: each
            .into_iter()
            .take(8)
            .map(|(name, c)| (name, per(c)))
            .collect(),
    })
}

/// Wait until strace said "Process N attached" for every thread it found
/// (at least once per process; threads that come and go may be fewer).
fn wait_attached(st: &mut Proc, procs: usize, threads: usize) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let n = st
            .stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(" attached"))
            .count();
        if n >= threads || (n >= procs && t0.elapsed() > Duration::from_secs(3)) {
            return Ok(());
        }
        if !st.alive() {
            bail!("strace exited: {}", st.last_words());
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!(
                "strace attached {n} of {threads} threads within 10 s: {}",
                st.last_words()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `n` HTTP/1.1 `Connection: close` requests, each on a new connection, from 4
/// threads; returns how many failed (no 200 reply). Bounded by `limit`.
fn connections(port: u16, n: usize, limit: Duration) -> Result<usize> {
    const THREADS: usize = 4;
    let t0 = Instant::now();
    let hs: Vec<_> = (0..THREADS)
        .map(|t| {
            let mine = n / THREADS + usize::from(t < n % THREADS);
            std::thread::spawn(move || -> Result<usize> {
                let mut failed = 0;
                for _ in 0..mine {
                    anyhow::ensure!(
                        t0.elapsed() < limit,
                        "connections not done within {limit:?}"
                    );
                    if one_request(port).is_err() {
                        failed += 1;
                    }
                }
                Ok(failed)
            })
        })
        .collect();
    let mut failed = 0;
    for h in hs {
        failed += h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    Ok(failed)
}

fn one_request(port: u16) -> Result<()> {
    let mut s = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(5),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /x HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    anyhow::ensure!(reply.starts_with(b"HTTP/1.1 200"), "no 200 reply");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUMMARY: &str = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 40.00    0.004000           2      2000           epoll_ctl
 30.00    0.003000           3      1000      1000 accept4
 30.00    0.003000           1      3000           close
------ ----------- ----------- --------- --------- ----------------
100.00    0.010000           1      6000      1000 total
";

    #[test]
    fn the_summary_gives_the_total_and_each_syscall() {
        let (total, each) = parse_summary(SUMMARY).unwrap();
        assert_eq!(total, 6000);
        assert_eq!(
            each,
            vec![
                ("epoll_ctl".to_string(), 2000),
                ("accept4".to_string(), 1000),
                ("close".to_string(), 3000)
            ]
        );
    }

    #[test]
    fn a_summary_without_a_total_is_an_error() {
        let e = parse_summary("strace: attach: ptrace(PTRACE_SEIZE, 1): Operation not permitted\n")
            .unwrap_err();
        assert!(e.to_string().contains("total"), "{e}");
    }
}
