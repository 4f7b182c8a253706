//! `wrap` and the confinement used by the suite cells: run a command as uid 65534 (which clears
//! its capabilities) and/or under a classic-BPF seccomp filter that refuses io_uring (and `bpf`)
//! with EPERM, the way Docker's default profile treats a container without CAP_SYS_ADMIN.

use crate::*;
use std::io::{self};
use std::os::unix::process::CommandExt;
use std::process::Command;

use ambassador_test_support::seccomp;
// `wrap`: run a command unprivileged and/or under seccomp.

/// Which syscalls the seccomp wrapper refuses.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Seccomp {
    Off,
    /// io_uring_setup/enter/register (425-427) fail with EPERM.
    Uring,
    /// io_uring and bpf (321) fail with EPERM: what Docker's default profile does to a
    /// container without CAP_SYS_ADMIN/CAP_BPF.
    UringBpf,
}

/// The seccomp filter for `which` (built by `ambassador_test_support::seccomp` with the
/// `seccompiler` crate, which checks the architecture first): refused syscalls return EPERM,
/// everything else is allowed.
pub(crate) fn seccomp_filter(which: Seccomp) -> io::Result<seccomp::Filter> {
    match which {
        Seccomp::Off => seccomp::deny(&[]),
        Seccomp::Uring => seccomp::deny(seccomp::IO_URING),
        Seccomp::UringBpf => seccomp::deny(&[seccomp::IO_URING, seccomp::BPF].concat()),
    }
}

/// Apply the wrapper options to `cmd`: `nonroot` switches to uid/gid 65534 (setuid from root
/// clears the permitted, effective and ambient capability sets); `seccomp` installs the filter
/// above right before exec.
pub(crate) fn confine(cmd: &mut Command, nonroot: bool, seccomp: Seccomp) {
    if nonroot {
        // std calls setgroups(0) before setuid when running as root.
        cmd.uid(65534).gid(65534);
    }
    if seccomp != Seccomp::Off {
        let filter = seccomp_filter(seccomp);
        // Safety: `apply` makes two syscalls (prctl, seccomp) on memory built before fork.
        unsafe {
            cmd.pre_exec(move || match &filter {
                Ok(f) => f.apply(),
                Err(e) => Err(io::Error::other(e.to_string())),
            });
        }
    }
}

pub(crate) fn wrap(args: &WrapArgs) -> Res<()> {
    let argv = &args.argv;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    let seccomp = if args.seccomp {
        Seccomp::UringBpf
    } else if args.seccomp_uring {
        Seccomp::Uring
    } else {
        Seccomp::Off
    };
    confine(&mut cmd, args.nonroot, seccomp);
    Err(format!("exec {}: {}", argv[0], cmd.exec()))
}
