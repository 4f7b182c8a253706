//! `ambassador-bench`: the ambassador's engines against direct, socat, HAProxy
//! and nginx, side by side, in one run, on one machine (issue 5).
//!
//! # Layout
//! - `main.rs`      — options, the pass/round/figure loop, writing the outputs.
//! - `sys.rs`       — pinned process groups that die with us; /proc readers.
//! - `servers.rs`   — the backends: sockperf, iperf3, nginx (HTTP), idle server.
//! - `peers.rs` + `peers/` — the rows: one module per proxy.
//! - `workloads.rs` — one function per figure (sockperf, iperf3, wrk, idle).
//! - `syscalls.rs`  — syscalls per connection (strace -c on a fixed number of connections).
//! - `results.rs`   — the JSON model; `report.rs` — markdown; `plot.rs` — PNGs.
//!
//! Passes ([`PassSpec`]): *same-core* (everything on CPU 0), *cross-core*
//! (proxy on CPU 1), *two-cpu* (proxy, clients and servers on CPUs 0-1;
//! HAProxy `nbthread 2`, nginx `worker_processes 2`, each engine that has
//! workers with `--workers 1` and `--workers 2`).
//!
//! Method: the servers are started once per pass; every round starts every row
//! (each its own listen ports) and then, figure by figure, runs the rows in
//! turn (the order rotates each round), so slow drift of a shared machine hits
//! all rows alike. After the timed rounds, each row is started once more and
//! traced (`syscalls.rs`): strace slows a proxy, so it never runs while timing.
//! All traffic is loopback, in a network namespace of the run's own (see
//! [`sys::own_netns`]); every tool runs for a fixed time under a hard limit.

mod peers;
mod plot;
mod report;
mod results;
mod servers;
mod sys;
mod syscalls;
mod workloads;

