//! The machine side of the harness: spawning pinned processes that die with us,
//! and reading the few /proc files the figures come from.
//!
//! Every process we start gets its own process group, so that a proxy that forks
//! (socat) is accounted and stopped as one unit: CPU time and memory are summed
//! over the group, and `Proc::drop` signals the whole group. A SIGINT, SIGTERM or
//! SIGHUP to the harness stops every group still running before it exits
//! ([`stop_children_on_signal`]): without it the signal's default action would
//! skip every `drop` and leave the peers running.

use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// clock ticks per second for /proc times (USER_HZ).
fn hz() -> f64 {
    // Safety: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// The process groups of every live [`Proc`] and running [`run_capture`]. A
/// spawn holds the lock from `fork` until its group is listed, so the signal
/// thread, which holds it until the process exits, misses none.
static GROUPS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Spawn `cmd` (in a process group of its own) and list its group.
fn spawn_tracked(cmd: &mut Command, prog: &str) -> Result<Child> {
    let mut groups = GROUPS.lock().unwrap();
    let child = cmd.spawn().with_context(|| format!("starting {prog}"))?;
    groups.push(child.id() as i32);
    Ok(child)
}

fn untrack(pg: i32) {
    GROUPS.lock().unwrap().retain(|&g| g != pg);
}

/// On SIGINT, SIGTERM or SIGHUP: SIGKILL every group we started, then exit
/// with 128 + the signal's number (as a shell reports a death by signal).
/// Call it after [`own_netns`]: it starts a thread.
pub fn stop_children_on_signal() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let groups = GROUPS.lock().unwrap();
            eprintln!("signal {sig}: stopping {} process group(s)", groups.len());
            for &pg in groups.iter() {
                // Safety: kill(2) of a process group we started.
                unsafe { libc::kill(-pg, libc::SIGKILL) };
            }
            std::process::exit(128 + sig);
        }
    });
    Ok(())
}

/// A process (group) we started. Stopped with SIGTERM, then SIGKILL, on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    /// stderr lines collected so far (the reason an engine could not start).
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Start `prog args` pinned to the CPU list `cpus` ("0", "0,1"; via taskset,
    /// which execs: same pid) in a new process group. stdout is discarded.
    pub fn spawn(name: &str, cpus: Option<&str>, prog: &str, args: &[String]) -> Result<Proc> {
        let mut cmd = pinned(cpus, prog);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = spawn_tracked(&mut cmd, prog)?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
                sink.lock().unwrap().push(line);
            }
        });
        Ok(Proc {
            name: name.to_string(),
            child,
            stderr,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Wait until a stderr line contains `needle`; fail with the process's own
    /// words if it exits first or the time runs out.
    pub fn wait_stderr(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let t0 = Instant::now();
        loop {
            if let Some(l) = self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return Ok(l.clone());
            }
            if let Some(st) = self.child.try_wait()? {
                std::thread::sleep(Duration::from_millis(50)); // let the reader drain
                bail!("exited {st}: {}", self.last_words());
            }
            if t0.elapsed() > timeout {
                bail!("no `{needle}` within {timeout:?}: {}", self.last_words());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait until every port accepts a TCP connection (for peers without a ready line).
    pub fn wait_ports(&mut self, ports: &[u16], timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        for &p in ports {
            loop {
                if let Some(st) = self.child.try_wait()? {
                    std::thread::sleep(Duration::from_millis(50));
                    bail!("exited {st}: {}", self.last_words());
                }
                if TcpStream::connect(("127.0.0.1", p)).is_ok() {
                    break;
                }
                if t0.elapsed() > timeout {
                    bail!(
                        "port {p} not accepting within {timeout:?}: {}",
                        self.last_words()
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// The last few stderr lines, joined: what a failed process said.
    pub fn last_words(&self) -> String {
        let l = self.stderr.lock().unwrap();
        let n = l.len().saturating_sub(3);
        let s = l[n..].join(" | ");
        if s.is_empty() {
            "(no output)".into()
        } else {
            s
        }
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pg = self.pid();
        // Safety: kill(2) with a negative pid signals our own child's group only.
        unsafe { libc::kill(-pg, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Safety: as above; also reaps forked children left in the group.
        unsafe { libc::kill(-pg, libc::SIGKILL) };
        untrack(pg);
        let _ = self.child.wait();
    }
}

/// Run a command to completion with a hard time limit; return stdout.
pub fn run_capture(
    cpus: Option<&str>,
    prog: &str,
    args: &[String],
    limit: Duration,
) -> Result<String> {
    let mut cmd = pinned(cpus, prog);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = spawn_tracked(&mut cmd, prog)?;
    let pg = child.id() as i32;
    let result = wait_capture(&mut child, prog, limit);
    untrack(pg);
    result
}

/// The rest of [`run_capture`], for `child` just started.
fn wait_capture(child: &mut Child, prog: &str, limit: Duration) -> Result<String> {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let h = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).ok();
        s
    });
    let he = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).ok();
        s
    });
    let t0 = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t0.elapsed() > limit {
            // Safety: our own child's group.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            bail!("{prog} exceeded {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = h.join().unwrap();
    let err = he.join().unwrap();
    if !st.success() {
        let tail: String = err
            .lines()
            .chain(out.lines())
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .join(" | ");
        bail!("{prog} {st}: {tail}");
    }
    Ok(out + &err)
}

/// `prog` under `taskset -c <cpus>` (or bare when `cpus` is None).
fn pinned(cpus: Option<&str>, prog: &str) -> Command {
    match cpus {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c).arg(prog);
            cmd
        }
        None => Command::new(prog),
    }
}

/// A free loopback port (bind :0, read it, release it).
pub fn free_port() -> Result<u16> {
    Ok(ambassador_test_support::free_ports::<1>()?[0])
}

/// Raise our soft RLIMIT_NOFILE to the hard limit (no CAP_SYS_RESOURCE here, so
/// never above it); children inherit it. Returns the new limit.
/// Move this process (and so everything it starts) into a network
/// namespace of its own, with only loopback up; the kernel removes it when
/// the last process in it exits. Call it before any thread is started: it
/// moves the calling thread, and threads started later inherit it.
///
/// Why: the host's firewall rules (Docker's, once the docker tests ran)
/// turn connection tracking on in the initial namespace, and at 10,000
/// connections a second, two entries each, held 120 s in TIME_WAIT, its
/// table (262,144 here) fills within a run and the kernel drops SYNs: a row
/// then measured a few hundred conn/s, or wrk hung past its limit. A fresh
/// namespace has no rules, so no tracking.
pub fn own_netns() -> Result<()> {
    // SAFETY: unshare(2) with a flag, no memory passed.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!(
            "unshare(CLONE_NEWNET): {} (the benchmark needs CAP_SYS_ADMIN)",
            std::io::Error::last_os_error()
        );
    }
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .context("ip link set lo up")?;
    if !up.success() {
        bail!("ip link set lo up: {up}");
    }
    Ok(())
}

pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // Safety: plain getrlimit/setrlimit on our own process with a valid pointer.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    r.rlim_cur
}

