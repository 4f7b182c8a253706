//! The markdown report of a pass: the table of medians, ratios to direct and to
//! HAProxy (the pass's own: `nbthread 2` in the two-CPU pass), the 1 → 2
//! worker ratios of the two-CPU pass, the spread, the syscalls each row makes
//! per connection, and the goals with a plain verdict for each.

use crate::results::{FIGURES, PassResult, RowResult, figure};
use std::fmt::Write;

fn fmt(key: &str, v: f64) -> String {
    if key.contains("_us") {
        format!("{v:.1}")
    } else if key.contains("gbps") {
        format!("{v:.2}")
    } else if key == "conn_per_s" {
        format!("{v:.0}")
    } else if key == "syscalls_per_conn" {
        format!("{v:.1}")
    } else if key.contains("cpu") {
        format!("{v:.3}")
    } else {
        format!("{v:.2}")
    }
}

/// System CPU per GiB above direct's (what the proxy adds, machine-wide).
pub fn sys_over_direct(p: &PassResult, r: &RowResult) -> Option<f64> {
    Some(r.median("cpu_sys_s_per_gib")? - p.row("direct")?.median("cpu_sys_s_per_gib")?)
}

fn cell(r: &RowResult, key: &str) -> String {
    match (r.figures.get(key), r.figure_errors.get(key)) {
        (Some(s), _) => fmt(key, s.median),
        (None, Some(_)) => "err¹".into(),
        (None, None) => "–".into(),
    }
}

/// The main table (medians), one line per row; rows that could not run show why.
pub fn table(p: &PassResult) -> String {
    let keys: Vec<&str> = FIGURES.iter().map(|f| f.key).collect();
    let mut s = String::from("| row |");
    for k in &keys {
        let _ = write!(s, " {} |", figure(k).label);
        if *k == "cpu_sys_s_per_gib" {
            s.push_str(" system CPU s/GiB over direct |");
        }
    }
    s.push_str("\n|---|");
    for k in &keys {
        s.push_str("---:|");
        if *k == "cpu_sys_s_per_gib" {
            s.push_str("---:|");
        }
    }
    s.push('\n');
    for r in &p.rows {
        let name = display_name(r);
        if let Some(e) = &r.error {
            let _ = writeln!(
                s,
                "| {name} | cannot run: {} |{}",
                e.replace('|', "/"),
                " |".repeat(keys.len())
            );
            continue;
        }
        let _ = write!(s, "| {name} |");
        for k in &keys {
            let _ = write!(s, " {} |", cell(r, k));
            if *k == "cpu_sys_s_per_gib" {
                let v = sys_over_direct(p, r)
                    .map(|v| fmt("cpu", v))
                    .unwrap_or("–".into());
                let _ = write!(s, " {v} |");
            }
        }
        s.push('\n');
    }
    s
}

/// A row's name as the tables show it: what `auto` chose, and the workers
/// that run when they are not the ones asked for (sockmap runs one).
fn display_name(r: &RowResult) -> String {
    let mut name =
        if r.engine.is_empty() || r.name.split_whitespace().nth(1) == Some(r.engine.as_str()) {
            r.name.clone()
        } else {
            format!("{} (→ {})", r.name, r.engine)
        };
    if let Some(asked) = r.name.split("--workers ").nth(1)
        && r.workers > 0
        && asked.split_whitespace().next() != Some(r.workers.to_string().as_str())
    {
        let _ = write!(
            name,
            " (runs {} worker{})",
            r.workers,
            if r.workers == 1 { "" } else { "s" }
        );
    }
    name
}

const RATIO_KEYS: &[&str] = &[
    "lat64_p50_us",
    "lat64_p99_us",
    "lat16k_p50_us",
    "tput1_gbps",
    "tput8_gbps",
    "conn_per_s",
    "syscalls_per_conn",
    "cpu_sys_s_per_gib",
];

