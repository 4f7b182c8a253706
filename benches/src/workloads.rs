//! One function per figure. Each runs a bounded tool (count and time limited)
//! against a loopback port and returns numbers; nothing here decides what is good.

use crate::peers::Running;
use crate::servers::{IdleServer, Servers};
use crate::sys;
use anyhow::{Context, Result, bail};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// sockperf ping-pong round trip (`--full-rtt`), µs: (p50, p99, p99.9).
pub fn latency(cpus: &str, port: u16, msg: usize, secs: u32) -> Result<(f64, f64, f64)> {
    let args = [
        "ping-pong",
        "--tcp",
        "-i",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-m",
        &msg.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["-t".into(), secs.to_string(), "--full-rtt".into()])
    .collect::<Vec<_>>();
    let out = sys::run_capture(
        Some(cpus),
        "sockperf",
        &args,
        Duration::from_secs(secs as u64 + 20),
    )?;
    let pct = |p: &str| -> Result<f64> {
        let l = out
            .lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .with_context(|| {
                // sockperf's own account of the run (e.g. no replies came back).
                let said: Vec<&str> = out
                    .lines()
                    .filter(|l| {
                        l.contains("Total Run")
                            || l.contains("Valid Duration")
                            || l.contains("ERROR")
                    })
                    .map(|l| l.trim_start_matches("sockperf: ").trim())
                    .collect();
                format!("no percentile {p} in sockperf output: {}", said.join(" / "))
            })?;
        Ok(l.rsplit('=').next().unwrap().trim().parse()?)
    };
    Ok((pct("50.000")?, pct("99.000")?, pct("99.900")?))
}

/// What one iperf3 run measured.
pub struct Tput {
    pub gbps: f64,
    /// proxy-own CPU seconds per GiB moved.
    pub proxy_cpu_per_gib: f64,
    /// system-wide, accounted: every process of the test (client, servers,
    /// proxy) plus every kernel thread, seconds per GiB.
    pub sys_cpu_per_gib: f64,
    /// all CPUs' busy time from /proc/stat per GiB, minus the background rate
    /// measured before the round. Kept for reference: on a shared machine other
    /// tenants fill whatever CPU we leave idle, so this one is not trustworthy here.
    pub stat_cpu_per_gib: f64,
}

/// CPU seconds of everything the test runs, plus kernel threads.
fn accounted(row: &Running, servers: &Servers) -> f64 {
    row.cpu_secs()
        + servers.cpu_secs()
        + sys::self_and_children_cpu_secs()
        + sys::kthreads_cpu_secs()
}

