//! The kernels under test: the newest Debian 6.1 and 6.12 images, fetched with `apt-get download`
//! (never installed), unpacked with `dpkg-deb`, and turned into a bootable ELF `vmlinux`.
//!
//! Cache: `target/kernel-matrix/kernels/<package>/` holds `vmlinux`, `config` and `version`. A
//! package name encodes its ABI, and the newest name is looked up on every run, so a new Debian
//! upload is picked up automatically and an old cache entry is simply never used again.

use crate::util::run;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// One guest kernel, ready to boot.
pub struct Kernel {
    /// Short key used in the expectation file and the table: `6.1`, `6.12`.
    pub key: String,
    /// Debian package name, e.g. `linux-image-6.1.0-56-amd64-unsigned`.
    pub package: String,
    /// Debian package version, e.g. `6.1.192-2` (the real upstream stable release).
    pub version: String,
    pub vmlinux: PathBuf,
    pub config: PathBuf,
}

/// The kernel series we test and the regex that finds their plain amd64 image packages
/// (not -cloud, not -rt; `-unsigned` has the same image without the signing wrapper).
pub const SERIES: &[(&str, &str)] = &[
    ("6.1", r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$"),
    (
        "6.12",
        r"^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64-unsigned$",
    ),
];

fn output(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !o.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Newest package matching `pattern`, by Debian version order of the candidate versions.
fn newest(pattern: &str) -> Result<(String, String)> {
    let names = output(Command::new("apt-cache").args(["search", "--names-only", pattern]))?;
    let mut best: Option<(String, String)> = None;
    for name in names.lines().filter_map(|l| l.split_whitespace().next()) {
        let pol = output(Command::new("apt-cache").args(["policy", name]))?;
        let Some(cand) = pol
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate: "))
            .map(str::to_string)
            .filter(|c| c != "(none)")
        else {
            continue;
        };
        let newer = match &best {
            None => true,
            Some((_, v)) => Command::new("dpkg")
                .args(["--compare-versions", &cand, "gt", v])
                .status()
                .map(|s| s.success())
                .unwrap_or(false),
        };
        if newer {
            best = Some((name.to_string(), cand));
        }
    }
    best.with_context(|| format!("no package matches {pattern}: run `apt-get update`?"))
}

/// Find, download, unpack and cache every series in `keys` (all of [`SERIES`] if empty).
pub fn fetch(cache: &Path, keys: &[String]) -> Result<Vec<Kernel>> {
    let mut out = Vec::new();
    let mut updated = false;
    for (key, pattern) in SERIES {
        if !keys.is_empty() && !keys.iter().any(|k| k == key) {
            continue;
        }
        let (package, version) = match newest(pattern) {
            Ok(x) => x,
            Err(_) if !updated => {
                run(Command::new("apt-get").args(["update", "-q"]))?;
                updated = true;
                newest(pattern)?
            }
            Err(e) => return Err(e),
        };
        let dir = cache.join("kernels").join(&package);
        let vmlinux = dir.join("vmlinux");
        let config = dir.join("config");
        let stamp = dir.join("version");
        let cached = std::fs::read_to_string(&stamp)
            .map(|v| v.trim() == version)
            .unwrap_or(false);
        if !cached {
            fetch_one(&dir, &package, &version)?;
        }
        eprintln!(
            "kernel-matrix: {key}: {package} {version}{}",
            if cached { " (cached)" } else { "" }
        );
        out.push(Kernel {
            key: key.to_string(),
            package,
            version,
            vmlinux,
            config,
        });
    }
    Ok(out)
}

fn fetch_one(dir: &Path, package: &str, version: &str) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    let dl = dir.join("deb");
    std::fs::create_dir_all(&dl)?;
    // `apt-get download` writes into the current directory. As root, apt warns that `_apt` cannot
    // write there and downloads unsandboxed: harmless.
    run(Command::new("apt-get").current_dir(&dl).args([
        "download",
        "-q",
        &format!("{package}={version}"),
    ]))?;
    let deb = std::fs::read_dir(&dl)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    // Only ./boot is needed: the modules tree is 400+ MB unpacked and loopback needs no module.
    let unpack = dir.join("unpack");
    std::fs::create_dir_all(&unpack)?;
    let script = format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' --wildcards './boot/*'",
        deb.display(),
        unpack.display()
    );
    run(Command::new("sh").args(["-c", &script]))?;
    let boot = unpack.join("boot");
    let mut vmlinuz = None;
    let mut config = None;
    for e in std::fs::read_dir(&boot)? {
        let p = e?.path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("vmlinuz-") {
            vmlinuz = Some(p);
        } else if name.starts_with("config-") {
            config = Some(p);
        }
    }
    let vmlinuz = vmlinuz.context("no boot/vmlinuz-* in the package")?;
    std::fs::write(dir.join("vmlinux"), extract_vmlinux(&vmlinuz)?)?;
    std::fs::copy(config.context("no boot/config-*")?, dir.join("config"))?;
    std::fs::remove_dir_all(&unpack)?;
    std::fs::remove_dir_all(&dl)?;
    std::fs::write(dir.join("version"), version)?;
    Ok(())
}

/// The ELF kernel inside a bzImage: find the first compressed stream that decompresses to an ELF
/// header (Debian 6.1 uses xz, 6.12 zstd). Booting it directly (PVH entry) skips the in-guest
/// decompressor, which under TCG takes longer than the rest of the boot. The decompressors
/// complain about the bytes after the stream and exit non-zero: the output is still complete.
pub fn extract_vmlinux(vmlinuz: &Path) -> Result<Vec<u8>> {
    let img = std::fs::read(vmlinuz)?;
    let formats: [(&[u8], &str); 3] = [
        (b"\xfd7zXZ\x00", "xz"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"\x1f\x8b\x08", "gzip"),
    ];
    for (magic, tool) in formats {
        let mut from = 0;
        while let Some(i) = img[from..].windows(magic.len()).position(|w| w == magic) {
            let at = from + i;
            from = at + 1;
            let mut child = Command::new(tool)
                .arg("-dc")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {tool} (apt-get install {tool}?)"))?;
            let mut stdin = child.stdin.take().unwrap();
            let data = img[at..].to_vec();
            let feeder = std::thread::spawn(move || {
                use std::io::Write;
                let _ = stdin.write_all(&data);
            });
            let out = child.wait_with_output()?;
            let _ = feeder.join();
            if out.stdout.starts_with(b"\x7fELF") {
                return Ok(out.stdout);
            }
        }
    }
    bail!("no compressed ELF found in {}", vmlinuz.display())
}