/// Each row's median divided by direct's and by HAProxy's.
pub fn ratios(p: &PassResult) -> String {
    let mut s = String::from("| row |");
    for k in RATIO_KEYS {
        let _ = write!(s, " {} ÷ direct / ÷ HAProxy |", figure(k).label);
    }
    s.push_str(" system CPU over direct ÷ HAProxy's |\n|---|");
    s.push_str(&"---:|".repeat(RATIO_KEYS.len() + 1));
    s.push('\n');
    let d = p.row("direct");
    let h = p.haproxy();
    for r in p.rows.iter().filter(|r| r.error.is_none()) {
        let _ = write!(s, "| {} |", r.name);
        for k in RATIO_KEYS {
            let q = |b: Option<&RowResult>| match (r.median(k), b.and_then(|b| b.median(k))) {
                (Some(a), Some(b)) if b != 0.0 => format!("{:.2}×", a / b),
                _ => "–".into(),
            };
            let _ = write!(s, " {} / {} |", q(d), q(h));
        }
        let v = match (sys_over_direct(p, r), h.and_then(|h| sys_over_direct(p, h))) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "–".into(),
        };
        let _ = writeln!(s, " {v} |");
    }
    s
}

/// Spread, (max − min) / median over the rounds, for every figure.
pub fn spread(p: &PassResult) -> String {
    let mut s = String::from("| row |");
    for f in FIGURES {
        let _ = write!(s, " {} |", f.label);
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(FIGURES.len()));
    s.push('\n');
    for r in p.rows.iter().filter(|r| r.error.is_none()) {
        let _ = write!(s, "| {} |", r.name);
        for f in FIGURES {
            let v = r
                .figures
                .get(f.key)
                .map(|st| format!("{:.0}%", st.spread() * 100.0))
                .unwrap_or("–".into());
            let _ = write!(s, " {v} |");
        }
        s.push('\n');
    }
    s
}

/// A goal's verdict line.
pub struct Goal {
    pub goal: String,
    pub measured: String,
    pub met: Option<bool>,
}

fn engines(p: &PassResult) -> Vec<&RowResult> {
    p.rows
        .iter()
        .filter(|r| {
            r.name.starts_with("ambassador ") && !r.name.ends_with(" auto") && r.error.is_none()
        })
        .collect()
}

/// The best engine for `key` (by its direction) and its median.
fn best<'a>(p: &'a PassResult, key: &str) -> Option<(&'a RowResult, f64)> {
    let hib = figure(key).higher_is_better;
    engines(p)
        .into_iter()
        .filter_map(|r| Some((r, r.median(key)?)))
        .max_by(|a, b| {
            if hib {
                a.1.total_cmp(&b.1)
            } else {
                b.1.total_cmp(&a.1)
            }
        })
}

fn short(r: &RowResult) -> String {
    r.name
        .trim_start_matches("ambassador ")
        .replace(" --splice always", " (splice always)")
}

/// One engine's 1-worker and 2-worker rows of the two-CPU pass.
struct Pair<'a> {
    engine: &'a str,
    one: &'a RowResult,
    two: &'a RowResult,
}

fn pairs(p: &PassResult) -> Vec<Pair<'_>> {
    let mut v = Vec::new();
    for one in &p.rows {
        let Some(engine) = one
            .name
            .strip_prefix("ambassador ")
            .and_then(|n| n.strip_suffix(" --workers 1"))
        else {
            continue;
        };
        if let Some(two) = p.row(&format!("ambassador {engine} --workers 2"))
            && one.error.is_none()
            && two.error.is_none()
        {
            v.push(Pair { engine, one, two });
        }
    }
    v
}

const SCALING_KEYS: &[&str] = &["conn_per_s", "tput8_gbps", "tput1_gbps"];

/// The two-CPU pass's scaling table: per engine with workers, 1 worker, 2
/// workers, 2 ÷ 1, and 2 workers ÷ HAProxy nbthread 2 and ÷ nginx 2 workers.
pub fn scaling(p: &PassResult) -> String {
    let mut s = String::from("| engine |");
    for k in SCALING_KEYS {
        let l = figure(k).label;
        let _ = write!(
            s,
            " {l} 1 worker | 2 workers | 2 ÷ 1 | 2 ÷ HAProxy nbthread 2 | 2 ÷ nginx 2 workers |"
        );
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(5 * SCALING_KEYS.len()));
    s.push('\n');
    let h = p.haproxy();
    let n = p.rows.iter().find(|r| r.name.starts_with("nginx"));
    let q = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    };
    for pr in pairs(p) {
        let _ = write!(s, "| {} |", pr.engine);
        for k in SCALING_KEYS {
            let (a, b) = (pr.one.median(k), pr.two.median(k));
            let f = |v: Option<f64>| v.map(|v| fmt(k, v)).unwrap_or("–".into());
            let _ = write!(
                s,
                " {} | {} | {} | {} | {} |",
                f(a),
                f(b),
                q(b, a),
                q(b, h.and_then(|h| h.median(k))),
                q(b, n.and_then(|n| n.median(k)))
            );
        }
        s.push('\n');
    }
    s
}

