//! A private network namespace for one test: loopback only, with its own TCP settings.
//!
//! Some tests need the network stack in a state the host must not be put in: tiny TCP buffers
//! (so a few megabytes fill every queue), TCP timestamps off (so a hand-made segment needs no
//! options). [`private_netns`] moves the calling thread into a new network namespace
//! (`unshare(CLONE_NEWNET)`), brings its loopback up and writes the given `net.*` sysctls there.
//!
//! Set-up and teardown are both the kernel's:
//!
//! - everything the thread starts afterwards (threads, child processes such as the proxy
//!   under test) is born inside the namespace and sees only its loopback, so the test's sockets
//!   and the proxy's meet there and nowhere else;
//! - `/proc/sys/net` is the namespace of the task that opens it, so the sysctls change the
//!   namespace's copy, never the host's;
//! - there is nothing to remove: the namespace goes away with the last task in it, also when the
//!   test panics. Call it at most once per test thread (each test of a harness runs on its own
//!   thread, and the thread ends with the test).
//!
//! It needs CAP_SYS_ADMIN (the tests run as root) and the `ip` command (iproute2).

use std::process::Command;

/// Move this thread (and what it starts) into a new network namespace with loopback up, then
/// write each `(name, value)` to `/proc/sys/net/NAME` there (for instance
/// `("ipv4/tcp_timestamps", "0")`). Panics naming the step that failed.
pub fn private_netns(sysctls: &[(&str, &str)]) {
    // Safety: plain syscall; affects only the calling thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    let st = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("ip (apt-get install iproute2)");
    assert!(st.success(), "ip link set lo up: {st}");
    for (name, value) in sysctls {
        let path = format!("/proc/sys/net/{name}");
        std::fs::write(&path, value).unwrap_or_else(|e| panic!("{path} = {value}: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In the new namespace the sysctl has the value written, and the host's is untouched
    /// (read through a thread that stayed outside).
    #[test]
    fn the_namespace_is_private_and_set() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let f = "/proc/sys/net/ipv4/tcp_timestamps";
        let host_before = std::fs::read_to_string(f).unwrap();
        let host_before_copy = host_before.clone();
        let inside = std::thread::spawn(move || {
            let want = if host_before.trim() == "0" { "1" } else { "0" };
            private_netns(&[("ipv4/tcp_timestamps", want)]);
            (want, std::fs::read_to_string(f).unwrap())
        })
        .join()
        .unwrap();
        let (want, got) = inside;
        assert_eq!(got.trim(), want);
        let host_after = std::fs::read_to_string(f).unwrap();
        if host_after.trim() == want {
            // Put the host back before failing.
            let _ = std::fs::write(f, host_before_copy.trim());
            panic!("the host's tcp_timestamps was changed");
        }
    }
}
