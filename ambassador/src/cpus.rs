//! How many CPUs this process may use: what `--workers auto` means.
//!
//! Two limits apply, and the smaller wins:
//!
//! - the **affinity mask** (`sched_getaffinity(2)`): `taskset -c 0`,
//!   `docker run --cpuset-cpus`, or a pinned systemd unit leave the process
//!   fewer CPUs than the host has;
//! - the **cgroup v2 CPU quota** (`cpu.max`, "QUOTA PERIOD" or "max
//!   PERIOD"): `docker run --cpus 1.5` writes "150000 100000", which lets
//!   the process run 1.5 CPUs' worth of time per period on any number of
//!   CPUs. More busy threads than that only get throttled, so the quota
//!   counts as ceil(quota / period) CPUs. Every cgroup from ours up to the
//!   root may set one; the smallest counts.
//!
//! The decision ([`count`]) is pure and unit-tested; [`available`] reads
//! the kernel's answers and hands them to it.

/// The CPU count for `affinity` CPUs in the mask and the `cpu.max` lines of
/// our cgroup and its ancestors (any order). At least 1.
pub fn count(affinity: usize, cpu_max: &[&str]) -> usize {
    let quota = cpu_max.iter().filter_map(|l| quota_cpus(l)).min();
    let n = match quota {
        Some(q) => affinity.min(q),
        None => affinity,
    };
    n.max(1)
}

/// One `cpu.max` line as a CPU count: ceil(quota / period); `None` for
/// "max …" (no quota) or a line that does not parse.
fn quota_cpus(line: &str) -> Option<usize> {
    let mut it = line.split_whitespace();
    let quota: u64 = it.next()?.parse().ok()?;
    let period: u64 = it.next()?.parse().ok()?;
    if period == 0 {
        return None;
    }
    usize::try_from(quota.div_ceil(period)).ok()
}

/// The CPUs this process may run on (see the module comment).
pub fn available() -> usize {
    let lines = cgroup_cpu_max();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    count(affinity(), &refs)
}

/// CPUs in this thread's affinity mask (the process's, at start-up); the
/// online CPUs if it cannot be read.
fn affinity() -> usize {
    // Safety: `set` is a plain bitmask the kernel fills; CPU_COUNT only
    // reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            return usize::try_from(libc::CPU_COUNT(&set)).unwrap_or(1);
        }
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The `cpu.max` of our cgroup v2 and of each of its ancestors (those that
/// exist; none on cgroup v1 or without /sys/fs/cgroup).
fn cgroup_cpu_max() -> Vec<String> {
    let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") else {
        return Vec::new();
    };
    // cgroup v2 is the line "0::/PATH".
    let Some(path) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
        return Vec::new();
    };
    let mut dir = std::path::PathBuf::from("/sys/fs/cgroup");
    dir.push(path.trim_start_matches('/'));
    let mut out = Vec::new();
    loop {
        if let Ok(l) = std::fs::read_to_string(dir.join("cpu.max")) {
            out.push(l);
        }
        if dir == std::path::Path::new("/sys/fs/cgroup") || !dir.pop() {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_alone() {
        assert_eq!(count(4, &[]), 4);
        assert_eq!(count(1, &["max 100000"]), 1);
        assert_eq!(count(8, &["max 100000\n"]), 8);
        assert_eq!(count(0, &[]), 1, "at least one worker");
    }

    #[test]
    fn quota_rounds_up_and_the_smallest_wins() {
        assert_eq!(count(8, &["150000 100000"]), 2);
        assert_eq!(count(8, &["100000 100000"]), 1);
        assert_eq!(count(8, &["50000 100000"]), 1);
        assert_eq!(
            count(8, &["max 100000", "300000 100000", "200000 100000"]),
            2
        );
        // The quota never raises the count above the mask.
        assert_eq!(count(2, &["400000 100000"]), 2);
    }

    #[test]
    fn odd_lines_are_no_quota() {
        assert_eq!(count(4, &["", "garbage", "100000 0", "100000"]), 4);
        assert_eq!(count(4, &["1 100000"]), 1);
    }
}
