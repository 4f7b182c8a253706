//! A real redis-server for tests: started on a free loopback port, with no
//! persistence, killed on drop; plus tiny raw-RESP helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Redis {
    pub child: Option<Child>,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_on(crate::support::free_port())
    }

    /// Start on `port` (e.g. again, after [`Redis::kill`]).
    pub fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        assert!(
            crate::support::wait_until(10, || TcpStream::connect(("127.0.0.1", port)).is_ok()),
            "redis did not start"
        );
        Redis {
            child: Some(child),
            port,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kill it and wait until its port refuses connections.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert!(
            crate::support::wait_until(10, || TcpStream::connect(("127.0.0.1", self.port))
                .is_err()),
            "redis still answers"
        );
    }

    /// `INFO <section>` field `key`, asked directly (not through a proxy).
    pub fn info(&self, section: &str, key: &str) -> u64 {
        let mut c = connect(&self.addr());
        let reply = command(&mut c, &["INFO", section]);
        let pat = format!("{key}:");
        reply
            .lines()
            .find_map(|l| l.strip_prefix(&pat))
            .unwrap_or_else(|| panic!("{key} in {reply}"))
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn connect(addr: &str) -> TcpStream {
    let c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

/// Send one command as RESP; return the reply (simple string, error,
/// integer or bulk string) as text. Panics on an I/O error.
pub fn command(c: &mut TcpStream, args: &[&str]) -> String {
    try_command(c, args).unwrap()
}

/// [`command`], with I/O errors returned; a closed connection is an
/// `UnexpectedEof` error.
pub fn try_command(c: &mut TcpStream, args: &[&str]) -> std::io::Result<String> {
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    c.write_all(req.as_bytes())?;
    let mut r = BufReader::new(c);
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    match line.as_bytes().first() {
        Some(b'$') => {
            let n: i64 = line[1..].trim().parse().unwrap();
            if n < 0 {
                return Ok(String::new());
            }
            let mut buf = vec![0u8; n as usize + 2];
            r.read_exact(&mut buf)?;
            buf.truncate(n as usize);
            Ok(String::from_utf8(buf).unwrap())
        }
        _ => Ok(line.trim_end().to_string()),
    }
}

/// The port of the redis-server at the other end of `c` (through any
/// proxies): which backend a client reached.
pub fn server_port(c: &mut TcpStream) -> u16 {
    let reply = command(c, &["INFO", "server"]);
    reply
        .lines()
        .find_map(|l| l.strip_prefix("tcp_port:"))
        .unwrap_or_else(|| panic!("tcp_port in {reply}"))
        .trim()
        .parse()
        .unwrap()
}
