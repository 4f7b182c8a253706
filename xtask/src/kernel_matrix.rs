//! (placeholder, owned by the kernel_matrix work)
use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_a: Args) -> Result<()> {
    anyhow::bail!("not built yet")
}