use anyhow::{Context, Result};
use clap::Parser;
use peers::{Fwd, Kind, Running};
use results::{PassResult, RowResult, Stat};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "ambassador vs direct, socat, HAProxy, nginx (loopback only)")]
struct Opts {
    /// Thorough run: 3 rounds, 3 s per figure, 10,000 idle connections.
    #[arg(long)]
    full: bool,
    /// CI smoke: 1 round, 1 s per figure, into --out (a scratch dir): the same-core pass
    /// (500 idle connections, syscalls over 100 connections) and the two-cpu pass's
    /// throughput and connection rate only; proves the harness, asserts no timing.
    #[arg(long)]
    smoke: bool,
    /// Rounds (default 1 quick, 3 full).
    #[arg(long)]
    rounds: Option<u32>,
    /// Seconds per figure (default 1 quick, 3 full).
    #[arg(long)]
    secs: Option<u32>,
    /// Idle connections to hold (default 5,000 quick, 10,000 full, 500 smoke; clamped to
    /// what RLIMIT_NOFILE allows a proxy: 2 fds per connection).
    #[arg(long)]
    idle: Option<usize>,
    /// Passes to run (same-core, cross-core, two-cpu).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "same-core,cross-core,two-cpu"
    )]
    passes: Vec<String>,
    /// Connections each row's syscalls are counted over, under strace after the timed
    /// rounds (default 1,000 quick, 2,000 full, 100 smoke; 0 = no syscall step).
    #[arg(long)]
    syscall_conns: Option<usize>,
    /// Only these rows (names as in the table, e.g. direct,haproxy,epoll; an engine or peer
    /// word picks its two-cpu rows too: "epoll" = both `--workers` rows).
    #[arg(long, value_delimiter = ',')]
    rows: Vec<String>,
    /// Where results go.
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// The ambassador binary (default $AMBASSADOR_BIN, else target/release/ambassador).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Only these figure groups (lat, tput, conn, idle), for development.
    #[arg(long, value_delimiter = ',', default_value = "lat,tput,conn,idle")]
    figures: Vec<String>,
    /// Rewrite the results section of this markdown file (between its markers).
    #[arg(long)]
    docs: Option<PathBuf>,
    /// Re-render the markdown and plots (and --docs) from these result JSON files; run nothing.
    #[arg(long, num_args = 1..)]
    render: Vec<PathBuf>,
}

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some("idle-server") {
        return servers::idle_server_main();
    }
    let o = Opts::parse();
    if !o.render.is_empty() {
        return render(&o);
    }
    sys::own_netns()?;
    sys::stop_children_on_signal()?;
    let nofile = sys::raise_nofile();
    let mode = if o.smoke {
        "smoke"
    } else if o.full {
        "full"
    } else {
        "quick"
    };
    let rounds = o.rounds.unwrap_or(if o.full { 3 } else { 1 });
    let secs = o.secs.unwrap_or(if o.full { 3 } else { 1 });
    // A proxy holds two sockets per connection; leave room for its other fds.
    let idle_cap = (nofile as usize).saturating_sub(200) / 2;
    let idle = o
        .idle
        .unwrap_or(if o.smoke {
            500
        } else if o.full {
            10_000
        } else {
            5_000
        })
        .min(idle_cap);
    let bin = o
        .bin
        .clone()
        .or_else(|| std::env::var_os("AMBASSADOR_BIN").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("target/release/ambassador"));
    let passes: Vec<String> = if o.smoke {
        vec!["same-core".into(), "two-cpu".into()]
    } else {
        o.passes.clone()
    };
    let syscall_conns = o.syscall_conns.unwrap_or(if o.smoke {
        100
    } else if o.full {
        2000
    } else {
        1000
    });
    std::fs::create_dir_all(&o.out)?;
    plot::init_font()?;
    let date = sh("date", &["-u", "+%F"]);
    let t_all = Instant::now();
    let mut written = Vec::new();
    let mut missing = Vec::new();
    for pass in &passes {
        let spec = PassSpec::of(pass)?;
        let base = if spec.two_cpu {
            Kind::two_cpu()
        } else {
            Kind::all()
        };
        let kinds: Vec<Kind> = base
            .into_iter()
            .filter(|k| o.rows.is_empty() || o.rows.iter().any(|r| k.picked_by(r)))
            .collect();
        if kinds.is_empty() {
            eprintln!("== {pass}: no row of this pass is in --rows; pass skipped");
            continue;
        }
        let mut skipped = Vec::new();
        // The smoke keeps CI fast: the two-CPU pass runs only the figures it is
        // about (8-stream throughput, connection rate), and the syscall step
        // runs in the same-core pass only.
        let groups: Vec<String> = if o.smoke && spec.two_cpu {
            skipped.push("latency figures: skipped in smoke mode".to_string());
            vec!["tput".into(), "conn".into()]
        } else {
            o.figures.clone()
        };
        let syscalls_here = if o.smoke && spec.two_cpu {
            skipped.push(
                "syscalls per connection: skipped in smoke mode (the same-core pass counts them)"
                    .to_string(),
            );
            0
        } else {
            syscall_conns
        };
        if syscalls_here == 0 && !(o.smoke && spec.two_cpu) {
            skipped.push("syscalls per connection: --syscall-conns 0".to_string());
        }
        // Memory does not depend on where the proxy runs: the idle figures are
        // measured in the same-core pass only (they take a minute per round).
        let idle_here = if pass == "same-core" && groups.iter().any(|f| f == "idle") {
            idle
        } else {
            0
        };
        let plan = Plan {
            spec: &spec,
            kinds: &kinds,
            rounds,
            secs,
            idle: idle_here,
            bin: &bin,
            groups: &groups,
            syscall_conns: syscalls_here,
        };
        let mut res = run_pass(&plan)?;
        res.skipped = skipped;
        res.mode = mode.into();
        res.date = date.clone();
        let stem = format!("{date}-{pass}");
        let plots = plot::plots(&res, &o.out, &stem)?;
        std::fs::write(
            o.out.join(format!("{stem}.json")),
            serde_json::to_string_pretty(&res)?,
        )?;
        std::fs::write(
            o.out.join(format!("{stem}.md")),
            report::markdown(&res, &plots),
        )?;
        eprintln!(
            "== {pass}: wrote {}/{stem}.{{md,json}} and {} plots",
            o.out.display(),
            plots.len()
        );
        println!("{}", report::table(&res));
        for sk in &res.skipped {
            eprintln!("== {pass}: {sk}");
        }
        missing.extend(check(&res));
        written.push((res, stem, plots));
    }
    if let Some(doc) = &o.docs {
        update_docs(doc, &o.out, &written)?;
    }
    eprintln!("== done in {:.0} s", t_all.elapsed().as_secs_f64());
    for m in &missing {
        eprintln!("missing: {m}");
    }
    if o.smoke {
        anyhow::ensure!(
            missing.is_empty(),
            "{} figure(s) missing without a reason",
            missing.len()
        );
        eprintln!("smoke: every row has every figure or its reason");
    }
    Ok(())
}

