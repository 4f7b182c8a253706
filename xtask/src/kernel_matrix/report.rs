//! From `KM ...` marker lines to outcomes, the table, the expectation check and `docs/kernels.md`.
//!
//! The testpeer prints (see `ambassador/src/bin/ambassador-testpeer.rs`):
//! - `KM check cell=<c> engine=<e> check=<name> ok=0|1 ms=<n> detail=<text>`
//! - `KM skipped cell=<c> engine=<e> reason=<text>` / `KM chosen cell=<c> engine=<e> mode=<m>`
//! - `KM cell cell=<c> ready=0|1 engine=<e|none> exit=<code> ms=<n> ... integrity_resets=<n>
//!   trimmed=<n> detail=<text>`
//! - `KM feature name=<n> result=<r>` and `KM sockmapfix name=<n> result=yes|no detail=<text>`
//!
//! `detail=` and `reason=` are always last and run to the end of the line.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The cells in table order: (name, mode, column title).
pub const CELLS: &[(&str, &str, &str)] = &[
    ("sockmap", "sockmap", "`--mode sockmap` (`--splice always`)"),
    (
        "sockmap-adaptive",
        "sockmap",
        "`--mode sockmap --splice adaptive` (promoting at once)",
    ),
    (
        "sockmap-leave",
        "sockmap",
        "`--mode sockmap`, every connection leaving the kernel",
    ),
    ("uring", "uring", "`--mode uring`"),
    ("epoll", "epoll", "`--mode epoll`"),
    ("auto", "auto", "`auto` (root)"),
    ("auto-nonroot", "auto", "`auto` (uid 65534, no caps)"),
    (
        "auto-seccomp",
        "auto",
        "`auto` (root, seccomp: no io_uring, no bpf)",
    ),
    (
        "auto-nonroot-nouring",
        "auto",
        "`auto` (uid 65534, seccomp: no io_uring)",
    ),
    (
        "auto-nonroot-sysctl",
        "auto",
        "`auto` (uid 65534, `kernel.io_uring_disabled=2`; guests only)",
    ),
];

/// The checks every started cell must pass (see the testpeer's `run_cell`).
pub const CHECKS: &[&str] = &[
    "bulk",
    "speak-first-server",
    "speak-first-client",
    "half-close",
    "connect-storm",
];

#[derive(Default, Clone)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub ms: u64,
    pub detail: String,
}

#[derive(Default, Clone)]
pub struct CellRun {
    pub ready: bool,
    pub engine: String,
    pub exit: String,
    pub ms: u64,
    pub detail: String,
    /// `KM na`: the cell cannot run here, and why.
    pub na: Option<String>,
    /// From the binary's exit `stats` lines.
    pub spliced: u64,
    pub splice_fallbacks: u64,
    pub errors: u64,
    pub conns: u64,
    /// Connections the engine reset because its byte books did not balance, and bytes the
    /// kernel program cut from partly old retransmissions.
    pub integrity_resets: u64,
    pub trimmed: u64,
    pub checks: Vec<Check>,
    pub skipped: Vec<(String, String)>,
}

#[derive(Default)]
pub struct KernelRun {
    /// `6.1`, `6.12`, `host`.
    pub key: String,
    /// What the table shows, e.g. `6.1.0-56-amd64 (Debian 6.1.192-2)`.
    pub label: String,
    /// The guest finished (`KM suite end` seen) within its deadline.
    pub complete: bool,
    pub problem: String,
    pub cells: BTreeMap<String, CellRun>,
    pub features: Vec<(String, String)>,
    pub fixes: Vec<(String, bool, String)>,
    pub secs: f64,
}

/// `k=v` tokens, with `detail`/`reason` swallowing the rest of the line.
fn kv(line: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut rest = line;
    for tail in [" detail=", " reason="] {
        if let Some(i) = rest.find(tail) {
            m.insert(
                tail.trim().trim_end_matches('=').to_string(),
                rest[i + tail.len()..].trim().to_string(),
            );
            rest = &rest[..i];
        }
    }
    for tok in rest.split_whitespace() {
        if let Some((k, v)) = tok.split_once('=') {
            m.insert(k.to_string(), v.to_string());
        }
    }
    m
}

