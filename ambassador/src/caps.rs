//! Dropping privileges once they are no longer needed.
//!
//! Only start-up needs capabilities: loading the BPF program and creating its
//! maps (CAP_BPF + CAP_NET_ADMIN, or CAP_SYS_ADMIN) and binding ports below
//! 1024 (CAP_NET_BIND_SERVICE). Inserting sockets into a sockmap needs only
//! the map's file descriptor, which we already hold. So once every listener
//! is bound we clear the effective, permitted and inheritable sets: a
//! compromised ambassador cannot load BPF programs or bind new privileged
//! ports.

/// `capset(2)` with empty sets. Logs what was held and whether the drop
/// worked; never fails the process.
pub fn drop_all() {
    let held = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("CapEff:"))
                .map(|l| l["CapEff:".len()..].trim().to_string())
        })
        .unwrap_or_default();
    if held.chars().all(|c| c == '0') {
        return;
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data::default(); 2];
    // Safety: header and data are valid, correctly sized capset(2) arguments.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc == 0 {
        tracing::info!(was = %held, "capabilities dropped");
    } else {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not drop capabilities");
    }
}
