//! Boot one kernel + initramfs under qemu and return its console.
//!
//! TCG, not KVM: `/dev/kvm` on this machine kind is a nested "PVM" flavour that cannot run stock
//! kernels (6.1 hangs in the decompressor, 6.12 stops with "KVM internal error"; see
//! docs/kernels.md). The ELF vmlinux is booted directly through its PVH entry.
//! `panic=-1` + `-no-reboot` turn a guest panic into a qemu exit; the deadline covers a hang.

use anyhow::{Context, Result};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Console {
    pub text: String,
    pub timed_out: bool,
    pub elapsed: Duration,
}

pub fn boot(vmlinux: &Path, initrd: &Path, deadline: Duration) -> Result<Console> {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "768", "-smp", "2"])
        .arg("-kernel")
        .arg(vmlinux)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1 loglevel=1"])
        .args([
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-nodefaults",
            "-no-reboot",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let t0 = Instant::now();
    let mut timed_out = false;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if t0.elapsed() > deadline {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let raw = reader.join().unwrap_or_default();
    let text = String::from_utf8_lossy(&raw).replace('\r', "");
    Ok(Console {
        text,
        timed_out,
        elapsed: t0.elapsed(),
    })
}
