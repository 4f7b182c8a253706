//! HAProxy 2.6 in mode tcp, `nbthread N` (1, or 2 in the two-CPU pass), `maxconn 4000`
//! (this VM's setting).

use crate::peers::Fwd;
use crate::sys::Proc;
use anyhow::Result;
use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

pub const MAXCONN: usize = 4000;

pub fn start(cpus: &str, threads: u32, fwds: &[Fwd], dir: &Path) -> Result<Proc> {
    let mut c = format!(
        "global\n  nbthread {threads}\n  maxconn {MAXCONN}\n\ndefaults\n  mode tcp\n  maxconn {MAXCONN}\n  \
         timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\n"
    );
    for (i, f) in fwds.iter().enumerate() {
        let _ = write!(
            c,
            "listen f{i}\n  bind 127.0.0.1:{}\n  server s{i} 127.0.0.1:{}\n\n",
            f.listen, f.target
        );
    }
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, c)?;
    let mut p = Proc::spawn(
        "haproxy",
        Some(cpus),
        "haproxy",
        &["-db".into(), "-f".into(), cfg.display().to_string()],
    )?;
    p.wait_ports(
        &fwds.iter().map(|f| f.listen).collect::<Vec<_>>(),
        Duration::from_secs(5),
    )?;
    Ok(p)
}
