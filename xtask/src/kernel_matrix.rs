//! `cargo xtask kernel-matrix [--check]`: the same static ambassador on the kernels users run.
//!
//! Boots the newest Debian 6.1 and 6.12 kernels under qemu (TCG) with a busybox initramfs, and
//! runs the same two commands inside each guest and natively on the host:
//! `ambassador-testpeer probe` (kernel features, sockmap lifecycle fixes via raw bpf()) and
//! `ambassador-testpeer suite` (each engine through the real binary: bulk, speak-first both ways,
//! half-close, a connect storm; `auto` as root, unprivileged, under seccomp filters, and with
//! `kernel.io_uring_disabled=2` in the guests). Prints one table of kernel × engine, and either
//! rewrites `docs/kernels.md` (a developer's run) or, with `--check` (CI), fails on any
//! regression from `tests/kernel-matrix/expected.txt` and leaves the tree untouched.
//!
//! Usual commands: `cargo xtask kernel-matrix` (run, print, regenerate the docs),
//! `cargo xtask kernel-matrix --bless` (also accept the outcomes as the new expectation),
//! `cargo xtask kernel-matrix --check` (what CI runs). Logs: `target/kernel-matrix/`.
//!
//! # Layout
//! - `kernels`: find/download/unpack the Debian kernels, extract the ELF vmlinux (cached under
//!   `target/kernel-matrix/kernels/`).
//! - `initramfs`: busybox + the two static binaries + `/init`.
//! - `boot`: qemu with a deadline.
//! - `report`: markers → outcomes → table, expectation compare, docs.

mod boot;
mod initramfs;
mod kernels;
mod report;

use crate::util::{apt_install, root, run as run_cmd};
use anyhow::{Context, Result, bail};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Host packages the matrix needs (`zstd`/`xz-utils` unpack the kernel images).
const PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "zstd", "xz-utils"];

/// Per-guest deadline. A full guest run takes 20–45 s under TCG on a busy 2-core machine; a hang
/// must not eat CI.
const GUEST_DEADLINE: Duration = Duration::from_secs(300);

#[derive(clap::Args, Default)]
pub struct Args {
    /// Fail if any cell regresses from tests/kernel-matrix/expected.txt.
    #[arg(long)]
    pub check: bool,
    /// Rewrite tests/kernel-matrix/expected.txt from this run (after reviewing the table).
    #[arg(long)]
    pub bless: bool,
    /// Only these kernels (comma-separated: 6.1,6.12,host). Partial runs don't rewrite docs.
    #[arg(long, value_delimiter = ',')]
    pub kernels: Vec<String>,
    /// Only these cells (comma-separated: sockmap, uring, epoll, auto, auto-nonroot,
    /// auto-seccomp, auto-nonroot-nouring, auto-nonroot-sysctl).
    #[arg(long, default_value = "")]
    pub cells: String,
    /// Bytes per direction for the bulk check.
    #[arg(long, default_value_t = 4 << 20)]
    pub bytes: usize,
    /// Short connections per cell in the connect-storm check (each speaking first).
    #[arg(long, default_value_t = 40)]
    pub storm: usize,
    /// Bulk connections per cell, one after another (`--bytes` each way at once, every byte
    /// checked): a soak on the guests' kernels. The guest deadline grows with it.
    #[arg(long, default_value_t = 1)]
    pub bulk_rounds: usize,
    /// The ambassador's `RUST_LOG` in every cell (a cell whose check failed prints its whole
    /// log into the console log).
    #[arg(long, default_value = "info")]
    pub log: String,
    /// Use this *static* ambassador binary instead of building one from the tree.
    #[arg(long)]
    pub ambassador: Option<PathBuf>,
    /// With --ambassador: use this static testpeer too, and build nothing (for a broken tree).
    #[arg(long, requires = "ambassador")]
    pub testpeer: Option<PathBuf>,
}

/// What CI calls: the whole matrix, failing on any regression.
pub fn check() -> Result<()> {
    run(Args {
        check: true,
        bytes: 4 << 20,
        storm: 40,
        bulk_rounds: 1,
        log: "info".into(),
        ..Default::default()
    })
}

