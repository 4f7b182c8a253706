//! Free TCP ports on loopback.
//!
//! The kernel picks a free port when a socket binds port 0; reading it back and closing the
//! socket gives a port that is free *now*. Another process may take it before the test binds it
//! (a small race that tests accept, or retry). To get several distinct ports, hold every socket
//! until all are known: [`free_ports`] does, so the kernel cannot hand out one port twice.

use std::io;
use std::net::TcpListener;

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    free_ports::<1>().expect("bind 127.0.0.1:0")[0]
}

/// `N` distinct free TCP ports on 127.0.0.1.
pub fn free_ports<const N: usize>() -> io::Result<[u16; N]> {
    let mut held = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for p in ports.iter_mut() {
        let l = TcpListener::bind("127.0.0.1:0")?;
        *p = l.local_addr()?.port();
        held.push(l);
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ports_are_distinct() {
        let p = super::free_ports::<3>().unwrap();
        assert!(p[0] != p[1] && p[1] != p[2] && p[0] != p[2]);
    }
}
