//! `wrap` and the confinement used by the suite cells: run a command as uid 65534 (which clears
//! its capabilities) and/or under a classic-BPF seccomp filter that refuses io_uring (and `bpf`)
//! with EPERM, the way Docker's default profile treats a container without CAP_SYS_ADMIN.

use crate::*;
use std::io::{self};
use std::os::unix::process::CommandExt;
use std::process::Command;
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

/// The seccomp program (classic BPF) for `which`: refused syscalls return EPERM, everything
/// else is allowed.
pub(crate) fn seccomp_filter(which: Seccomp) -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const ALLOW: u32 = 0x7FFF_0000;
    const ERRNO_EPERM: u32 = 0x0005_0000 | libc::EPERM as u32;
    let st = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    vec![
        st(LD_W_ABS, 0, 0, 4), // seccomp_data.arch
        st(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        st(RET_K, 0, 0, ALLOW),
        st(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        st(JEQ_K, 4, 0, 425),
        st(JEQ_K, 3, 0, 426),
        st(JEQ_K, 2, 0, 427),
        // bpf: refused only for UringBpf (otherwise compare against an impossible number).
        st(
            JEQ_K,
            1,
            0,
            if which == Seccomp::UringBpf {
                321
            } else {
                u32::MAX
            },
        ),
        st(RET_K, 0, 0, ALLOW),
        st(RET_K, 0, 0, ERRNO_EPERM),
    ]
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
        // Safety: the closure only makes async-signal-safe prctl() calls on memory captured
        // before fork; `filter` outlives the call.
        unsafe {
            cmd.pre_exec(move || {
                let prog = libc::sock_fprog {
                    len: filter.len() as u16,
                    filter: filter.as_ptr() as *mut _,
                };
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::prctl(
                        libc::PR_SET_SECCOMP,
                        libc::SECCOMP_MODE_FILTER,
                        &prog as *const libc::sock_fprog,
                    ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
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