/// `--render`: rebuild the reports from saved JSON (after a report or plot change).
fn render(o: &Opts) -> Result<()> {
    plot::init_font()?;
    let mut written = Vec::new();
    for f in &o.render {
        let res: PassResult = serde_json::from_str(&std::fs::read_to_string(f)?)
            .with_context(|| format!("reading {}", f.display()))?;
        let dir = f.parent().unwrap_or(Path::new("."));
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        let plots = plot::plots(&res, dir, &stem)?;
        std::fs::write(
            dir.join(format!("{stem}.md")),
            report::markdown(&res, &plots),
        )?;
        eprintln!(
            "== rendered {}/{stem}.md and {} plots",
            dir.display(),
            plots.len()
        );
        written.push((res, stem, plots));
    }
    if let Some(doc) = &o.docs {
        update_docs(doc, &o.out, &written)?;
    }
    Ok(())
}

/// Figures a row should have but does not, with no reason given (what the smoke
/// pass fails on). A row that could not run has its reason instead of figures.
fn check(p: &PassResult) -> Vec<String> {
    let mut v = Vec::new();
    for r in &p.rows {
        if r.error.is_some() {
            continue;
        }
        for f in results::FIGURES {
            let group = results::group_of(f.key);
            let na = (r.name == "direct"
                && matches!(
                    f.key,
                    "rss_mib" | "idle_proxy_kib_per_conn" | "syscalls_per_conn"
                ))
                || (p.idle_conns_target == 0 && group == "idle")
                || (p.syscall_conns == 0 && group == "syscalls")
                || !(p.ran(group) || matches!(group, "idle" | "syscalls" | "always"));
            if !na && !r.figures.contains_key(f.key) && !r.figure_errors.contains_key(f.key) {
                v.push(format!("{} / {} / {}", p.pass, r.name, f.key));
            }
        }
    }
    v
}

fn sh(prog: &str, args: &[&str]) -> String {
    std::process::Command::new(prog)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The figure loop's unit of work.
#[derive(Clone, Copy, PartialEq)]
enum Work {
    Lat64,
    Lat16k,
    Tput1,
    Tput8,
    Conn,
}

impl Work {
    fn group(self) -> &'static str {
        match self {
            Work::Lat64 | Work::Lat16k => "lat",
            Work::Tput1 | Work::Tput8 => "tput",
            Work::Conn => "conn",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Work::Lat64 => "latency 64 B",
            Work::Lat16k => "latency 16 KiB",
            Work::Tput1 => "iperf3 1 stream",
            Work::Tput8 => "iperf3 8 streams",
            Work::Conn => "connection rate",
        }
    }
}

/// Where a pass puts the proxy and the load (taskset CPU lists).
struct PassSpec {
    name: &'static str,
    proxy: &'static str,
    client: &'static str,
    /// The two-CPU pass: its own rows, two-thread wrk, a two-worker backend.
    two_cpu: bool,
}

impl PassSpec {
    fn of(name: &str) -> Result<PassSpec> {
        let (name, proxy, client, two_cpu) = match name {
            "same-core" => ("same-core", "0", "0", false),
            "cross-core" => ("cross-core", "1", "0", false),
            // On a 2-vCPU machine the load tools and servers share the proxy's
            // two CPUs: the pass compares proxies with each other on equal
            // terms, not against an unloaded ceiling.
            "two-cpu" => ("two-cpu", "0,1", "0,1", true),
            p => anyhow::bail!("--passes: unknown pass {p} (same-core, cross-core, two-cpu)"),
        };
        Ok(PassSpec {
            name,
            proxy,
            client,
            two_cpu,
        })
    }
}

