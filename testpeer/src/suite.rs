//! `suite`: the whole per-kernel run. One ambassador per cell (`--mode sockmap|uring|epoll|auto`,
//! `auto` unprivileged or under seccomp), the peer checks through it, and `KM ...` marker lines
//! on stdout that `cargo xtask kernel-matrix` parses. Log lines are tidied into single tokens
//! so a marker always fits on one line.

use crate::*;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
// `suite`: one ambassador per cell, the checks through it, marker lines out.

/// A cell of the matrix: the mode passed to the ambassador and how it is confined.
pub(crate) struct Cell {
    name: &'static str,
    mode: &'static str,
    /// `--splice` policy for the sockmap engine, and extra environment.
    splice: &'static str,
    env: &'static [(&'static str, &'static str)],
    nonroot: bool,
    seccomp: Seccomp,
    /// Value written to `kernel.io_uring_disabled` for this cell (guests only: the host's
    /// sysctls belong to everyone on the machine).
    uring_sysctl: Option<&'static str>,
}

pub(crate) const CELLS: &[Cell] = &[
    Cell {
        name: "sockmap",
        mode: "sockmap",
        nonroot: false,
        seccomp: Seccomp::Off,
        uring_sysctl: None,
        splice: "always",
        env: &[],
    },
    Cell {
        name: "uring",
        mode: "uring",
        nonroot: false,
        seccomp: Seccomp::Off,
        uring_sysctl: None,
        splice: "always",
        env: &[],
    },
    Cell {
        name: "epoll",
        mode: "epoll",
        nonroot: false,
        seccomp: Seccomp::Off,
        uring_sysctl: None,
        splice: "always",
        env: &[],
    },
    Cell {
        name: "auto",
        mode: "auto",
        nonroot: false,
        seccomp: Seccomp::Off,
        uring_sysctl: None,
        splice: "always",
        env: &[],
    },
    Cell {
        name: "auto-nonroot",
        mode: "auto",
        nonroot: true,
        seccomp: Seccomp::Off,
        uring_sysctl: None,
        splice: "always",
        env: &[],
    },
    Cell {
        name: "auto-seccomp",
        mode: "auto",
        nonroot: false,
        seccomp: Seccomp::UringBpf,
        uring_sysctl: None,
        splice: "always",
        env: &[],
    },
    Cell {
        name: "auto-nonroot-nouring",
        mode: "auto",
        nonroot: true,
        seccomp: Seccomp::Uring,
        uring_sysctl: None,
        splice: "always",
        env: &[],
    },
    Cell {
        name: "auto-nonroot-sysctl",
        mode: "auto",
        nonroot: true,
        seccomp: Seccomp::Off,
        uring_sysctl: Some("2"),
        splice: "always",
        env: &[],
    },
    // The default policy, promoting at the first quiet point so that the
    // checks run through promotions.
    Cell {
        name: "sockmap-adaptive",
        mode: "sockmap",
        nonroot: false,
        seccomp: Seccomp::Off,
        uring_sysctl: None,
        splice: "adaptive",
        env: &[("AMBASSADOR_SOCKMAP_PROMOTE_TURNS", "0")],
    },
    // Every spliced connection leaves the kernel as soon as a byte is in
    // flight: the way out of the maps (to the copy loop) on every kernel.
    Cell {
        name: "sockmap-leave",
        mode: "sockmap",
        nonroot: false,
        seccomp: Seccomp::Off,
        uring_sysctl: None,
        splice: "always",
        env: &[("AMBASSADOR_SOCKMAP_INFLIGHT", "0")],
    },
];

/// One line of free text for a marker. Marker values are single tokens, except `detail=` and
/// `reason=`, which are always last on the line and run to its end, so they may hold spaces.
pub(crate) fn clean(s: &str) -> String {
    s.replace(['\n', '\r'], " ").trim().to_string()
}

