//! `cargo xtask ci`: the whole test suite, from a fresh clone on a fresh
//! machine (this is what `.ci/run` runs). Each step installs what it needs:
//!
//! 1. Debian packages the tests use (real peers: redis, postgres, socat,
//!    docker, qemu, ...);
//! 2. the committed eBPF object is rebuilt with the pinned toolchain and
//!    compared byte for byte (`cargo xtask build-ebpf` installs it);
//! 3. `cargo fmt --check` and `clippy -D warnings`;
//! 4. the static binary (for the Docker image and the qemu guests), then
//!    every test, serially (they measure nothing, but they share 2 CPUs
//!    and real ports, namespaces and containers);
//! 5. the soak: a minute of randomised, byte-checked traffic through every
//!    engine, and a minute more under a CPU hog;
//! 6. one smoke round of the benchmark harness (no timing asserted);
//! 7. the kernel matrix (Debian 6.1 and 6.12 under qemu, and the host),
//!    compared with the committed expectation.

use crate::util::{self, apt_install, root};
use anyhow::Result;
use std::process::Command;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Skip the kernel matrix (qemu) step.
    #[arg(long)]
    pub no_kernel_matrix: bool,
    /// Skip the benchmark smoke pass.
    #[arg(long)]
    pub no_bench: bool,
    /// Skip the eBPF rebuild-and-compare step.
    #[arg(long)]
    pub no_ebpf: bool,
}

/// Debian packages the integration tests use (real peers, tools).
pub const TEST_PACKAGES: &[&str] = &[
    "socat",
    "redis-server",
    "redis-tools",
    "postgresql",
    "libcap2-bin",
    "iproute2",
    "strace",
    "docker.io",
    "qemu-system-x86",
    "busybox-static",
    // promtool, which checks the /metrics exposition format.
    "prometheus",
    // etcd and etcdctl, for the discovery tests (tests/etcd.rs).
    "etcd-server",
    "etcd-client",
    // certificates for the etcd-over-TLS test (tests/etcd_tls.rs).
    "openssl",
];

fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    let t = Instant::now();
    eprintln!("==> {name}");
    let r = f();
    eprintln!(
        "==> {name}: {} in {:.0?}",
        if r.is_ok() { "ok" } else { "FAILED" },
        t.elapsed()
    );
    r
}

pub fn run(a: Args) -> Result<()> {
    let root = root();
    let cargo = |args: &[&str]| util::run(Command::new("cargo").current_dir(&root).args(args));
    step("install test packages", || apt_install(TEST_PACKAGES))?;
    if !a.no_ebpf {
        step("eBPF object is current", crate::ebpf::check_committed)?;
    }
    step("fmt", || cargo(&["fmt", "--all", "--", "--check"]))?;
    step("clippy", || {
        cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
    })?;
    // The static binary is built once here and shared: the Docker image
    // (tests/docker.rs) and the kernel matrix use it.
    let static_bin = crate::image::static_binary()?;
    step("tests", || {
        util::run(
            Command::new("cargo")
                .current_dir(&root)
                .env("AMBASSADOR_STATIC_BIN", &static_bin)
                .args(["test", "--release", "--workspace", "--", "--test-threads=1"]),
        )
    })?;
    // Randomised, byte-checked traffic through every engine: one minute
    // over the four configs, then one more with a CPU hog.
    step("soak", crate::soak::ci)?;
    if !a.no_bench {
        step("benchmark smoke", crate::bench::smoke)?;
    }
    if !a.no_kernel_matrix {
        step("kernel matrix", crate::kernel_matrix::check)?;
    }
    Ok(())
}