pub fn parse(key: &str, label: &str, text: &str) -> KernelRun {
    let mut k = KernelRun {
        key: key.into(),
        label: label.into(),
        ..Default::default()
    };
    for line in text.lines() {
        let Some(i) = line.find("KM ") else { continue };
        let line = &line[i + 3..];
        let kind = line.split_whitespace().next().unwrap_or("");
        let f = kv(line);
        let get = |n: &str| f.get(n).cloned().unwrap_or_default();
        match kind {
            "check" => k.cells.entry(get("cell")).or_default().checks.push(Check {
                name: get("check"),
                ok: get("ok") == "1",
                ms: get("ms").parse().unwrap_or(0),
                detail: get("detail"),
            }),
            "skipped" => k
                .cells
                .entry(get("cell"))
                .or_default()
                .skipped
                .push((get("engine"), get("reason"))),
            "cell" => {
                let c = k.cells.entry(get("cell")).or_default();
                c.ready = get("ready") == "1";
                c.engine = get("engine");
                c.exit = get("exit");
                c.ms = get("ms").parse().unwrap_or(0);
                c.detail = get("detail");
                c.spliced = get("spliced").parse().unwrap_or(0);
                c.splice_fallbacks = get("splice_fallbacks").parse().unwrap_or(0);
                c.errors = get("errors").parse().unwrap_or(0);
                c.conns = get("conns").parse().unwrap_or(0);
                c.integrity_resets = get("integrity_resets").parse().unwrap_or(0);
                c.trimmed = get("trimmed").parse().unwrap_or(0);
            }
            "na" => k.cells.entry(get("cell")).or_default().na = Some(get("detail")),
            "feature" => k.features.push((get("name"), get("result"))),
            "sockmapfix" if f.contains_key("result") => {
                k.fixes
                    .push((get("name"), get("result") == "yes", get("detail")))
            }
            "suite" if line.starts_with("suite end") => k.complete = true,
            _ => {}
        }
    }
    k
}

/// What a cell did, reduced to what the expectation file pins.
#[derive(Clone, PartialEq, Debug)]
pub enum Outcome {
    /// Explicit mode: started that engine and every check passed.
    Works,
    /// Explicit mode: refused to start (exit 1 with a reason).
    Unavailable(String),
    /// `auto`: started this engine and every check passed; the skipped engines' reasons.
    Picked(String, String),
    /// Started but a check failed, or auto did not start, or no result at all.
    Fails(String),
    /// Left out of this run (`--cells`), or not applicable here (`KM na`: the reason).
    NotRun(String),
}

impl Outcome {
    /// The token in `expected.txt`.
    pub fn token(&self) -> String {
        match self {
            Outcome::Works => "works".into(),
            Outcome::Unavailable(_) => "unavailable".into(),
            Outcome::Picked(e, _) => format!("engine={e}"),
            Outcome::Fails(_) => "fails".into(),
            Outcome::NotRun(_) => "not-run".into(),
        }
    }
    /// Short cell text and the reason that goes into a footnote (if any).
    pub fn text(&self) -> (String, Option<String>) {
        match self {
            Outcome::Works => ("works".into(), None),
            Outcome::Unavailable(r) => ("unavailable".into(), Some(r.clone())),
            Outcome::Picked(e, r) if r.is_empty() => (format!("picks **{e}**"), None),
            Outcome::Picked(e, r) => (format!("falls back to **{e}**"), Some(r.clone())),
            Outcome::Fails(r) => ("**FAILS**".into(), Some(r.clone())),
            Outcome::NotRun(why) if why.is_empty() => ("–".into(), None),
            Outcome::NotRun(why) => ("n/a".into(), Some(why.clone())),
        }
    }
}

