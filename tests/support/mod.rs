//! Test support: start the real `ambassador` binary, pick ports, make and
//! check deterministic byte streams, and run small real servers in threads.
//! Everything talks to loopback only and every wait is bounded.
#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ambassador");

/// A free TCP port on 127.0.0.1 (bound and released; the tiny race is fine here).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running ambassador. Killed on drop; its log is kept for assertions.
pub struct Proxy {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    pub port: u16,
}

impl Proxy {
    /// `ambassador --mode <mode> --forward 127.0.0.1:<port>=<target> <extra>`, waiting for `ready`.
    pub fn forward(mode: &str, target: &str, extra: &[&str]) -> Proxy {
        let port = free_port();
        let fwd = format!("127.0.0.1:{port}={target}");
        // `sockmap` splices every connection; `sockmap_adaptive` is the
        // default policy (userspace first, spliced once request/response).
        let mut args = match mode {
            "sockmap" => vec!["--mode", "sockmap", "--splice", "always"],
            "sockmap_adaptive" => vec!["--mode", "sockmap", "--splice", "adaptive"],
            _ => vec!["--mode", mode],
        };
        args.extend(["--forward", fwd.as_str()]);
        args.extend_from_slice(extra);
        let mut cmd = Command::new(BIN);
        cmd.args(&args).env_clear();
        if mode == "sockmap_adaptive" {
            // Promote at the first quiet point instead of after 4 round
            // trips, so most of these tests run through a promotion.
            cmd.env("AMBASSADOR_SOCKMAP_PROMOTE_TURNS", "0");
        }
        Proxy::spawn(cmd, port).expect("proxy did not become ready")
    }

    /// Spawn `cmd` (stderr captured) and wait up to 10 s for the `ready` line.
    /// Err carries the log if the process exited first.
    pub fn spawn(mut cmd: Command, port: u16) -> Result<Proxy, (Option<i32>, String)> {
        cmd.env(
            "RUST_LOG",
            std::env::var("AMB_TEST_LOG").unwrap_or("debug".into()),
        );
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ambassador");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let log2 = log.clone();
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(" ready ") || line.contains("\"ready\"") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(()) => Ok(Proxy { child, log, port }),
            Err(_) => {
                let code = match child.try_wait() {
                    Ok(Some(st)) => st.code(),
                    _ => {
                        let _ = child.kill();
                        child.wait().ok().and_then(|s| s.code())
                    }
                };
                thread::sleep(Duration::from_millis(100));
                let l = log.lock().unwrap().clone();
                Err((code, l))
            }
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr()).expect("connect to proxy");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Wait for the log to contain `needle` (up to `secs`).
    pub fn wait_log(&self, needle: &str, secs: u64) -> bool {
        wait_until(secs, || self.log().contains(needle))
    }

    /// How many times `needle` occurs in the log.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Open file descriptors of the process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// A `Status:`-style line of /proc/<pid>/status, e.g. `CapEff`.
    pub fn status_field(&self, field: &str) -> Option<String> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        s.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .map(|v| v.trim().to_string())
    }

    /// Wait for exit (up to `secs`), returning the exit code.
    pub fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(secs) {
            if let Ok(Some(st)) = self.child.try_wait() {
                thread::sleep(Duration::from_millis(50)); // let the log reader finish
                return st.code();
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The last `stats` line's value for `key` (after SIGUSR1 or exit).
    pub fn stat(&self, key: &str) -> Option<u64> {
        self.stat_for("", key)
    }

    /// The last `stats` line of the forward whose source is `forward` (any,
    /// if empty): its value for `key`.
    pub fn stat_for(&self, forward: &str, key: &str) -> Option<u64> {
        let log = self.log();
        let want = format!(" forward={forward} ");
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains(" stats ") && (forward.is_empty() || l.contains(&want)))?;
        let pat = format!(" {key}=");
        let rest = &line[line.find(&pat)? + pat.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A deterministic pseudo-random byte stream (xorshift64), so both ends can
/// generate and check gigabytes without storing them.
pub struct Stream(u64, [u8; 8], usize);

impl Stream {
    pub fn new(seed: u64) -> Self {
        Stream(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, [0; 8], 8)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.2 == 8 {
                let x = &mut self.0;
                *x ^= *x << 13;
                *x ^= *x >> 7;
                *x ^= *x << 17;
                self.1 = x.to_le_bytes();
                self.2 = 0;
            }
            *b = self.1[self.2];
            self.2 += 1;
        }
    }

    pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        Stream::new(seed).fill(&mut v);
        v
    }
}

/// Write `n` bytes of stream `seed` to `w`.
pub fn send_stream(w: &mut impl Write, seed: u64, n: u64) -> io::Result<()> {
    let mut s = Stream::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        s.fill(&mut buf[..k]);
        w.write_all(&buf[..k])?;
        left -= k as u64;
    }
    Ok(())
}