/// The multi-core goals of issue 11, for the two-CPU pass: for each engine
/// with workers, conn/s and 8-stream throughput with 2 workers ≥ 1.8× its
/// 1-worker figure, and ≥ HAProxy `nbthread 2` and nginx `worker_processes 2`.
fn goals_two_cpu(p: &PassResult) -> Vec<Goal> {
    let mut g = Vec::new();
    let h = p.haproxy();
    let n = p.rows.iter().find(|r| r.name.starts_with("nginx"));
    let ps = pairs(p);
    for k in ["conn_per_s", "tput8_gbps"] {
        let l = figure(k).label;
        let goal = format!("every engine with workers: {l} with 2 workers ≥ 1.8× 1 worker");
        let mut parts = Vec::new();
        let mut ok = true;
        for pr in &ps {
            if let (Some(a), Some(b)) = (pr.one.median(k), pr.two.median(k)) {
                ok &= b >= 1.8 * a;
                parts.push(format!("{} {:.2}×", pr.engine, b / a));
            }
        }
        g.push(Goal {
            met: (!parts.is_empty()).then_some(ok),
            measured: if parts.is_empty() {
                "no engine pair ran".into()
            } else {
                parts.join("; ")
            },
            goal,
        });
        let goal = format!(
            "every engine with workers: {l} with 2 workers ≥ HAProxy nbthread 2 and nginx 2 workers"
        );
        let (hv, nv) = (h.and_then(|r| r.median(k)), n.and_then(|r| r.median(k)));
        let mut parts = Vec::new();
        let mut ok = true;
        for pr in &ps {
            if let (Some(b), Some(hv), Some(nv)) = (pr.two.median(k), hv, nv) {
                ok &= b >= hv && b >= nv;
                parts.push(format!(
                    "{} {} vs {} / {}",
                    pr.engine,
                    fmt(k, b),
                    fmt(k, hv),
                    fmt(k, nv)
                ));
            }
        }
        g.push(Goal {
            met: (!parts.is_empty()).then_some(ok),
            measured: if parts.is_empty() {
                "no engine pair, HAProxy or nginx figure".into()
            } else {
                parts.join("; ")
            },
            goal,
        });
    }
    g
}