pub fn outcome(k: &KernelRun, cell: &str, mode: &str) -> Outcome {
    let Some(c) = k.cells.get(cell) else {
        // The suite finished without this cell: it was filtered out, not lost.
        if k.complete {
            return Outcome::NotRun(String::new());
        }
        return Outcome::Fails(if k.problem.is_empty() {
            "no result".into()
        } else {
            k.problem.clone()
        });
    };
    if let Some(why) = &c.na {
        return Outcome::NotRun(why.clone());
    }
    let failed: Vec<String> = c
        .checks
        .iter()
        .filter(|x| !x.ok)
        .map(|x| format!("{}: {}", x.name, x.detail))
        .collect();
    let skipped = c
        .skipped
        .iter()
        .map(|(e, r)| format!("{e}: {r}"))
        .collect::<Vec<_>>()
        .join("; ");
    if !c.ready {
        let why = if c.detail.is_empty() {
            format!("exit {}", c.exit)
        } else {
            c.detail.clone()
        };
        return if mode == "auto" || c.exit != "1" {
            Outcome::Fails(format!("did not start (exit {}): {why}", c.exit))
        } else {
            Outcome::Unavailable(why)
        };
    }
    if !failed.is_empty() {
        return Outcome::Fails(format!("engine {}: {}", c.engine, failed.join("; ")));
    }
    if let Some(missing) = CHECKS
        .iter()
        .find(|n| !c.checks.iter().any(|x| x.name == **n))
    {
        return Outcome::Fails(format!("check {missing} did not run"));
    }
    // (The adaptive cell may legitimately leave a short check in userspace.)
    if c.engine == "sockmap" && c.spliced == 0 && cell != "sockmap-adaptive" {
        return Outcome::Fails(format!(
            "engine sockmap spliced no byte ({} of {} connections fell back to userspace)",
            c.splice_fallbacks, c.conns
        ));
    }
    if c.integrity_resets > 0 {
        return Outcome::Fails(format!(
            "engine {}: {} integrity resets (byte books did not balance)",
            c.engine, c.integrity_resets
        ));
    }
    if c.exit != "0" {
        return Outcome::Fails(format!(
            "engine {}: exit {} after SIGTERM (the contract says 0)",
            c.engine, c.exit
        ));
    }
    if mode == "auto" {
        Outcome::Picked(c.engine.clone(), skipped)
    } else if c.engine == mode {
        Outcome::Works
    } else {
        Outcome::Fails(format!("asked for {mode}, started {}", c.engine))
    }
}

fn esc(s: &str) -> String {
    s.replace('|', "\\|")
}

/// The kernel × cell table (markdown; also readable as plain text), reasons as numbered notes
/// below it (each distinct reason once).
pub fn table(runs: &[KernelRun]) -> String {
    let mut notes: Vec<String> = Vec::new();
    let mut t = String::from("| kernel |");
    for (_, _, title) in CELLS {
        let _ = write!(t, " {title} |");
    }
    t.push_str("\n|---|");
    t.push_str(&"---|".repeat(CELLS.len()));
    t.push('\n');
    for k in runs {
        let _ = write!(t, "| {} |", esc(&k.label));
        for (cell, mode, _) in CELLS {
            let (text, why) = outcome(k, cell, mode).text();
            match why {
                Some(why) => {
                    let n = match notes.iter().position(|x| *x == why) {
                        Some(i) => i + 1,
                        None => {
                            notes.push(why);
                            notes.len()
                        }
                    };
                    let _ = write!(t, " {text} [{n}] |");
                }
                None => {
                    let _ = write!(t, " {text} |");
                }
            }
        }
        t.push('\n');
    }
    if !notes.is_empty() {
        t.push_str("\nReasons, as the binary logged them (`engine skipped` / start-up error):\n\n");
        for (i, n) in notes.iter().enumerate() {
            let _ = writeln!(t, "{}. {n}", i + 1);
        }
    }
    t
}

