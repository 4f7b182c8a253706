//! A TCP proxy in front of a gRPC server that cuts a connection at an exact point of the
//! conversation: just before the client's `n`-th request reaches the server.
//!
//! Some failures live in a window between two calls, e.g. etcd dying after a client's first
//! read and before its watch. Killing the real server "at the right moment" is a race the test
//! would usually lose. A proxy that understands just enough HTTP/2 makes the window certain:
//! gRPC sends each call as a new HTTP/2 stream, opened by a HEADERS frame, so counting the
//! client's new stream ids tells which call is starting. The proxy relays every byte until the
//! frame that opens stream number `n`, then closes both sides without passing it on: call
//! `n - 1` got its whole answer, call `n` never reaches the server.
//!
//! Only the first connection is cut; later ones (the client reconnecting) are relayed whole, so
//! a test also sees the client recover. Plain HTTP/2 only (no TLS: the frames must be visible).
//!
//! Frame layout (RFC 9113 §4.1): a 9-byte header, 24-bit payload length, 8-bit type, 8-bit
//! flags, 31-bit stream id, then the payload. The client's first bytes are the 24-byte preface.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

/// The client connection preface, `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_LEN: usize = 24;
/// HTTP/2 frame type HEADERS: opens a stream (a new gRPC call) when its id is new.
const HEADERS: u8 = 0x1;

/// The running proxy; stops accepting when dropped (live relays end with their sockets).
pub struct GrpcCut {
    /// The proxy's port on 127.0.0.1.
    pub port: u16,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl GrpcCut {
    /// Relay `127.0.0.1:<port>` to `upstream`; cut the first connection just before the frame
    /// that opens the client's `nth` stream (1 = its first call).
    pub fn start(upstream: SocketAddr, nth: usize) -> io::Result<GrpcCut> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        let (cut, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (cut2, stop2) = (cut.clone(), stop.clone());
        thread::spawn(move || {
            let mut first = true;
            for c in l.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = c else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let cut_at = first.then_some(nth);
                first = false;
                let cut = cut2.clone();
                thread::spawn(move || relay(client, server, cut_at, &cut));
            }
        });
        Ok(GrpcCut { port, cut, stop })
    }

    /// Whether the cut has happened.
    pub fn cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

impl Drop for GrpcCut {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Server to client as is; client to server frame by frame, cut before stream `cut_at` opens.
fn relay(client: TcpStream, server: TcpStream, cut_at: Option<usize>, cut: &AtomicBool) {
    let (Ok(mut c_read), Ok(mut s_write)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let (mut s_read, mut c_write) = (server, client);
    let back = thread::spawn(move || {
        let _ = io::copy(&mut s_read, &mut c_write);
        let _ = c_write.shutdown(Shutdown::Both);
    });
    let result = match cut_at {
        None => io::copy(&mut c_read, &mut s_write).map(|_| false),
        Some(n) => frames_until(&mut c_read, &mut s_write, n),
    };
    if matches!(result, Ok(true)) {
        cut.store(true, Ordering::SeqCst);
    }
    let _ = c_read.shutdown(Shutdown::Both);
    let _ = s_write.shutdown(Shutdown::Both);
    let _ = back.join();
}

/// Copy the preface and whole frames from `from` to `to` until the HEADERS frame that opens
/// the `n`-th stream, which is not copied. Ok(true): stopped there; Ok(false): the client
/// closed first.
fn frames_until(from: &mut impl Read, to: &mut impl Write, n: usize) -> io::Result<bool> {
    let mut preface = [0u8; PREFACE_LEN];
    if !read_all(from, &mut preface)? {
        return Ok(false);
    }
    to.write_all(&preface)?;
    let mut opened = Vec::new();
    let mut head = [0u8; 9];
    let mut payload = Vec::new();
    loop {
        if !read_all(from, &mut head)? {
            return Ok(false);
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if head[3] == HEADERS && !opened.contains(&stream) {
            opened.push(stream);
            if opened.len() == n {
                return Ok(true);
            }
        }
        payload.resize(len, 0);
        if !read_all(from, &mut payload)? {
            return Ok(false);
        }
        to.write_all(&head)?;
        to.write_all(&payload)?;
    }
}

/// Fill `buf`; Ok(false) if the stream ended first.
fn read_all(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, 0];
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    #[test]
    fn stops_before_the_nth_new_stream() {
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let settings = frame(0x4, 0, b"");
        let call1 = [frame(HEADERS, 1, b"h1"), frame(0x0, 1, b"data")].concat();
        // A second HEADERS frame on stream 1 (trailers) does not count as a new call.
        let trailers = frame(HEADERS, 1, b"t");
        input.extend(&settings);
        input.extend(&call1);
        input.extend(&trailers);
        input.extend(frame(HEADERS, 3, b"h3"));
        input.extend(frame(0x0, 3, b"never"));
        let mut out = Vec::new();
        assert!(frames_until(&mut &input[..], &mut out, 2).unwrap());
        let want = [&input[..PREFACE_LEN], &settings, &call1, &trailers].concat();
        assert_eq!(out, want);
        // A client that closes before: not a cut.
        let mut out = Vec::new();
        assert!(!frames_until(&mut &input[..PREFACE_LEN + 9], &mut out, 2).unwrap());
    }
}