/// iperf3 client for `secs` with `streams` parallel streams (client→server).
pub fn throughput(
    cpus: &str,
    port: u16,
    streams: u32,
    secs: u32,
    row: &Running,
    servers: &Servers,
    bg_rate: f64,
) -> Result<Tput> {
    let args = [
        "-c",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        &secs.to_string(),
        "-P",
        &streams.to_string(),
        "-J",
    ]
    .map(String::from)
    .to_vec();
    let (c0, a0, s0, t0) = (
        row.cpu_secs(),
        accounted(row, servers),
        sys::system_busy_secs(),
        Instant::now(),
    );
    let out = sys::run_capture(
        Some(cpus),
        "iperf3",
        &args,
        Duration::from_secs(secs as u64 + 20),
    )?;
    let (c1, a1, s1, dt) = (
        row.cpu_secs(),
        accounted(row, servers),
        sys::system_busy_secs(),
        t0.elapsed().as_secs_f64(),
    );
    let json_start = out.find('{').context("no JSON from iperf3")?;
    let v: serde_json::Value = serde_json::Deserializer::from_str(&out[json_start..])
        .into_iter::<serde_json::Value>()
        .next()
        .context("iperf3 JSON")??;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    let r = &v["end"]["sum_received"];
    let bytes = r["bytes"]
        .as_f64()
        .context("iperf3 end.sum_received.bytes")?;
    let gib = bytes / (1u64 << 30) as f64;
    anyhow::ensure!(gib > 0.0, "iperf3 moved no bytes");
    Ok(Tput {
        gbps: r["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9,
        proxy_cpu_per_gib: (c1 - c0) / gib,
        sys_cpu_per_gib: (a1 - a0) / gib,
        stat_cpu_per_gib: ((s1 - s0) - bg_rate * dt).max(0.0) / gib,
    })
}

/// The machine's background busy rate (CPU-seconds per second) over `ms`,
/// with nothing of ours running a load.
pub fn background_rate(ms: u64) -> f64 {
    let (s0, t0) = (sys::system_busy_secs(), Instant::now());
    std::thread::sleep(Duration::from_millis(ms));
    (sys::system_busy_secs() - s0) / t0.elapsed().as_secs_f64()
}

/// New connections per second: wrk, `threads` threads (1, or 2 in the
/// two-CPU pass), 32 connections, each request carrying `Connection: close`,
/// so every response ends its connection and wrk opens a new one. Returns
/// (conn/s, errors).
pub fn conn_rate(cpus: &str, port: u16, secs: u32, threads: u32) -> Result<(f64, u64)> {
    let args = [
        &format!("-t{threads}"),
        "-c32",
        &format!("-d{secs}s"),
        "-H",
        "Connection: close",
        &format!("http://127.0.0.1:{port}/x"),
    ]
    .map(String::from)
    .to_vec();
    let out = sys::run_capture(
        Some(cpus),
        "wrk",
        &args,
        Duration::from_secs(secs as u64 + 20),
    )?;
    let rps: f64 = out
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .context("no Requests/sec from wrk")?
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()?;
    let mut errors = 0;
    for l in out.lines() {
        let l = l.trim();
        if l.starts_with("Socket errors:") {
            errors += l
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|x| x.parse::<u64>().ok())
                .sum::<u64>();
        } else if l.starts_with("Non-2xx") {
            errors += l
                .rsplit(' ')
                .next()
                .and_then(|x| x.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok((rps, errors))
}

/// What holding `n` idle connections through a row costs.
pub struct Idle {
    pub n: usize,
    /// proxy PSS delta per connection, bytes.
    pub proxy_bytes: f64,
    /// kernel memory delta per connection (slab + stacks + page tables + TCP buffers), bytes.
    pub kernel_bytes: f64,
}

/// Open `n` connections to `port` (through the row), wait until the idle server
/// holds all `n`, let the proxy settle, measure, close everything.
pub fn idle(
    port: u16,
    n: usize,
    window: usize,
    row: &Running,
    server: &mut IdleServer,
    limit: Duration,
) -> Result<Idle> {
    server.reset()?;
    std::thread::sleep(Duration::from_millis(200));
    let pids0: usize = row
        .procs
        .iter()
        .map(|p| sys::group_pids(p.pid()).len())
        .sum();
    let alloc0 = sys::sockstat_tcp_alloc();
    let (p0, k0) = (row.pss_kib(), sys::kernel_mem_bytes());
    let t0 = Instant::now();
    let mut conns = Vec::with_capacity(n);
    let mut known = 0usize;
    let res = (|| -> Result<()> {
        while conns.len() < n {
            conns.push(
                TcpStream::connect(("127.0.0.1", port))
                    .with_context(|| format!("connect #{}", conns.len()))?,
            );
            // Pace ourselves: at most `window` connections ahead of the server, so
            // no accept queue overflows (an overflow costs a SYN-ACK retransmit of
            // a second or more). socat listens with a backlog of 5.
            if conns.len() - known > window {
                loop {
                    known = server.count()?;
                    if conns.len() - known <= window {
                        break;
                    }
                    anyhow::ensure!(
                        t0.elapsed() < limit,
                        "server holds {known} of {} after {limit:?}",
                        conns.len()
                    );
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
        loop {
            let held = server.count()?;
            if held >= n {
                break;
            }
            anyhow::ensure!(
                t0.elapsed() < limit,
                "server holds {held} of {n} after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    })();
    let out = res.map(|_| {
        std::thread::sleep(Duration::from_millis(300));
        let (p1, k1) = (row.pss_kib(), sys::kernel_mem_bytes());
        Idle {
            n,
            proxy_bytes: (p1 as f64 - p0 as f64) * 1024.0 / n as f64,
            kernel_bytes: (k1 as f64 - k0 as f64) / n as f64,
        }
    });
    drop(conns);
    server.reset()?;
    // Let the proxy tear down (socat: thousands of children exit).
    let t1 = Instant::now();
    while t1.elapsed() < Duration::from_secs(10)
        && row
            .procs
            .iter()
            .map(|p| sys::group_pids(p.pid()).len())
            .sum::<usize>()
            > pids0
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    // ... and let the kernel free the sockets (closing, RCU), so that the next
    // row's kernel delta does not include this row's teardown.
    while t1.elapsed() < Duration::from_secs(15) && sys::sockstat_tcp_alloc() > alloc0 + 64 {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    out
}
