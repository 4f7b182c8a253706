//! Our binary, one engine per row: `ambassador --mode <engine> --forward ...`,
//! measured only after its `ready` line. An engine that cannot start exits
//! non-zero with its reason on stderr; that reason becomes the row.
//!
//! The `ready` line says which engine runs (what `auto` chose) and how many
//! workers (sockmap asked for two runs one): both go into the report.

use crate::peers::Fwd;
use crate::sys::Proc;
use anyhow::Result;
use std::path::Path;
use std::time::Duration;

/// What the `ready` line said.
#[derive(Debug, PartialEq)]
pub struct Ready {
    pub engine: String,
    /// 0 when the line has no `workers=` (an older binary).
    pub workers: usize,
}

/// Read `engine=` and `workers=` out of a `ready` line (tracing's key=value
/// format, values maybe quoted).
pub fn parse_ready(line: &str) -> Ready {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or("")
            .trim_matches('"')
            .to_string()
    };
    Ready {
        engine: field("engine="),
        workers: field("workers=").parse().unwrap_or(0),
    }
}

pub fn start(bin: &Path, engine: &str, cpus: &str, fwds: &[Fwd]) -> Result<(Proc, Ready)> {
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
        Some(cpus),
        &bin.display().to_string(),
        &args,
    )?;
    let line = p.wait_stderr("ready forwards=", Duration::from_secs(10))?;
    Ok((p, parse_ready(&line)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_gives_engine_and_workers() {
        let l = "2026-12-03T14:00:00Z  INFO ambassador::server: ready forwards=4 engine=\"sockmap\" workers=1";
        assert_eq!(
            parse_ready(l),
            Ready {
                engine: "sockmap".into(),
                workers: 1
            }
        );
        assert_eq!(parse_ready("ready forwards=4 engine=epoll").workers, 0);
    }
}