/// What a pass runs.
struct Plan<'a> {
    spec: &'a PassSpec,
    kinds: &'a [Kind],
    rounds: u32,
    secs: u32,
    /// Idle connections to hold; 0 = no idle figures in this pass.
    idle: usize,
    bin: &'a Path,
    /// Figure groups to run (lat, tput, conn).
    groups: &'a [String],
    /// Connections for the syscall step; 0 = none.
    syscall_conns: usize,
}

fn run_pass(plan: &Plan) -> Result<PassResult> {
    let Plan {
        spec,
        kinds,
        rounds,
        secs,
        idle,
        bin,
        groups,
        syscall_conns,
    } = *plan;
    let pass = spec.name;
    let proxy_cpu = spec.proxy;
    let client = spec.client;
    // wrk's one thread would be the bottleneck before two proxy workers are.
    let wrk_threads = if spec.two_cpu { 2 } else { 1 };
    let (kernel, cpu_model, cpus) = sys::machine();
    let dir = std::env::temp_dir().join(format!("ambassador-bench-{}-{pass}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut res = PassResult {
        started_utc: sh("date", &["-u", "+%FT%TZ"]),
        pass: pass.into(),
        rounds,
        seconds_per_figure: secs,
        idle_conns_target: idle,
        kernel,
        cpu_model,
        cpus,
        proxy_cpu: first_cpu(spec.proxy),
        client_server_cpu: first_cpu(spec.client),
        proxy_cpus: spec.proxy.into(),
        client_cpus: spec.client.into(),
        groups: groups.to_vec(),
        syscall_conns,
        ambassador_bin: bin.display().to_string(),
        versions: versions(bin),
        rows: kinds
            .iter()
            .map(|k| RowResult {
                name: k.name(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut servers = servers::Servers::start(client, wrk_threads, &dir)
        .context("starting the backend servers")?;
    let ports = servers.ports();
    for round in 0..rounds {
        let t_round = Instant::now();
        res.background_busy.push(workloads::background_rate(500));
        // Start every row for this round.
        let mut running: Vec<Option<Running>> = Vec::new();
        for (i, k) in kinds.iter().enumerate() {
            let fwds: Vec<Fwd> = if *k == Kind::Direct {
                ports
                    .iter()
                    .map(|&p| Fwd {
                        listen: p,
                        target: p,
                    })
                    .collect()
            } else {
                ports
                    .iter()
                    .map(|&p| {
                        Ok(Fwd {
                            listen: sys::free_port()?,
                            target: p,
                        })
                    })
                    .collect::<Result<_>>()?
            };
            match peers::start(k, proxy_cpu, &fwds, &dir, bin) {
                Ok(r) => {
                    res.rows[i].engine = r.note.clone();
                    res.rows[i].workers = r.workers;
                    res.rows[i].error = None;
                    ROW_PORTS.with(|m| {
                        m.borrow_mut()
                            .insert(i, fwds.iter().map(|f| f.listen).collect())
                    });
                    running.push(Some(r));
                }
                Err(e) => {
                    eprintln!("   {}: cannot run: {e:#}", k.name());
                    res.rows[i].error = Some(format!("{e:#}"));
                    running.push(None);
                }
            }
        }
        let n = kinds.len();
        let order: Vec<usize> = (0..n).map(|j| (j + round as usize) % n).collect();
        let lport = |i: usize, which: usize| ROW_PORTS.with(|m| m.borrow()[&i][which]);
        for work in [
            Work::Lat64,
            Work::Lat16k,
            Work::Tput1,
            Work::Tput8,
            Work::Conn,
        ] {
            if !groups.iter().any(|g| g == work.group()) {
                continue;
            }
            let t_work = Instant::now();
            for &i in &order {
                let Some(row) = running[i].as_mut() else {
                    continue;
                };
                if let Err(e) = row.check_alive() {
                    res.rows[i].error = Some(format!("{e:#}"));
                    continue;
                }
                let row = running[i].as_ref().unwrap();
                let r = &mut res.rows[i];
                let bg = *res.background_busy.last().unwrap();
                match work {
                    Work::Lat64 | Work::Lat16k => {
                        let (msg, pfx) = if work == Work::Lat64 {
                            (64, "lat64")
                        } else {
                            (16384, "lat16k")
                        };
                        match workloads::latency(client, lport(i, 0), msg, secs) {
                            Ok((a, b, c)) => {
                                push(r, &format!("{pfx}_p50_us"), a);
                                push(r, &format!("{pfx}_p99_us"), b);
                                push(r, &format!("{pfx}_p999_us"), c);
                            }
                            Err(e) => {
                                for q in ["p50", "p99", "p999"] {
                                    fail(r, &format!("{pfx}_{q}_us"), &e);
                                }
                            }
                        }
                    }
                    Work::Tput1 | Work::Tput8 => {
                        let streams = if work == Work::Tput1 { 1 } else { 8 };
                        let key = if streams == 1 {
                            "tput1_gbps"
                        } else {
                            "tput8_gbps"
                        };
                        match workloads::throughput(
                            client,
                            lport(i, 1),
                            streams,
                            secs,
                            row,
                            &servers,
                            bg,
                        ) {
                            Ok(t) => {
                                push(r, key, t.gbps);
                                if streams == 1 {
                                    push(r, "cpu_proxy_s_per_gib", t.proxy_cpu_per_gib);
                                    push(r, "cpu_sys_s_per_gib", t.sys_cpu_per_gib);
                                    push(r, "cpu_stat_s_per_gib", t.stat_cpu_per_gib);
                                }
                            }
                            Err(e) => {
                                fail(r, key, &e);
                                if streams == 1 {
                                    fail(r, "cpu_proxy_s_per_gib", &e);
                                    fail(r, "cpu_sys_s_per_gib", &e);
                                }
                                servers
                                    .restart_iperf()
                                    .context("restarting the iperf3 server")?;
                            }
                        }
                        // iperf3's server needs a moment between tests.
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Work::Conn => {
                        match workloads::conn_rate(client, lport(i, 2), secs, wrk_threads) {
                            Ok((cps, errs)) => {
                                push(r, "conn_per_s", cps);
                                r.conn_errors += errs;
                            }
                            Err(e) => fail(r, "conn_per_s", &e),
                        }
                    }
                }
            }
            eprintln!(
                "   {pass} round {}: {} in {:.1} s",
                round + 1,
                work.name(),
                t_work.elapsed().as_secs_f64()
            );
        }
        for &i in &order {
            let Some(row) = running[i].as_ref() else {
                continue;
            };
            if row.kind == Kind::Direct {
                continue;
            }
            let rss = row.rss_kib() as f64 / 1024.0;
            push(&mut res.rows[i], "rss_mib", rss);
            let maps: u64 = row.procs.iter().map(|p| sys::bpf_map_bytes(p.pid())).sum();
            if maps > 0 {
                push(
                    &mut res.rows[i],
                    "bpf_maps_mib",
                    maps as f64 / (1 << 20) as f64,
                );
            }
        }
        let t_idle = Instant::now();
        for &i in order.iter().filter(|_| idle > 0) {
            let Some(row) = running[i].as_ref() else {
                continue;
            };
            let n = row.kind.max_conns().map(|m| idle.min(m)).unwrap_or(idle);
            let window = if row.kind == Kind::Socat { 4 } else { 200 };
            let t_row = Instant::now();
            let got = workloads::idle(
                lport(i, 3),
                n,
                window,
                row,
                &mut servers.idle,
                Duration::from_secs(60),
            );
            eprintln!(
                "   idle {}: {n} conns in {:.1} s",
                row.kind.name(),
                t_row.elapsed().as_secs_f64()
            );
            match got {
                Ok(x) => {
                    let r = &mut res.rows[i];
                    r.idle_conns = x.n;
                    if row.kind != Kind::Direct {
                        push(r, "idle_proxy_kib_per_conn", x.proxy_bytes / 1024.0);
                    }
                    push(r, "idle_kernel_kib_per_conn", x.kernel_bytes / 1024.0);
                }
                Err(e) => {
                    fail(&mut res.rows[i], "idle_kernel_kib_per_conn", &e);
                    if row.kind != Kind::Direct {
                        fail(&mut res.rows[i], "idle_proxy_kib_per_conn", &e);
                    }
                }
            }
        }
        if idle > 0 {
            eprintln!(
                "   {pass} round {}: idle in {:.1} s",
                round + 1,
                t_idle.elapsed().as_secs_f64()
            );
        }
        // What each ambassador says it did (its `stats` lines on SIGUSR1):
        // how much the kernel spliced, how many connections fell back.
        for (i, row) in running.iter().enumerate() {
            let Some(row) = row else { continue };
            if let (Kind::Ambassador(_), Some(p)) = (&row.kind, row.procs.first()) {
                if let Some((moved, spliced, fallbacks)) = splice_stats(p, ports.len()) {
                    push(&mut res.rows[i], "moved_mib", moved);
                    push(&mut res.rows[i], "spliced_mib", spliced);
                    push(&mut res.rows[i], "splice_fallbacks", fallbacks);
                }
            }
        }
        drop(running);
        ROW_PORTS.with(|m| m.borrow_mut().clear());
        eprintln!(
            "== {pass} round {}/{rounds} in {:.0} s",
            round + 1,
            t_round.elapsed().as_secs_f64()
        );
    }
    if syscall_conns > 0 {
        syscall_step(&mut res, plan, &ports, &dir)?;
    }
    for r in &mut res.rows {
        r.figures = r
            .raw
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), Stat::of(v)?)))
            .collect();
        // A figure that worked in some round keeps its numbers; its error stays in the notes.
        if r.error.is_some() {
            r.figures.clear();
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(res)
}

/// Start each row once more, count its syscalls over `syscall_conns`
/// connections under strace (`syscalls.rs`), stop it.
fn syscall_step(res: &mut PassResult, plan: &Plan, ports: &[u16; 4], dir: &Path) -> Result<()> {
    let t0 = Instant::now();
    for (i, k) in plan.kinds.iter().enumerate() {
        if *k == Kind::Direct || res.rows[i].error.is_some() {
            continue;
        }
        let fwds: Vec<Fwd> = ports
            .iter()
            .map(|&p| {
                Ok(Fwd {
                    listen: sys::free_port()?,
                    target: p,
                })
            })
            .collect::<Result<_>>()?;
        let got = peers::start(k, plan.spec.proxy, &fwds, dir, plan.bin)
            .and_then(|row| syscalls::measure(&row, fwds[2].listen, plan.syscall_conns, dir));
        let r = &mut res.rows[i];
        match got {
            Ok(c) => {
                eprintln!("   syscalls {}: {:.1} per connection", k.name(), c.per_conn);
                push(r, "syscalls_per_conn", c.per_conn);
                r.syscall_top = c.top;
            }
            Err(e) => fail(r, "syscalls_per_conn", &e),
        }
    }
    eprintln!(
        "   {} syscalls ({} connections per row, under strace) in {:.1} s",
        plan.spec.name,
        plan.syscall_conns,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The first CPU of a taskset list ("0,1" -> 0), for the older single-CPU fields.
fn first_cpu(list: &str) -> u32 {
    list.split([',', '-'])
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

thread_local! {
    /// Each running row's listen ports, by row index, in backend order.
    static ROW_PORTS: std::cell::RefCell<BTreeMap<usize, Vec<u16>>> = Default::default();
}

/// Ask an ambassador for its `stats` lines (SIGUSR1) and sum the last one per
/// forward: (MiB it counts as moved, MiB spliced in the kernel, connections that fell back).
fn splice_stats(p: &sys::Proc, forwards: usize) -> Option<(f64, f64, f64)> {
    let before = p.stderr.lock().unwrap().len();
    // Safety: signalling our own child.
    unsafe { libc::kill(p.pid(), libc::SIGUSR1) };
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        let n = p.stderr.lock().unwrap()[before..]
            .iter()
            .filter(|l| l.contains("stats forward="))
            .count();
        if n >= forwards {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let lines = p.stderr.lock().unwrap();
    let stats: Vec<&String> = lines[before..]
        .iter()
        .filter(|l| l.contains("stats forward="))
        .collect();
    if stats.is_empty() {
        return None;
    }
    let field = |l: &str, k: &str| -> f64 {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.trim_matches('"').parse().ok())
            .unwrap_or(0.0)
    };
    let (mut bytes, mut spliced, mut fallbacks) = (0.0, 0.0, 0.0);
    for l in stats {
        bytes += field(l, "bytes_to_upstream") + field(l, "bytes_to_client");
        spliced += field(l, "spliced_to_upstream") + field(l, "spliced_to_client");
        fallbacks += field(l, "splice_fallbacks");
    }
    // This binary's `bytes_to_*` count what userspace copied; spliced bytes are
    // counted apart (a fully spliced run reports bytes_to_*=0).
    let mib = (1u64 << 20) as f64;
    Some(((bytes + spliced) / mib, spliced / mib, fallbacks))
}

fn push(r: &mut RowResult, key: &str, v: f64) {
    r.raw.entry(key.into()).or_default().push(v);
}

fn fail(r: &mut RowResult, key: &str, e: &anyhow::Error) {
    eprintln!("   {} {key}: {e:#}", r.name);
    r.figure_errors.insert(key.into(), format!("{e:#}"));
}

fn versions(bin: &Path) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    v.insert(
        "socat".into(),
        sys::version_of("socat", &["-V"]).replace("socat version ", ""),
    );
    v.insert("haproxy".into(), sys::version_of("haproxy", &["-v"]));
    v.insert("nginx".into(), sys::version_of("nginx", &["-v"]));
    v.insert(
        "sockperf".into(),
        sys::version_of("sockperf", &["--version"]),
    );
    v.insert("iperf3".into(), sys::version_of("iperf3", &["--version"]));
    v.insert("wrk".into(), sys::version_of("wrk", &["--version"]));
    let amb = if bin.exists() {
        sys::version_of(&bin.display().to_string(), &["--version"])
    } else {
        "not built".into()
    };
    v.insert("ambassador".into(), format!("{amb} ({})", bin.display()));
    v
}

const BEGIN: &str = "<!-- results:begin (written by `cargo xtask bench`) -->";
const END: &str = "<!-- results:end -->";

/// Replace the results section of the docs page with the latest tables and plots.
fn update_docs(
    doc: &Path,
    out: &Path,
    written: &[(PassResult, String, Vec<String>)],
) -> Result<()> {
    let text = std::fs::read_to_string(doc).unwrap_or_default();
    let rel = relative(doc, out);
    let mut sec = format!("{BEGIN}\n");
    for (res, stem, plots) in written {
        sec += &format!(
            "\n### {} pass ({}, mode `{}`, {} round(s) × {} s; full report: [{stem}.md]({rel}/{stem}.md))\n\n",
            res.pass, res.date, res.mode, res.rounds, res.seconds_per_figure
        );
        sec += &report::table(res);
        sec += "\nRatios to direct / to HAProxy:\n\n";
        sec += &report::ratios(res);
        if res.pass == "two-cpu" {
            sec += "\n1 → 2 workers:\n\n";
            sec += &report::scaling(res);
        }
        for sk in &res.skipped {
            sec += &format!("\nNot run: {sk}.\n");
        }
        sec += "\nGoals:\n\n";
        sec += &report::goals_table(res);
        sec += "\n";
        for p in plots {
            sec += &format!("![{p}]({rel}/{p})\n");
        }
    }
    sec += &format!("\n{END}");
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(a), Some(b)) if b > a => format!("{}{}{}", &text[..a], sec, &text[b + END.len()..]),
        _ => format!("{text}\n## Latest results\n\n{sec}\n"),
    };
    std::fs::write(doc, new)?;
    eprintln!("== updated {}", doc.display());
    Ok(())
}

/// `out` as seen from `doc`'s directory (both relative to the workspace root).
fn relative(doc: &Path, out: &Path) -> String {
    let depth = doc.parent().map(|p| p.components().count()).unwrap_or(0);
    format!("{}{}", "../".repeat(depth), out.display())
}
