//! nginx stream proxy, `worker_processes N` (1, or 2 in the two-CPU pass), our
//! own config and prefix (Debian's stream module loaded explicitly); [`run`]
//! starts any nginx config (the HTTP server of `servers.rs` too).

use crate::peers::Fwd;
use crate::sys::Proc;
use anyhow::Result;
use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

pub const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

pub fn start(cpus: &str, workers: u32, fwds: &[Fwd], dir: &Path) -> Result<Proc> {
    let prefix = dir.join("nginx-stream");
    std::fs::create_dir_all(&prefix)?;
    let p = prefix.display();
    let mut c = format!(
        "load_module {STREAM_MODULE};\nworker_processes {workers};\nworker_rlimit_nofile 20000;\ndaemon off;\n\
         pid {p}/nginx.pid;\nerror_log {p}/error.log warn;\nevents {{ worker_connections 20000; }}\nstream {{\n"
    );
    for f in fwds {
        let _ = writeln!(
            c,
            "  server {{ listen 127.0.0.1:{}; proxy_pass 127.0.0.1:{}; }}",
            f.listen, f.target
        );
    }
    c.push_str("}\n");
    let ports: Vec<u16> = fwds.iter().map(|f| f.listen).collect();
    run("nginx", cpus, &prefix, &c, &ports)
}

/// Write `conf` to `PREFIX/nginx.conf` and run nginx on it in the foreground
/// (prefix and error log in `prefix`, pinned to `cpus`), named `name` in the
/// harness's messages; ready once every one of `ports` accepts.
pub fn run(name: &str, cpus: &str, prefix: &Path, conf: &str, ports: &[u16]) -> Result<Proc> {
    let p = prefix.display();
    let cfg = prefix.join("nginx.conf");
    std::fs::write(&cfg, conf)?;
    let args = [
        "-p",
        &p.to_string(),
        "-e",
        &format!("{p}/error.log"),
        "-c",
        &cfg.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let mut pr = Proc::spawn(name, Some(cpus), "nginx", &args)?;
    pr.wait_ports(ports, Duration::from_secs(5))?;
    Ok(pr)
}
