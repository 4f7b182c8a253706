//! The kernel half of the sockmap engine: one `sk_skb/stream_verdict`
//! program that moves each received skb straight to the peer socket's send
//! path, so spliced bytes never reach userspace.
//!
//! Verdict-only mode (no stream parser): the kernel takes the strparser-free
//! `read_skb` path and calls us once per batch of received data on a socket
//! that is in `VERDICT`. Maps and layouts: `ambassador-common`.
//!
//! Per skb, in order:
//! 1. zero length (a FIN) -> `SK_DROP`. Redirecting it would make the peer's
//!    psock send 0 bytes, treat that as an error and set EPIPE on the peer.
//!    Userspace sees the FIN as EPOLLRDHUP and forwards it with `shutdown()`
//!    once the peer has drained.
//! 2. unknown socket (no `STATS`/`CTRL`) -> `SK_PASS` (bytes stay readable).
//! 3. over the in-flight budget, or userspace still owes the peer bytes it
//!    copied (pass mode) -> `SK_PASS`: the bytes wait in the source socket's
//!    receive buffer, charged to it, so TCP flow control pushes back. The
//!    first pass pushes the cookie to `EVENTS` to wake userspace.
//! 4. otherwise redirect to `PEERS[cookie]` (egress, flags 0) and count.
//!    The redirect that carries the count past `CTRL.wake` pushes the
//!    cookie to `EVENTS`: a resting connection's userspace wakes up.
//!
//! Before 3 and 4, an skb that starts before the end of the previous one
//! (a partly old retransmission TCP queued whole: `tcp_read_skb` hands skbs
//! over without skipping what was already consumed) is cut down to its new
//! bytes, so they are never handed on twice. The first skb after the insert
//! is measured against the socket's `copied_seq` (where userspace stopped
//! reading), every later one against the end of the one before. An skb that
//! cannot be mended that way is dropped and counted (the engine resets the
//! connection). The cut happens last, after the verdict is decided, because
//! each exit of the bounded cut loop makes the verifier walk whatever follows
//! it. See docs/sockmap.md, "Overlapping skbs".
#![no_std]
#![no_main]

use ambassador_common::{DirCtrl, DirStats, SEQ_TRACKING, SEQ_UNAVAILABLE};
use aya_ebpf::{
    EbpfContext,
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::{bpf_get_socket_cookie, bpf_probe_read_kernel},
    macros::{map, stream_verdict},
    maps::{HashMap, RingBuf, SockHash},
    programs::SkBuffContext,
};

// Map capacities are placeholders: the loader sets the real size with
// `EbpfLoader::set_max_entries` before creating the maps.
const N: u32 = ambassador_common::DEFAULT_MAX_SOCKETS;
/// `BPF_F_NO_PREALLOC`: the hash maps only hold live connections; don't
/// reserve memory for the whole capacity up front.
const NO_PREALLOC: u32 = 1;

/// Set to 1 by the loader when it may read kernel memory (CAP_PERFMON or
/// CAP_SYS_ADMIN): then overlapping skbs are cut. A read-only global, so the
/// verifier sees the value and does not even check the branch it turns off
/// (without the capability, `bpf_probe_read_kernel` would fail the load).
#[unsafe(no_mangle)]
static TRIM: u8 = 0;

/// Where `struct sock *sk` sits in `struct sk_buff`, and `copied_seq` in
/// `struct tcp_sock`, from the running kernel's BTF (set by the loader; 0:
/// unknown). With them the first skb after the insert is judged against the
/// socket's own `copied_seq` (where its unread bytes start; `tcp_eat_skb`
/// moves it only after the verdict), not trusted.
#[unsafe(no_mangle)]
static SKB_SK: u32 = 0;
#[unsafe(no_mangle)]
static TCP_COPIED_SEQ: u32 = 0;

