//! `cargo xtask <command>`: the project's chores, one module per concern.
//!
//! - `ci`            — what `.ci/run` runs: install what the tests need, prove the
//!   committed eBPF object is current, lint, run every test, smoke the benchmarks,
//!   run the kernel matrix.
//! - `build-ebpf`    — install the BPF toolchain if missing and rebuild the committed object.
//! - `bench`         — the side-by-side benchmark (`--full` for the thorough run).
//! - `image`         — the static binary and the FROM-scratch Docker image.
//! - `kernel-matrix` — boot Debian kernels under qemu and run the engine checks inside.
//! - `soak`          — randomised, byte-checked traffic through each engine for minutes.

mod bench;
mod ci;
mod ebpf;
mod image;
mod kernel_matrix;
mod soak;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Everything CI runs (installs what it needs).
    Ci(ci::Args),
    /// Rebuild the eBPF object into its committed path.
    BuildEbpf(ebpf::Args),
    /// Benchmarks: ambassador engines vs direct, socat, HAProxy, nginx.
    Bench(bench::Args),
    /// Build the static binary and the FROM-scratch image.
    Image(image::Args),
    /// Run the engine checks on Debian kernels under qemu and on the host.
    KernelMatrix(kernel_matrix::Args),
    /// Randomised, byte-checked traffic through every engine (`--minutes`, `--hog`).
    Soak(soak::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Ci(a) => ci::run(a),
        Cmd::BuildEbpf(a) => ebpf::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Image(a) => image::run(a),
        Cmd::KernelMatrix(a) => kernel_matrix::run(a),
        Cmd::Soak(a) => soak::run(a),
    }
}
