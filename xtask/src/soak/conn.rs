//! Both ends of one scripted connection, over blocking sockets with a 60 s
//! no-progress timeout on every read and write. Nothing here unwraps network
//! I/O: every failure becomes a [`Fail`] that names the direction and the
//! stream offset, and the caller counts it.

use super::script::{End, Script, pause_ms, write_size};
use super::stream::{ByteStream, Checker, Rng};
use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::thread;
use std::time::Duration;

/// No progress for this long on one read or write is a failure.
pub const IDLE: Duration = Duration::from_secs(60);
const BUF: usize = 256 * 1024;
/// The slow reader takes at most this much per millisecond.
const SLOW_READ: usize = 64 * 1024;

/// A direction of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// client → upstream
    Up,
    /// upstream → client
    Down,
}

impl fmt::Display for Dir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dir::Up => "client->upstream",
            Dir::Down => "upstream->client",
        })
    }
}

/// Why one side of a connection failed.
#[derive(Debug)]
pub enum Fail {
    /// A byte differs from the stream (or arrived past its end); `origin`:
    /// the stream offset the bytes that arrived there belong to, if found.
    Wrong {
        dir: Dir,
        offset: u64,
        origin: Option<u64>,
    },
    /// EOF or a reset before the expected end, with no reset scripted.
    Truncated {
        dir: Dir,
        at: u64,
        want: u64,
        how: String,
    },
    /// Anything else: a timeout, a refused connect, a bad header.
    Error(String),
}

impl Fail {
    /// Name the client's local port (the proxy logs it as `client=`), so a
    /// failure can be found in the proxy's log.
    pub fn with_port(self, port: u16) -> Fail {
        match self {
            Fail::Truncated { dir, at, want, how } => Fail::Truncated {
                dir,
                at,
                want,
                how: format!("{how} (client port {port})"),
            },
            Fail::Error(e) => Fail::Error(format!("{e} (client port {port})")),
            w => w,
        }
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fail::Wrong {
                dir,
                offset,
                origin,
            } => {
                write!(f, "WRONG BYTES {dir}: first mismatch at offset {offset}")?;
                match origin {
                    Some(o) => write!(
                        f,
                        " (the bytes there are the stream's from offset {o}: shift {})",
                        *o as i64 - *offset as i64
                    ),
                    None => write!(f, " (not found nearby in the stream)"),
                }
            }
            Fail::Truncated { dir, at, want, how } => {
                write!(f, "TRUNCATED {dir}: {how} at offset {at} of {want}")
            }
            Fail::Error(e) => write!(f, "ERROR {e}"),
        }
    }
}

/// How a side's script finished.
#[derive(Debug, PartialEq, Eq)]
pub enum Done {
    Clean,
    /// The scripted client reset happened (and, upstream, was seen as a
    /// reset or EOF after only correct bytes).
    Reset,
}

/// Verified bytes moved, shared by every connection of a run.
#[derive(Default)]
pub struct Moved {
    pub up: AtomicU64,
    pub down: AtomicU64,
}

impl Moved {
    pub fn total(&self) -> u64 {
        self.up.load(Relaxed) + self.down.load(Relaxed)
    }
    fn of(&self, dir: Dir) -> &AtomicU64 {
        match dir {
            Dir::Up => &self.up,
            Dir::Down => &self.down,
        }
    }
}

fn is_cut(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset
            | ErrorKind::BrokenPipe
            | ErrorKind::ConnectionAborted
            | ErrorKind::UnexpectedEof
    )
}

/// Classify an I/O error at offset `at` of a `want`-byte stretch.
fn io_fail(dir: Dir, at: u64, want: u64, e: io::Error) -> Fail {
    match e.kind() {
        _ if is_cut(&e) => Fail::Truncated {
            dir,
            at,
            want,
            how: e.to_string(),
        },
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Fail::Error(format!(
            "{dir}: no progress for {}s at offset {at} of {want}",
            IDLE.as_secs()
        )),
        _ => Fail::Error(format!("{dir}: {e} at offset {at} of {want}")),
    }
}

fn read_some(mut s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// The sending end of one direction.
struct Tx {
    dir: Dir,
    bytes: ByteStream,
    rng: Rng,
    buf: Vec<u8>,
}

impl Tx {
    /// Send the next `n` bytes: one write per call for turns, uneven writes
    /// with occasional pauses for bulk.
    fn send(&mut self, mut s: &TcpStream, n: u64, uneven: bool) -> Result<(), Fail> {
        let end = self.bytes.pos + n;
        while self.bytes.pos < end {
            let size = if uneven {
                write_size(&mut self.rng)
            } else {
                BUF
            };
            let size = size.min((end - self.bytes.pos) as usize);
            let at = self.bytes.pos;
            self.bytes.fill(&mut self.buf[..size]);
            s.write_all(&self.buf[..size])
                .map_err(|e| io_fail(self.dir, at, end, e))?;
            if let Some(ms) = uneven.then(|| pause_ms(&mut self.rng)).flatten() {
                // The traffic pattern (a scripted pause), not a synchronisation.
                thread::sleep(Duration::from_millis(ms));
            }
        }
        Ok(())
    }
}

/// The receiving end of one direction: checks every byte as it arrives.
struct Rx<'m> {
    dir: Dir,
    check: Checker,
    buf: Vec<u8>,
    moved: &'m AtomicU64,
}

