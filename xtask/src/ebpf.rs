//! `cargo xtask build-ebpf`: rebuild the committed eBPF object.
//!
//! The object (`ambassador/bpf/ambassador.bpf.o`) is committed and embedded
//! by `ambassador`, so a stable `cargo build` never needs the BPF toolchain
//! (the bpf2go approach). This command installs what a fresh Debian machine
//! lacks, builds `ambassador-ebpf` with nightly for `bpfel-unknown-none`, and
//! copies the result to the committed path. [`check_committed`] (run by CI)
//! rebuilds into a scratch directory and fails if the result differs.
//!
//! The build is bit-reproducible: without BTF, bpf-linker emits no debug info
//! and so no paths; `codegen-units = 1` and the pinned versions (Cargo.lock,
//! aya-ebpf =0.2.0) fix the rest. Verified across clean builds in different
//! directories (docs/sockmap.md).

use crate::util::{apt_install, have, root, run as sh};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// LLVM major version of the nightly's rustc; bpf-linker must link the same.
const LLVM: &str = "22";
/// Where the object is committed, relative to the workspace root.
pub const COMMITTED: &str = "ambassador/bpf/ambassador.bpf.o";

#[derive(clap::Args)]
pub struct Args {
    /// Only check that the committed object matches a fresh build.
    #[arg(long)]
    pub check: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.check {
        return check_committed();
    }
    let obj = build(None)?;
    let dst = root().join(COMMITTED);
    std::fs::copy(&obj, &dst).with_context(|| format!("copying to {}", dst.display()))?;
    eprintln!(
        "wrote {} ({} bytes)",
        dst.display(),
        std::fs::metadata(&dst)?.len()
    );
    Ok(())
}

/// Rebuild into a scratch target directory and compare with the committed
/// object byte for byte.
pub fn check_committed() -> Result<()> {
    let scratch =
        std::env::temp_dir().join(format!("ambassador-ebpf-check-{}", std::process::id()));
    let fresh = build(Some(&scratch));
    let result = fresh.and_then(|obj| {
        let fresh = std::fs::read(&obj)?;
        let committed = std::fs::read(root().join(COMMITTED))
            .with_context(|| format!("reading {COMMITTED}"))?;
        if fresh != committed {
            bail!(
                "{COMMITTED} is stale: a fresh build ({} bytes) differs from the committed object \
                 ({} bytes). Run `cargo xtask build-ebpf` and commit the result.",
                fresh.len(),
                committed.len()
            );
        }
        eprintln!("{COMMITTED} matches a fresh build ({} bytes)", fresh.len());
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Install what is missing, build, and return the path of the object.
fn build(target_dir: Option<&Path>) -> Result<PathBuf> {
    install_toolchain()?;
    let crate_dir = root().join("ambassador-ebpf");
    let target_dir = target_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| crate_dir.join("target"));
    sh(Command::new("cargo")
        .current_dir(&crate_dir)
        // Don't let a caller's flags or toolchain override leak in.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env("PATH", path_with_cargo_bin())
        .args([
            "+nightly",
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir))?;
    Ok(target_dir.join("bpfel-unknown-none/release/ambassador-ebpf"))
}

/// The bpf-linker release the committed object was built with.
const BPF_LINKER: &str = "=0.13.0";

/// LLVM dev packages, bpf-linker built against them, rust-src for nightly.
fn install_toolchain() -> Result<()> {
    let llvm_pkgs = [format!("llvm-{LLVM}-dev"), format!("libpolly-{LLVM}-dev")];
    apt_install(&llvm_pkgs.iter().map(String::as_str).collect::<Vec<_>>())?;
    if !have("bpf-linker") && !cargo_bin().join("bpf-linker").exists() {
        let path = format!("/usr/lib/llvm-{LLVM}/bin:{}", path_with_cargo_bin());
        sh(Command::new("cargo").env("PATH", path).args([
            "install",
            "bpf-linker",
            // Pinned: the committed object is compared byte for byte.
            "--version",
            BPF_LINKER,
            "--no-default-features",
            "--features",
            &format!("llvm-{LLVM}"),
        ]))?;
    }
    let have_src = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("rust-src"))
        })
        .unwrap_or(false);
    if !have_src {
        sh(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn cargo_bin() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        });
    home.join("bin")
}

/// `PATH` with `~/.cargo/bin` on it, where `cargo install` puts bpf-linker.
fn path_with_cargo_bin() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{}:{path}", cargo_bin().display())
}
