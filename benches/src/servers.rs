//! The backends every row forwards to, started once per pass on the client CPUs:
//! sockperf (latency), iperf3 (throughput), an nginx serving a 3-byte file
//! (connection rate; one worker per client CPU, so that the two-CPU pass's
//! backend keeps up with two proxy workers), and our own idle server (idle
//! connections).

use crate::sys::{self, Proc};
use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Servers {
    pub sockperf: u16,
    pub iperf: u16,
    pub http: u16,
    pub idle: IdleServer,
    _procs: Vec<Proc>,
    cpus: &'static str,
}

impl Servers {
    /// Start every backend pinned to `cpus`; the HTTP server runs `http_workers` workers.
    pub fn start(cpus: &'static str, http_workers: u32, dir: &Path) -> Result<Servers> {
        let (sockperf, iperf, http) = (sys::free_port()?, sys::free_port()?, sys::free_port()?);
        let mut sp = Proc::spawn(
            "sockperf server",
            Some(cpus),
            "sockperf",
            &[
                "server",
                "--tcp",
                "-i",
                "127.0.0.1",
                "-p",
                &sockperf.to_string(),
            ]
            .map(String::from),
        )?;
        sp.wait_ports(&[sockperf], Duration::from_secs(5))?;
        let ip = iperf_server(cpus, iperf)?;
        let ng = http_server(cpus, http_workers, http, dir)?;
        let idle = IdleServer::start(cpus)?;
        Ok(Servers {
            sockperf,
            iperf,
            http,
            idle,
            _procs: vec![sp, ip, ng],
            cpus,
        })
    }

    /// Start a fresh iperf3 server on the same port: after a test that hung
    /// (its client killed at the time limit) the old one stays "busy running a
    /// test" and would fail the next row's test too.
    pub fn restart_iperf(&mut self) -> Result<()> {
        drop(self._procs.remove(1)); // stops it and frees the port
        self._procs.insert(1, iperf_server(self.cpus, self.iperf)?);
        Ok(())
    }

    /// CPU seconds of the backend servers (all their process groups).
    pub fn cpu_secs(&self) -> f64 {
        self._procs
            .iter()
            .map(|p| sys::group_cpu_secs(p.pid()))
            .sum::<f64>()
            + sys::group_cpu_secs(self.idle.child.id() as i32)
    }

    /// Backend ports in forward order.
    pub fn ports(&self) -> [u16; 4] {
        [self.sockperf, self.iperf, self.http, self.idle.port]
    }
}

fn iperf_server(cpus: &str, port: u16) -> Result<Proc> {
    let mut ip = Proc::spawn(
        "iperf3 server",
        Some(cpus),
        "iperf3",
        &["-s", "-B", "127.0.0.1", "-p", &port.to_string()].map(String::from),
    )?;
    // (iperf3 treats a bare connect as an aborted test and keeps serving.)
    ip.wait_ports(&[port], Duration::from_secs(5))?;
    Ok(ip)
}

/// nginx, `workers` worker processes, serving `/x` (3 bytes) with access log off.
fn http_server(cpus: &str, workers: u32, port: u16, dir: &Path) -> Result<Proc> {
    let prefix = dir.join("nginx-http");
    std::fs::create_dir_all(prefix.join("www"))?;
    std::fs::write(prefix.join("www/x"), "ok\n")?;
    let p = prefix.display();
    let c = format!(
        "worker_processes {workers};\nworker_rlimit_nofile 20000;\ndaemon off;\npid {p}/nginx.pid;\n\
         error_log {p}/error.log warn;\nevents {{ worker_connections 8192; }}\nhttp {{\n  access_log off;\n  \
         client_body_temp_path {p}/cb; proxy_temp_path {p}/pt; fastcgi_temp_path {p}/ft;\n  \
         uwsgi_temp_path {p}/ut; scgi_temp_path {p}/st;\n  \
         server {{ listen 127.0.0.1:{port} backlog=4096; root {p}/www; }}\n}}\n"
    );
    crate::peers::nginx::run("nginx http", cpus, &prefix, &c, &[port])
}

/// Our idle server in its own process (its 10,000 sockets need their own
/// RLIMIT_NOFILE budget): accepts and holds connections; on stdin `count` it
/// prints how many it holds, on `reset` it closes them all.
pub struct IdleServer {
    pub port: u16,
    pub(crate) child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl IdleServer {
    fn start(cpus: &str) -> Result<IdleServer> {
        let me = std::env::current_exe()?;
        let mut child = Command::new("taskset")
            .arg("-c")
            .arg(cpus)
            .arg(me)
            .arg("idle-server")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting idle server")?;
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut l = String::new();
        stdout.read_line(&mut l)?;
        let port = l.trim().parse().context("idle server port")?;
        Ok(IdleServer {
            port,
            child,
            stdin,
            stdout,
        })
    }

    fn ask(&mut self, cmd: &str) -> Result<usize> {
        writeln!(self.stdin, "{cmd}")?;
        let mut l = String::new();
        self.stdout.read_line(&mut l)?;
        Ok(l.trim().parse()?)
    }
    pub fn count(&mut self) -> Result<usize> {
        self.ask("count")
    }
    pub fn reset(&mut self) -> Result<usize> {
        self.ask("reset")
    }
}

impl Drop for IdleServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The idle server's own main (hidden subcommand `idle-server`).
pub fn idle_server_main() -> Result<()> {
    sys::raise_nofile();
    let l = TcpListener::bind("127.0.0.1:0")?;
    // std listens with a backlog of 128; widen it so a burst of connects through
    // a proxy is not dropped and retried after a second.
    // Safety: listen(2) on a socket we own, already listening: only the backlog changes.
    unsafe { libc::listen(l.as_raw_fd(), 4096) };
    println!("{}", l.local_addr()?.port());
    let held = Arc::new(Mutex::new(Vec::new()));
    let h2 = held.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            h2.lock().unwrap().push(s);
        }
    });
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        let n = match line.trim() {
            "reset" => {
                held.lock().unwrap().clear();
                0
            }
            _ => held.lock().unwrap().len(),
        };
        writeln!(out, "{n}")?;
        out.flush()?;
    }
    Ok(())
}