impl Rx<'_> {
    /// Take `got` fresh bytes, which must not run past `end`.
    fn take(&mut self, got: usize, end: u64) -> Result<(), Fail> {
        let pos = self.check.pos();
        let ok = (got as u64).min(end.saturating_sub(pos)) as usize;
        let dir = self.dir;
        self.check
            .check(&self.buf[..ok])
            .map_err(|(offset, origin)| Fail::Wrong {
                dir,
                offset,
                origin,
            })?;
        self.moved.fetch_add(ok as u64, Relaxed);
        if ok < got {
            // Bytes past the end the script allows: wrong by definition.
            return Err(Fail::Wrong {
                dir,
                offset: end,
                origin: None,
            });
        }
        Ok(())
    }

    /// Receive exactly the next `n` bytes; `slow` reads at most 64 KiB per ms.
    fn recv(&mut self, s: &TcpStream, n: u64, slow: bool) -> Result<(), Fail> {
        let end = self.check.pos() + n;
        let cap = if slow { SLOW_READ } else { BUF };
        while self.check.pos() < end {
            let pos = self.check.pos();
            let room = cap.min((end - pos) as usize);
            let got =
                read_some(s, &mut self.buf[..room]).map_err(|e| io_fail(self.dir, pos, end, e))?;
            if got == 0 {
                return Err(Fail::Truncated {
                    dir: self.dir,
                    at: pos,
                    want: end,
                    how: "EOF".into(),
                });
            }
            self.take(got, end)?;
            if slow {
                // The traffic pattern: a slow reader, so the sender meets backpressure.
                thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }

    /// The stream must end here: EOF next, any byte is a wrong one.
    fn recv_eof(&mut self, s: &TcpStream) -> Result<(), Fail> {
        let pos = self.check.pos();
        match read_some(s, &mut self.buf[..BUF]) {
            Ok(0) => Ok(()),
            Ok(got) => self.take(got, pos),
            Err(e) => Err(io_fail(self.dir, pos, pos, e)),
        }
    }

    /// The scripted reset's tail: correct bytes, at most `max`, then EOF or
    /// a reset.
    fn recv_until_cut(&mut self, s: &TcpStream, max: u64) -> Result<(), Fail> {
        let end = self.check.pos() + max;
        loop {
            let pos = self.check.pos();
            match read_some(s, &mut self.buf[..BUF]) {
                Ok(0) => return Ok(()),
                Ok(got) => self.take(got, end)?,
                Err(e) if is_cut(&e) => return Ok(()),
                Err(e) => return Err(io_fail(self.dir, pos, end, e)),
            }
        }
    }
}

/// One side of a connection: what it sends and what it checks.
struct Peer<'m> {
    tx: Tx,
    rx: Rx<'m>,
}

impl<'m> Peer<'m> {
    fn new(sc: &Script, client: bool, moved: &'m Moved) -> Peer<'m> {
        let (out, inn) = if client {
            (Dir::Up, Dir::Down)
        } else {
            (Dir::Down, Dir::Up)
        };
        let seed = |d| match d {
            Dir::Up => sc.up_seed(),
            Dir::Down => sc.down_seed(),
        };
        Peer {
            tx: Tx {
                dir: out,
                bytes: ByteStream::new(seed(out)),
                rng: Rng::new(seed(out) ^ 0x7772_6974),
                buf: vec![0; BUF],
            },
            rx: Rx {
                dir: inn,
                check: Checker::new(seed(inn)),
                buf: vec![0; BUF],
                moved: moved.of(inn),
            },
        }
    }

    /// Send `send` and receive `recv` bytes at once (a writer thread sends).
    /// A receive failure shuts the socket so that the writer stops too.
    fn both_ways(&mut self, s: &TcpStream, send: u64, recv: u64) -> Result<(), Fail> {
        let (tx, rx) = (&mut self.tx, &mut self.rx);
        thread::scope(|sc| {
            let w = sc.spawn(move || tx.send(s, send, true));
            let r = rx.recv(s, recv, false);
            if r.is_err() {
                let _ = s.shutdown(Shutdown::Both);
            }
            let wr = w
                .join()
                .unwrap_or_else(|_| Err(Fail::Error("bulk writer panicked".into())));
            r.and(wr)
        })
    }
}

/// Prepare a connected socket: no Nagle, the no-progress timeouts.
pub fn tune(s: &TcpStream) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IDLE))?;
    s.set_write_timeout(Some(IDLE))
}

