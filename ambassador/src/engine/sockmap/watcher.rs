//! The watcher thread of the sockmap engine: one `epoll_wait` over every
//! spliced socket, registered for `EPOLLRDHUP` only (ERR and HUP are
//! implicit) and edge-triggered, so it wakes at a connection's edges and
//! never for the bytes the kernel moves. It also drains the `EVENTS` ring
//! buffer, whose records name a socket whose verdict just started passing
//! bytes (its backstop budget ran out) or that moved again after resting
//! (`rest.rs`), and wakes that connection's task at once. While a
//! connection waits on a stall (`rest.rs`), its driver adds `EPOLLIN` or
//! `EPOLLOUT` to a socket's registration for the wait, and takes it off
//! again after.

use aya::maps::{MapData, RingBuf};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use std::collections::HashMap;
use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Extra bit in `Slot::events`: the kernel program pushed this socket's
/// cookie to `EVENTS` (it started passing bytes, or a resting connection
/// moved past its wake mark).
pub const EV_KERNEL: u32 = 1 << 31;
/// epoll token of the `EVENTS` ring buffer.
const RING_TOKEN: u64 = u64::MAX;

/// Events seen for one connection: [client, upstream] epoll bits, and a
/// wake-up for its relay task.
pub struct Slot {
    pub events: [AtomicU32; 2],
    pub notify: Notify,
}

/// A thread blocked in `epoll_wait` on every spliced socket, registered for
/// `EPOLLRDHUP` (ERR and HUP are implicit) and edge-triggered, so it wakes
/// only at a connection's edges, never for the bytes the kernel moves.
/// It also owns the `EVENTS` ring buffer and wakes the connection whose
/// socket just started passing bytes (see `ambassador_common::DirCtrl`).
pub struct Watcher {
    epoll: Arc<Epoll>,
    slots: Arc<Mutex<Slots>>,
    stop: Arc<AtomicBool>,
}

#[derive(Default)]
struct Slots {
    by_token: HashMap<u64, Arc<Slot>>,
    /// cookie -> (token, side)
    by_cookie: HashMap<u64, (u64, usize)>,
}

impl Watcher {
    pub fn start(mut ring: RingBuf<MapData>) -> io::Result<Self> {
        let epoll = Arc::new(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?);
        epoll.add(&ring, EpollEvent::new(EpollFlags::EPOLLIN, RING_TOKEN))?;
        let slots: Arc<Mutex<Slots>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (e, s, st) = (epoll.clone(), slots.clone(), stop.clone());
        std::thread::Builder::new()
            .name("sockmap-watch".into())
            .spawn(move || {
                let mut evs = vec![EpollEvent::empty(); 256];
                while !st.load(Ordering::Relaxed) {
                    // An error (EINTR) is no event; the loop looks at `stop` and waits again.
                    let n = e.wait(&mut evs, 200u16).unwrap_or(0);
                    for ev in evs.iter().take(n) {
                        let slots = s.lock().unwrap();
                        let wake = |token: u64, side: usize, bits: u32| {
                            if let Some(slot) = slots.by_token.get(&token) {
                                slot.events[side].fetch_or(bits, Ordering::AcqRel);
                                slot.notify.notify_one();
                            }
                        };
                        if ev.data() != RING_TOKEN {
                            wake(
                                ev.data() >> 1,
                                (ev.data() & 1) as usize,
                                ev.events().bits() as u32,
                            );
                            continue;
                        }
                        while let Some(item) = ring.next() {
                            let Ok(b) = <[u8; 8]>::try_from(&item[..]) else {
                                continue;
                            };
                            if let Some(&(token, side)) =
                                slots.by_cookie.get(&u64::from_ne_bytes(b))
                            {
                                wake(token, side, EV_KERNEL);
                            }
                        }
                    }
                }
            })?;
        Ok(Watcher { epoll, slots, stop })
    }

    pub fn add(&self, token: u64, fds: [RawFd; 2], cookies: [u64; 2]) -> io::Result<Arc<Slot>> {
        let slot = Arc::new(Slot {
            events: [AtomicU32::new(0), AtomicU32::new(0)],
            notify: Notify::new(),
        });
        {
            let mut slots = self.slots.lock().unwrap();
            slots.by_token.insert(token, slot.clone());
            slots.by_cookie.insert(cookies[0], (token, 0));
            slots.by_cookie.insert(cookies[1], (token, 1));
        }
        for (side, fd) in fds.iter().enumerate() {
            let ev = EpollEvent::new(
                EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET,
                (token << 1) | side as u64,
            );
            // Safety: the caller's connection owns `fds` and outlives its watch.
            if let Err(e) = self.epoll.add(unsafe { BorrowedFd::borrow_raw(*fd) }, ev) {
                self.remove(token, fds, cookies);
                return Err(e.into());
            }
        }
        Ok(slot)
    }

    /// Watch socket `side` of connection `token` for `events` (edge
    /// triggered; ERR and HUP are implicit): `EPOLLRDHUP` until it was
    /// seen, plus `EPOLLIN` or `EPOLLOUT` during a stall (see `rest.rs`).
    /// Changing the registration polls the socket: every event in
    /// `events` that is true already is reported at once (so an RDHUP
    /// already seen must be left out, or it comes back on every change).
    pub fn interest(
        &self,
        token: u64,
        side: usize,
        fd: RawFd,
        events: EpollFlags,
    ) -> io::Result<()> {
        let mut ev = EpollEvent::new(events | EpollFlags::EPOLLET, (token << 1) | side as u64);
        // Safety: the caller's connection owns `fd` and outlives its watch.
        self.epoll
            .modify(unsafe { BorrowedFd::borrow_raw(fd) }, &mut ev)
            .map_err(io::Error::from)
    }

    pub fn remove(&self, token: u64, fds: [RawFd; 2], cookies: [u64; 2]) {
        for fd in fds {
            // Not registered (a failed `add`): ENOENT, ignored.
            // Safety: the caller's connection owns `fds` and outlives its watch.
            let _ = self.epoll.delete(unsafe { BorrowedFd::borrow_raw(fd) });
        }
        let mut slots = self.slots.lock().unwrap();
        slots.by_token.remove(&token);
        for c in cookies {
            slots.by_cookie.remove(&c);
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
