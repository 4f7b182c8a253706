//! The peers on either side of an ambassador under test: upstream servers (echo, speak-first,
//! half-close; each on its own loopback listener, one thread per connection) and the client
//! checks that drive them through the forward (bulk both ways, speak-first both ways, half-close,
//! a connect storm). Every socket has a timeout, so a stalled forward is a failed check.

use crate::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Instant;
// Upstreams: each runs on its own loopback listener, one thread per connection.

#[derive(Clone, Copy)]
pub(crate) enum Upstream {
    /// Echo everything back; EOF → shut down our write side.
    Echo,
    /// Send `BANNER_LEN` bytes of stream `SEED_BANNER` before reading anything, then echo.
    SpeakFirst,
    /// Read the client's stream to EOF (verifying it), then answer `REPLY_LEN` bytes and close.
    HalfClose,
}

pub(crate) const SEED_BANNER: u64 = 0xB4;
pub(crate) const BANNER_LEN: usize = 4096;
pub(crate) const SEED_HALF_UP: u64 = 0x4A1F;
pub(crate) const HALF_UP_LEN: usize = 1 << 20;
pub(crate) const SEED_HALF_DOWN: u64 = 0xD0;
pub(crate) const REPLY_LEN: usize = 256 << 10;

pub(crate) fn serve(listen: &str, kind: Upstream) -> Res<()> {
    let l = ctx(TcpListener::bind(listen), "bind")?;
    serve_on(l, kind);
    Ok(())
}

pub(crate) fn serve_on(l: TcpListener, kind: Upstream) {
    for s in l.incoming().flatten() {
        thread::spawn(move || {
            let _ = handle_upstream(s, kind);
        });
    }
}

pub(crate) fn spawn_upstream(kind: Upstream) -> Res<SocketAddr> {
    let l = ctx(TcpListener::bind("127.0.0.1:0"), "bind upstream")?;
    let a = ctx(l.local_addr(), "local_addr")?;
    thread::spawn(move || serve_on(l, kind));
    Ok(a)
}

pub(crate) fn handle_upstream(mut s: TcpStream, kind: Upstream) -> Res<()> {
    s.set_read_timeout(Some(IO_TIMEOUT)).ok();
    s.set_write_timeout(Some(IO_TIMEOUT)).ok();
    match kind {
        Upstream::Echo | Upstream::SpeakFirst => {
            if let Upstream::SpeakFirst = kind {
                ctx(write_stream(&mut s, SEED_BANNER, BANNER_LEN), "banner")?;
            }
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = ctx(s.read(&mut buf), "echo read")?;
                if n == 0 {
                    let _ = s.shutdown(Shutdown::Write);
                    return Ok(());
                }
                ctx(s.write_all(&buf[..n]), "echo write")?;
            }
        }
        Upstream::HalfClose => {
            // The verdict travels back in the reply header: "ok\n" or "bad <why>\n".
            let verdict = match verify_stream(&mut s, SEED_HALF_UP, HALF_UP_LEN) {
                Ok(()) => match read_to_eof(&mut s) {
                    Ok(0) => "ok".to_string(),
                    Ok(n) => format!("bad {n} extra bytes before EOF"),
                    Err(e) => format!("bad no EOF from the client's half-close: {e}"),
                },
                Err(e) => format!("bad upstream read: {e}"),
            };
            let verdict = verdict.replace('\n', " ");
            ctx(
                s.write_all(format!("{verdict}\n").as_bytes()),
                "reply header",
            )?;
            ctx(write_stream(&mut s, SEED_HALF_DOWN, REPLY_LEN), "reply")?;
            let _ = s.shutdown(Shutdown::Write);
            Ok(())
        }
    }
}

// Client checks. Each returns Ok(detail) or Err(why).

pub(crate) fn connect(a: SocketAddr) -> Res<TcpStream> {
    let s = ctx(TcpStream::connect_timeout(&a, IO_TIMEOUT), "connect")?;
    s.set_read_timeout(Some(IO_TIMEOUT)).ok();
    s.set_write_timeout(Some(IO_TIMEOUT)).ok();
    Ok(s)
}

