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
#![no_std]
#![no_main]

use ambassador_common::{DirCtrl, DirStats};
use aya_ebpf::{
    EbpfContext,
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
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
    let len = u64::from(ctx.len());
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
    // Safety: read-only view of a map value, valid for this run.
    let Some(ctrl) = (unsafe { CTRL.get(cookie) }) else {
        stats.passed_bytes += len;
        return SK_PASS;
    };
    if stats.passed_bytes != ctrl.forwarded || stats.redirected_bytes + len > ctrl.limit {
        if stats.passed_bytes == ctrl.forwarded {
            // First pass after redirecting: tell userspace. (If the ring is
            // full the event is lost; userspace also checks on a slow tick.)
            let _ = EVENTS.output::<u64>(&cookie, 0);
        }
        stats.passed_bytes += len;
        return SK_PASS;
    }
    // Returns SK_PASS when the skb was handed to the peer, SK_DROP when the
    // key is missing (then the bytes are gone, so count it loudly).
    if PEERS.redirect_skb(&ctx, &mut cookie, 0) == SK_PASS as i64 {
        stats.redirected_bytes += len;
        stats.redirected_segs += 1;
        SK_PASS
    } else {
        stats.misses += 1;
        SK_DROP
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