/// Offset of `cb` in `struct sk_buff` on 64-bit kernels (next, prev,
/// dev = 24; sk = 8; tstamp = 8) since 4.x; `TCP_SKB_CB(skb)->seq` and
/// `end_seq` are its first two `u32`. Checked on every skb: `end_seq - seq`
/// must be the skb's length (+1 with a FIN), or the socket stops trimming.
const SKB_CB: usize = 40;
/// What `overlap()` returns for an skb that neither follows on nor can be
/// cut into shape (never a real cut: those are at most 393,120 bytes).
const ANOMALY: u32 = u32::MAX;
/// `bpf_skb_adjust_room` removes at most 4,095 bytes a call.
const CUT_STEP: u32 = 4095;
/// Calls per skb: 96 x 4,095 = 393,120 bytes. A spurious loss probe resends
/// one segment (up to 64 KiB on loopback), but the socket backlog can merge
/// several before the skb reaches us (overlaps of 255,735 bytes were seen).
/// A larger overlap is an anomaly.
const CUT_CALLS: u32 = 96;

/// Source cookie -> destination socket. No program attached.
#[map(name = "PEERS")]
static PEERS: SockHash<u64> = SockHash::with_max_entries(N, 0);

/// Own cookie -> own socket. The verdict program is attached to this map.
#[map(name = "VERDICT")]
static VERDICT: SockHash<u64> = SockHash::with_max_entries(N, 0);

/// Source cookie -> counters (written here only).
#[map(name = "STATS")]
static STATS: HashMap<u64, DirStats> = HashMap::with_max_entries(N, NO_PREALLOC);

/// Source cookie -> budget and pass-mode handshake (written by userspace only).
#[map(name = "CTRL")]
static CTRL: HashMap<u64, DirCtrl> = HashMap::with_max_entries(N, NO_PREALLOC);

/// Cookies of sockets that just switched to passing: wakes userspace.
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(ambassador_common::EVENTS_BYTES, 0);

#[stream_verdict]
pub fn verdict(ctx: SkBuffContext) -> u32 {
    let len = ctx.len();
    // Safety: the helper only reads the skb the kernel handed us.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(stats) = STATS.get_ptr_mut(cookie) else {
        return if len == 0 { SK_DROP } else { SK_PASS };
    };
    // Safety: `stats` points into a map value that stays valid for this
    // program run. Verdicts for one socket run under its socket lock, so
    // these plain read-modify-writes never race with each other.
    let stats = unsafe { &mut *stats };
    if len == 0 {
        stats.zero_len += 1;
        return SK_DROP;
    }
    // Safety: a volatile read of our own read-only global.
    let cut = if unsafe { core::ptr::read_volatile(&TRIM) } == 1 {
        overlap(&ctx, stats, len)
    } else {
        0
    };
    if cut == ANOMALY {
        // Bytes that may repeat (or skip) what was handed on: hand on none
        // of them. The count resets the connection.
        return SK_DROP;
    }
    let keep = u64::from(len - cut);
    let action = decide(&ctx, stats, &mut cookie, keep);
    if cut == 0 {
        return action;
    }
    if trim(&ctx, cut) {
        stats.trimmed_bytes += u64::from(cut);
        stats.trimmed_segs += 1;
        action
    } else {
        // Partly cut: neither copy of the bytes is right. Drop and count it
        // as a miss, which makes the engine reset the connection.
        stats.misses += 1;
        SK_DROP
    }
}

/// Steps 3 and 4 for an skb that will carry `keep` bytes: pass or redirect.
fn decide(ctx: &SkBuffContext, stats: &mut DirStats, cookie: &mut u64, keep: u64) -> u32 {
    // Safety: read-only view of a map value, valid for this run.
    let Some(ctrl) = (unsafe { CTRL.get(*cookie) }) else {
        stats.passed_bytes += keep;
        return SK_PASS;
    };
    if stats.passed_bytes != ctrl.forwarded || stats.redirected_bytes + keep > ctrl.limit {
        if stats.passed_bytes == ctrl.forwarded {
            // First pass after redirecting: tell userspace. (If the ring is
            // full the event is lost; userspace also checks on a slow tick.)
            let _ = EVENTS.output::<u64>(cookie, 0);
        }
        stats.passed_bytes += keep;
        return SK_PASS;
    }
    // Returns SK_PASS when the skb was handed to the peer, SK_DROP when the
    // key is missing (then the bytes are gone, so count it loudly). It only
    // records the target: the skb moves after the program returns, so a cut
    // made after this call is what the peer gets.
    if PEERS.redirect_skb(ctx, &mut *cookie, 0) == SK_PASS as i64 {
        if stats.redirected_bytes <= ctrl.wake && stats.redirected_bytes + keep > ctrl.wake {
            // A resting connection moved: wake userspace (a lost event is
            // caught by its slow safety tick).
            let _ = EVENTS.output::<u64>(cookie, 0);
        }
        stats.redirected_bytes += keep;
        stats.redirected_segs += 1;
        SK_PASS
    } else {
        stats.misses += 1;
        SK_DROP
    }
}