/// Process ids in process group `pgid`.
pub fn group_pids(pgid: i32) -> Vec<i32> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Some(f) = stat_fields(pid)
            && f.get(2).and_then(|s| s.parse::<i32>().ok()) == Some(pgid)
        {
            v.push(pid);
        }
    }
    v
}

/// /proc/<pid>/stat fields after the command name: index 0 = state (field 3).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// CPU seconds (utime+stime+cutime+cstime) summed over a process group: forked
/// children count while alive and, once reaped, through their parent's cutime.
pub fn group_cpu_secs(pgid: i32) -> f64 {
    let mut ticks = 0u64;
    for pid in group_pids(pgid) {
        if let Some(f) = stat_fields(pid) {
            // utime=14 stime=15 cutime=16 cstime=17 (1-based) -> 11..=14 here
            for i in 11..=14 {
                ticks += f
                    .get(i)
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or(0)
                    .max(0) as u64;
            }
        }
    }
    ticks as f64 / hz()
}

fn status_kib(pid: i32, key: &str) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    field_kib(&s, key)
}

fn field_kib(s: &str, key: &str) -> u64 {
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// VmRSS summed over a process group, KiB.
pub fn group_rss_kib(pgid: i32) -> u64 {
    group_pids(pgid)
        .into_iter()
        .map(|p| status_kib(p, "VmRSS:"))
        .sum()
}

/// Proportional set size summed over a process group, KiB. For a forking proxy
/// (socat) summing RSS would count shared pages once per child; PSS does not.
pub fn group_pss_kib(pgid: i32) -> u64 {
    group_pids(pgid)
        .into_iter()
        .map(|p| {
            std::fs::read_to_string(format!("/proc/{p}/smaps_rollup"))
                .map(|s| field_kib(&s, "Pss:"))
                .unwrap_or(0)
        })
        .sum()
}

/// All CPUs' busy time in seconds from /proc/stat (user+nice+system+irq+softirq;
/// idle, iowait and steal excluded).
pub fn system_busy_secs() -> f64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let l = s.lines().next().unwrap_or("");
    let v: Vec<u64> = l
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let g = |i: usize| v.get(i).copied().unwrap_or(0);
    (g(0) + g(1) + g(2) + g(5) + g(6)) as f64 / hz()
}

