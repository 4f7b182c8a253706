//! Dropping privileges once they are no longer needed.
//!
//! Only start-up needs capabilities: loading the BPF program and creating its
//! maps (CAP_BPF + CAP_NET_ADMIN, or CAP_SYS_ADMIN) and binding ports below
//! 1024 (CAP_NET_BIND_SERVICE). Inserting sockets into a sockmap needs only
//! the map's file descriptor, which we already hold. So once every listener
//! is bound we clear the ambient, inheritable, effective and permitted sets:
//! a compromised ambassador cannot load BPF programs or bind new privileged
//! ports.
//!
//! The sets are read and written with `capget(2)`/`capset(2)` (the `caps`
//! crate), never by parsing `/proc/self/status`: a `/proc` that cannot be
//! read must not look like "nothing to drop". After the drop the sets are
//! read back, and if they are not empty (or cannot be read) start-up fails:
//! running with privileges we meant to give up is worse than not running.

use caps::{CapSet, CapsHashSet};

/// The sets that must end up empty, in the order they are cleared: the
/// effective set before the permitted one (the kernel refuses an effective
/// set that is not a subset of the permitted set).
const DROP_ORDER: [CapSet; 4] = [
    CapSet::Ambient,
    CapSet::Inheritable,
    CapSet::Effective,
    CapSet::Permitted,
];

/// What was held before the drop (effective or permitted), as the hex mask
/// `/proc/<pid>/status` shows, for the log line; `None` if nothing was.
pub struct Dropped(pub Option<String>);

/// Clear every capability set of this thread (the only thread at this
/// point that serves connections), then verify the effective and permitted
/// sets are empty (the kernel keeps the ambient set inside the permitted
/// one, so it is empty too). Err is one line for the operator.
pub fn drop_all() -> Result<Dropped, String> {
    let before = read(CapSet::Effective)?;
    let held_permitted = read(CapSet::Permitted)?;
    for set in DROP_ORDER {
        caps::clear(None, set).map_err(|e| format!("cannot drop capabilities ({set:?}): {e}"))?;
    }
    for set in [CapSet::Effective, CapSet::Permitted] {
        let left = read(set)?;
        if !left.is_empty() {
            return Err(format!(
                "cannot drop capabilities: {set:?} set still holds {}",
                names(&left)
            ));
        }
    }
    let mask: u64 = before
        .union(&held_permitted)
        .map(|c| c.bitmask())
        .fold(0, |a, b| a | b);
    let held = (mask != 0).then(|| format!("{mask:016x}"));
    Ok(Dropped(held))
}

fn read(set: CapSet) -> Result<CapsHashSet, String> {
    caps::read(None, set).map_err(|e| format!("cannot verify capabilities ({set:?}): {e}"))
}

/// `CAP_BPF,CAP_NET_ADMIN`, sorted, for logs.
fn names(set: &CapsHashSet) -> String {
    let mut v: Vec<String> = set.iter().map(|c| c.to_string()).collect();
    v.sort();
    v.join(",")
}