/// SO_LINGER 0, so that closing sends a reset.
fn set_linger_zero(s: &TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a properly sized linger struct.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The client's script; the caller drops `s` afterwards (a reset with
/// SO_LINGER 0 when the script ends in one).
pub fn client(mut s: &TcpStream, sc: &Script, moved: &Moved) -> Result<Done, Fail> {
    let mut p = Peer::new(sc, true, moved);
    s.write_all(&sc.header())
        .map_err(|e| io_fail(Dir::Up, 0, 16, e))?;
    for &(req, resp) in &sc.turns_before {
        p.tx.send(s, req, false)?;
        p.rx.recv(s, resp, false)?;
    }
    p.both_ways(s, sc.bulk_up, sc.bulk_down)?;
    for &(req, resp) in &sc.turns_after {
        p.tx.send(s, req, false)?;
        p.rx.recv(s, resp, false)?;
    }
    client_end(s, &mut p, sc.end)
}

fn shut_write(s: &TcpStream, dir: Dir) -> Result<(), Fail> {
    s.shutdown(Shutdown::Write)
        .map_err(|e| Fail::Error(format!("{dir}: shutdown(Write): {e}")))
}

fn client_end(s: &TcpStream, p: &mut Peer, end: End) -> Result<Done, Fail> {
    match end {
        End::ClientHalfClose { reply } => {
            shut_write(s, Dir::Up)?;
            p.rx.recv(s, reply, false)?;
            p.rx.recv_eof(s)?;
        }
        End::ServerHalfClose { reply } => {
            p.rx.recv_eof(s)?;
            p.tx.send(s, reply, true)?;
            shut_write(s, Dir::Up)?;
        }
        End::ClientReset { cut, .. } => {
            p.tx.send(s, cut, true)?;
            set_linger_zero(s).map_err(|e| Fail::Error(format!("SO_LINGER: {e}")))?;
            return Ok(Done::Reset);
        }
        End::SlowReader { client_reads, len } => {
            if client_reads {
                p.rx.recv(s, len, true)?;
            } else {
                p.tx.send(s, len, true)?;
            }
            shut_write(s, Dir::Up)?;
            p.rx.recv_eof(s)?;
        }
    }
    Ok(Done::Clean)
}

/// Read the 16-byte header; the seed in it names the script.
pub fn read_header(mut s: &TcpStream) -> Result<Script, Fail> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h)
        .map_err(|e| io_fail(Dir::Up, 0, 16, e))?;
    Script::from_header(&h).ok_or(Fail::Wrong {
        dir: Dir::Up,
        offset: 0,
        origin: None,
    })
}

/// The upstream's script for a connection whose header was `sc`.
pub fn upstream(s: &TcpStream, sc: &Script, moved: &Moved) -> Result<Done, Fail> {
    let mut p = Peer::new(sc, false, moved);
    for &(req, resp) in &sc.turns_before {
        p.rx.recv(s, req, false)?;
        p.tx.send(s, resp, false)?;
    }
    p.both_ways(s, sc.bulk_down, sc.bulk_up)?;
    for &(req, resp) in &sc.turns_after {
        p.rx.recv(s, req, false)?;
        p.tx.send(s, resp, false)?;
    }
    upstream_end(s, &mut p, sc.end)
}

fn upstream_end(s: &TcpStream, p: &mut Peer, end: End) -> Result<Done, Fail> {
    match end {
        End::ClientHalfClose { reply } => {
            p.rx.recv_eof(s)?;
            p.tx.send(s, reply, true)?;
            shut_write(s, Dir::Down)?;
        }
        End::ServerHalfClose { reply } => {
            shut_write(s, Dir::Down)?;
            p.rx.recv(s, reply, false)?;
            p.rx.recv_eof(s)?;
        }
        End::ClientReset { tail, cut } => {
            upstream_reset(s, p, tail, cut)?;
            return Ok(Done::Reset);
        }
        End::SlowReader { client_reads, len } => {
            if client_reads {
                p.tx.send(s, len, true)?;
            } else {
                p.rx.recv(s, len, true)?;
            }
            p.rx.recv_eof(s)?;
            shut_write(s, Dir::Down)?;
        }
    }
    Ok(Done::Clean)
}

/// The client resets mid-stream: send our tail meanwhile (a reset on it is
/// expected), and see only correct bytes, at most `cut`, then EOF or a reset.
fn upstream_reset(s: &TcpStream, p: &mut Peer, tail: u64, cut: u64) -> Result<(), Fail> {
    let (tx, rx) = (&mut p.tx, &mut p.rx);
    thread::scope(|sc| {
        let w = sc.spawn(move || match tx.send(s, tail, true) {
            Err(Fail::Truncated { .. }) => Ok(()),
            r => r,
        });
        let r = rx.recv_until_cut(s, cut);
        let _ = s.shutdown(Shutdown::Both);
        let wr = w
            .join()
            .unwrap_or_else(|_| Err(Fail::Error("tail writer panicked".into())));
        r.and(wr)
    })
}