pub(crate) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            // CSI: ESC [ ... final byte in @..~
            if it.peek() == Some(&'[') {
                it.next();
                for d in it.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Value of `key=` in a log line: quoted ("..."), or up to the next space, or (for `reason`) to
/// the end of the line.
pub(crate) fn field(line: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=");
    let mut from = 0;
    let i = loop {
        let i = from + line[from..].find(&pat)?;
        if i == 0 || line.as_bytes()[i - 1] == b' ' || line.as_bytes()[i - 1] == b'{' {
            break i;
        }
        from = i + pat.len();
    };
    let v = &line[i + pat.len()..];
    if let Some(q) = v.strip_prefix('"') {
        let end = q.find('"').unwrap_or(q.len());
        return Some(q[..end].to_string());
    }
    if key == "reason" {
        return Some(v.trim().to_string());
    }
    Some(v.split_whitespace().next().unwrap_or("").to_string())
}

/// A log line without its timestamp, level and target: `2026-..Z ERROR ambassador: msg` → `msg`.
pub(crate) fn tidy(line: &str) -> String {
    let mut rest = line.trim();
    for _ in 0..3 {
        let Some((head, tail)) = rest.split_once(' ') else {
            break;
        };
        let is_ts = head.len() > 10 && head.as_bytes()[0].is_ascii_digit() && head.contains('T');
        let is_level = ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&head);
        let is_target = head.ends_with(':') && !head.contains('=');
        if is_ts || is_level || is_target {
            rest = tail.trim_start();
        } else {
            break;
        }
    }
    rest.to_string()
}

/// One check through a running ambassador.
pub(crate) type CheckFn<'a> = Box<dyn Fn() -> Res<()> + 'a>;

pub(crate) struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Set by the log reader at the end of stderr: `lines` is complete.
    drained: Arc<AtomicBool>,
}

impl Running {
    /// Wait (bounded) until the log reader saw the end of stderr (the process has exited).
    fn drain(&self) {
        let done = || self.drained.load(Ordering::SeqCst);
        let _ = ambassador_test_support::poll(Duration::from_secs(5), "the end of stderr", || {
            done().then_some(())
        });
    }
}

/// Three distinct free loopback ports for the ambassador's listeners. All three sockets are
/// held until all three are known, so the kernel cannot hand out the same port twice. (Another
/// process may still take one before the ambassador binds it: `run_cell` retries once.)
pub(crate) fn free_ports() -> Res<[u16; 3]> {
    ctx(ambassador_test_support::free_ports::<3>(), "bind")
}

/// Start the ambassador and wait (bounded) for `ready` or for its exit.
pub(crate) fn start_ambassador(
    bin: &str,
    cell: &Cell,
    log: &str,
    forwards: &[(u16, SocketAddr)],
) -> Res<(Running, Option<String>, Option<ExitStatus>)> {
    let mut cmd = Command::new(bin);
    cmd.arg("--mode").arg(cell.mode);
    // `always` splices every connection (the default `adaptive` policy
    // would leave these short checks in userspace): the matrix proves the
    // kernel path; the adaptive cell promotes at the first quiet point.
    cmd.args(["--splice", cell.splice]);
    cmd.envs(cell.env.iter().copied());
    for (p, up) in forwards {
        cmd.arg("--forward").arg(format!("127.0.0.1:{p}={up}"));
    }
    cmd.env("RUST_LOG", log)
        .env("NO_COLOR", "1")
        .env_remove("AMBASSADOR_MODE");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    confine(&mut cmd, cell.nonroot, cell.seccomp);
    let mut child = ctx(cmd.spawn(), &format!("spawn {bin}"))?;
    let err = child.stderr.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let drained = Arc::new(AtomicBool::new(false));
    {
        let (lines, drained) = (lines.clone(), drained.clone());
        thread::spawn(move || {
            for l in BufReader::new(err).lines() {
                let Ok(l) = l else { break };
                let l = strip_ansi(&l);
                if l.contains("ready forwards=") {
                    let _ = tx.send(field(&l, "engine"));
                }
                lines.lock().unwrap().push(l);
            }
            drained.store(true, Ordering::SeqCst);
        });
    }
    // Ready (Ok: the engine it names) or exited (Err: its status), for up to 20 s.
    let started = ambassador_test_support::poll(Duration::from_secs(20), "ready or exit", || {
        if let Ok(engine) = rx.try_recv() {
            return Some(Ok(engine.unwrap_or_default()));
        }
        child.try_wait().ok().flatten().map(Err)
    });
    let run = Running {
        child,
        lines,
        drained,
    };
    Ok(match started {
        Ok(Ok(engine)) => (run, Some(engine), None),
        Ok(Err(st)) => {
            run.drain();
            (run, None, Some(st))
        }
        Err(_) => (run, None, None),
    })
}

