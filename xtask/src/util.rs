//! Small helpers shared by the xtask commands: run a command loudly, find the
//! workspace root, install Debian packages that are missing, find (or build)
//! the release ambassador binary.

use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::Command;

/// The workspace root (the parent of `xtask/`).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The ambassador binary to drive: `$AMBASSADOR_BIN` (which must exist), else
/// `cargo build --release -p ambassador` and the binary it made (in
/// [`target_dir`]).
pub fn release_binary() -> Result<PathBuf> {
    if let Some(b) = std::env::var_os("AMBASSADOR_BIN") {
        let b = PathBuf::from(b);
        anyhow::ensure!(b.exists(), "AMBASSADOR_BIN={} does not exist", b.display());
        return Ok(b);
    }
    let root = root();
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["build", "--release", "-p", "ambassador"]))?;
    Ok(target_dir().join("release/ambassador"))
}

/// Where cargo puts what it builds: `$CARGO_TARGET_DIR` when set (relative to
/// the root), else `target/` in the root.
pub fn target_dir() -> PathBuf {
    let root = root();
    std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| root.join(d))
        .unwrap_or_else(|| root.join("target"))
}

/// Run `cmd`, echoing it first; fail with its exit status.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let st = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

/// Is `prog` on PATH?
pub fn have(prog: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {prog} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// `apt-get install` the packages that dpkg does not list as installed.
pub fn apt_install(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing))
}