/// `n` pseudo-random bytes through an echo upstream, written by one thread while the other reads:
/// both directions carry the full stream at the same time, compared byte for byte.
pub(crate) fn check_bulk(a: SocketAddr, n: usize) -> Res<()> {
    let s = connect(a)?;
    let mut w = ctx(s.try_clone(), "clone")?;
    let t0 = Instant::now();
    let writer = thread::spawn(move || write_stream(&mut w, 0xB01C, n));
    let mut r = s;
    let v = verify_stream(&mut r, 0xB01C, n);
    let wr = writer.join().map_err(|_| "writer panicked".to_string())?;
    // The reader's verdict first: whether a wrong byte arrived before a reset.
    if let Err(e) = v {
        return Err(match wr {
            Err(w) => format!("{e}; write: {w}"),
            Ok(()) => e,
        });
    }
    ctx(wr, "write")?;
    let _ = r.shutdown(Shutdown::Write);
    match read_to_eof(&mut r) {
        Ok(0) => {}
        Ok(k) => return Err(format!("{k} extra bytes after the stream")),
        Err(e) => return Err(format!("no EOF after our half-close: {e}")),
    }
    println!("# bulk {n} bytes each way in {:?}", t0.elapsed());
    Ok(())
}

/// The upstream speaks first: its banner must arrive although the client has sent nothing.
pub(crate) fn check_speak_first_server(a: SocketAddr) -> Res<()> {
    let mut s = connect(a)?;
    verify_stream(&mut s, SEED_BANNER, BANNER_LEN).map_err(|e| format!("banner: {e}"))?;
    ctx(s.write_all(b"ping"), "write")?;
    let mut b = [0u8; 4];
    ctx(s.read_exact(&mut b), "echo after banner")?;
    if &b != b"ping" {
        return Err("wrong echo after banner".into());
    }
    Ok(())
}

/// The client speaks first, right after connect, before the proxy can have set anything up.
pub(crate) fn check_speak_first_client(a: SocketAddr) -> Res<()> {
    let mut s = connect(a)?;
    let mut w = ctx(s.try_clone(), "clone")?;
    ctx(write_stream(&mut w, 0x5F, 1000), "write")?;
    verify_stream(&mut s, 0x5F, 1000)?;
    // And a second message once everything is surely established.
    ctx(s.write_all(b"again"), "write")?;
    let mut b = [0u8; 5];
    ctx(s.read_exact(&mut b), "second echo")?;
    if &b != b"again" {
        return Err("wrong second echo".into());
    }
    Ok(())
}

/// Many short connections, each speaking first the instant it is connected (client side) or
/// being spoken to first (server side), 4 at a time: the race between bytes arriving and the
/// engine setting the connection up (for sockmap: insert + kick) gets many chances to lose data.
pub(crate) fn check_storm(echo: SocketAddr, first: SocketAddr, rounds: usize) -> Res<()> {
    const PARALLEL: usize = 4;
    let workers: Vec<_> = (0..PARALLEL)
        .map(|w| {
            thread::spawn(move || -> Res<()> {
                for i in 0..rounds.div_ceil(PARALLEL) {
                    let seed = (w * 1000 + i) as u64 + 7;
                    let mut s = connect(echo)?;
                    let mut wr = ctx(s.try_clone(), "clone")?;
                    ctx(write_stream(&mut wr, seed, 300), "write")?;
                    verify_stream(&mut s, seed, 300)
                        .map_err(|e| format!("client-first #{i}: {e}"))?;
                    let mut s = connect(first)?;
                    verify_stream(&mut s, SEED_BANNER, BANNER_LEN)
                        .map_err(|e| format!("server-first #{i}: {e}"))?;
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| "worker panicked".to_string())??;
    }
    Ok(())
}

/// Client sends 1 MiB then shuts down its write side; the upstream must see every byte then EOF,
/// and its reply (sent after our FIN) must still reach us, followed by EOF.
pub(crate) fn check_half_close(a: SocketAddr) -> Res<()> {
    let mut s = connect(a)?;
    ctx(write_stream(&mut s, SEED_HALF_UP, HALF_UP_LEN), "write")?;
    ctx(s.shutdown(Shutdown::Write), "shutdown")?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    ctx(r.read_line(&mut line), "reply header")?;
    let line = line.trim_end();
    if line != "ok" {
        return Err(format!(
            "upstream: {}",
            if line.is_empty() {
                "EOF, no reply"
            } else {
                line
            }
        ));
    }
    verify_stream(&mut r, SEED_HALF_DOWN, REPLY_LEN).map_err(|e| format!("reply: {e}"))?;
    match read_to_eof(&mut r) {
        Ok(0) => Ok(()),
        Ok(k) => Err(format!("{k} extra bytes after reply")),
        Err(e) => Err(format!("no EOF after reply: {e}")),
    }
}
