//! `cargo xtask soak`: long, randomised, byte-checked traffic through the real
//! proxy, one engine configuration after another.
//!
//! Why: the sockmap engine once duplicated one MSS under bulk traffic. Unit
//! and integration tests move a few megabytes along a handful of paths; the
//! bug needed gigabytes, concurrency, uneven writes and a busy scheduler. The
//! soak makes those conditions routine and checks every byte, so such a bug
//! shows up as a replayable line instead of a corrupted database.
//!
//! What, for each config (`sockmap-always`, `sockmap-adaptive`, `uring`,
//! `epoll` by default; `sockmap-never` on request):
//!
//! 1. start the release binary (`$AMBASSADOR_BIN`, or `cargo build --release
//!    -p ambassador`) with one loopback forward to an in-process upstream, not
//!    pinned to a CPU, and wait for `ready`;
//! 2. run several client threads (8 by default) until the config's share of
//!    `--minutes` is over or `--gib-target` GiB were moved. Each connection
//!    follows a script drawn from its own seed, which the client sends first
//!    in a 16-byte header so that the upstream derives the same script:
//!    2–12 request/response turns of 1 B–8 KiB (enough round trips for
//!    `--splice adaptive` to promote the connection into the kernel), a bulk
//!    phase both ways at once (0–64 MiB each way, mostly small, some large;
//!    writes of 1 B–256 KiB with short random pauses), more turns, and an
//!    end: client half-close, server half-close (each followed by a final
//!    reply that must arrive whole), a client reset mid-stream (SO_LINGER 0;
//!    the upstream must see only correct bytes, then EOF or a reset), or a
//!    slow reader (64 KiB per millisecond);
//! 3. both ends check every byte against a deterministic stream per (seed,
//!    direction) as it arrives, so nothing is buffered. Counted: connections,
//!    bytes each way, wrong bytes (the first mismatch per connection is
//!    logged with config, seed and offset: `--replay SEED` reruns exactly
//!    that connection), truncations (EOF or reset before the end when no
//!    reset was scripted), scripted resets and unexpected errors (any read
//!    or write with no progress for 60 s among them);
//! 4. SIGTERM the proxy, wait for it, read its final `stats` line.
//!
//! One summary line per config, then a total, go to stderr and to
//! `target/soak-last.txt`. The soak fails if any config saw a wrong byte, a
//! truncation, an unexpected error or an `integrity_resets` (the proxy's own
//! last line of defence, which must never fire), or if the proxy died or did
//! not exit cleanly. `--hog` adds one busy loop per CPU for the whole run.

mod conn;
mod proxy;
mod script;
mod stream;

use crate::util::{release_binary, root, run as run_cmd, target_dir};
use anyhow::{Context, Result, bail};
use conn::{Done, Fail, Moved};
use proxy::{Config, Hog, Proxy, ProxyStats, Stopped};
use script::Script;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::{self, Scope};
use std::time::{Duration, Instant};

const GIB: f64 = (1u64 << 30) as f64;
/// Failure lines printed as they happen (all are counted).
const PRINT_FAILS: usize = 20;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Total minutes, split evenly over the configs.
    #[arg(long, default_value_t = 1.0)]
    pub minutes: f64,
    /// Configs to run in order, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "sockmap-always,sockmap-adaptive,uring,epoll"
    )]
    pub configs: Vec<Config>,
    /// Run a CPU hog (one busy loop per CPU) for the duration.
    #[arg(long)]
    pub hog: bool,
    /// Base seed (decimal or 0x-hex); random by default.
    #[arg(long, value_parser = parse_u64)]
    pub seed: Option<u64>,
    /// Stop a config early once this many GiB (both directions) were moved.
    #[arg(long)]
    pub gib_target: Option<f64>,
    /// Concurrent client threads.
    #[arg(long, default_value_t = 8)]
    pub clients: u64,
    /// Run only the connection with this seed (from a failure line), once per config.
    #[arg(long, value_parser = parse_u64)]
    pub replay: Option<u64>,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            minutes: 1.0,
            configs: vec![
                Config::SockmapAlways,
                Config::SockmapAdaptive,
                Config::Uring,
                Config::Epoll,
            ],
            hog: false,
            seed: None,
            gib_target: None,
            clients: 8,
            replay: None,
        }
    }
}

