//! Our binary, one engine per row: `ambassador --mode <engine> --forward ...`,
//! measured only after its `ready` line. An engine that cannot start exits
//! non-zero with its reason on stderr; that reason becomes the row.

use crate::peers::Fwd;
use crate::sys::Proc;
use anyhow::Result;
use std::path::Path;
use std::time::Duration;

pub fn start(bin: &Path, engine: &str, cpu: u32, fwds: &[Fwd]) -> Result<(Proc, String)> {
    anyhow::ensure!(bin.exists(), "binary not found: {}", bin.display());
    // `engine` is the mode, maybe followed by more flags ("sockmap --splice always").
    let mut words = engine.split_whitespace().map(String::from);
    let mut args = vec!["--mode".to_string(), words.next().unwrap_or_default()];
    args.extend(words);
    for f in fwds {
        args.push("--forward".into());
        args.push(format!("127.0.0.1:{}=127.0.0.1:{}", f.listen, f.target));
    }
    let mut p = Proc::spawn(
        &format!("ambassador {engine}"),
        Some(cpu),
        &bin.display().to_string(),
        &args,
    )?;
    let line = p.wait_stderr("ready forwards=", Duration::from_secs(10))?;
    // Keep what the engine reported (for `auto`: the engine it chose).
    let note = line
        .split_whitespace()
        .find(|w| w.starts_with("engine="))
        .unwrap_or("")
        .trim_start_matches("engine=");
    Ok((p, note.trim_matches('"').to_string()))
}