/// How many bytes at the head of this skb were already handed on: the
/// distance from its `seq` back to where the previous skb ended (or, for
/// the first skb after the insert, to the socket's `copied_seq`). Keeps
/// `next_seq` up to date. 0 when nothing overlaps or it cannot tell;
/// [`ANOMALY`] when the skb does not follow on in a way a cut can mend.
fn overlap(ctx: &SkBuffContext, stats: &mut DirStats, len: u32) -> u32 {
    if stats.seq_state == SEQ_UNAVAILABLE {
        return 0;
    }
    let cb = (ctx.as_ptr() as *const u8).wrapping_add(SKB_CB) as *const [u32; 2];
    // Safety: reads 8 bytes of the skb the kernel handed us; a failed read
    // is an error value, never a fault.
    let Ok([seq, end_seq]) = (unsafe { bpf_probe_read_kernel(cb) }) else {
        stats.seq_state = SEQ_UNAVAILABLE;
        return 0;
    };
    let span = end_seq.wrapping_sub(seq);
    if span != len && span != len + 1 {
        stats.seq_state = SEQ_UNAVAILABLE;
        // For the engine's error line: by how much they differed.
        stats.next_seq = len.wrapping_sub(span);
        return 0;
    }
    let tracking = stats.seq_state == SEQ_TRACKING;
    let expected = if tracking {
        stats.next_seq
    } else {
        match copied_seq(ctx) {
            Some(c) => c,
            None => {
                stats.next_seq = end_seq;
                stats.seq_state = SEQ_TRACKING;
                return 0;
            }
        }
    };
    stats.next_seq = end_seq;
    stats.seq_state = SEQ_TRACKING;
    let behind = expected.wrapping_sub(seq);
    if behind == 0 {
        return 0;
    }
    // Ahead of `expected` (a gap, "negative" in sequence space), entirely
    // old, or more than the cut can take: flag it, and it is dropped.
    if behind > u32::MAX / 2 || behind >= len || behind > CUT_STEP * CUT_CALLS {
        stats.seq_anomalies += 1;
        return ANOMALY;
    }
    behind
}

/// The socket's `copied_seq`, if the loader found where to read it.
fn copied_seq(ctx: &SkBuffContext) -> Option<u32> {
    // Safety: volatile reads of our own read-only globals.
    let (sk_off, seq_off) = unsafe {
        (
            core::ptr::read_volatile(&SKB_SK),
            core::ptr::read_volatile(&TCP_COPIED_SEQ),
        )
    };
    if sk_off == 0 || seq_off == 0 {
        return None;
    }
    let skp = (ctx.as_ptr() as *const u8).wrapping_add(sk_off as usize) as *const u64;
    // Safety: probe reads of kernel memory; a failed read is an error
    // value, never a fault.
    let sk = unsafe { bpf_probe_read_kernel(skp) }.ok()?;
    if sk == 0 {
        return None;
    }
    let seqp = (sk as usize).wrapping_add(seq_off as usize) as *const u32;
    unsafe { bpf_probe_read_kernel(seqp) }.ok()
}

/// Remove `cut` bytes (at most `CUT_STEP * CUT_CALLS`) from the head.
fn trim(ctx: &SkBuffContext, cut: u32) -> bool {
    let mut left = cut;
    for _ in 0..CUT_CALLS + 1 {
        if left == 0 {
            return true;
        }
        let step = if left > CUT_STEP { CUT_STEP } else { left };
        if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
            return false;
        }
        left -= step;
    }
    left == 0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