fn parse_u64(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s}: {e}"))
}

/// What CI runs: one minute over every engine and splice policy, then one
/// minute with the hog (longer runs: `cargo xtask soak --minutes N`).
pub fn ci() -> Result<()> {
    run(Args::default())?;
    run(Args {
        hog: true,
        ..Args::default()
    })
}

pub fn run(a: Args) -> Result<()> {
    anyhow::ensure!(!a.configs.is_empty(), "no configs");
    if cfg!(debug_assertions) && std::env::var_os(IN_RELEASE).is_none() {
        if let Some(r) = rerun_in_release(&a) {
            return r;
        }
    }
    anyhow::ensure!(
        a.minutes > 0.0 && a.clients > 0,
        "--minutes and --clients must be > 0"
    );
    let bin = release_binary()?;
    let seed = a.seed.unwrap_or_else(random_seed);
    let per = Duration::from_secs_f64(a.minutes * 60.0 / a.configs.len() as f64);
    let _hog = a.hog.then(Hog::start).transpose()?;
    let mut report = format!(
        "soak: configs={} per-config={per:.0?} hog={} seed={seed:#x} gib-target={} clients={} bin={}\n",
        a.configs
            .iter()
            .map(|c| c.name())
            .collect::<Vec<_>>()
            .join(","),
        a.hog,
        a.gib_target.map_or("none".into(), |g| g.to_string()),
        a.clients,
        bin.display()
    );
    eprint!("{report}");
    let mut all = Vec::new();
    for (i, &cfg) in a.configs.iter().enumerate() {
        let plan = Plan {
            cfg,
            time: per,
            target: a.gib_target.map(|g| (g * GIB) as u64),
            seed: stream::mix(seed ^ i as u64),
            clients: a.clients,
            replay: a.replay,
        };
        let s = soak_config(&bin, &plan)?;
        eprintln!("{}", s.line());
        all.push(s);
    }
    finish(&mut report, &all)
}

/// Print and save the summary; Err if any config failed.
fn finish(report: &mut String, all: &[Summary]) -> Result<()> {
    let mut failed = Vec::new();
    for s in all {
        let _ = writeln!(report, "{}", s.line());
        for f in &s.failures {
            let _ = writeln!(report, "  {f}");
        }
        if s.failed() {
            failed.push(s.cfg.name());
        }
    }
    let total = Summary::total(all);
    let _ = writeln!(report, "{}", total.line());
    eprintln!("{}", total.line());
    let path = root().join("target/soak-last.txt");
    std::fs::write(&path, report.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("soak: summary in {}", path.display());
    if !failed.is_empty() {
        bail!("soak failed for {}", failed.join(", "));
    }
    Ok(())
}

/// Set in the environment of the optimised re-run (so it does not recurse).
const IN_RELEASE: &str = "AMBASSADOR_SOAK_IN_RELEASE";

/// An unoptimised driver generates and checks bytes about 8x slower than the
/// proxy moves them, so a debug `cargo xtask` runs the soak from a release
/// build of itself. None (run here instead) if that build fails.
fn rerun_in_release(a: &Args) -> Option<Result<()>> {
    let root = root();
    let built = run_cmd(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-q",
        "-p",
        "xtask",
    ]));
    if let Err(e) = built {
        eprintln!("soak: no release build of xtask ({e:#}); running unoptimised");
        return None;
    }
    Some(run_cmd(
        Command::new(target_dir().join("release/xtask"))
            .arg("soak")
            .args(a.to_args())
            .env(IN_RELEASE, "1"),
    ))
}

impl Args {
    /// The command line that means these arguments.
    fn to_args(&self) -> Vec<String> {
        let names: Vec<_> = self.configs.iter().map(|c| c.name()).collect();
        let mut v = vec![
            format!("--minutes={}", self.minutes),
            format!("--configs={}", names.join(",")),
            format!("--clients={}", self.clients),
        ];
        v.extend(self.hog.then(|| "--hog".to_string()));
        v.extend(self.seed.map(|s| format!("--seed={s:#x}")));
        v.extend(self.gib_target.map(|g| format!("--gib-target={g}")));
        v.extend(self.replay.map(|s| format!("--replay={s:#x}")));
        v
    }
}

fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    stream::mix(t ^ u64::from(std::process::id()))
}