pub fn run(a: Args) -> Result<()> {
    let t0 = Instant::now();
    let root = root();
    let cache = root.join("target/kernel-matrix");
    std::fs::create_dir_all(&cache)?;
    apt_install(PACKAGES)?;
    let bins = match (&a.ambassador, &a.testpeer) {
        (Some(amb), Some(tp)) => initramfs::Binaries {
            ambassador: amb.clone(),
            testpeer: tp.clone(),
        },
        _ => build_static(&root, a.ambassador.as_deref())?,
    };
    for b in [&bins.ambassador, &bins.testpeer] {
        if is_dynamic(b)? {
            bail!(
                "{} is dynamically linked: the guests have no libc; pass a static build",
                b.display()
            );
        }
    }

    let want = |k: &str| a.kernels.is_empty() || a.kernels.iter().any(|x| x == k);
    let guest_keys: Vec<String> = a.kernels.iter().filter(|k| *k != "host").cloned().collect();
    let kernels = if a.kernels.is_empty() || !guest_keys.is_empty() {
        kernels::fetch(&cache, &guest_keys)?
    } else {
        Vec::new()
    };

    let mut runs = Vec::new();
    for k in &kernels {
        runs.push(run_guest(&cache, k, &bins, &a)?);
    }
    if want("host") {
        runs.push(run_host(&cache, &bins, &a)?);
    }

    let table = report::table(&runs);
    let fixes = report::fixes_table(&runs);
    eprintln!("\n{}", report::details(&runs));
    println!("\n{table}\nSockmap probes (raw bpf(), independent of the engine):\n\n{fixes}");
    std::fs::write(cache.join("last-table.md"), format!("{table}\n{fixes}"))?;

    // The docs page always lands in target/; a developer's full run also updates the committed
    // copy. CI (`--check`) never writes into the tree.
    let full = a.kernels.is_empty() && a.cells.is_empty();
    let docs = render_docs(&runs, &table, &fixes);
    std::fs::write(cache.join("kernels.md"), &docs)?;
    if full && !a.check {
        std::fs::write(root.join("docs/kernels.md"), &docs)?;
        eprintln!("kernel-matrix: wrote docs/kernels.md");
    }
    let exp_path = root.join("tests/kernel-matrix/expected.txt");
    if a.bless {
        if !full {
            bail!("--bless needs the full matrix (no --kernels/--cells)");
        }
        std::fs::create_dir_all(exp_path.parent().unwrap())?;
        std::fs::write(&exp_path, report::render_expected(&runs))?;
        eprintln!("kernel-matrix: wrote {}", exp_path.display());
    }
    let expected = std::fs::read_to_string(&exp_path).unwrap_or_default();
    let (bad, notes) = report::compare(&expected, &runs);
    for n in &notes {
        eprintln!("kernel-matrix: note: {n}");
    }
    for b in &bad {
        eprintln!("kernel-matrix: REGRESSION: {b}");
    }
    eprintln!("kernel-matrix: {:.0}s", t0.elapsed().as_secs_f64());
    if a.check {
        if expected.is_empty() {
            bail!("no {} to check against", exp_path.display());
        }
        if !bad.is_empty() {
            bail!(
                "{} cell(s) regressed from {}",
                bad.len(),
                exp_path.display()
            );
        }
    }
    Ok(())
}

/// Build both binaries statically (glibc, `+crt-static`) in `target/static`, so the guests need no
/// libc of their own, with exactly the image's build (`image::static_cargo`).
fn build_static(root: &Path, ambassador: Option<&Path>) -> Result<initramfs::Binaries> {
    let target_dir = root.join("target/static");
    // The testpeer is its own workspace package (`testpeer/`), not a binary of `ambassador`.
    let packages: &[&str] = match ambassador {
        Some(_) => &["ambassador-testpeer"],
        None => &["ambassador", "ambassador-testpeer"],
    };
    let mut cmd = crate::image::static_cargo_packages(&target_dir, packages);
    cmd.arg("--bins");
    run_cmd(&mut cmd)?;
    let out = target_dir.join(crate::image::TARGET).join("release");
    let amb = ambassador
        .map(Path::to_path_buf)
        .unwrap_or_else(|| out.join("ambassador"));
    Ok(initramfs::Binaries {
        ambassador: amb,
        testpeer: out.join("ambassador-testpeer"),
    })
}