/// Kernel memory that sockets and their owners cost, bytes: the slab objects a
/// connection allocates (TCP sockets, socket inodes, files, epoll items,
/// io_uring requests, skbs, and kmalloc: sk_psock and friends; objects in use
/// x object size, from /proc/slabinfo), kernel stacks and page tables (a
/// process per connection for socat; /proc/meminfo), and TCP buffer memory
/// (/proc/net/sockstat `mem`). Only these caches, not all of Slab: other
/// tenants' file work (dentries, inodes) would otherwise swamp the delta.
/// Socket dentries (192 B each) are left out for the same reason.
pub fn kernel_mem_bytes() -> u64 {
    let mi = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let k = field_kib(&mi, "KernelStack:") + field_kib(&mi, "PageTables:");
    k * 1024 + socket_slab_bytes() + sockstat_tcp_mem_pages() * 4096
}

const SOCKET_CACHES: &[&str] = &[
    "TCP",
    "TCPv6",
    "request_sock_TCP",
    "sock_inode_cache",
    "filp",
    "eventpoll_epi",
    "eventpoll_pwq",
    "io_kiocb",
    "skbuff_head_cache",
    "skbuff_fclone_cache",
    "skbuff_small_head",
];

fn socket_slab_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    let mut total = 0;
    for l in s.lines().skip(2) {
        let w: Vec<&str> = l.split_whitespace().collect();
        let (Some(name), Some(active), Some(size)) = (w.first(), w.get(1), w.get(3)) else {
            continue;
        };
        if SOCKET_CACHES.contains(name) || name.starts_with("kmalloc-") {
            total += active.parse::<u64>().unwrap_or(0) * size.parse::<u64>().unwrap_or(0);
        }
    }
    total
}

pub fn sockstat_tcp_mem_pages() -> u64 {
    sockstat_tcp("mem")
}

/// TCP sockets allocated (open or closing, not TIME_WAIT), /proc/net/sockstat.
pub fn sockstat_tcp_alloc() -> u64 {
    sockstat_tcp("alloc")
}

fn sockstat_tcp(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let l = s.lines().find(|l| l.starts_with("TCP:")).unwrap_or("");
    let w: Vec<&str> = l.split_whitespace().collect();
    w.iter()
        .position(|x| *x == key)
        .and_then(|i| w.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Kernel release and CPU model, for the report.
pub fn machine() -> (String, String, usize) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (kernel, cpu, n)
}

/// First line of `prog args` (stdout or stderr), for version strings.
pub fn version_of(prog: &str, args: &[&str]) -> String {
    match Command::new(prog).args(args).output() {
        Ok(o) => {
            let s = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            s.lines()
                .find(|l| l.to_lowercase().contains("version") || l.contains(prog))
                .or(s.lines().next())
                .unwrap_or("?")
                .trim()
                .to_string()
        }
        Err(e) => format!("not found ({e})"),
    }
}

/// CPU seconds of every kernel thread (children of kthreadd: ksoftirqd, kworkers
/// running deferred socket work such as sockmap's backlog). Ticks that a softirq
/// steals from a task are charged to that task here (tick accounting, no
/// IRQ_TIME_ACCOUNTING), so tasks + kernel threads cover the softirq work.
pub fn kthreads_cpu_secs() -> f64 {
    let mut ticks = 0u64;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Some(f) = stat_fields(pid) else { continue };
        // field 4 (ppid) -> index 1
        if pid == 2 || f.get(1).map(String::as_str) == Some("2") {
            for i in 11..=12 {
                ticks += f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    ticks as f64 / hz()
}

/// Our own CPU seconds plus those of our reaped children (the client tools).
pub fn self_and_children_cpu_secs() -> f64 {
    let mut t = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // Safety: getrusage fills the struct we pass.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut ru) };
        let tv = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
        t += tv(ru.ru_utime) + tv(ru.ru_stime);
    }
    t
}

/// Kernel memory of the BPF maps a process holds (the `memlock` of each
/// bpf-map fd in /proc/<pid>/fdinfo), bytes: a fixed cost, preallocated for
/// the maps' capacity, that the per-connection figures do not show.
pub fn bpf_map_bytes(pid: i32) -> u64 {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let mut total = 0;
    for e in rd.flatten() {
        let is_map = std::fs::read_link(e.path())
            .map(|l| l.to_string_lossy().contains("bpf-map"))
            .unwrap_or(false);
        if !is_map {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        total += info
            .lines()
            .find(|l| l.starts_with("memlock:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}