/// SIGTERM, then a bounded wait, then SIGKILL.
pub(crate) fn stop(r: &mut Running) -> Option<ExitStatus> {
    // Safety: kill(2) on the pid of our own, not yet reaped, child.
    unsafe { libc::kill(r.child.id() as libc::pid_t, libc::SIGTERM) };
    let child = &mut r.child;
    let st = ambassador_test_support::poll(Duration::from_secs(10), "exit after SIGTERM", || {
        child.try_wait().ok().flatten()
    });
    if st.is_err() {
        let _ = r.child.kill();
        let _ = r.child.wait();
    }
    st.ok()
}

pub(crate) fn suite(args: &SuiteArgs) -> Res<()> {
    let (bin, only, guest) = (args.ambassador.clone(), args.cells.as_str(), args.guest);
    let load = Load {
        bytes: args.bytes,
        storm: args.storm,
        bulk_rounds: args.bulk_rounds.max(1),
        log: args.log.clone(),
    };
    let echo = spawn_upstream(Upstream::Echo)?;
    let first = spawn_upstream(Upstream::SpeakFirst)?;
    let half = spawn_upstream(Upstream::HalfClose)?;
    println!(
        "KM suite start bytes={} bulk_rounds={} uid={}",
        load.bytes,
        load.bulk_rounds,
        unsafe { libc::getuid() }
    );
    for cell in CELLS {
        if !only.is_empty() && !only.split(',').any(|c| c == cell.name) {
            continue;
        }
        let Some(value) = cell.uring_sysctl else {
            run_cell(&bin, cell, &load, [echo, first, half])?;
            continue;
        };
        const SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";
        let old = match std::fs::read_to_string(SYSCTL) {
            _ if !guest => {
                println!(
                    "KM na cell={} detail=changes a sysctl: guests only",
                    cell.name
                );
                continue;
            }
            Err(e) => {
                println!("KM na cell={} detail={SYSCTL}: {e}", cell.name);
                continue;
            }
            Ok(v) => v,
        };
        ctx(std::fs::write(SYSCTL, value), SYSCTL)?;
        let r = run_cell(&bin, cell, &load, [echo, first, half]);
        ctx(std::fs::write(SYSCTL, old.trim()), SYSCTL)?;
        r?;
    }
    println!("KM suite end");
    Ok(())
}

/// How much each cell carries.
pub(crate) struct Load {
    /// Bytes each way per bulk connection.
    pub bytes: usize,
    /// Connections in the connect storm.
    pub storm: usize,
    /// Bulk connections, one after another.
    pub bulk_rounds: usize,
    /// The ambassador's `RUST_LOG`.
    pub log: String,
}

/// `rounds` bulk connections one after another; the first failure names its round.
fn check_bulk_rounds(a: SocketAddr, bytes: usize, rounds: usize) -> Res<()> {
    for i in 0..rounds {
        check_bulk(a, bytes).map_err(|e| format!("round {} of {rounds}: {e}", i + 1))?;
    }
    Ok(())
}