/// Does this ELF have a PT_INTERP program header (i.e. needs a dynamic loader)?
fn is_dynamic(p: &Path) -> Result<bool> {
    use object::read::elf::{FileHeader, ProgramHeader};
    let b = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    let not_elf = || format!("{} is not a 64-bit ELF", p.display());
    let h = object::elf::FileHeader64::<object::Endianness>::parse(&*b).with_context(not_elf)?;
    let e = h.endian().with_context(not_elf)?;
    let phs = h.program_headers(e, &*b).with_context(not_elf)?;
    Ok(phs.iter().any(|ph| ph.p_type(e) == object::elf::PT_INTERP))
}

/// The default run fits in `GUEST_DEADLINE`; a soak (`--bulk-rounds`, bigger `--bytes`) adds
/// time for what each cell carries beyond that, at a pessimistic 2 MiB/s each way under TCG
/// (measured: about 27 MiB/s).
fn guest_deadline(a: &Args) -> Duration {
    let cells = match a.cells.split(',').filter(|c| !c.is_empty()).count() {
        0 => 10,
        n => n,
    } as u64;
    let extra = (a.bulk_rounds.max(1) * a.bytes).saturating_sub(4 << 20) as u64;
    GUEST_DEADLINE + Duration::from_secs(cells * extra / (2 << 20))
}