/// One config's run.
#[derive(Clone, Copy)]
struct Plan {
    cfg: Config,
    time: Duration,
    target: Option<u64>,
    seed: u64,
    clients: u64,
    replay: Option<u64>,
}

/// Counters shared by every thread of one config's run.
#[derive(Default)]
struct Tally {
    conns: AtomicU64,
    wrong: AtomicU64,
    truncated: AtomicU64,
    resets: AtomicU64,
    errors: AtomicU64,
    failures: Mutex<Vec<String>>,
    moved: Moved,
}

impl Tally {
    /// Count one side's outcome; `client` says which side it was.
    fn record(&self, cfg: Config, seed: u64, client: bool, r: Result<Done, Fail>) {
        if client {
            self.conns.fetch_add(1, Relaxed);
        }
        let f = match r {
            Ok(Done::Reset) if !client => {
                self.resets.fetch_add(1, Relaxed);
                return;
            }
            Ok(_) => return,
            Err(f) => f,
        };
        let c = match f {
            Fail::Wrong { .. } => &self.wrong,
            Fail::Truncated { .. } => &self.truncated,
            Fail::Error(_) => &self.errors,
        };
        c.fetch_add(1, Relaxed);
        let side = if client { "client" } else { "upstream" };
        let line = format!("config={} seed={seed:#x} side={side}: {f}", cfg.name());
        let mut v = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() < PRINT_FAILS {
            eprintln!("soak: {line}");
        }
        v.push(line);
    }
}

/// Everything the client and upstream threads share.
struct Ctx {
    plan: Plan,
    proxy: SocketAddr,
    tally: Tally,
    /// Clients start no new connection once set.
    stop: AtomicBool,
    /// The upstream accepts no more once set.
    upstream_stop: AtomicBool,
    upstream_active: AtomicU64,
}

impl Ctx {
    fn should_stop(&self) -> bool {
        self.stop.load(Relaxed)
            || self
                .plan
                .target
                .is_some_and(|t| self.tally.moved.total() >= t)
    }
}

fn soak_config(bin: &std::path::Path, plan: &Plan) -> Result<Summary> {
    let upstream = TcpListener::bind("127.0.0.1:0")?;
    upstream.set_nonblocking(true)?;
    let mut proxy = Proxy::start(bin, plan.cfg, upstream.local_addr()?)?;
    let ctx = Ctx {
        plan: *plan,
        proxy: proxy.addr,
        tally: Tally::default(),
        stop: AtomicBool::new(false),
        upstream_stop: AtomicBool::new(false),
        upstream_active: AtomicU64::new(0),
    };
    let t = Instant::now();
    let died = thread::scope(|s| {
        let ctx = &ctx;
        s.spawn(|| serve(&upstream, ctx, s));
        let clients: Vec<_> = (0..plan.clients)
            .map(|i| s.spawn(move || client_loop(ctx, i)))
            .collect();
        let died = watch(&mut proxy, ctx, t, &clients);
        wait_upstreams(ctx);
        ctx.upstream_stop.store(true, Relaxed);
        died
    });
    let secs = t.elapsed().as_secs_f64();
    let stopped = match died {
        Some(st) => {
            let mut s = proxy.stop();
            s.status = None;
            Err(format!(
                "proxy died during the run: {st}; {}",
                s.notable.join(" | ")
            ))
        }
        None => Ok(proxy.stop()),
    };
    Ok(Summary::new(plan.cfg, secs, &ctx.tally, stopped))
}