pub fn goals(p: &PassResult) -> Vec<Goal> {
    if p.pass == "two-cpu" {
        return goals_two_cpu(p);
    }
    let mut g = Vec::new();
    let d = |k: &str| p.row("direct").and_then(|r| r.median(k));
    let h = |k: &str| p.haproxy().and_then(|r| r.median(k));
    let na = |goal: String| Goal {
        goal,
        measured: "no engine ran, or its baseline is missing".into(),
        met: None,
    };
    for k in ["lat64_p50_us", "lat16k_p50_us"] {
        let goal = format!("best engine {} ≤ direct + 3 µs", figure(k).label);
        match (best(p, k), d(k)) {
            (Some((r, v)), Some(dv)) => g.push(Goal {
                measured: format!(
                    "{} {:.1} µs vs direct {:.1} + 3 = {:.1} µs ({:+.1} µs)",
                    short(r),
                    v,
                    dv,
                    dv + 3.0,
                    v - dv
                ),
                met: Some(v <= dv + 3.0),
                goal,
            }),
            _ => g.push(na(goal)),
        }
    }
    for k in ["tput1_gbps", "tput8_gbps"] {
        let goal = format!("best engine {} ≥ 0.8× direct", figure(k).label);
        match (best(p, k), d(k)) {
            (Some((r, v)), Some(dv)) => g.push(Goal {
                measured: format!("{} {:.2} vs direct {:.2}: {:.2}×", short(r), v, dv, v / dv),
                met: Some(v >= 0.8 * dv),
                goal,
            }),
            _ => g.push(na(goal)),
        }
    }
    {
        let goal = "best engine system CPU s/GiB over direct ≤ 0.7× HAProxy's".to_string();
        let hv = p.haproxy().and_then(|hr| sys_over_direct(p, hr));
        let b = engines(p)
            .into_iter()
            .filter_map(|r| Some((r, sys_over_direct(p, r)?)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        match (b, hv) {
            (Some((r, v)), Some(hv)) if hv > 0.0 => g.push(Goal {
                measured: format!("{} {:.3} vs HAProxy {:.3}: {:.2}×", short(r), v, hv, v / hv),
                met: Some(v <= 0.7 * hv),
                goal,
            }),
            _ => g.push(na(goal)),
        }
    }
    {
        let k = "conn_per_s";
        let goal = "best engine conn/s ≥ 1.2× HAProxy's".to_string();
        match (best(p, k), h(k)) {
            (Some((r, v)), Some(hv)) => g.push(Goal {
                measured: format!("{} {:.0} vs HAProxy {:.0}: {:.2}×", short(r), v, hv, v / hv),
                met: Some(v >= 1.2 * hv),
                goal,
            }),
            _ => g.push(na(goal)),
        }
    }
    // Every engine at least HAProxy on latency, throughput, connection rate.
    {
        let keys = [
            "lat64_p50_us",
            "lat16k_p50_us",
            "tput1_gbps",
            "tput8_gbps",
            "conn_per_s",
        ];
        let mut worse = Vec::new();
        // Engines as users run them: not the forced `--splice always` row.
        let es: Vec<&RowResult> = engines(p)
            .into_iter()
            .filter(|r| !r.name.contains(" --"))
            .collect();
        for r in &es {
            for k in keys {
                if let (Some(v), Some(hv)) = (r.median(k), h(k)) {
                    let ok = if figure(k).higher_is_better {
                        v >= hv
                    } else {
                        v <= hv
                    };
                    if !ok {
                        worse.push(format!(
                            "{} {} {} vs {}",
                            short(r),
                            figure(k).label,
                            fmt(k, v),
                            fmt(k, hv)
                        ));
                    }
                }
            }
        }
        let goal = "every engine ≥ HAProxy on p50 latency, throughput, conn/s".to_string();
        if es.is_empty() || h("lat64_p50_us").is_none() {
            g.push(na(goal));
        } else {
            g.push(Goal {
                measured: if worse.is_empty() {
                    "all engines at least HAProxy".into()
                } else {
                    format!("worse: {}", worse.join("; "))
                },
                met: Some(worse.is_empty()),
                goal,
            });
        }
    }
    // Every engine at most HAProxy's idle memory per connection, proxy + kernel.
    {
        let idle = |r: &RowResult| {
            Some(r.median("idle_proxy_kib_per_conn")? + r.median("idle_kernel_kib_per_conn")?)
        };
        let goal =
            "every engine's idle memory per connection (proxy + kernel) ≤ HAProxy's".to_string();
        let es: Vec<&RowResult> = engines(p)
            .into_iter()
            .filter(|r| !r.name.contains(" --"))
            .collect();
        match p.haproxy().and_then(idle) {
            Some(hv) if !es.is_empty() => {
                let (mut parts, mut ok) = (Vec::new(), true);
                for r in es {
                    if let Some(v) = idle(r) {
                        ok &= v <= hv;
                        parts.push(format!("{} {v:.1}", short(r)));
                    }
                }
                g.push(Goal {
                    measured: format!("{} KiB vs HAProxy {hv:.1}", parts.join(", ")),
                    met: Some(ok),
                    goal,
                });
            }
            _ => g.push(na(goal)),
        }
    }
    // auto within 5% of the best engine, per workload.
    {
        let keys = [
            "lat64_p50_us",
            "lat16k_p50_us",
            "tput1_gbps",
            "tput8_gbps",
            "conn_per_s",
        ];
        let auto = p
            .rows
            .iter()
            .find(|r| r.name == "ambassador auto" && r.error.is_none());
        let goal = "auto within 5% of the best engine, each workload".to_string();
        match auto {
            Some(a) if !engines(p).is_empty() => {
                let mut parts = Vec::new();
                let mut ok = true;
                for k in keys {
                    if let (Some(av), Some((r, bv))) = (a.median(k), best(p, k)) {
                        let rel = if figure(k).higher_is_better {
                            av / bv
                        } else {
                            bv / av
                        };
                        ok &= rel >= 0.95;
                        parts.push(format!(
                            "{} {:.0}% of {}",
                            figure(k).label,
                            rel * 100.0,
                            short(r)
                        ));
                    }
                }
                g.push(Goal {
                    measured: format!("auto ran {}: {}", a.engine, parts.join("; ")),
                    met: Some(ok),
                    goal,
                });
            }
            _ => g.push(na(goal)),
        }
    }
    g
}

pub fn goals_table(p: &PassResult) -> String {
    let mut s = String::from("| goal | measured | verdict |\n|---|---|---|\n");
    for g in goals(p) {
        let v = match g.met {
            Some(true) => "met",
            Some(false) => "**MISSED**",
            None => "not measured",
        };
        let _ = writeln!(s, "| {} | {} | {v} |", g.goal, g.measured);
    }
    s
}

/// Row notes: figure errors, idle connection counts, wrk errors.
pub fn notes(p: &PassResult) -> String {
    let mut s = String::new();
    for r in &p.rows {
        for (k, e) in &r.figure_errors {
            let _ = writeln!(
                s,
                "- ¹ {} / {}: {}",
                r.name,
                figure(k).label,
                e.replace('|', "/")
            );
        }
        if r.error.is_none() && r.idle_conns != 0 && r.idle_conns != p.idle_conns_target {
            let _ = writeln!(
                s,
                "- {}: idle figures at {} connections (its limit), not {}.",
                r.name, r.idle_conns, p.idle_conns_target
            );
        }
        if r.engine == "sockmap"
            && let Some(fb) = r.median("splice_fallbacks")
        {
            let said = match (
                r.median("moved_mib"),
                r.median("spliced_mib"),
                r.median("spliced_pct"),
            ) {
                (Some(m), Some(sp), _) => format!(
                    "{:.0}% of the bytes it moved were spliced in the kernel ({sp:.0} of {m:.0} MiB per round)",
                    100.0 * sp / m.max(1e-9)
                ),
                // Older results stored spliced / bytes_to_* (userspace-copied bytes).
                (_, _, Some(pct)) => format!(
                    "{:.0}% of the bytes it moved were spliced in the kernel",
                    100.0 * pct / (100.0 + pct)
                ),
                _ => "no byte counts".into(),
            };
            let _ = writeln!(
                s,
                "- {}: by its own `stats` lines, {said}; {fb:.0} connection(s) fell back to copying in \
                 userspace (medians over rounds).",
                r.name
            );
        }
        if let Some(m) = r.median("bpf_maps_mib") {
            let _ = writeln!(
                s,
                "- {}: its BPF maps hold {m:.1} MiB of kernel memory (memlock, preallocated for the maps' \
                 capacity): a fixed cost, not in the per-connection figures.",
                r.name
            );
        }
        if !r.syscall_top.is_empty() {
            let top: Vec<String> = r
                .syscall_top
                .iter()
                .map(|(n, c)| format!("{c:.1} {n}"))
                .collect();
            let _ = writeln!(
                s,
                "- {}: syscalls per connection, largest first: {}.",
                r.name,
                top.join(", ")
            );
        }
        if r.conn_errors > 0 {
            let _ = writeln!(
                s,
                "- {}: wrk counted {} socket errors / non-2xx over the rounds.",
                r.name, r.conn_errors
            );
        }
    }
    s
}

pub fn markdown(p: &PassResult, plots: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# ambassador benchmark: {} pass, {}\n", p.pass, p.date);
    let _ = writeln!(
        s,
        "Mode `{}`: {} round(s), {} s per figure, rows alternating figure by figure within each round; \
         medians over rounds. Proxy on CPU(s) {}, client and servers on CPU(s) {}. Started {}.\n",
        p.mode,
        p.rounds,
        p.seconds_per_figure,
        cpus(&p.proxy_cpus, p.proxy_cpu),
        cpus(&p.client_cpus, p.client_server_cpu),
        p.started_utc
    );
    for sk in &p.skipped {
        let _ = writeln!(s, "- Not run: {sk}.");
    }
    if !p.skipped.is_empty() {
        s.push('\n');
    }
    if p.pass == "two-cpu" {
        s.push_str(
            "Two-CPU pass: HAProxy `nbthread 2`, nginx `worker_processes 2`, each engine that runs \
             workers with `--workers 1` and `--workers 2` (sockmap is asked for 2 and runs 1: its \
             state is single-threaded), the backend nginx with 2 workers and wrk with 2 threads; \
             proxy, clients and servers share the two CPUs. Ratios are to HAProxy `nbthread 2`.\n\n",
        );
    }
    if p.syscall_conns > 0 {
        let _ = writeln!(
            s,
            "Syscalls per connection: after the timed rounds each row is started once more and \
             `strace -c -f` is attached to all its processes while {} HTTP/1.1 `Connection: close` \
             requests (each a new connection, 4 client threads) go through it; strace's total over \
             that window ÷ {}. Never measured while timing (strace slows the proxy). For the uring \
             engine only `io_uring_enter` is a syscall: what it submits through the ring is not \
             counted.\n",
            p.syscall_conns, p.syscall_conns
        );
    }
    let _ = writeln!(
        s,
        "Machine: kernel {}, {} × {}.\n",
        p.kernel, p.cpus, p.cpu_model
    );
    s.push_str("Versions:\n");
    for (k, v) in &p.versions {
        let _ = writeln!(s, "- {k}: {v}");
    }
    let _ = writeln!(
        s,
        "\nLatency is sockperf ping-pong round trip (`--full-rtt`). Throughput is iperf3 client→server. \
         Connection rate is wrk (1 thread, 32 connections, `Connection: close`) against a one-worker nginx \
         serving 3 bytes. CPU s/GiB comes from the 1-stream iperf3 run: proxy = the proxy's own \
         utime+stime (+ reaped children); system = the CPU time of every process of the test (client, \
         servers, proxy) plus every kernel thread (softirq, kworkers: where sockmap's work runs); \
         \"over direct\" subtracts direct's figure. (The /proc/stat machine-wide figure is kept in the \
         JSON as `cpu_stat_s_per_gib`, but this VM is shared and other tenants fill any CPU we leave idle, \
         so it cannot be trusted here.) RSS is after the load figures. Idle: {} connections held open \
         (fewer where a row caps them; 0 = not measured in this pass: memory does not depend on \
         where the proxy runs, so the cross-core pass leaves it to the same-core one); proxy = PSS delta, \
         kernel = slab + kernel stacks + page tables + TCP buffer delta, per connection, client and server \
         sockets included (direct's row is that baseline). Machine busy rate before each round (CPUs, \
         other tenants included): {}.\n",
        p.idle_conns_target,
        p.background_busy
            .iter()
            .map(|b| format!("{b:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    s.push_str("## Medians\n\n");
    s.push_str(&table(p));
    s.push_str("\n## Ratios (to direct / to HAProxy)\n\n");
    s.push_str(&ratios(p));
    if p.pass == "two-cpu" {
        s.push_str("\n## 1 → 2 workers (and 2 workers ÷ HAProxy nbthread 2 / nginx 2 workers)\n\n");
        s.push_str(&scaling(p));
    }
    s.push_str("\n## Goals\n\n");
    s.push_str(&goals_table(p));
    if p.rounds > 1 {
        s.push_str("\n## Spread ((max − min) / median over rounds)\n\n");
        s.push_str(&spread(p));
    }
    let n = notes(p);
    if !n.is_empty() {
        s.push_str("\n## Notes\n\n");
        s.push_str(&n);
    }
    if !plots.is_empty() {
        s.push_str("\n## Plots\n\n");
        for pl in plots {
            let _ = writeln!(s, "![{pl}]({pl})");
        }
    }
    s
}

/// A CPU list for the text: the list when recorded, else the older single CPU.
fn cpus(list: &str, one: u32) -> String {
    if list.is_empty() {
        one.to_string()
    } else {
        list.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::Stat;

    fn row(name: &str, workers: usize, figs: &[(&str, f64)]) -> RowResult {
        RowResult {
            name: name.into(),
            workers,
            figures: figs
                .iter()
                .map(|(k, v)| (k.to_string(), Stat::of(&[*v]).unwrap()))
                .collect(),
            ..Default::default()
        }
    }

    fn two_cpu_pass() -> PassResult {
        PassResult {
            pass: "two-cpu".into(),
            rows: vec![
                row(
                    "haproxy nbthread 2",
                    0,
                    &[("conn_per_s", 100.0), ("tput8_gbps", 4.0)],
                ),
                row(
                    "nginx worker_processes 2",
                    0,
                    &[("conn_per_s", 90.0), ("tput8_gbps", 5.0)],
                ),
                row(
                    "ambassador epoll --workers 1",
                    1,
                    &[("conn_per_s", 60.0), ("tput8_gbps", 3.0)],
                ),
                row(
                    "ambassador epoll --workers 2",
                    2,
                    &[("conn_per_s", 120.0), ("tput8_gbps", 6.0)],
                ),
                row("ambassador sockmap --workers 2", 1, &[("conn_per_s", 70.0)]),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn the_scaling_table_divides_two_workers_by_one_and_by_the_peers() {
        let s = scaling(&two_cpu_pass());
        let epoll = s.lines().find(|l| l.starts_with("| epoll |")).unwrap();
        // conn/s: 60 -> 120 = 2.00×, ÷ HAProxy 1.20×, ÷ nginx 1.33×.
        assert!(
            epoll.contains("| 60 | 120 | 2.00× | 1.20× | 1.33× |"),
            "{epoll}"
        );
        // sockmap has no --workers 1 row: no pair, no line.
        assert!(!s.contains("| sockmap |"), "{s}");
    }

    #[test]
    fn the_idle_memory_goal_adds_proxy_and_kernel_and_skips_forced_rows() {
        let idle = |name: &str, proxy: f64, kernel: f64| {
            row(
                name,
                0,
                &[
                    ("idle_proxy_kib_per_conn", proxy),
                    ("idle_kernel_kib_per_conn", kernel),
                ],
            )
        };
        let pass = |epoll_proxy: f64| PassResult {
            pass: "same-core".into(),
            rows: vec![
                idle("haproxy", 3.3, 14.0),
                idle("ambassador epoll", epoll_proxy, 13.6),
                // Opt-in, not an engine as users run it: not judged.
                idle("ambassador sockmap --splice always", 2.8, 16.6),
            ],
            ..Default::default()
        };
        let find = |p: &PassResult| {
            goals(p)
                .into_iter()
                .find(|g| g.goal.starts_with("every engine's idle memory"))
                .unwrap()
        };
        let g = find(&pass(3.4));
        assert_eq!(g.met, Some(true), "{}", g.measured);
        assert_eq!(g.measured, "epoll 17.0 KiB vs HAProxy 17.3");
        let g = find(&pass(4.2));
        assert_eq!(g.met, Some(false), "{}", g.measured);
    }

    #[test]
    fn two_cpu_goals_judge_scaling_and_the_peers() {
        let g = goals(&two_cpu_pass());
        assert_eq!(g.len(), 4);
        // conn/s 2.00× ≥ 1.8×: met; 120 ≥ 100 and ≥ 90: met.
        assert_eq!(g[0].met, Some(true), "{}", g[0].measured);
        assert_eq!(g[1].met, Some(true), "{}", g[1].measured);
        // 8 streams 2.00× ≥ 1.8× met; 6.0 ≥ 4.0 and ≥ 5.0 met.
        assert_eq!(g[2].met, Some(true), "{}", g[2].measured);
        assert_eq!(g[3].met, Some(true), "{}", g[3].measured);
        let mut p = two_cpu_pass();
        p.rows[3] = row("ambassador epoll --workers 2", 2, &[("conn_per_s", 95.0)]);
        let g = goals(&p);
        assert_eq!(g[0].met, Some(false), "{}", g[0].measured);
        assert_eq!(g[1].met, Some(false), "{}", g[1].measured);
    }

    #[test]
    fn a_row_that_runs_fewer_workers_than_asked_says_so() {
        let p = two_cpu_pass();
        assert_eq!(
            display_name(&p.rows[4]),
            "ambassador sockmap --workers 2 (runs 1 worker)"
        );
        assert_eq!(display_name(&p.rows[3]), "ambassador epoll --workers 2");
    }
}