/// Read from `r` until EOF and check it is exactly `n` bytes of stream `seed`.
/// Returns the number of bytes that matched before the first difference.
pub fn check_stream(r: &mut impl Read, seed: u64, n: u64) -> Result<u64, String> {
    let mut s = Stream::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut want = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) => return Err(format!("read error after {got} bytes: {e}")),
        };
        if got + k as u64 > n {
            return Err(format!("more than {n} bytes received"));
        }
        s.fill(&mut want[..k]);
        if buf[..k] != want[..k] {
            let i = buf[..k]
                .iter()
                .zip(&want[..k])
                .position(|(a, b)| a != b)
                .unwrap();
            return Err(format!("byte {} differs", got + i as u64));
        }
        got += k as u64;
    }
    if got != n {
        return Err(format!("EOF after {got} of {n} bytes"));
    }
    Ok(got)
}

/// A threaded server on 127.0.0.1: `handler` runs for each accepted
/// connection on its own thread. Returns the port and a count of accepts.
pub fn serve<F>(handler: F) -> (u16, Arc<std::sync::atomic::AtomicUsize>)
where
    F: Fn(TcpStream) + Send + Sync + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acc = accepted.clone();
    let handler = Arc::new(handler);
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            acc.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let h = handler.clone();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            thread::spawn(move || h(s));
        }
    });
    (port, accepted)
}

/// An echo server: returns everything, then closes when the client does.
pub fn echo_server() -> u16 {
    serve(|mut s| {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = s.shutdown(Shutdown::Write);
    })
    .0
}

/// Close with RST instead of FIN.
pub fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

/// Engines whose start-up works on this machine, for per-engine tests.
pub fn engine_available(mode: &str) -> bool {
    let port = free_port();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--mode",
        mode,
        "--forward",
        &format!("127.0.0.1:{port}=127.0.0.1:9"),
    ]);
    match Proxy::spawn(cmd, port) {
        Ok(_) => true,
        Err((_, log)) => {
            eprintln!("engine {mode} unavailable: {log}");
            false
        }
    }
}

/// Restrict a child before exec: drop every capability and/or make
/// io_uring_setup fail with EPERM through a seccomp filter, the way Docker's
/// default profile does. Only the child is affected; no global sysctl.
pub fn restrict(cmd: &mut Command, drop_caps: bool, deny_io_uring: bool) {
    use std::os::unix::process::CommandExt;
    unsafe {
        cmd.pre_exec(move || {
            if drop_caps {
                // As root, exec gives the full set back unless SECBIT_NOROOT
                // is set, which needs CAP_SETPCAP: set (and lock) it first,
                // then empty every set.
                const SECBIT_NOROOT: libc::c_ulong = 1;
                const SECBIT_NOROOT_LOCKED: libc::c_ulong = 2;
                if libc::prctl(
                    libc::PR_SET_SECUREBITS,
                    SECBIT_NOROOT | SECBIT_NOROOT_LOCKED,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                #[repr(C)]
                struct Header {
                    version: u32,
                    pid: i32,
                }
                let mut h = Header {
                    version: 0x2008_0522,
                    pid: 0,
                };
                let data = [0u32; 6];
                if libc::syscall(libc::SYS_capset, &mut h, data.as_ptr()) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if deny_io_uring {
                #[repr(C)]
                struct Filter {
                    code: u16,
                    jt: u8,
                    jf: u8,
                    k: u32,
                }
                #[repr(C)]
                struct Prog {
                    len: u16,
                    filter: *const Filter,
                }
                const SYS_IO_URING_SETUP: u32 = 425;
                let f = [
                    Filter {
                        code: 0x20,
                        jt: 0,
                        jf: 0,
                        k: 0,
                    }, // ld [nr]
                    Filter {
                        code: 0x15,
                        jt: 0,
                        jf: 1,
                        k: SYS_IO_URING_SETUP,
                    }, // jeq
                    Filter {
                        code: 0x06,
                        jt: 0,
                        jf: 0,
                        k: 0x0005_0000 | libc::EPERM as u32,
                    }, // errno
                    Filter {
                        code: 0x06,
                        jt: 0,
                        jf: 0,
                        k: 0x7fff_0000,
                    }, // allow
                ];
                let prog = Prog {
                    len: f.len() as u16,
                    filter: f.as_ptr(),
                };
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::prctl(libc::PR_SET_SECCOMP, 2, &prog as *const Prog) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Poll `cond` every 20 ms for up to `secs` seconds (and once more at the
/// end): whether it became true. Every wait in the tests is one of these.
pub fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    cond()
}