fn run_guest(
    cache: &Path,
    k: &kernels::Kernel,
    bins: &initramfs::Binaries,
    a: &Args,
) -> Result<report::KernelRun> {
    // Package `linux-image-6.1.0-56-amd64-unsigned` boots as `uname -r` = `6.1.0-56-amd64`.
    let release = k
        .package
        .trim_start_matches("linux-image-")
        .trim_end_matches("-unsigned")
        .to_string();
    let work = cache.join(format!("guest-{}", k.key));
    std::fs::create_dir_all(&work)?;
    let initrd = work.join("initrd.gz");
    initramfs::build(&work, &initrd, bins, &k.config, &release, &suite_args(a))?;
    eprintln!("kernel-matrix: booting {release} under qemu (TCG)...");
    let deadline = guest_deadline(a);
    let con = boot::boot(&k.vmlinux, &initrd, deadline)?;
    std::fs::write(work.join("console.log"), &con.text)?;
    let label = format!("{release} (Debian {})", k.version);
    let mut r = report::parse(&k.key, &label, &con.text);
    r.secs = con.elapsed.as_secs_f64();
    if con.timed_out {
        r.problem = format!("guest timed out after {}s", deadline.as_secs());
    } else if !r.complete {
        let tail: Vec<&str> = con.text.lines().rev().take(5).collect();
        r.problem = format!(
            "guest stopped early: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        );
    }
    eprintln!(
        "kernel-matrix: {release}: {:.1}s; console in {}",
        r.secs,
        work.join("console.log").display()
    );
    Ok(r)
}

/// Arguments for `ambassador-testpeer suite`, the same in the guests and on the host.
fn suite_args(a: &Args) -> Vec<String> {
    let mut v = vec![
        "--bytes".to_string(),
        a.bytes.to_string(),
        "--storm".to_string(),
        a.storm.to_string(),
        "--bulk-rounds".to_string(),
        a.bulk_rounds.max(1).to_string(),
        "--log".to_string(),
        a.log.clone(),
    ];
    if !a.cells.is_empty() {
        v.push("--cells".into());
        v.push(a.cells.clone());
    }
    v
}

/// The same commands natively (as root: CI is root). Ports are ephemeral, so other users of the
/// machine don't collide with us.
fn run_host(cache: &Path, bins: &initramfs::Binaries, a: &Args) -> Result<report::KernelRun> {
    let t0 = Instant::now();
    // The unprivileged cells exec the ambassador as uid 65534, which may not be allowed to enter
    // the checkout (a clone under /root is 0700): run both binaries from a world-readable copy.
    let dir = std::env::temp_dir().join(format!("ambassador-kernel-matrix-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let (amb, peer) = (dir.join("ambassador"), dir.join("ambassador-testpeer"));
    for (src, dst) in [(&bins.ambassador, &amb), (&bins.testpeer, &peer)] {
        std::fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o755))?;
    }
    let mut text = String::new();
    let probe = Command::new(&peer).arg("probe").output()?;
    text.push_str(&String::from_utf8_lossy(&probe.stdout));
    let out = Command::new(&peer)
        .arg("suite")
        .arg("--ambassador")
        .arg(&amb)
        .args(suite_args(a))
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    std::fs::write(cache.join("host.log"), &text)?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut r = report::parse("host", &format!("{} (host)", release.trim()), &text);
    r.secs = t0.elapsed().as_secs_f64();
    if !r.complete {
        r.problem = format!("suite exited {}", out.status);
    }
    Ok(r)
}

fn render_docs(runs: &[report::KernelRun], table: &str, fixes: &str) -> String {
    let mut s = String::from(
        "<!-- Generated by `cargo xtask kernel-matrix` from its last full run. Do not edit by hand. -->\n\
         # Supported kernels\n\n\
         The same static `ambassador` binary, booted on Debian's own kernels under qemu (TCG) and run\n\
         natively on the development host. A cell *works* when the binary started that engine and every\n\
         check passed through it on loopback: 4 MiB of pseudo-random bytes both ways at once, byte-exact;\n\
         an upstream that speaks first; a client that speaks first; a half-close (1 MiB, client FIN, then\n\
         a 256 KiB reply and the upstream's FIN); 40 short connections 4 at a time, each speaking first;\n\
         and exit 0 on SIGTERM. `auto` cells name the engine `auto` picked; the reasons it logged for\n\
         each engine it skipped are listed under the table.\n\n",
    );
    s.push_str(table);
    s.push_str(
        "\n## What `auto` picks\n\n| kernel | as root | unprivileged (uid 65534, no capabilities) | \
         root, io_uring + bpf refused by seccomp | unprivileged, io_uring refused by seccomp | \
         unprivileged, `kernel.io_uring_disabled=2` |\n|---|---|---|---|---|---|\n",
    );
    for k in runs {
        let pick = |c: &str| match report::outcome(k, c, "auto") {
            report::Outcome::Picked(e, _) => e,
            report::Outcome::NotRun(_) => "n/a".into(),
            o => o.token(),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            k.label,
            pick("auto"),
            pick("auto-nonroot"),
            pick("auto-seccomp"),
            pick("auto-nonroot-nouring"),
            pick("auto-nonroot-sysctl")
        ));
    }
    s.push_str(
        "\n## Sockmap lifecycle fixes, observed with raw `bpf()` (independent of the engine)\n\n",
    );
    s.push_str(
        "`ambassador-testpeer probe` builds the two-SOCKHASH verdict-only design by hand on each kernel\n\
         and checks the behaviour the sockmap engine depends on (docs/sockmap.md, \"Kernel facts\"):\n\n\
         - `preinsert_kick`: bytes queued before the insert are flushed by one non-blocking recv\n\
         (\"bpf, sockmap: TCP data stall on recv before accept\", upstream 6.4-rc4).\n\
         - `fin_pass_recv_eof`: an SK_PASS'd FIN makes recv return 0 (\"Handle fin correctly\", 6.4-rc4).\n\
         - `fin_drop_clean`: SK_DROP of the zero-length FIN skb leaves the peer clean (kernel fact 4).\n\
         - `halfclose_drain`: drain-then-shutdown delivers every byte before the FIN (kernel fact 9).\n\
         - `pass_fionread`: FIONREAD and MSG_PEEK on a socket's own SK_PASS'd bytes (kept as a probe;\n\
         the engine no longer reads passed bytes).\n\
         - `ingress_fionread`: FIONREAD counts bytes redirected into a socket's ingress queue\n\
         (\"bpf, sockmap: Fix FIONREAD for sockmap\", Jan 2026). Our engine never redirects to\n\
         ingress, so this only tells kernels apart.\n\
         - `first_skb_cut` (from the engine's start-up self-test, not the probe): the program reads\n\
         the socket's `copied_seq` (offsets from the kernel's BTF) and cuts a byte userspace read from\n\
         the first skb before the insert (docs/sockmap.md, \"The first skb after an insert\").\n\
         - `sk_skb_load_eagain_after_ring_close`: how often (of 20) `BPF_PROG_LOAD` failed with EAGAIN\n\
         right after the process closed an io_uring instance.\n\n",
    );
    s.push_str(fixes);
    s.push_str(&differences(runs));
    s.push_str(&MINIMUMS.replace("@SOCKMAP_NOTE@", &sockmap_note(runs)));
    s
}

