//! `cargo xtask image`: the static binary and the FROM-scratch Docker image.
//!
//! No image registry is reachable from where this runs, so nothing is pulled: cargo builds a
//! static glibc binary (`-C target-feature=+crt-static`) into its own target directory, the
//! binary is copied into a tiny build context next to the `Dockerfile`, and `docker build`
//! assembles a `FROM scratch` image holding that one file.
//!
//! Why a separate target directory (`target/static`): `RUSTFLAGS` is part of cargo's
//! fingerprint, so sharing `target/` with the ordinary builds would rebuild everything each
//! time one or the other runs.
//!
//! Why a separate build context (`target/image-context`): the legacy builder sends the whole
//! context to the daemon, and the repository's `target/` is gigabytes.
//!
//! Name resolution: since glibc 2.34 the `files` and `dns` NSS back-ends live inside libc, so
//! the static binary resolves `/etc/hosts` names (`db` under `--link db:db`) and Docker's
//! embedded DNS from a scratch container (checked on this machine: Debian 12, glibc 2.36).

use crate::util::{self, root};
use anyhow::{Context, Result, bail, ensure};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Rust target of the static build (the host's; glibc, statically linked).
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The image must stay below this many bytes (the bound).
pub const MAX_IMAGE_BYTES: u64 = 10 * 1000 * 1000;

#[derive(clap::Args)]
pub struct Args {
    /// Tag of the image to build.
    #[arg(long, default_value = "ambassador:latest")]
    pub tag: String,
    /// Use this already-built static binary instead of building one.
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Only build the static binary and print its path; no Docker.
    #[arg(long)]
    pub binary_only: bool,
}

pub fn run(a: Args) -> Result<()> {
    let bin = match a.binary {
        Some(b) => {
            ensure!(is_static(&b)?, "{} is not a static executable", b.display());
            b
        }
        None => static_binary()?,
    };
    if a.binary_only {
        println!("{}", bin.display());
        return Ok(());
    }
    let size = build_image(&bin, &a.tag)?;
    println!("{} {} bytes", a.tag, size);
    Ok(())
}

/// Build the `ambassador` binary statically linked (release, symbols stripped) and return its
/// path, `target/static/x86_64-unknown-linux-gnu/release/ambassador`.
pub fn static_binary() -> Result<PathBuf> {
    let target_dir = root().join("target/static");
    util::run(&mut static_cargo(&target_dir))?;
    let bin = target_dir.join(TARGET).join("release/ambassador");
    ensure!(
        is_static(&bin)?,
        "{} is not statically linked",
        bin.display()
    );
    Ok(bin)
}

/// `cargo build` of the `ambassador` package, statically linked, release, symbols stripped, into
/// `target_dir`. Shared with the kernel matrix: cargo fingerprints these flags, so one set keeps
/// the image and the qemu guests on one build.
pub fn static_cargo(target_dir: &Path) -> Command {
    static_cargo_packages(target_dir, &["ambassador"])
}

/// [`static_cargo`] for the given workspace packages (`-p` each).
pub fn static_cargo_packages(target_dir: &Path, packages: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        // An encoded flags variable inherited from an outer cargo would win over RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // The workspace release profile keeps line tables (`debug = 1`) for perf work; the image
        // does not want them (they are most of the file's size).
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        // One optimisation unit across all crates: about a tenth smaller (the image budget below)
        // and no slower; the discovery clients (Docker API, etcd over TLS) brought it near 10 MB.
        .env("CARGO_PROFILE_RELEASE_LTO", "fat")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        .args(["build", "--release", "--target", TARGET]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    cmd.arg("--target-dir").arg(target_dir);
    cmd
}

/// `docker build` the image from `Dockerfile` with `bin` as its only file; returns the image
/// size in bytes and fails if it is not below [`MAX_IMAGE_BYTES`].
pub fn build_image(bin: &Path, tag: &str) -> Result<u64> {
    let root = root();
    let ctx = root.join("target/image-context");
    std::fs::create_dir_all(&ctx).with_context(|| format!("creating {}", ctx.display()))?;
    std::fs::copy(bin, ctx.join("ambassador"))
        .with_context(|| format!("copying {} into the build context", bin.display()))?;
    util::run(
        Command::new("docker")
            .current_dir(&root)
            // The legacy builder: dockerd 20.10 from Debian has no buildx; the context is one file.
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", tag, "-f"])
            .arg(root.join("Dockerfile"))
            .arg(&ctx),
    )?;
    let out = Command::new("docker")
        .args(["image", "inspect", "-f", "{{.Size}}", tag])
        .output()
        .context("docker image inspect")?;
    ensure!(out.status.success(), "docker image inspect {tag} failed");
    let size: u64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    if size >= MAX_IMAGE_BYTES {
        bail!("image {tag} is {size} bytes, over the {MAX_IMAGE_BYTES} byte budget");
    }
    Ok(size)
}

/// Is `path` an ELF executable without a program interpreter (no `PT_INTERP`), i.e. one that
/// runs in an empty `FROM scratch` filesystem?
pub fn is_static(path: &Path) -> Result<bool> {
    let f = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    // ELF64 little-endian header: e_phoff at 0x20 (u64), e_phentsize at 0x36, e_phnum at 0x38.
    ensure!(
        f.len() > 0x40 && &f[..4] == b"\x7fELF" && f[4] == 2 && f[5] == 1,
        "not an ELF64 LE file"
    );
    let u16_at = |o: usize| u16::from_le_bytes([f[o], f[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(f[0x20..0x28].try_into()?) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        ensure!(o + 4 <= f.len(), "truncated program headers");
        if u32::from_le_bytes(f[o..o + 4].try_into()?) == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}