/// Sockmap lifecycle fixes seen by the raw-bpf probe, one row per probe.
pub fn fixes_table(runs: &[KernelRun]) -> String {
    let mut names: Vec<String> = Vec::new();
    for k in runs {
        for (n, _, _) in &k.fixes {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    let mut t = String::from("| probe |");
    for k in runs {
        let _ = write!(t, " {} |", esc(&k.label));
    }
    t.push_str("\n|---|");
    t.push_str(&"---|".repeat(runs.len()));
    t.push('\n');
    for n in &names {
        let _ = write!(t, "| `{n}` |");
        for k in runs {
            match k.fixes.iter().find(|(m, _, _)| m == n) {
                Some((_, ok, _)) => {
                    let _ = write!(t, " {} |", if *ok { "yes" } else { "**no**" });
                }
                None => t.push_str(" – |"),
            }
        }
        t.push('\n');
    }
    let mut feats: Vec<String> = Vec::new();
    for k in runs {
        for (n, _) in &k.features {
            if !feats.contains(n) {
                feats.push(n.clone());
            }
        }
    }
    for n in &feats {
        let _ = write!(t, "| {n} |");
        for k in runs {
            let v = k
                .features
                .iter()
                .find(|(m, _)| m == n)
                .map(|(_, r)| r.as_str())
                .unwrap_or("–");
            let _ = write!(t, " {} |", esc(v));
        }
        t.push('\n');
    }
    t.push_str("\n<details><summary>What each probe saw</summary>\n\n");
    for k in runs {
        for (n, ok, d) in &k.fixes {
            let _ = writeln!(
                t,
                "- {} `{n}` {}: {d}",
                k.label,
                if *ok { "yes" } else { "NO" }
            );
        }
    }
    t.push_str("\n</details>\n");
    t
}

/// The expectation lines this run would produce: `<kernel> <cell> <token>` and
/// `<kernel> fix:<probe> yes|no`.
pub fn expectations(runs: &[KernelRun]) -> Vec<(String, String, String)> {
    let mut v = Vec::new();
    for k in runs {
        for (cell, mode, _) in CELLS {
            v.push((
                k.key.clone(),
                cell.to_string(),
                outcome(k, cell, mode).token(),
            ));
        }
        for (n, ok, _) in &k.fixes {
            v.push((
                k.key.clone(),
                format!("fix:{n}"),
                if *ok { "yes" } else { "no" }.to_string(),
            ));
        }
    }
    v
}

pub fn render_expected(runs: &[KernelRun]) -> String {
    let mut s = String::from(
        "# Expected kernel-matrix outcomes; `cargo xtask kernel-matrix --check` fails on any regression.\n\
         # Regenerate after a reviewed behaviour change: `cargo xtask kernel-matrix --bless`.\n\
         # <kernel> <cell> <works|unavailable|fails|engine=NAME>   (auto cells must match exactly)\n\
         # <kernel> fix:<probe> <yes|no>                            (raw-bpf sockmap probes)\n",
    );
    for (k, c, t) in expectations(runs) {
        let _ = writeln!(s, "{k:<5} {c:<26} {t}");
    }
    s
}

/// Compare with the committed expectation. Returns (regressions, improvements/notes).
pub fn compare(expected: &str, runs: &[KernelRun]) -> (Vec<String>, Vec<String>) {
    let actual: BTreeMap<(String, String), String> = expectations(runs)
        .into_iter()
        .map(|(k, c, t)| ((k, c), t))
        .collect();
    let ran: Vec<&str> = runs.iter().map(|r| r.key.as_str()).collect();
    let (mut bad, mut notes) = (Vec::new(), Vec::new());
    for line in expected
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [k, c, want] = f[..] else {
            bad.push(format!("malformed expectation line: {line}"));
            continue;
        };
        if !ran.contains(&k) {
            continue;
        }
        let Some(got) = actual.get(&(k.to_string(), c.to_string())) else {
            bad.push(format!("{k} {c}: expected {want}, no result"));
            continue;
        };
        // A cell that did not run passes only where that is expected (a
        // sysctl the kernel lacks, or one the host shares with others).
        if got == want {
            continue;
        }
        let better = matches!(
            (want, got.as_str()),
            ("fails" | "not-run", _) | ("unavailable", "works") | ("no", "yes")
        );
        let msg = format!("{k} {c}: expected {want}, got {got}");
        if better {
            notes.push(format!("{msg} (improvement: bless it)"))
        } else {
            bad.push(msg)
        }
    }
    // A result with no expectation is a cell nobody reviewed: fail.
    let listed: std::collections::BTreeSet<(String, String)> = expected
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3).then(|| (f[0].to_string(), f[1].to_string()))
        })
        .collect();
    for (k, c) in actual.keys() {
        if !listed.contains(&(k.clone(), c.clone())) {
            bad.push(format!("{k} {c}: no expectation (bless after review)"));
        }
    }
    (bad, notes)
}

/// Per-check timings and reasons, for the log.
pub fn details(runs: &[KernelRun]) -> String {
    let mut s = String::new();
    for k in runs {
        let _ = writeln!(
            s,
            "== {} ({:.1}s){}",
            k.label,
            k.secs,
            if k.complete { "" } else { " INCOMPLETE" }
        );
        if !k.problem.is_empty() {
            let _ = writeln!(s, "   problem: {}", k.problem);
        }
        for (cell, c) in &k.cells {
            let _ = writeln!(
                s,
                "   {cell}: ready={} engine={} exit={} {}ms conns={} spliced={} splice_fallbacks={} errors={} integrity_resets={} trimmed={} {}",
                c.ready,
                c.engine,
                c.exit,
                c.ms,
                c.conns,
                c.spliced,
                c.splice_fallbacks,
                c.errors,
                c.integrity_resets,
                c.trimmed,
                c.detail
            );
            for (e, r) in &c.skipped {
                let _ = writeln!(s, "      skipped {e}: {r}");
            }
            for x in &c.checks {
                let _ = writeln!(
                    s,
                    "      {} {} {}ms {}",
                    if x.ok { "ok  " } else { "FAIL" },
                    x.name,
                    x.ms,
                    x.detail
                );
            }
        }
    }
    s
}