/// Whether this guest's first-skb row was printed.
static FIRST_SKB_SHOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub(crate) fn run_cell(bin: &str, cell: &Cell, load: &Load, ups: [SocketAddr; 3]) -> Res<()> {
    let (bytes, storm, rounds) = (load.bytes, load.storm, load.bulk_rounds);
    let t0 = Instant::now();
    let mut attempt = 0;
    let (ports, mut run, ready, exited) = loop {
        let ports = free_ports()?;
        let fw: Vec<(u16, SocketAddr)> = ports.iter().copied().zip(ups).collect();
        let (run, ready, exited) = start_ambassador(bin, cell, &load.log, &fw)?;
        let lost_port = ready.is_none()
            && run
                .lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("in use"));
        attempt += 1;
        if !lost_port || attempt == 2 {
            break (ports, run, ready, exited);
        }
        println!(
            "# {}: a listen port was taken meanwhile; retrying with new ports",
            cell.name
        );
    };
    let c = cell.name;
    let engine = ready.clone();
    let mut failed = false;
    if let Some(engine) = &ready {
        let via = |i: usize| SocketAddr::from(([127, 0, 0, 1], ports[i]));
        let checks: [(&str, CheckFn); 5] = [
            (
                "bulk",
                Box::new(move || check_bulk_rounds(via(0), bytes, rounds)),
            ),
            (
                "speak-first-server",
                Box::new(move || check_speak_first_server(via(1))),
            ),
            (
                "speak-first-client",
                Box::new(move || check_speak_first_client(via(0))),
            ),
            ("half-close", Box::new(move || check_half_close(via(2)))),
            (
                "connect-storm",
                Box::new(move || check_storm(via(0), via(1), storm)),
            ),
        ];
        for (name, f) in checks {
            let t = Instant::now();
            let r = f();
            let ms = t.elapsed().as_millis();
            failed |= r.is_err();
            match r {
                Ok(()) => {
                    println!("KM check cell={c} engine={engine} check={name} ok=1 ms={ms} detail=")
                }
                Err(e) => println!(
                    "KM check cell={c} engine={engine} check={name} ok=0 ms={ms} detail={}",
                    clean(&e)
                ),
            }
        }
    }
    let end = if exited.is_none() {
        stop(&mut run)
    } else {
        exited
    };
    run.drain();
    let lines = run.lines.lock().unwrap().clone();
    for l in &lines {
        if l.contains("engine skipped") {
            println!(
                "KM skipped cell={c} engine={} reason={}",
                field(l, "engine").unwrap_or_default(),
                clean(&field(l, "reason").unwrap_or_default())
            );
        }
        // The start-up self-test's verdict on the first skb after an insert
        // (one row per kernel, from the first sockmap cell).
        let judged = l.contains("are cut from the first skb after it");
        if (judged || l.contains("first skb after a promotion cannot be judged"))
            && !FIRST_SKB_SHOWN.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            println!(
                "KM sockmapfix name=first_skb_cut result={} detail={}",
                if judged { "yes" } else { "no" },
                if judged {
                    "the self-test's byte read before the insert was cut".to_string()
                } else {
                    clean(&field(l, "reason").unwrap_or_default())
                }
            );
        }
        if l.contains("engine chosen") {
            println!(
                "KM chosen cell={c} engine={} mode={}",
                field(l, "engine").unwrap_or_default(),
                field(l, "mode").unwrap_or_default()
            );
        }
    }
    let code = match end {
        Some(st) => st
            .code()
            .map(|c| c.to_string())
            .unwrap_or_else(|| format!("{st}")),
        None => "killed".to_string(),
    };
    // The last non-empty stderr line is the reason when it did not start.
    let last = lines
        .iter()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| tidy(l))
        .unwrap_or_default();
    // The `stats` lines logged at exit: how many bytes the kernel spliced, and how many
    // connections fell back to userspace copying. A sockmap cell that spliced nothing is a
    // silent fallback, not a working engine.
    let mut totals = [0u64; 6];
    for l in lines.iter().filter(|l| l.contains("stats forward=")) {
        let n = |k: &str| field(l, k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        totals[0] += n("spliced_to_upstream") + n("spliced_to_client");
        totals[1] += n("splice_fallbacks");
        totals[2] += n("errors");
        totals[3] += n("conns_total");
        totals[4] += n("integrity_resets");
        totals[5] += n("spliced_trimmed");
    }
    println!(
        "KM cell cell={c} ready={} engine={} exit={} ms={} spliced={} splice_fallbacks={} errors={} conns={} integrity_resets={} trimmed={} detail={}",
        ready.is_some() as u8,
        engine.unwrap_or_else(|| "none".into()),
        code.replace(' ', "_"),
        t0.elapsed().as_millis(),
        totals[0],
        totals[1],
        totals[2],
        totals[3],
        totals[4],
        totals[5],
        if ready.is_some() {
            String::new()
        } else {
            clean(&last)
        }
    );
    // A failed check shows the whole log (run with `--log debug` to see why).
    for l in lines.iter().take(if failed { 20_000 } else { 40 }) {
        println!("# {c}: {l}");
    }
    Ok(())
}