/// Which tested kernels below 6.4 carry the 6.4-rc4 fixes anyway, per the probes.
fn sockmap_note(runs: &[report::KernelRun]) -> String {
    let has = |k: &report::KernelRun, n: &str| k.fixes.iter().any(|f| f.0 == n && f.1);
    let old: Vec<String> = runs
        .iter()
        .filter(|k| {
            let mut v = k
                .label
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|x| x.parse::<u32>().ok());
            (v.next().unwrap_or(0), v.next().unwrap_or(0)) < (6, 4)
        })
        .map(|k| {
            let yes = has(k, "preinsert_kick") && has(k, "fin_pass_recv_eof");
            format!(
                "{} {} them (probes above).",
                k.label,
                if yes { "carries" } else { "lacks" }
            )
        })
        .collect();
    old.join(" ")
}

/// Probe results and features that are not the same on every kernel.
fn differences(runs: &[report::KernelRun]) -> String {
    let mut out = String::from("\n## What differs between the kernels\n\n");
    let mut names: Vec<String> = Vec::new();
    for k in runs {
        for n in k
            .fixes
            .iter()
            .map(|f| f.0.clone())
            .chain(k.features.iter().map(|f| f.0.clone()))
        {
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    let mut any = false;
    for n in &names {
        let vals: Vec<String> = runs
            .iter()
            .map(|k| {
                k.fixes
                    .iter()
                    .find(|f| &f.0 == n)
                    .map(|f| {
                        if f.1 {
                            "yes".to_string()
                        } else {
                            "no".to_string()
                        }
                    })
                    .or_else(|| k.features.iter().find(|f| &f.0 == n).map(|f| f.1.clone()))
                    .unwrap_or_else(|| "–".into())
            })
            .collect();
        // Counts like `3/20` vary run to run; only report them when zero vs non-zero differs.
        let norm: Vec<String> = vals
            .iter()
            .map(|v| {
                if v.contains('/') {
                    (!v.starts_with("0/")).to_string()
                } else {
                    v.clone()
                }
            })
            .collect();
        if norm.iter().all(|v| *v == norm[0]) {
            continue;
        }
        any = true;
        let per: Vec<String> = runs
            .iter()
            .zip(&vals)
            .map(|(k, v)| format!("{}: {v}", k.label))
            .collect();
        out.push_str(&format!("- `{n}`: {}\n", per.join("; ")));
    }
    if !any {
        out.push_str("Nothing: every probe and feature matched.\n");
    }
    out
}

/// The minimum kernel per engine and why: from the fix history in docs/sockmap.md,
/// tokio-uring's documented minimum, and what the matrix saw on the tested kernels.
const MINIMUMS: &str = "
## Minimum kernel per engine

| engine | minimum | why |
|---|---|---|
| `epoll` | any kernel Rust std supports (3.2+) | plain non-blocking sockets and epoll; the last fallback, needs no privilege |
| `uring` | 5.10 | tokio-uring's documented minimum. `io_uring_setup` must also be allowed: not `kernel.io_uring_disabled=2` (or `=1` outside `io_uring_group`; the sysctl exists from 6.6) and not refused by seccomp (Docker's default profile refuses it since 25.0) |
| `sockmap` | 6.4, or a stable kernel with the 6.4-rc4 sockmap series backported | verdict-only sk_skb needs 5.10; bytes queued before the insert and FIN handling need the 6.4-rc4 fixes. The binary does not trust the version: at start-up it splices a throw-away loopback pair (a byte queued before the insert, then a FIN) and skips sockmap with the failed step as its reason. @SOCKMAP_NOTE@ Needs CAP_BPF + CAP_NET_ADMIN (or CAP_SYS_ADMIN) |
";

#[cfg(test)]
mod tests {
    use super::is_dynamic;
    use std::path::Path;

    #[test]
    fn tells_a_dynamic_binary_from_a_static_one() {
        // Any glibc system has a dynamic `ls` and a static(-pie) `ldconfig`.
        assert!(is_dynamic(Path::new("/bin/ls")).unwrap());
        assert!(!is_dynamic(Path::new("/sbin/ldconfig")).unwrap());
    }

    #[test]
    fn refuses_what_is_not_an_elf() {
        let e = is_dynamic(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/Cargo.toml"
        )))
        .unwrap_err();
        assert!(format!("{e:#}").contains("is not a 64-bit ELF"), "{e:#}");
    }
}
