//! Copying a half in userspace while the connection leaves the kernel.
//!
//! A connection leaves the kernel when a half outran its destination
//! (`half.rs`, `Path::Leaving`): both sockets are taken out of `VERDICT`,
//! and the bytes already redirected must reach their destination before
//! the sockets can leave `PEERS` (unlinking a socket drops its psock and
//! every redirected byte still queued on it). Those bytes drain only as
//! fast as the destination peer reads. A peer that answers what it reads
//! (an echo, a database streaming results) reads only while its own writes
//! are taken — and its writes land in the *other* half's source socket,
//! which nobody read while leaving. Once the kernel buffers between them
//! were full, neither moved again: a deadlock whenever more bytes were in
//! flight than those buffers hold (seen on small guests, 9.6 MB in flight;
//! reproduced on the host with small `tcp_rmem`/`tcp_wmem`).
//!
//! So a half whose destination has already taken every redirected byte
//! (`Route::may_copy`) is copied on in userspace while the other drains.
//! The source is still in `PEERS`, where `recv()` goes through the sockmap
//! receive path; `splice(2)` reads the plain TCP queue directly
//! (`tcp_splice_read` → `tcp_read_sock`, which honours sequence offsets),
//! into a pipe and from the pipe into the destination. The pipe is the
//! only buffer: the connection leaves `PEERS` only once it is empty, so the
//! copy loop that carries on afterwards starts with nothing held.
//!
//! The books: bytes read here are consumed from the source without a
//! verdict, bytes written here are queued on the destination without a
//! redirect; the driver subtracts both from its conservation checks.

use nix::fcntl::{SpliceFFlags, splice};
use nix::unistd::pipe2;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

/// At most this much per half per tick (16 pipe-fulls): fair to the other
/// connections of this thread, and a tick is 2 ms while bytes move.
const PER_TICK: usize = 1 << 20;
/// One splice call at most (the default pipe capacity).
const CHUNK: usize = 64 * 1024;

/// Per half (client→server, server→client): its pipe and its books.
#[derive(Default)]
pub struct Copy {
    pipes: [Option<(OwnedFd, OwnedFd)>; 2],
    /// Bytes in each half's pipe: read from the source, not yet written.
    held: [u64; 2],
    /// Bytes read from each half's source.
    pub read: [u64; 2],
    /// Bytes written to each half's destination.
    pub written: [u64; 2],
    /// The source returned EOF: the copy loop passes the FIN on later
    /// (a TCP read after EOF returns EOF again).
    eof: [bool; 2],
}

impl Copy {
    /// Bytes held in pipes (the connection may not leave `PEERS` yet).
    pub fn held(&self) -> u64 {
        self.held[0] + self.held[1]
    }

    /// Where half `d`'s copy stopped (after a [`Copy::pump`] that moved
    /// less than it may per tick).
    pub fn state(&self, d: usize) -> super::rest::Copying {
        use super::rest::Copying;
        if self.held[d] > 0 {
            Copying::Held
        } else if self.eof[d] {
            Copying::Eof
        } else {
            Copying::Empty
        }
    }

    /// Move what can move now from `src` to `dst` for half `d`, without
    /// blocking. Returns the bytes written to `dst`.
    pub fn pump(&mut self, d: usize, src: &impl AsFd, dst: &impl AsFd) -> io::Result<u64> {
        if self.pipes[d].is_none() {
            self.pipes[d] = Some(pipe2(
                nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK,
            )?);
        }
        let (r, w) = self.pipes[d].as_ref().unwrap();
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        let start = self.written[d];
        while ((self.written[d] - start) as usize) < PER_TICK {
            if self.held[d] == 0 {
                if self.eof[d] {
                    break;
                }
                match splice(src, None, w, None, CHUNK, flags) {
                    Ok(0) => {
                        self.eof[d] = true;
                        break;
                    }
                    Ok(n) => {
                        self.held[d] += n as u64;
                        self.read[d] += n as u64;
                    }
                    Err(nix::errno::Errno::EAGAIN) => break,
                    Err(e) => return Err(e.into()),
                }
            }
            match splice(r, None, dst, None, self.held[d] as usize, flags) {
                Ok(0) => break,
                Ok(n) => {
                    self.held[d] -= n as u64;
                    self.written[d] += n as u64;
                }
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self.written[d] - start)
    }
}
