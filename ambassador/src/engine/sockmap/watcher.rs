//! The watcher thread of the sockmap engine: one `epoll_wait` over every
//! spliced socket, registered for `EPOLLRDHUP` only (ERR and HUP are
//! implicit) and edge-triggered, so it wakes at a connection's edges and
//! never for the bytes the kernel moves. It also drains the `EVENTS` ring
//! buffer, whose records name a socket whose verdict just started passing
//! bytes (its backstop budget ran out), and wakes that connection's task
//! at once.

use aya::maps::{MapData, RingBuf};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Extra bit in `Slot::events`: the program started passing bytes of this
/// socket (an `EVENTS` record), so userspace has copying to do.
pub const EV_PASS: u32 = 1 << 31;
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
    epfd: Arc<OwnedFd>,
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
        // Safety: plain syscall; the fd is owned right away.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // Safety: `fd` is a fresh fd nobody else owns.
        let epfd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: RING_TOKEN,
        };
        // Safety: live fds, valid event struct.
        if unsafe { libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, ring.as_raw_fd(), &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let slots: Arc<Mutex<Slots>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (e, s, st) = (epfd.clone(), slots.clone(), stop.clone());
        std::thread::Builder::new()
            .name("sockmap-watch".into())
            .spawn(move || {
                let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
                while !st.load(Ordering::Relaxed) {
                    // Safety: `evs` has room for the count passed.
                    let n = unsafe {
                        libc::epoll_wait(e.as_raw_fd(), evs.as_mut_ptr(), evs.len() as i32, 200)
                    };
                    for ev in evs.iter().take(n.max(0) as usize) {
                        let slots = s.lock().unwrap();
                        let wake = |token: u64, side: usize, bits: u32| {
                            if let Some(slot) = slots.by_token.get(&token) {
                                slot.events[side].fetch_or(bits, Ordering::AcqRel);
                                slot.notify.notify_one();
                            }
                        };
                        if ev.u64 != RING_TOKEN {
                            wake(ev.u64 >> 1, (ev.u64 & 1) as usize, ev.events);
                            continue;
                        }
                        while let Some(item) = ring.next() {
                            let Ok(b) = <[u8; 8]>::try_from(&item[..]) else {
                                continue;
                            };
                            if let Some(&(token, side)) =
                                slots.by_cookie.get(&u64::from_ne_bytes(b))
                            {
                                wake(token, side, EV_PASS);
                            }
                        }
                    }
                }
            })?;
        Ok(Watcher { epfd, slots, stop })
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
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLRDHUP | libc::EPOLLET) as u32,
                u64: (token << 1) | side as u64,
            };
            // Safety: live fds, valid event struct.
            let r = unsafe {
                libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, *fd, &mut ev)
            };
            if r != 0 {
                let e = io::Error::last_os_error();
                self.remove(token, fds, cookies);
                return Err(e);
            }
        }
        Ok(slot)
    }

    pub fn remove(&self, token: u64, fds: [RawFd; 2], cookies: [u64; 2]) {
        for fd in fds {
            // Safety: at worst ENOENT/EBADF, which we ignore.
            unsafe {
                libc::epoll_ctl(
                    self.epfd.as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    fd,
                    std::ptr::null_mut(),
                )
            };
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