/// Until every client thread is done: stop them at the deadline, report
/// progress, notice a proxy that exits on its own (Some: how it ended).
fn watch(
    proxy: &mut Proxy,
    ctx: &Ctx,
    t: Instant,
    clients: &[thread::ScopedJoinHandle<'_, ()>],
) -> Option<std::process::ExitStatus> {
    let mut died = None;
    let mut next_report = Duration::from_secs(10);
    while !clients.iter().all(|c| c.is_finished()) {
        if t.elapsed() >= ctx.plan.time {
            ctx.stop.store(true, Relaxed);
        }
        if died.is_none() {
            died = proxy.exited();
            if died.is_some() {
                ctx.stop.store(true, Relaxed);
            }
        }
        if t.elapsed() >= next_report {
            next_report += Duration::from_secs(10);
            progress(ctx, t);
        }
        // The run's clock (watch the proxy, report every 10 s), not a synchronisation.
        thread::sleep(Duration::from_millis(100));
    }
    died.or_else(|| proxy.exited())
}

fn progress(ctx: &Ctx, t: Instant) {
    let m = &ctx.tally.moved;
    eprintln!(
        "soak {}: {:.0}s conns={} moved={:.2} GiB failures={}",
        ctx.plan.cfg.name(),
        t.elapsed().as_secs_f64(),
        ctx.tally.conns.load(Relaxed),
        m.total() as f64 / GIB,
        ctx.tally.wrong.load(Relaxed)
            + ctx.tally.truncated.load(Relaxed)
            + ctx.tally.errors.load(Relaxed)
    );
}

/// Let the upstream finish its connections (bounded: 2 idle timeouts).
fn wait_upstreams(ctx: &Ctx) {
    ambassador_test_support::wait_until(2 * conn::IDLE, || ctx.upstream_active.load(Relaxed) == 0);
}

/// One client thread: scripted connections until told to stop.
fn client_loop(ctx: &Ctx, thread_no: u64) {
    if let Some(seed) = ctx.plan.replay {
        if thread_no == 0 {
            client_conn(ctx, seed);
        }
        return;
    }
    let mut n = 0u64;
    while !ctx.should_stop() {
        let seed = stream::mix(ctx.plan.seed ^ (thread_no << 40) ^ n);
        n += 1;
        client_conn(ctx, seed);
    }
}

fn client_conn(ctx: &Ctx, seed: u64) {
    let sc = Script::new(seed);
    let mut port = 0;
    let r = TcpStream::connect_timeout(&ctx.proxy, Duration::from_secs(10))
        .and_then(|s| conn::tune(&s).map(|()| s))
        .map_err(|e| Fail::Error(format!("connect to the proxy: {e}")))
        .and_then(|s| {
            // The proxy logs this port as the connection's `client=`.
            port = s.local_addr().map_or(0, |a| a.port());
            conn::client(&s, &sc, &ctx.tally.moved)
        });
    let r = r.map_err(|f| f.with_port(port));
    ctx.tally.record(ctx.plan.cfg, seed, true, r);
}

/// The in-process upstream: a thread per accepted connection.
fn serve<'s, 'e>(l: &'s TcpListener, ctx: &'s Ctx, s: &'s Scope<'s, 'e>) {
    while !ctx.upstream_stop.load(Relaxed) {
        match l.accept() {
            Ok((sock, _)) => {
                ctx.upstream_active.fetch_add(1, Relaxed);
                s.spawn(move || {
                    upstream_conn(ctx, sock);
                    ctx.upstream_active.fetch_sub(1, Relaxed);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // The non-blocking accept loop's pace (it checks `upstream_stop`).
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => {
                let f = Fail::Error(format!("upstream accept: {e}"));
                ctx.tally.record(ctx.plan.cfg, 0, false, Err(f));
                // Back-off after a failed accept (EMFILE would otherwise spin).
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn upstream_conn(ctx: &Ctx, sock: TcpStream) {
    let moved = &ctx.tally.moved;
    let (seed, r) = match conn::tune(&sock)
        .map_err(|e| Fail::Error(format!("upstream socket: {e}")))
        .and_then(|()| conn::read_header(&sock))
    {
        Ok(sc) => (sc.seed, conn::upstream(&sock, &sc, moved)),
        Err(f) => (0, Err(f)),
    };
    ctx.tally.record(ctx.plan.cfg, seed, false, r);
}

/// One config's result line.
struct Summary {
    cfg: Config,
    secs: f64,
    conns: u64,
    up: u64,
    down: u64,
    wrong: u64,
    truncated: u64,
    resets: u64,
    errors: u64,
    proxy: ProxyStats,
    /// Why the proxy's end is a failure (died, killed, non-zero, no stats).
    proxy_problem: Option<String>,
    failures: Vec<String>,
}

impl Summary {
    fn new(cfg: Config, secs: f64, t: &Tally, stopped: Result<Stopped, String>) -> Summary {
        let (proxy, proxy_problem, mut failures) = judge_proxy(stopped);
        let mut f = t.failures.lock().unwrap_or_else(|e| e.into_inner()).clone();
        f.append(&mut failures);
        Summary {
            cfg,
            secs,
            conns: t.conns.load(Relaxed),
            up: t.moved.up.load(Relaxed),
            down: t.moved.down.load(Relaxed),
            wrong: t.wrong.load(Relaxed),
            truncated: t.truncated.load(Relaxed),
            resets: t.resets.load(Relaxed),
            errors: t.errors.load(Relaxed),
            proxy,
            proxy_problem,
            failures: f,
        }
    }

    fn failed(&self) -> bool {
        self.wrong + self.truncated + self.errors + self.proxy.integrity_resets > 0
            || self.proxy_problem.is_some()
    }

    fn line(&self) -> String {
        let gib = |b: u64| b as f64 / GIB;
        format!(
            "soak {:<16} conns={} moved={:.2} GiB (up {:.2}, down {:.2}, {:.0} MiB/s) spliced={:.2} GiB \
             wrong={} truncated={} scripted_resets={} errors={} integrity_resets={} \
             proxy_conns={} proxy_errors={} splice_fallbacks={} in {:.0}s: {}",
            self.cfg.name(),
            self.conns,
            gib(self.up + self.down),
            gib(self.up),
            gib(self.down),
            (self.up + self.down) as f64 / (1 << 20) as f64 / self.secs.max(0.001),
            gib(self.proxy.spliced),
            self.wrong,
            self.truncated,
            self.resets,
            self.errors,
            self.proxy.integrity_resets,
            self.proxy.conns_total,
            self.proxy.errors,
            self.proxy.splice_fallbacks,
            self.secs,
            match (&self.proxy_problem, self.failed()) {
                (Some(p), _) => format!("FAILED ({p})"),
                (None, true) => "FAILED".into(),
                (None, false) => "ok".into(),
            }
        )
    }

    fn total(all: &[Summary]) -> TotalLine {
        let sum = |f: fn(&Summary) -> u64| all.iter().map(f).sum::<u64>();
        TotalLine {
            conns: sum(|s| s.conns),
            moved: sum(|s| s.up + s.down),
            spliced: sum(|s| s.proxy.spliced),
            bad: [
                sum(|s| s.wrong),
                sum(|s| s.truncated),
                sum(|s| s.resets),
                sum(|s| s.errors),
                sum(|s| s.proxy.integrity_resets),
            ],
            failed: all.iter().filter(|s| s.failed()).count(),
            secs: all.iter().map(|s| s.secs).sum(),
        }
    }
}

struct TotalLine {
    conns: u64,
    moved: u64,
    spliced: u64,
    /// wrong, truncated, scripted resets, errors, integrity resets
    bad: [u64; 5],
    failed: usize,
    secs: f64,
}

impl TotalLine {
    fn line(&self) -> String {
        let [w, t, r, e, i] = self.bad;
        format!(
            "soak TOTAL            conns={} moved={:.2} GiB spliced={:.2} GiB wrong={w} truncated={t} \
             scripted_resets={r} errors={e} integrity_resets={i} in {:.0}s: {}",
            self.conns,
            self.moved as f64 / GIB,
            self.spliced as f64 / GIB,
            self.secs,
            if self.failed == 0 {
                "ok".to_string()
            } else {
                format!("FAILED ({} configs)", self.failed)
            }
        )
    }
}

/// The proxy's counters and whether its end was clean, plus its notable log
/// lines when it was not.
fn judge_proxy(stopped: Result<Stopped, String>) -> (ProxyStats, Option<String>, Vec<String>) {
    let s = match stopped {
        Ok(s) => s,
        Err(why) => return (ProxyStats::default(), Some(why), Vec::new()),
    };
    let stats = s.stats.clone().unwrap_or_default();
    let problem = match (&s.status, &s.stats) {
        (None, _) => Some("did not exit within 40 s of SIGTERM".to_string()),
        (Some(st), _) if !st.success() => Some(format!("exited with {st} after SIGTERM")),
        (_, None) => Some("no final stats line".to_string()),
        _ => None,
    };
    let notes = if problem.is_some() || stats.integrity_resets > 0 {
        s.notable.iter().map(|l| format!("proxy: {l}")).collect()
    } else {
        Vec::new()
    };
    (stats, problem, notes)
}
